"""Readable text reports of scaling-law fits and frontiers, and the demo table drawn from known laws."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vlm_jax.scaling import frontier, laws
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


def demo_rows(llm_sizes: Mapping[str, int], noise: float = 0.02, seed: int = 0) -> list[dict]:
    """Result rows (llm, n_params, visual_tokens, task, error) drawn from DEMO_LAWS with lognormal noise, for the
    LLMs of `llm_sizes` ({name: parameter count}, e.g. of DEMO_LLMS)."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, (form, theta) in DEMO_LAWS.items():
        form = laws.get_form(form)
        for llm, n_params in llm_sizes.items():
            for v in DEMO_V:
                err = form.predict(np.asarray(theta), np.array([n_params / PARAMS_PER_UNIT]), np.array([v]))[0]
                err = float(np.clip(err * np.exp(noise * rng.standard_normal()), 1e-6, 1.0))
                rows.append({"llm": llm, "n_params": n_params, "visual_tokens": v, "task": task, "error": err})
    return rows


def format_fit(fit: FitResult, truth: Sequence[float] | None = None) -> str:
    """Parameters with intervals, goodness of fit, start-grid diagnostics and leave-one-N-out errors."""
    t = fit.table
    boot = (f"{fit.level:.0%} bootstrap intervals over {len(fit.bootstrap)} resamples"
            + (f", {fit.bootstrap_unconverged} stopped at the iteration cap" if fit.bootstrap_unconverged else "")
            if len(fit.bootstrap) else "no bootstrap")
    lines = [f"-- {fit.form.name} law: {fit.form.formula}   [{boot}]"]
    for i, (name, est) in enumerate(fit.params.items()):
        extra = f"   (true {truth[i]:.4g})" if truth is not None else ""
        lines.append(f"   {name:<6} = {est}{extra}")
    rms = float(np.sqrt(np.mean(fit.log_residuals ** 2)))
    edge = ", ".join(fit.at_grid_edge) or "none"
    lines.append(f"   Huber loss {fit.loss:.3g} (delta {fit.delta:g}) · R² on error {fit.r2:.4f} · "
                 f"RMS log residual {rms:.3g} · fit at start-grid edge: {edge}")
    if not fit.converged:
        lines.append("   WARNING: the best point fit stopped at the iteration cap; treat it as approximate")
    if fit.loo:
        parts = [f"N={r.n_held_out:.3g}B: {r.mean_abs_rel_error:.1%}" for r in fit.loo]
        worst = max(fit.loo, key=lambda r: r.rms_log_error)
        lines.append("   leave-one-N-out mean |relative error|: " + ", ".join(parts)
                     + f" (worst RMS log error {worst.rms_log_error:.3g} at N={worst.n_held_out:.3g}B)")
    else:
        lines.append(f"   leave-one-N-out: not possible with {len(t.n_values)} LLM sizes")
    return "\n".join(lines)


def default_budgets(fit: FitResult, text_tokens: float, count: int = 4) -> np.ndarray:
    """float[count] budgets spanning the table's own inference costs at Q = text_tokens."""
    cost = frontier.inference_flops(fit.table.n, fit.table.v, text_tokens)
    return np.geomspace(cost.min(), cost.max(), count)


def format_frontier(fit: FitResult, budgets: Sequence[float], text_tokens: float, *,
                    v_range=frontier.DEFAULT_V_RANGE) -> str:
    """The continuous optimum and the best menu entry (the table's N and V values) per budget."""
    lines = [(f"   frontier at Q = {text_tokens:g} (continuous N, V in [{v_range[0]:g}, {v_range[1]:g}]; "
             "menu = the table's N and V; ! = N* outside the fitted N range, an extrapolation):")]
    n_lo, n_hi = fit.table.n_values[0], fit.table.n_values[-1]
    for c in budgets:
        p = frontier.continuous_optimum(fit, c, text_tokens, v_range=v_range)
        flag = "" if n_lo <= p.n.point <= n_hi else "!"
        line = f"     C = {c:.3g}: N* = {p.n} B{flag}, V* = {p.v}, error {p.error}"
        try:
            d = frontier.discrete_optimum(fit, c, text_tokens, fit.table.n_values, fit.table.v_values)
            share = f", picked by {d.share:.0%} of resamples" if np.isfinite(d.share) else ""
            line += f"  | menu: N {d.n:.3g}B, V {d.v:g}, error {d.error}{share}"
        except ValueError:
            line += "  | menu: nothing affordable"
        lines.append(line)
    return "\n".join(lines)


