"""PNG figures of a fitted scaling law.

- error vs inference FLOPs: observed cells and one fitted curve per LLM size as V varies, with the compute-optimal
  frontier and its bootstrap band (the style of the paper's Figure 1);
- the (N, V) error surface as a heat map with iso-FLOP lines and the optimal path;
- predicted vs observed error, in-sample (with each cell's seed range) and leave-one-N-out.
Every axis, legend and label reads in human units (27K parameters, 3.2 GFLOPs: `units.py`). A fit with parameters
the data do not pin down names them in every title; a figure with nothing to show draws a frame that says why.
`draw_*` return the figure; `plot_*` save it (`save`: a local folder or a gs:// bucket). Figures are drawn on
`matplotlib.figure.Figure` (Agg canvas), never through pyplot: no global backend state.
"""

from __future__ import annotations

import dataclasses
import io
import os
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib import ticker as mticker
from matplotlib.figure import Figure

from vlm_jax import files
from vlm_jax.scaling import frontier as frontier_lib
from vlm_jax.scaling import identification, units
from vlm_jax.scaling.laws import FitResult

_DPI = 120


def _title(fit: FitResult, extra: str = "") -> str:
    title = f"{fit.table.task}: {fit.form.name} law{extra}"
    missing = identification.not_identified(fit)
    if missing:
        title += "\n" + textwrap.fill(f"not identified: {', '.join(missing)} (reasons in the report)", 70)
    return title


def save(fig: Figure, path: str) -> str:
    """`fig` as a PNG at `path`, a local file or a gs:// object: rendered into memory (savefig only writes local
    files) and written whole by `files.write_bytes_atomic`. The grid's report saves its figures through it too."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    files.write_bytes_atomic(path, buf.getvalue())
    return path


def _nothing(ax, why: str) -> None:
    """An empty frame that says in words why there is nothing to draw."""
    ax.text(0.5, 0.5, textwrap.fill(why, 48), ha="center", va="center", transform=ax.transAxes, fontsize=10,
            color="0.25")
    ax.set_xticks([])
    ax.set_yticks([])


def _finite(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, np.nan)


@dataclasses.dataclass(frozen=True)
class Overlay:
    """Measured (FLOPs, error) points drawn on the error-vs-FLOPs figure of Q = text_tokens, in the colour of the
    LLM of N = n (billions) when the figure has it: e.g. the adaptive-V router's threshold sweep."""

    label: str
    flops: Sequence[float]
    error: Sequence[float]
    text_tokens: float
    n: float = 0.0


def frontier_curve(fit: FitResult, budgets, text_tokens: float, *, v_range=frontier_lib.DEFAULT_V_RANGE):
    """Arrays over budgets float[C]: (n, v, error, error_lo, error_hi) of the continuous optimum."""
    points = frontier_lib.frontier(fit, budgets, text_tokens, v_range=v_range)
    field = lambda name, attr: np.array([getattr(getattr(p, name), attr) for p in points])
    return (field("n", "point"), field("v", "point"), field("error", "point"), field("error", "lo"),
            field("error", "hi"))


