"""Scaling laws of downstream error over LLM size N and visual tokens V.

`laws` (law forms, robust fit with bootstrap intervals), `tables` (results tables in and out, seeds kept),
`resampling` (each cell's noise and weight; the two-level bootstrap over cells and seeds), `solvers` (batched
L-BFGS), `identification` (which parameters the data pin down), `frontier` (compute-optimal (N, V) at an inference
budget), `decision` (V*, N* per budget and P(beta_a > beta_b)), `report` (text, summary.json), `plots` (PNGs),
`units` (27K, 1.8B, 3.2 GFLOPs). The names below are the surface most callers need.
"""

from vlm_jax.scaling import decision, frontier, identification, laws, report, resampling, solvers, tables, units
from vlm_jax.scaling.laws import (ADDITIVE, LAW_FORMS, MULTIPLICATIVE, Estimate, FitResult, LawForm, fit_law,
                                  get_form, synthetic_table)
from vlm_jax.scaling.tables import ScalingTable, load_tables, tables_from_rows

__all__ = ["ADDITIVE", "LAW_FORMS", "MULTIPLICATIVE", "Estimate", "FitResult", "LawForm", "ScalingTable", "decision",
           "fit_law", "frontier", "get_form", "identification", "laws", "load_tables", "report", "resampling",
           "solvers", "synthetic_table", "tables", "tables_from_rows", "units"]