def format_v_by_q(fit: FitResult, budget: float, text_tokens: Sequence[float], *,
                  v_range=frontier.DEFAULT_V_RANGE) -> str:
    """How the optimal V moves with the text length Q at one budget."""
    points = frontier.optimal_v_by_text_length(fit, budget, text_tokens, v_range=v_range)
    cells = [f"Q={p.text_tokens:g}: V* {p.v} (N* {p.n.point:.3g}B)" for p in points]
    text = f"   optimal V vs Q at C = {budget:.3g}: " + "; ".join(cells)
    if fit.form.name == "multiplicative":
        # The closed form (frontier.py docstring): V* = Q * beta / (alpha - beta) inside the allowed range.
        ratio = fit.estimate(lambda th: np.where(th[:, 1] > th[:, 2], th[:, 2] / (th[:, 1] - th[:, 2]), np.inf))
        text += f"\n   closed form: V*/Q = beta / (alpha - beta) = {ratio}, independent of the budget"
    return text


def fit_tables(tables: dict, forms: Sequence[str], *, text_tokens: Sequence[float] = (0.0, 64.0, 256.0),
               budgets: Sequence[float] | None = None, v_range=frontier.DEFAULT_V_RANGE, n_bootstrap: int = 1000,
               seed: int = 0, level: float = 0.95, delta: float = 1e-3, plot_dir: str | None = None,
               truths: dict | None = None, echo=print) -> dict:
    """Fit every law form to every task's table; echo the text report; write PNGs to `plot_dir` (None: none).

    Returns the JSON-ready summary {task: {form: {params: {name: {point, lo, hi}}, r2, optimal_v: {Q: {budget,
    v, n_billions}}, plots: [...]}}}; `truths` {task: (form name, theta)} prints the known values next to the fit.
    """
    from vlm_jax.scaling import plots   # matplotlib only when plotting

    summary = {}
    for task, table in tables.items():
        echo(f"\n=== task {task!r}: {len(table)} cells; N = {', '.join(f'{n:.3g}' for n in table.n_values)} B; "
             f"V = {', '.join(f'{v:g}' for v in table.v_values)}")
        for form in forms:
            fit = laws.fit_law(table, form, n_bootstrap=n_bootstrap, seed=seed, delta=delta, level=level)
            truth = truths.get(task) if truths else None
            echo(format_fit(fit, truth[1] if truth and truth[0] == fit.form.name else None))
            middle = float(np.sqrt(np.prod(default_budgets(fit, max(text_tokens), 2))))
            optimal_v = {}
            for q in text_tokens:
                echo(format_frontier(fit, budgets or default_budgets(fit, q), q, v_range=v_range))
                p = frontier.continuous_optimum(fit, (budgets or [middle])[0], q, v_range=v_range)
                optimal_v[f"{q:g}"] = {"budget_flops": (budgets or [middle])[0], "v": _estimate_json(p.v),
                                       "n_billions": _estimate_json(p.n), "error": _estimate_json(p.error)}
            echo(format_v_by_q(fit, budgets[0] if budgets else middle,
                               sorted(set(text_tokens) | {0.0, 16.0, 64.0, 256.0, 1024.0}), v_range=v_range))
            written = (plots.write_plots(fit, plot_dir, text_tokens=text_tokens, v_range=v_range)
                       if plot_dir else [])
            summary.setdefault(task, {})[fit.form.name] = {
                "formula": fit.form.formula, "params": {k: _estimate_json(e) for k, e in fit.params.items()},
                "r2": fit.r2, "level": fit.level, "bootstrap": len(fit.bootstrap), "optimal_v": optimal_v,
                "plots": written}
    return summary


def _estimate_json(e) -> dict:
    return {"point": e.point, "lo": e.lo, "hi": e.hi}
