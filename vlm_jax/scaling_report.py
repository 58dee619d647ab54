"""Readable text reports of scaling-law fits and frontiers, and the demo table drawn from known laws."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlm_jax import scaling, scaling_frontier
from vlm_jax.scaling import FitResult
from vlm_jax.scaling_table import PARAMS_PER_UNIT

# The demo's known laws: one family where LLM size matters far more than visual tokens (reasoning-like) and one
# where tokens matter more (fine detail, e.g. reading small text). Sizes are the Qwen1.5 trees' parameter counts.
DEMO_LLMS = {"qwen1.5-0.5b": 463_987_712, "qwen1.5-1.8b": 1_836_828_672, "qwen1.5-4b": 3_950_369_280,
             "qwen1.5-7b": 7_721_324_544}
DEMO_V = (1, 4, 16, 36, 64, 144, 576)
DEMO_LAWS = {
    "reasoning": ("multiplicative", (0.35, 0.45, 0.06, 0.12)),
    "fine_detail": ("additive", (0.08, 0.15, 0.5, 0.5, 0.35)),
}


def demo_rows(noise: float = 0.02, seed: int = 0) -> list[dict]:
    """Result rows (llm, n_params, visual_tokens, task, error) drawn from DEMO_LAWS with lognormal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for task, (form, theta) in DEMO_LAWS.items():
        form = scaling.get_form(form)
        for llm, n_params in DEMO_LLMS.items():
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
    cost = scaling_frontier.inference_flops(fit.table.n, fit.table.v, text_tokens)
    return np.geomspace(cost.min(), cost.max(), count)


def format_frontier(fit: FitResult, budgets: Sequence[float], text_tokens: float, *,
                    v_range=scaling_frontier.DEFAULT_V_RANGE) -> str:
    """The continuous optimum and the best menu entry (the table's N and V values) per budget."""
    lines = [(f"   frontier at Q = {text_tokens:g} (continuous N, V in [{v_range[0]:g}, {v_range[1]:g}]; "
             "menu = the table's N and V; ! = N* outside the fitted N range, an extrapolation):")]
    n_lo, n_hi = fit.table.n_values[0], fit.table.n_values[-1]
    for c in budgets:
        p = scaling_frontier.continuous_optimum(fit, c, text_tokens, v_range=v_range)
        flag = "" if n_lo <= p.n.point <= n_hi else "!"
        line = f"     C = {c:.3g}: N* = {p.n} B{flag}, V* = {p.v}, error {p.error}"
        try:
            d = scaling_frontier.discrete_optimum(fit, c, text_tokens, fit.table.n_values, fit.table.v_values)
            share = f", picked by {d.share:.0%} of resamples" if np.isfinite(d.share) else ""
            line += f"  | menu: N {d.n:.3g}B, V {d.v:g}, error {d.error}{share}"
        except ValueError:
            line += "  | menu: nothing affordable"
        lines.append(line)
    return "\n".join(lines)


def format_v_by_q(fit: FitResult, budget: float, text_tokens: Sequence[float], *,
                  v_range=scaling_frontier.DEFAULT_V_RANGE) -> str:
    """How the optimal V moves with the text length Q at one budget."""
    points = scaling_frontier.optimal_v_by_text_length(fit, budget, text_tokens, v_range=v_range)
    cells = [f"Q={p.text_tokens:g}: V* {p.v} (N* {p.n.point:.3g}B)" for p in points]
    text = f"   optimal V vs Q at C = {budget:.3g}: " + "; ".join(cells)
    if fit.form.name == "multiplicative":
        # The closed form (scaling_frontier docstring): V* = Q * beta / (alpha - beta) inside the allowed range.
        ratio = fit.estimate(lambda th: np.where(th[:, 1] > th[:, 2], th[:, 2] / (th[:, 1] - th[:, 2]), np.inf))
        text += f"\n   closed form: V*/Q = beta / (alpha - beta) = {ratio}, independent of the budget"
    return text
