"""Readable text reports of scaling-law fits and frontiers, summary.json's content, and the demo table.

The report opens with the decision (`decision.py`); then, per task and law form, the parameters with their
intervals (or why they are not identified), goodness of fit, the frontier and how V* moves with Q. Every number is
written in human units (`units.py`) and nothing non-finite is printed: JSON gets null plus a reason. Each (task,
form) is fitted, reported and plotted on its own: one that fails is recorded with its error, the rest stand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from vlm_jax.scaling import decision as decision_lib
from vlm_jax.scaling import frontier, identification, laws, units
from vlm_jax.scaling.laws import FitResult
from vlm_jax.scaling.tables import PARAMS_PER_UNIT

# The demo's known laws: one family where LLM size matters far more than visual tokens (reasoning-like) and one
# where tokens matter more (fine detail, e.g. reading small text). The LLMs are named presets; their sizes are
# counted from the parameter trees by the caller (configs.models.llm_param_count), not typed here.
DEMO_LLMS = ("qwen1.5-0.5b", "qwen1.5-1.8b", "qwen1.5-4b", "qwen1.5-7b")
DEMO_V = (1, 4, 16, 36, 64, 144, 576)
DEMO_LAWS = {
    "reasoning": ("multiplicative", (0.35, 0.45, 0.06, 0.12)),
    "fine_detail": ("additive", (0.08, 0.15, 0.5, 0.5, 0.35)),
}


def demo_rows(llm_sizes: Mapping[str, int], noise: float = 0.02, seed: int = 0, seeds: int = 2,
              questions: int = 1000, seed_noise: float = 0.05) -> list[dict]:
    """Result rows (llm, n_params, visual_tokens, task, seed, questions, error) drawn from DEMO_LAWS for the LLMs
    of `llm_sizes` ({name: parameter count}, e.g. of DEMO_LLMS): lognormal cell noise `noise`, then per seed
    lognormal training noise `seed_noise`, then a binomial evaluation on `questions` questions (a zero count
    entered as half a question, as the grid does)."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, (form, theta) in DEMO_LAWS.items():
        form = laws.get_form(form)
        for llm, n_params in llm_sizes.items():
            for v in DEMO_V:
                err = form.predict(np.asarray(theta), np.array([n_params / PARAMS_PER_UNIT]), np.array([v]))[0]
                err = err * np.exp(noise * rng.standard_normal())
                for s in range(seeds):
                    p = float(np.clip(err * np.exp(seed_noise * rng.standard_normal()), 0.0, 1.0))
                    measured = max(rng.binomial(questions, p) / questions, 0.5 / questions)
                    rows.append({"llm": llm, "n_params": n_params, "visual_tokens": v, "task": task, "seed": s,
                                 "questions": questions, "error": float(measured)})
    return rows


# ----------------------------------------------------------------------------------------------- the cells

