"""After the cells: the error table per task, the law fitted per task, summary.json, report.txt and the PNGs."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from etils import epath

from vlm_jax import files, scaling
from vlm_jax.grid import results


def error_table(rows: Sequence[dict]) -> dict:
    """{task: {llm: {V: error}}} (mean over seeds), in the rows' order."""
    table: dict = {}
    for r in rows:
        table.setdefault(r["task"], {}).setdefault(r["llm"], {}).setdefault(int(r["visual_tokens"]), []).append(
            r["error"])
    return {t: {llm: {v: float(np.mean(e)) for v, e in by_v.items()} for llm, by_v in by_llm.items()}
            for t, by_llm in table.items()}


def format_error_table(table: dict, n_params: dict) -> str:
    lines = []
    for task, by_llm in table.items():
        vs = sorted({v for by_v in by_llm.values() for v in by_v})
        lines.append(f"error of task {task!r} (rows: LLM, N; columns: V)")
        lines.append(f"  {'LLM':<14}{'N':>10}" + "".join(f"{f'V={v}':>9}" for v in vs))
        for llm, by_v in by_llm.items():
            lines.append(f"  {llm:<14}{n_params[llm]:>10,}" + "".join(
                f"{by_v[v]:>9.3f}" if v in by_v else f"{'-':>9}" for v in vs))
    return "\n".join(lines)


def plot_observed(table: dict, n_params: dict, path: str) -> str:
    """One heatmap per task of the measured error over (N, V): the token-vs-params error surface as measured."""
    from matplotlib.figure import Figure

    tasks = list(table)
    fig = Figure(figsize=(4.8 * len(tasks), 4.0), dpi=120, layout="constrained")
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        llms = list(table[task])
        vs = sorted({v for by_v in table[task].values() for v in by_v})
        grid = np.array([[table[task][llm].get(v, np.nan) for v in vs] for llm in llms])
        im = ax.imshow(grid, origin="lower", cmap="viridis_r", vmin=0, vmax=max(1e-3, np.nanmax(grid)),
                       aspect="auto")
        for (a, b), e in np.ndenumerate(grid):
            if np.isfinite(e):
                ax.text(b, a, f"{e:.2f}", ha="center", va="center", color="white" if e > 0.5 * np.nanmax(grid)
                        else "black", fontsize=9)
        ax.set_xticks(range(len(vs)), [str(v) for v in vs])
        ax.set_yticks(range(len(llms)), [f"{llm}\n{n_params[llm] / 1e6:.2g}M" for llm in llms])
        ax.set_xlabel("visual tokens V")
        ax.set_ylabel("LLM (parameters N)")
        ax.set_title(f"{task}: measured error")
        fig.colorbar(im, ax=ax, label="error")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    return path


def _upload(local: str, folder: str) -> None:
    dst = epath.Path(folder) / os.path.basename(local)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(epath.Path(local).read_bytes())


def write_report(grid_dir: str, jobs, fit_cfg, echo=print) -> dict:
    """Rebuild results.jsonl, fit every task, write summary.json, report.txt and plots/; returns the summary."""
    rows = results.write_table(os.path.join(grid_dir, "results.jsonl"), jobs)
    if not rows:
        echo("no finished cell yet: nothing to fit")
        return {}
    n_params = {r["llm"]: r["n_params"] for r in rows}
    table = error_table(rows)
    text = io.StringIO()

    def both(line: str) -> None:
        echo(line)
        text.write(line + "\n")

    both(format_error_table(table, n_params))
    # Figures are drawn into a local folder; a bucket grid gets copies (matplotlib writes local files).
    plot_dir = tempfile.mkdtemp(prefix="grid-plots-") if files.is_remote(grid_dir) else os.path.join(grid_dir,
                                                                                                       "plots")
    plots = [plot_observed(table, n_params, os.path.join(plot_dir, "observed_error.png"))]
    fits: dict = {}
    tables = scaling.tables_from_rows(rows, source=os.path.join(grid_dir, "results.jsonl"))
    try:
        fits = scaling.report.fit_tables(
            tables, list(fit_cfg.forms), text_tokens=tuple(fit_cfg.text_tokens), n_bootstrap=fit_cfg.bootstrap,
            seed=fit_cfg.seed, level=fit_cfg.level, plot_dir=plot_dir, echo=both,
            v_range=(1.0, float(max(r["visual_tokens"] for r in rows))))
    except ValueError as e:  # too few cells for a law (e.g. --only one cell): the table still stands
        both(f"no fit: {e}")
    if files.is_remote(grid_dir):
        remote = os.path.join(grid_dir, "plots")
        for name in sorted(os.listdir(plot_dir)):
            _upload(os.path.join(plot_dir, name), remote)
        plots = [p.replace(plot_dir, remote) for p in plots]
        fits = json.loads(json.dumps(fits).replace(plot_dir, remote))
    summary = {"cells": len({r['cell'] for r in rows}), "errors": table, "n_params": n_params, "fits": fits,
               "plots": plots + [p for forms in fits.values() for f in forms.values() for p in f["plots"]]}
    files.write_json_atomic(os.path.join(grid_dir, "summary.json"), summary)
    files.write_text_atomic(os.path.join(grid_dir, "report.txt"), text.getvalue())
    return summary
