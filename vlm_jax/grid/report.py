"""After the cells: the error table per task (mean and spread over seeds), the law fitted per task, summary.json,
report.txt and the PNGs. report.txt and summary.json open with the decision (V*, N* per budget, P(beta_a >
beta_b)); a fit that fails is recorded under its (task, form) and the rest are kept."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence

import numpy as np

from vlm_jax import files, scaling
from vlm_jax.grid import adaptive, results
from vlm_jax.scaling import units


def _seed_errors(rows: Sequence[dict]) -> dict:
    """{task: {llm: {V: [error per seed]}}}: rows of one seed (several benchmarks) averaged, in the rows' order."""
    by_seed: dict = {}
    for r in rows:
        cell = by_seed.setdefault(r["task"], {}).setdefault(r["llm"], {}).setdefault(int(r["visual_tokens"]), {})
        cell.setdefault(str(r.get("seed", "")), []).append(r["error"])
    return {t: {llm: {v: [float(np.mean(e)) for e in seeds.values()] for v, seeds in by_v.items()}
                for llm, by_v in by_llm.items()} for t, by_llm in by_seed.items()}


def error_table(rows: Sequence[dict]) -> dict:
    """{task: {llm: {V: error}}} (mean over seeds), in the rows' order."""
    return {t: {llm: {v: float(np.mean(e)) for v, e in by_v.items()} for llm, by_v in by_llm.items()}
            for t, by_llm in _seed_errors(rows).items()}


def seed_spread(rows: Sequence[dict]) -> dict:
    """{task: {llm: {V: {mean, std, min, max, seeds}}}}: each cell across its seeds (std null with one seed)."""
    return {t: {llm: {v: {"mean": float(np.mean(e)), "std": float(np.std(e, ddof=1)) if len(e) > 1 else None,
                          "min": float(np.min(e)), "max": float(np.max(e)), "seeds": len(e)}
                      for v, e in by_v.items()} for llm, by_v in by_llm.items()}
            for t, by_llm in _seed_errors(rows).items()}


TRAINING = {"per-V": "per-V models: one per LLM, V and seed",
            "elastic-mqt": "elastic-mqt models: one per LLM and seed, trained at a random V of the set each step, "
                           "evaluated at every V",
            "elastic-m3": "elastic-m3 models: one per LLM and seed, trained on the mean loss over every V of the set, "
                          "evaluated at every V"}


def training_of(rows: Sequence[dict]) -> str:
    """How the rows' models were trained ('per-V' for rows without the column: the per-V grid writes none)."""
    kinds = sorted({r.get("training", "per-V") for r in rows})
    return "+".join(kinds)


def plot_observed(table: dict, n_params: dict, path: str, spread: dict | None = None, training: str = "per-V") -> str:
    """One heatmap per task of the measured error over (N, V) (mean over seeds, with the std across seeds below
    each mean when there are several): the token-vs-params error surface as measured."""
    from matplotlib.figure import Figure

    from vlm_jax.scaling import plots

    tasks = list(table)
    fig = Figure(figsize=(4.8 * len(tasks), 4.0), dpi=120, layout="constrained")
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        llms = list(table[task])
        vs = sorted({v for by_v in table[task].values() for v in by_v})
        grid = np.array([[table[task][llm].get(v, np.nan) for v in vs] for llm in llms])
        im = ax.imshow(grid, origin="lower", cmap="viridis_r", vmin=0, vmax=max(1e-3, np.nanmax(grid)),
                       aspect="auto")
        several = False
        for (a, b), e in np.ndenumerate(grid):
            if np.isfinite(e):
                cell = (spread or {}).get(task, {}).get(llms[a], {}).get(vs[b], {})
                std = cell.get("std")
                several |= std is not None
                text = f"{e:.2f}" + (f"\n±{std:.2f}" if std is not None else "")
                ax.text(b, a, text, ha="center", va="center", color="white" if e > 0.5 * np.nanmax(grid)
                        else "black", fontsize=9 if std is None else 8)
        ax.set_xticks(range(len(vs)), [str(v) for v in vs])
        ax.set_yticks(range(len(llms)), [f"{llm}\n{units.params(n_params[llm])}" for llm in llms])
        ax.set_xlabel("visual tokens V")
        ax.set_ylabel("LLM (parameters N)")
        ax.set_title(f"{task}: measured error" + (" (mean ± std over seeds)" if several else " (one seed)")
                     + f"\n{training} models", fontsize=10)
        fig.colorbar(im, ax=ax, label="error")
    return plots.save(fig, path)


