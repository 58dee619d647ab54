"""Scaling laws of downstream error over LLM size N and visual tokens V.

`laws` (law forms, robust fit with bootstrap intervals), `tables` (results tables in and out), `solvers`
(batched L-BFGS), `frontier` (compute-optimal (N, V) at an inference budget), `report` (text), `plots` (PNGs).
The names below are the surface most callers need.
"""

from vlm_jax.scaling import frontier, laws, report, solvers, tables
from vlm_jax.scaling.laws import (ADDITIVE, LAW_FORMS, MULTIPLICATIVE, Estimate, FitResult, LawForm, fit_law,
                                  get_form, synthetic_table)
from vlm_jax.scaling.tables import ScalingTable, load_tables, tables_from_rows

__all__ = ["ADDITIVE", "LAW_FORMS", "MULTIPLICATIVE", "Estimate", "FitResult", "LawForm", "ScalingTable", "fit_law",
           "frontier", "get_form", "laws", "load_tables", "report", "solvers", "synthetic_table", "tables",
           "tables_from_rows"]