def draw_error_vs_flops(fit: FitResult, *, text_tokens: float = 0.0,
                        v_range=frontier_lib.DEFAULT_V_RANGE, overlays: Sequence[Overlay] = ()) -> Figure:
    """Error against inference FLOPs 2 N (Q + V): one curve per N over V, plus the frontier (and the `overlays`
    of this Q, dotted with crosses)."""
    fig = Figure(figsize=(7.0, 4.8))
    ax = fig.subplots()
    table = fit.table
    ax.set_title(_title(fit), fontsize=10)
    palette = colormaps["viridis"](np.linspace(0.0, 0.85, len(table.n_values)))
    v_curve = np.geomspace(*v_range, 200)
    curves = {n: _finite(fit.predict(n, v_curve)) for n in table.n_values}
    if not any(np.isfinite(c).any() for c in curves.values()):
        _nothing(ax, "The fitted law has no finite prediction on this range of N and V: no curve to draw "
                     "(see the report for the fit).")
        fig.tight_layout()
        return fig
    lo_cost, hi_cost = np.inf, 0.0
    for n, color in zip(table.n_values, palette):
        cost = frontier_lib.inference_flops(n, v_curve, text_tokens)
        ax.plot(cost, curves[n], color=color, lw=1.5, label=f"N = {units.params_billions(n)}")
        cells = table.n == n
        ax.scatter(frontier_lib.inference_flops(n, table.v[cells], text_tokens), table.error[cells],
                   color=color, s=22, zorder=3, edgecolors="white", linewidths=0.5)
        lo_cost, hi_cost = min(lo_cost, cost.min()), max(hi_cost, cost.max())
    budgets = np.geomspace(lo_cost, hi_cost, 40)
    n_opt, _, err, err_lo, err_hi = frontier_curve(fit, budgets, text_tokens, v_range=v_range)
    # Where the optimum's N lies outside the measured LLM sizes the frontier is the law's extrapolation: drawn
    # thin and dotted, so that no one reads it as something a measured model did.
    inside = (n_opt >= table.n_values[0] * (1 - 1e-9)) & (n_opt <= table.n_values[-1] * (1 + 1e-9))
    ax.plot(budgets, np.where(inside, _finite(err), np.nan), "k--", lw=2, label="compute-optimal frontier")
    if not inside.all():
        # each outside run joined to its inside neighbours, so the two styles meet without a gap
        outside = ~inside | np.convolve(~inside, [1, 1, 1], mode="same").astype(bool)
        ax.plot(budgets, np.where(outside, _finite(err), np.nan), "k:", lw=1.2,
                label="frontier at an N outside the table (extrapolated)")
    band = np.isfinite(err_lo) & np.isfinite(err_hi)
    if band.any():
        ax.fill_between(budgets[band], err_lo[band], err_hi[band], color="k", alpha=0.15, lw=0,
                        label=f"frontier {fit.level:.0%} interval")
    else:
        why = fit.no_interval or "no bootstrap was run"
        ax.plot([], [], " ", label=textwrap.fill(f"no interval: {why}", 45))
    colour_of = dict(zip(table.n_values, palette))
    for o in overlays:
        if o.text_tokens == text_tokens:
            ax.plot(o.flops, _finite(o.error), "x:", color=colour_of.get(o.n, "0.3"), lw=1.3, ms=5, label=o.label)
    # Keep the measured errors in view: a wide interval band (or a law that diverges at small N) would otherwise
    # set the scale and flatten every curve and point onto the axis.
    ax.set_ylim(0.0, 1.25 * max(float(np.max(table.error)), 1e-3))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(units.flops_formatter())
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.set_xlabel(f"inference FLOPs per answer, 2·N·(Q+V), Q = {text_tokens:g}")
    ax.set_ylabel("downstream error")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return fig


def plot_error_vs_flops(fit: FitResult, path: str, *, text_tokens: float = 0.0,
                        v_range=frontier_lib.DEFAULT_V_RANGE, overlays: Sequence[Overlay] = ()) -> str:
    return save(draw_error_vs_flops(fit, text_tokens=text_tokens, v_range=v_range, overlays=overlays), path)