def write_report(grid_dir: str, jobs, fit_cfg, echo=print) -> dict:
    """Rebuild results.jsonl, fit every task, write summary.json, report.txt and plots/; returns the summary.
    Where no cell of this config has finished, but some finished under another spec (the config, or the grid's
    folder, changed since they ran), the table there is left as it is: it may be all that is left of them."""
    path = os.path.join(grid_dir, "results.jsonl")
    rows, stale = results.table_rows(jobs)
    if rows or not stale:
        results.write_rows(path, rows)
    if not rows:
        echo("no finished cell yet: nothing to fit" + (
            f"; {stale} cell(s) finished under another spec (the config, or the grid's folder: its cells' paths "
            f"are part of each job), so {path} is left as it was. `python -m launch.fit --results={path}` fits "
            f"that table" if stale else ""))
        return {}
    return report_rows(grid_dir, rows, fit_cfg, echo, jobs)


def report_rows(grid_dir: str, rows: Sequence[dict], fit_cfg, echo=print, jobs=()) -> dict:
    """summary.json, report.txt and plots/ of the results rows (fit_cfg: forms, text_tokens, bootstrap, seed,
    level); returns the summary. report.txt opens with how the models were trained and the decision, then the
    measured table, then each fit; an elastic grid's `jobs` add the adaptive-V section (grid/adaptive.py)."""
    n_params = {r["llm"]: r["n_params"] for r in rows}
    table = error_table(rows)
    spread = seed_spread(rows)
    training = training_of(rows)
    text = io.StringIO()

    def both(line: str) -> None:
        echo(line)
        text.write(line + "\n")

    plot_dir = os.path.join(grid_dir, "plots")   # a bucket's too: figures go through scaling.plots.save
    plots = [plot_observed(table, n_params, os.path.join(plot_dir, "observed_error.png"), spread, training)]
    try:
        routed = adaptive.report(jobs, rows, table, n_params, plot_dir, training)
    except Exception as e:  # noqa: BLE001  (the table and the fits stand without it)
        routed = {"json": {"error": f"{type(e).__name__}: {e}"}, "plots": [],
                  "lines": [f"ADAPTIVE V: failed: {type(e).__name__}: {e}"]}
    try:
        tables = scaling.tables_from_rows(rows, source=os.path.join(grid_dir, "results.jsonl"))
        fitted = scaling.report.fit_tables(
            tables, list(fit_cfg.forms), text_tokens=tuple(fit_cfg.text_tokens), n_bootstrap=fit_cfg.bootstrap,
            seed=fit_cfg.seed, level=fit_cfg.level, plot_dir=plot_dir, echo=both,
            v_range=(1.0, float(max(r["visual_tokens"] for r in rows))), overlays=routed.get("overlays"),
            observed=f"the grid's {TRAINING.get(training, training)}\n\n" + scaling.report.format_observed(tables))
    except Exception as e:  # noqa: BLE001  (the means still stand; each fit's own failure is caught inside)
        both(f"DECISION: none -- no fit: {type(e).__name__}: {e}\n\nthe grid's {TRAINING.get(training, training)}"
             "\nmean error (over seeds) per task, LLM and V:")
        for task, by_llm in table.items():
            for llm, by_v in by_llm.items():
                both(f"  {task} {llm} ({units.params(n_params[llm])}): "
                     + ", ".join(f"V={v} {e:.3f}" for v, e in sorted(by_v.items())))
        fitted = {"decision": {"error": f"{type(e).__name__}: {e}"}, "fits": {}}
    fits = fitted["fits"]
    if routed:
        both("")
        for line in routed["lines"]:
            both(line)
    summary = {"decision": fitted["decision"], "training": training, "cells": len({r["cell"] for r in rows}),
               "seeds": sorted({str(r.get("seed", "")) for r in rows}), "errors": table, "seed_spread": spread,
               "n_params": n_params, "fits": fits,
               "plots": plots + routed.get("plots", [])
               + [p for forms in fits.values() for f in forms.values() for p in f.get("plots", [])]}
    if routed:
        summary["adaptive_v"] = routed["json"]
    summary = scaling.report.json_safe(summary)
    # Written here rather than by files.write_json_atomic, which sorts keys: the decision stays first.
    files.write_text_atomic(os.path.join(grid_dir, "summary.json"),
                            json.dumps(summary, indent=1, allow_nan=False) + "\n")
    files.write_text_atomic(os.path.join(grid_dir, "report.txt"), text.getvalue())
    return summary
