"""PNG figures of a fitted scaling law.

- error vs inference FLOPs: observed cells and one fitted curve per LLM size as V varies, with the compute-optimal
  frontier and its bootstrap band (the style of the paper's Figure 1);
- the (N, V) error surface as a heat map with iso-FLOP lines and the optimal path;
- predicted vs observed error, in-sample and leave-one-N-out.
Figures are drawn on `matplotlib.figure.Figure` (Agg canvas), never through pyplot: no global backend state.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib import ticker as mticker
from matplotlib.figure import Figure

from vlm_jax.scaling import frontier as frontier_lib
from vlm_jax.scaling.laws import FitResult

_DPI = 120


def _title(fit: FitResult, extra: str = "") -> str:
    return f"{fit.table.task}: {fit.form.name} law{extra}"


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=_DPI)
    return path


def frontier_curve(fit: FitResult, budgets, text_tokens: float, *, v_range=frontier_lib.DEFAULT_V_RANGE):
    """Arrays over budgets float[C]: (n, v, error, error_lo, error_hi) of the continuous optimum."""
    points = frontier_lib.frontier(fit, budgets, text_tokens, v_range=v_range)
    field = lambda name, attr: np.array([getattr(getattr(p, name), attr) for p in points])
    return (field("n", "point"), field("v", "point"), field("error", "point"), field("error", "lo"),
            field("error", "hi"))


def plot_error_vs_flops(fit: FitResult, path: str, *, text_tokens: float = 0.0,
                        v_range=frontier_lib.DEFAULT_V_RANGE) -> str:
    """Error against inference FLOPs 2 N (Q + V): one curve per N over V, plus the frontier."""
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.subplots()
    table = fit.table
    palette = colormaps["viridis"](np.linspace(0.0, 0.85, len(table.n_values)))
    v_curve = np.geomspace(*v_range, 200)
    lo_cost, hi_cost = np.inf, 0.0
    for n, color in zip(table.n_values, palette):
        cost = frontier_lib.inference_flops(n, v_curve, text_tokens)
        ax.plot(cost, fit.predict(n, v_curve), color=color, lw=1.5, label=f"N = {n:.3g}B")
        cells = table.n == n
        ax.scatter(frontier_lib.inference_flops(n, table.v[cells], text_tokens), table.error[cells],
                   color=color, s=22, zorder=3, edgecolors="white", linewidths=0.5)
        lo_cost, hi_cost = min(lo_cost, cost.min()), max(hi_cost, cost.max())
    budgets = np.geomspace(lo_cost, hi_cost, 40)
    _, _, err, err_lo, err_hi = frontier_curve(fit, budgets, text_tokens, v_range=v_range)
    ax.plot(budgets, err, "k--", lw=2, label="compute-optimal frontier")
    if np.isfinite(err_lo).all():
        ax.fill_between(budgets, err_lo, err_hi, color="k", alpha=0.15, lw=0,
                        label=f"frontier {fit.level:.0%} interval")
    # Keep the measured errors in view: a wide interval band (or a law that diverges at small N) would otherwise
    # set the scale and flatten every curve and point onto the axis.
    ax.set_ylim(0.0, 1.25 * max(float(np.max(table.error)), 1e-3))
    ax.set_xscale("log")
    ax.set_xlabel(f"inference FLOPs  2·N·(Q+V),  Q = {text_tokens:g}")
    ax.set_ylabel("downstream error")
    ax.set_title(_title(fit))
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return _save(fig, path)


def plot_error_surface(fit: FitResult, path: str, *, text_tokens: float = 0.0, resolution: int = 120) -> str:
    """Predicted error over the table's (N, V) range (log axes) with iso-FLOP lines and the optimal path."""
    table = fit.table
    n_grid = np.geomspace(table.n_values[0], table.n_values[-1], resolution)
    v_grid = np.geomspace(table.v_values[0], table.v_values[-1], resolution)
    nn, vv = np.meshgrid(n_grid, v_grid, indexing="xy")
    err = fit.predict(nn, vv)
    fig = Figure(figsize=(6.6, 5.0))
    ax = fig.subplots()
    norm = mcolors.Normalize(min(err.min(), table.error.min()), max(err.max(), table.error.max()))
    mesh = ax.pcolormesh(nn, vv, err, shading="auto", cmap="viridis", norm=norm)
    fig.colorbar(mesh, ax=ax, label="predicted error")
    log_cost = np.log10(frontier_lib.inference_flops(nn, vv, text_tokens))
    levels = np.arange(np.ceil(log_cost.min() * 2) / 2, log_cost.max(), 0.5)
    iso = ax.contour(nn, vv, log_cost, levels=levels, colors="white", linewidths=0.8, alpha=0.8)
    ax.clabel(iso, fmt=lambda x: f"1e{x:g}", fontsize=7)
    budgets = 10.0 ** np.linspace(log_cost.min(), log_cost.max(), 40)
    v_range = (table.v_values[0], table.v_values[-1])
    n_range = (table.n_values[0], table.n_values[-1])
    path_n, path_v = [], []
    for c in budgets:
        n, v, _, _ = frontier_lib.optimum_from_params(fit.form, fit.theta, c, text_tokens, v_range=v_range,
                                                          n_range=n_range)
        path_n.append(n[0])
        path_v.append(v[0])
    ax.plot(path_n, path_v, color="tab:red", lw=2, label="optimal (N, V) per budget")
    ax.scatter(table.n, table.v, c=table.error, cmap="viridis", norm=norm, s=30, edgecolors="white", zorder=3,
               label="observed cells")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Tick at the table's own N and V: a log axis spanning less than a decade otherwise labels 6x10^-1 etc.
    ax.set_xticks(table.n_values, [f"{n:.3g}" for n in table.n_values])
    ax.set_yticks(table.v_values, [f"{v:g}" for v in table.v_values])
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    ax.set_xlabel("LLM parameters N (billions)")
    ax.set_ylabel("visual tokens V")
    ax.set_title(_title(fit, f", iso-FLOP lines at Q = {text_tokens:g}"))
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_predicted_vs_observed(fit: FitResult, path: str) -> str:
    """Predicted against observed error: in-sample fit and each leave-one-N-out extrapolation."""
    table = fit.table
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    pred = fit.predict(table.n, table.v)
    ax.scatter(table.error, pred, s=24, label=f"fit (R² = {fit.r2:.3f})", zorder=3)
    for loo in fit.loo:
        held = table.n == loo.n_held_out
        ax.scatter(table.error[held], fit.form.predict(loo.theta, table.n[held], table.v[held]), s=30,
                   facecolors="none", edgecolors="tab:red", linewidths=0.8)
    if fit.loo:
        ax.scatter([], [], facecolors="none", edgecolors="tab:red", label="leave-one-N-out")
    lims = [min(table.error.min(), pred.min()) * 0.95, max(table.error.max(), pred.max()) * 1.05]
    ax.plot(lims, lims, "k:", lw=1)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_xlabel("observed error")
    ax.set_ylabel("predicted error")
    ax.set_title(_title(fit))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(fit: FitResult, out_dir: str, *, text_tokens=(0.0,), v_range=frontier_lib.DEFAULT_V_RANGE
                ) -> list[str]:
    """All figures of one fit into out_dir, named <task>_<form>_*.png; returns the paths."""
    stem = os.path.join(out_dir, f"{_safe(fit.table.task)}_{fit.form.name}")
    paths = [plot_predicted_vs_observed(fit, f"{stem}_pred_vs_obs.png")]
    for q in text_tokens:
        paths.append(plot_error_vs_flops(fit, f"{stem}_error_vs_flops_q{q:g}.png", text_tokens=q, v_range=v_range))
        paths.append(plot_error_surface(fit, f"{stem}_surface_q{q:g}.png", text_tokens=q))
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