def draw_error_surface(fit: FitResult, *, text_tokens: float = 0.0, resolution: int = 120) -> Figure:
    """Predicted error over the table's (N, V) range (log axes) with iso-FLOP lines and the optimal path."""
    table = fit.table
    n_grid = np.geomspace(table.n_values[0], table.n_values[-1], resolution)
    v_grid = np.geomspace(table.v_values[0], table.v_values[-1], resolution)
    nn, vv = np.meshgrid(n_grid, v_grid, indexing="xy")
    err = _finite(fit.predict(nn, vv))
    fig = Figure(figsize=(6.6, 5.0))
    ax = fig.subplots()
    ax.set_title(_title(fit, f", iso-FLOP lines at Q = {text_tokens:g}"), fontsize=10)
    if not np.isfinite(err).any():
        _nothing(ax, "The fitted law has no finite prediction over the table's N and V: no surface to draw.")
        fig.tight_layout()
        return fig
    norm = mcolors.Normalize(min(np.nanmin(err), table.error.min()), max(np.nanmax(err), table.error.max()))
    mesh = ax.pcolormesh(nn, vv, np.ma.masked_invalid(err), shading="auto", cmap="viridis", norm=norm)
    fig.colorbar(mesh, ax=ax, label="predicted error")
    log_cost = np.log10(frontier_lib.inference_flops(nn, vv, text_tokens))
    levels = np.arange(np.ceil(log_cost.min() * 2) / 2, log_cost.max(), 0.5)
    if len(levels):
        iso = ax.contour(nn, vv, log_cost, levels=levels, colors="white", linewidths=0.8, alpha=0.8)
        ax.clabel(iso, fmt=lambda x: units.flops(10 ** x), fontsize=7)
    budgets = 10.0 ** np.linspace(log_cost.min(), log_cost.max(), 40)
    v_range = (table.v_values[0], table.v_values[-1])
    n_range = (table.n_values[0], table.n_values[-1])
    path_n, path_v = [], []
    for c in budgets:
        n, v, e, _ = frontier_lib.optimum_for_fit(fit, c, text_tokens, v_range=v_range, n_range=n_range,
                                                  point_only=True)
        if np.isfinite(e[0]):
            path_n.append(n[0])
            path_v.append(v[0])
    if path_n:   # often along the table's edges: drawn over the frame, with a dot per budget
        ax.plot(path_n, path_v, "o-", color="tab:red", lw=2, ms=3, clip_on=False, zorder=4,
                label="optimal (N, V) per budget")
    ax.scatter(table.n, table.v, c=table.error, cmap="viridis", norm=norm, s=30, edgecolors="white", zorder=5,
               label="observed cells")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Tick at the table's own N and V: a log axis spanning less than a decade otherwise labels 6x10^-1 etc.
    ax.set_xticks(table.n_values, [units.params_billions(n) for n in table.n_values])
    ax.set_yticks(table.v_values, [f"{v:g}" for v in table.v_values])
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    # A margin around the table's range, so a path along its edge is not hidden under the frame.
    ax.set_xlim(n_grid[0] / 1.12, n_grid[-1] * 1.12)
    ax.set_ylim(v_grid[0] / 1.15, v_grid[-1] * 1.15)
    ax.set_xlabel("LLM parameters N")
    ax.set_ylabel("visual tokens V")
    # Below the axes: inside, it would hide the path's end (often the top-right corner) or a cell.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def plot_error_surface(fit: FitResult, path: str, *, text_tokens: float = 0.0, resolution: int = 120) -> str:
    return save(draw_error_surface(fit, text_tokens=text_tokens, resolution=resolution), path)