def format_observed(tables: Mapping[str, object]) -> str:
    """The measured error per task (mean over each cell's seeds), each cell's spread across seeds (std and
    min-max), and the evaluation's binomial noise: what the fits below are fitted to."""
    lines = []
    for task, t in tables.items():
        vs = list(t.v_values)
        counts = t.seed_counts
        seeds = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
        lines.append(f"error of task {task!r} (rows: LLM, N; columns: V; mean over {seeds} seed(s) per cell)")
        head = f"  {'LLM':<14}{'N':>8}"
        by_n = {n: np.flatnonzero(t.n == n) for n in t.n_values}
        label = {n: f"  {t.llm[cells[0]]:<14}{units.params_billions(n):>8}" for n, cells in by_n.items()}

        def row(n, fmt, width):
            cells = {t.v[i]: i for i in by_n[n]}
            return label[n] + "".join((fmt(cells[v]) if v in cells else "-").rjust(width) for v in vs)

        lines.append(head + "".join(f"V={v:g}".rjust(9) for v in vs))
        lines += [row(n, lambda i: f"{t.error[i]:.3f}", 9) for n in t.n_values]
        if counts.max() > 1:
            def spread(i):
                e = t.seed_errors[i, :counts[i]]
                if len(e) < 2:
                    return "one seed"
                return f"{np.std(e, ddof=1):.3f} ({e.min():.3f}-{e.max():.3f})"

            lines.append("  spread across seeds: std (min-max)")
            lines.append(head + "".join(f"V={v:g}".rjust(22) for v in vs))
            lines += [row(n, spread, 22) for n in t.n_values]
        else:
            lines.append("  one seed per cell: the spread across seeds (training noise) is not measured")
        q = t.questions[np.isfinite(t.questions)]
        if len(q):
            sd = np.sqrt(t.error * (1 - t.error) / t.questions)
            sd = sd[np.isfinite(sd)]
            count = f"{q.min():g}" if q.min() == q.max() else f"{q.min():g}-{q.max():g}"
            sds = f"{sd.min():.3f}" if f"{sd.min():.3f}" == f"{sd.max():.3f}" else f"{sd.min():.3f}-{sd.max():.3f}"
            lines.append(f"  evaluation noise: {count} questions per cell, binomial sd of an error sqrt(p(1-p)/q) "
                         f"{sds}")
        else:
            lines.append("  evaluation noise: not known (the results carry no question counts)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- one fit

def _resampling_text(fit: FitResult) -> str:
    if fit.no_interval:
        return f"no interval: {fit.no_interval}"
    if not len(fit.bootstrap):
        return "no bootstrap"
    capped = f", {fit.bootstrap_unconverged} stopped at the iteration cap" if fit.bootstrap_unconverged else ""
    return f"{fit.level:.0%} intervals over {len(fit.bootstrap)} bootstrap resamples of {fit.resampled}{capped}"


def _r2_text(fit: FitResult) -> str:
    if np.isfinite(fit.r2):
        return f"R² on error {fit.r2:.4f}"
    return "R² undefined (every cell has the same error)" if np.ptp(fit.table.error) == 0 else "R² undefined"


def _pct(x: float) -> str:
    if not np.isfinite(x):
        return "diverges"
    return f"{x:.1%}" if x <= 10 else "over 1000%"


def _centre_terms(fit: FitResult) -> dict[str, str]:
    """For scale parameters whose natural value carries N's unit (A of the laws): the term's value at the
    table's centre, which is what the data determine (the natural A's spread is mostly alpha's, times log N)."""
    n0, v0 = math.exp(fit.centre[0]), math.exp(fit.centre[1])
    out = {}
    for i, name in enumerate(fit.form.param_names):
        if "centre" not in fit.form.coord_names[i]:
            continue
        c = np.exp(fit.bootstrap_coords[:, i]) if len(fit.bootstrap_coords) else np.zeros(0)
        est = laws.Estimate.from_samples(math.exp(fit.coords[i]), c, fit.level)
        out[name] = (f"   (its term at the table's centre N={units.params_billions(n0)}, V={v0:.3g}: "
                     f"{units.interval(est)})")
    return out


def format_fit(fit: FitResult, truth: Sequence[float] | None = None) -> str:
    """Parameters with intervals (or why not identified), goodness of fit, weights, leave-one-N-out errors."""
    t = fit.table
    reasons = identification.identify(fit)
    lines = [f"-- {fit.form.name} law: {fit.form.formula}   [{_resampling_text(fit)}]"]
    centre = _centre_terms(fit)
    for i, (name, est) in enumerate(fit.params.items()):
        extra = f"   (true {truth[i]:.4g})" if truth is not None else ""
        extra += centre.get(name, "")
        if reasons[name]:
            fitted = units.interval(est).replace(" (no interval)", "")
            lines.append(f"   {name:<6} not identified: {reasons[name]} (fit {fitted}){extra}")
        else:
            lines.append(f"   {name:<6} = {units.interval(est)}{extra}")
    rms = float(np.sqrt(np.mean(fit.log_residuals ** 2)))
    edge = ", ".join(fit.at_grid_edge) or "none"
    lines.append(f"   Huber loss {fit.loss:.3g} (delta {fit.delta:g}) · {_r2_text(fit)} · "
                 f"RMS log residual {units.number(rms)} · fit at start-grid edge: {edge}")
    noise = decision_lib.noise_json(fit)
    w = noise["weights"]
    weights = ("cells weighed equally" if np.isclose(w["min"], w["max"]) else
               f"cell weights {w['min']:.2g}-{w['max']:.2g} (1 / sd of log error)")
    lines.append(f"   {weights}; evaluation noise {noise['evaluation_noise']}; {noise['seed_noise']}")
    if not fit.converged:
        lines.append("   WARNING: the best point fit stopped at the iteration cap; treat it as approximate")
    if fit.loo:
        parts = [f"N={units.params_billions(r.n_held_out)}: {_pct(r.mean_abs_rel_error)}" for r in fit.loo]
        finite = [r for r in fit.loo if np.isfinite(r.rms_log_error)]
        worst = max(finite, key=lambda r: r.rms_log_error) if finite else None
        tail = (f" (worst RMS log error {worst.rms_log_error:.3g} at N={units.params_billions(worst.n_held_out)})"
                if worst else "")
        lines.append("   leave-one-N-out mean |relative error|: " + ", ".join(parts) + tail)
    else:
        lines.append(f"   leave-one-N-out: not possible with {len(t.n_values)} LLM sizes")
    return "\n".join(lines)


def default_budgets(fit: FitResult, text_tokens: float, count: int = 4) -> np.ndarray:
    """float[count] budgets spanning the table's own inference costs at Q = text_tokens."""
    cost = frontier.inference_flops(fit.table.n, fit.table.v, text_tokens)
    return np.geomspace(cost.min(), cost.max(), count)


def _n_text(est) -> str:
    return units.interval(type(est)(est.point * PARAMS_PER_UNIT, est.lo * PARAMS_PER_UNIT, est.hi * PARAMS_PER_UNIT,
                                    est.level), units.params)


def format_frontier(fit: FitResult, budgets: Sequence[float], text_tokens: float, *,
                    v_range=frontier.DEFAULT_V_RANGE) -> str:
    """The continuous optimum and the best menu entry (the table's N and V values) per budget."""
    lines = [(f"   frontier at Q = {text_tokens:g} (continuous N, V in [{v_range[0]:g}, {v_range[1]:g}]; "
             "menu = the table's N and V; ! = N* outside the fitted N range, an extrapolation):")]
    for c in budgets:
        try:
            p = frontier.continuous_optimum(fit, c, text_tokens, v_range=v_range)
        except ValueError as e:
            lines.append(f"     C = {units.flops(c)}: {e}")
            continue
        flag = "" if identification.within_table(fit, p.n.point) else "!"
        line = (f"     C = {units.flops(c)}: N* = {_n_text(p.n)}{flag}, V* = {units.interval(p.v)}, "
                f"error {units.interval(p.error)}")
        try:
            d = frontier.discrete_optimum(fit, c, text_tokens, fit.table.n_values, fit.table.v_values)
            share = f", picked by {d.share:.0%} of resamples" if np.isfinite(d.share) else ""
            line += (f"  | menu: N {units.params_billions(d.n)}, V {d.v:g}, error {units.interval(d.error)}"
                     f"{share}")
        except ValueError:
            line += "  | menu: nothing affordable"
        lines.append(line)
    return "\n".join(lines)


def format_v_by_q(fit: FitResult, budget: float, text_tokens: Sequence[float], *,
                  v_range=frontier.DEFAULT_V_RANGE) -> str:
    """How the optimal V moves with the text length Q at one budget."""
    points = frontier.optimal_v_by_text_length(fit, budget, text_tokens, v_range=v_range)
    cells = [f"Q={p.text_tokens:g}: V* {units.interval(p.v)} (N* {units.params_billions(p.n.point)})"
             for p in points]
    text = f"   optimal V vs Q at C = {units.flops(budget)}: " + "; ".join(cells)
    if fit.form.name == "multiplicative":
        # The closed form (frontier.py docstring): V* = Q * beta / (alpha - beta) inside the allowed range.
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = fit.estimate(lambda th: np.where(th[:, 1] > th[:, 2], th[:, 2] / (th[:, 1] - th[:, 2]),
                                                     np.inf))
        why = " (unbounded: resamples with alpha <= beta, where every token pays)" if np.isinf(ratio.hi) else ""
        text += (f"\n   closed form: V*/Q = beta / (alpha - beta) = {units.interval(ratio)}{why}, independent of the "
                 "budget")
    return text


# ----------------------------------------------------------------------------------------------- all fits

def fit_each(tables: dict, forms: Sequence[str], **fit_kwargs) -> dict:
    """{task: {form name: FitResult, or the exception that fit raised}}: one failure stays with its (task, form)."""
    fits: dict = {}
    for task, table in tables.items():
        for form in forms:
            try:
                name = laws.get_form(form).name
            except ValueError as e:
                fits.setdefault(task, {})[str(form)] = e
                continue
            try:
                fits.setdefault(task, {})[name] = laws.fit_law(table, form, **fit_kwargs)
            except Exception as e:  # noqa: BLE001  (recorded with its (task, form); the others are kept)
                fits.setdefault(task, {})[name] = e
    return fits


def fit_json(fit: FitResult, optimal_v: dict, plots: list) -> dict:
    reasons = identification.identify(fit)
    out = {"formula": fit.form.formula, "params": decision_lib.param_json(fit, reasons),
           "not_identified": {k: v for k, v in reasons.items() if v},
           "r2": float(fit.r2) if np.isfinite(fit.r2) else None, "level": fit.level,
           "bootstrap": len(fit.bootstrap), "resampled": fit.resampled or None,
           "noise": decision_lib.noise_json(fit), "optimal_v": optimal_v,
           "loo": [{"n_params": r.n_held_out * PARAMS_PER_UNIT, "cells": r.cells,
                    "mean_abs_rel_error": r.mean_abs_rel_error if np.isfinite(r.mean_abs_rel_error) else None,
                    "rms_log_error": r.rms_log_error if np.isfinite(r.rms_log_error) else None}
                   for r in fit.loo],
           "plots": plots}
    if not np.isfinite(fit.r2):
        out["r2_reason"] = _r2_text(fit)
    if fit.no_interval:
        out["no_interval"] = fit.no_interval
    return out


def fit_tables(tables: dict, forms: Sequence[str], *, text_tokens: Sequence[float] = (0.0, 64.0, 256.0),
               budgets: Sequence[float] | None = None, v_range=frontier.DEFAULT_V_RANGE, n_bootstrap: int = 1000,
               seed: int = 0, level: float = 0.95, delta: float = 1e-3, plot_dir: str | None = None,
               truths: dict | None = None, echo=print, observed: str = "", overlays: dict | None = None) -> dict:
    """Fit every law form to every task's table; echo the report (the decision first, then `observed` --
    default: the measured cells, `format_observed` --, then each fit); write PNGs to `plot_dir` (None: none).

    Returns the JSON-ready summary {"decision": ..., "fits": {task: {form: {params: {name: {point, lo, hi,
    identified, reason?}}, r2, optimal_v: {Q: {budget_flops, v, n_params, error}}, plots: [...]} or {error}}}};
    `truths` {task: (form name, theta)} prints the known values next to the fit; `overlays` {task: [plots.Overlay]}
    adds measured points to that task's error-vs-FLOPs figures. Nothing in it is NaN or infinite: such values are
    null with a reason.
    """
    from vlm_jax.scaling import plots   # matplotlib only when plotting

    fits = fit_each(tables, forms, n_bootstrap=n_bootstrap, seed=seed, delta=delta, level=level)
    names = list(dict.fromkeys(name for f in fits.values() for name in f))
    decision = decision_lib.decide(fits, names, text_tokens=text_tokens, budgets=budgets, v_range=v_range)
    echo(decision_lib.format_decision(decision))
    echo("\n" + (observed or format_observed(tables)))
    summary: dict = {}
    for task, table in tables.items():
        echo(f"\n=== task {task!r}: {len(table)} cells; N = "
             f"{', '.join(units.params_billions(n) for n in table.n_values)}; "
             f"V = {', '.join(f'{v:g}' for v in table.v_values)}; seeds per cell "
             f"{_range_text(table.seed_counts)}")
        for name, fit in fits[task].items():
            if not isinstance(fit, FitResult):
                err = decision_lib._error_text(fit)
                echo(f"-- {name} law: failed: {err}")
                written = _failed_plot(plots, plot_dir, task, name, err)
                summary.setdefault(task, {})[name] = {"error": err, "plots": written}
                continue
            summary.setdefault(task, {})[name] = _report_fit(fit, plots, truths, text_tokens, budgets, v_range,
                                                             plot_dir, echo, (overlays or {}).get(task, ()))
    return json_safe({"decision": decision, "fits": summary})


def _report_fit(fit, plots, truths, text_tokens, budgets, v_range, plot_dir, echo, overlays=()) -> dict:
    """One fit's text and JSON; a failure while reporting or plotting it is recorded, not raised."""
    task = fit.table.task
    truth = truths.get(task) if truths else None
    echo(format_fit(fit, truth[1] if truth and truth[0] == fit.form.name else None))
    optimal_v, problems = {}, {}
    try:
        middle = float(np.sqrt(np.prod(default_budgets(fit, max(text_tokens), 2))))
        for q in text_tokens:
            echo(format_frontier(fit, budgets or default_budgets(fit, q), q, v_range=v_range))
            budget = (budgets or [middle])[0]
            p = frontier.continuous_optimum(fit, budget, q, v_range=v_range)
            optimal_v[f"{q:g}"] = {"budget_flops": budget, "budget": units.flops(budget),
                                   "v": decision_lib.estimate_json(p.v),
                                   "n_params": decision_lib.estimate_json(p.n, scale=PARAMS_PER_UNIT),
                                   "error": decision_lib.estimate_json(p.error)}
        echo(format_v_by_q(fit, budgets[0] if budgets else middle,
                           sorted(set(text_tokens) | {0.0, 16.0, 64.0, 256.0, 1024.0}), v_range=v_range))
    except Exception as e:  # noqa: BLE001
        problems["report_error"] = decision_lib._error_text(e)
        echo(f"   frontier failed: {problems['report_error']}")
    written = []
    if plot_dir:
        try:
            written = plots.write_plots(fit, plot_dir, text_tokens=text_tokens, v_range=v_range, overlays=overlays)
        except Exception as e:  # noqa: BLE001
            problems["plot_error"] = decision_lib._error_text(e)
            echo(f"   plots failed: {problems['plot_error']}")
    return dict(fit_json(fit, optimal_v, written), **problems)


def _failed_plot(plots, plot_dir, task, form, err) -> list:
    if not plot_dir:
        return []
    try:
        return [plots.plot_failed(task, form, err, plot_dir)]
    except Exception:  # noqa: BLE001  (a plot of a failure must not fail the report)
        return []


def _range_text(counts) -> str:
    lo, hi = int(np.min(counts)), int(np.max(counts))
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def json_safe(obj):
    """obj with numpy scalars as Python numbers and every non-finite float as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