def draw_predicted_vs_observed(fit: FitResult) -> Figure:
    """Predicted against observed error: in-sample fit (with each cell's range over seeds) and each
    leave-one-N-out extrapolation."""
    table = fit.table
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    ax.set_title(_title(fit), fontsize=10)
    pred = _finite(fit.predict(table.n, table.v))
    ok = np.isfinite(pred)
    if not ok.any():
        _nothing(ax, "The fitted law has no finite prediction at the table's cells: nothing to compare with "
                     "the observed errors (see the report for the fit).")
        fig.tight_layout()
        return fig
    r2 = f"R² = {fit.r2:.3f}" if np.isfinite(fit.r2) else "R² undefined"
    several = table.seed_counts > 1
    if several.any():
        lo, hi = np.nanmin(table.seed_errors, 1), np.nanmax(table.seed_errors, 1)
        ax.errorbar(table.error[ok & several], pred[ok & several],
                    xerr=[(table.error - lo)[ok & several], (hi - table.error)[ok & several]], fmt="none",
                    ecolor="C0", alpha=0.5, lw=1, label="range over seeds")
    ax.scatter(table.error[ok], pred[ok], s=24, label=f"fit ({r2})", zorder=3)
    # The chart spans the observed errors and the in-sample fit; a leave-one-N-out prediction far outside (a
    # diverging extrapolation) is drawn at the edge and counted, so that it cannot flatten every other point.
    inside = np.concatenate([table.error, pred[ok]])
    log_axes = inside.max() / inside.min() > 20
    lims = ([inside.min() / 1.3, inside.max() * 1.3] if log_axes
            else [inside.min() * 0.95, inside.max() * 1.05])
    off, worst = 0, 0.0
    for loo in fit.loo:
        held = table.n == loo.n_held_out
        out = fit.predict_coords(loo.coords, table.n[held], table.v[held])
        beyond = ~np.isfinite(out) | (out < lims[0]) | (out > lims[1])
        off += int(beyond.sum())
        worst = max([worst] + [abs(np.log(x / e)) for x, e in zip(out[beyond], table.error[held][beyond])
                               if np.isfinite(x) and x > 0])
        ax.scatter(table.error[held][~beyond], out[~beyond], s=30, facecolors="none", edgecolors="tab:red",
                   linewidths=0.8)
        ax.scatter(table.error[held][beyond], np.clip(np.nan_to_num(out[beyond], nan=lims[1]), *lims), s=40,
                   marker="^", facecolors="none", edgecolors="tab:red", linewidths=0.8)
    if fit.loo:
        factor = f"10^{worst / np.log(10):.0f}" if worst > np.log(1e3) else f"{np.exp(worst):.2g}"
        note = (f"; {off} off the chart (drawn at its edge, up to {factor}x off)" if off and worst
                else f"; {off} off the chart or diverging (drawn at its edge)" if off else "")
        ax.scatter([], [], facecolors="none", edgecolors="tab:red", label=textwrap.fill(
            f"leave-one-N-out{note}", 40))
    if log_axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.plot(lims, lims, "k:", lw=1)
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_xlabel("observed error (mean over seeds)")
    ax.set_ylabel("predicted error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_predicted_vs_observed(fit: FitResult, path: str) -> str:
    return save(draw_predicted_vs_observed(fit), path)


def plot_failed(task: str, form: str, reason: str, out_dir: str) -> str:
    """The frame drawn in place of a fit's figures when the fit failed: the reason, in words."""
    fig = Figure(figsize=(5.2, 3.2))
    ax = fig.subplots()
    ax.set_title(f"{task}: {form} law", fontsize=10)
    _nothing(ax, f"No fit, so nothing to draw: {reason}")
    fig.tight_layout()
    return save(fig, os.path.join(out_dir, f"{_safe(task)}_{form}_failed.png"))


def write_plots(fit: FitResult, out_dir: str, *, text_tokens=(0.0,), v_range=frontier_lib.DEFAULT_V_RANGE,
                overlays: Sequence[Overlay] = ()) -> list[str]:
    """All figures of one fit into out_dir, named <task>_<form>_*.png; returns the paths."""
    stem = os.path.join(out_dir, f"{_safe(fit.table.task)}_{fit.form.name}")
    paths = [plot_predicted_vs_observed(fit, f"{stem}_pred_vs_obs.png")]
    for q in text_tokens:
        paths.append(plot_error_vs_flops(fit, f"{stem}_error_vs_flops_q{q:g}.png", text_tokens=q, v_range=v_range,
                                         overlays=overlays))
        paths.append(plot_error_surface(fit, f"{stem}_surface_q{q:g}.png", text_tokens=q))
    return paths


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
