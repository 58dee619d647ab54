"""Compute-optimal (N, V) under an inference-FLOPs budget, from a fitted scaling law.

Cost model (the paper's): FLOPs(N, V, Q) = 2 * N * (Q + V) + overhead, N in LLM parameters (the laws take
billions), Q text tokens, V visual tokens; `overhead` is any per-query cost independent of N (vision tower,
compressor), 0 in the paper. Both law forms decrease in N and V (for positive coefficients and exponents), so the
best configuration spends the whole budget: N = (C - overhead) / (2 (Q + V)), and the search is over V alone.

Analytic optimum of the multiplicative law err = A N^-alpha V^-beta + D (A, alpha > 0), V in [v_lo, v_hi]:
    with C' = C - overhead, err(V) - D = A (C'/2)^-alpha * (Q + V)^alpha * V^-beta, so the best V minimises
        g(V) = alpha ln(Q + V) - beta ln V,    g'(V) = (alpha V - beta (Q + V)) / (V (Q + V)).
    * alpha > beta: g' < 0 below V0 = beta Q / (alpha - beta) and > 0 above, so g is unimodal and
      V* = clip(V0, v_lo, v_hi). At Q = 0, V0 = 0 and V* = v_lo: the fewest visual tokens allowed, the whole
      budget in the LLM (the paper's headline). For Q > 0 with V0 in range, V* does not depend on C -- more
      compute buys a larger LLM, not more tokens -- and N* = C' (alpha - beta) / (2 alpha Q).
    * alpha <= beta: g' < 0 everywhere, so V* = v_hi.
`multiplicative_optimum` implements this; the numerical search (any law form) is tested against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from vlm_jax import flops as flops_lib
from vlm_jax.scaling import units
from vlm_jax.scaling.laws import Estimate, FitResult, LawForm, get_form
from vlm_jax.scaling.tables import PARAMS_PER_UNIT

DEFAULT_V_RANGE = (1.0, 576.0)  # one token up to every patch of CLIP ViT-L/14-336's 24x24 grid
_GRID = 257  # log-spaced V candidates before refinement
_GOLDEN_STEPS = 64  # shrinks the bracket (two grid steps, ~0.05 in log V) by 0.618^64 ~ 4e-14


def inference_flops(n, v, text_tokens, overhead_flops: float = 0.0):
    """The cost model above; n in billions of LLM parameters. Broadcasts over n and v."""
    n, v = np.asarray(n, dtype=np.float64), np.asarray(v, dtype=np.float64)
    return flops_lib.llm_linear_flops(n * PARAMS_PER_UNIT, text_tokens + v) + overhead_flops


def _n_at_budget(budget_left, v, text_tokens):
    return budget_left / flops_lib.llm_linear_flops(PARAMS_PER_UNIT, text_tokens + v)


@dataclasses.dataclass(frozen=True)
class FrontierPoint:
    """The best continuous (N, V) for one budget and text length; N in billions. `binding` is False when even
    the largest allowed N and V stay under budget (then they are the answer)."""

    budget: float
    text_tokens: float
    n: Estimate
    v: Estimate
    error: Estimate
    binding: bool


@dataclasses.dataclass(frozen=True)
class DiscreteChoice:
    """The best (N, V) from a menu; `share` is the fraction of bootstrap fits that pick the same pair, and
    `shares` maps every picked pair to its fraction."""

    budget: float
    text_tokens: float
    n: float
    v: float
    flops: float
    error: Estimate
    share: float
    shares: dict


def _check_budget(budget, text_tokens, overhead_flops):
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget}")
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")
    if budget <= overhead_flops:
        raise ValueError(f"budget {units.flops(budget)} does not cover the fixed overhead "
                         f"{units.flops(overhead_flops)}")


def _feasible_v(budget, text_tokens, v_range, n_range, overhead_flops):
    """(lo, hi, binding): the V interval on which the budget buys an N inside n_range."""
    v_lo, v_hi = map(float, v_range)
    if not 0 < v_lo <= v_hi:
        raise ValueError(f"v_range must satisfy 0 < lo <= hi, got {v_range}")
    left = budget - overhead_flops
    lo, hi = v_lo, v_hi
    if n_range is not None:
        n_lo, n_hi = map(float, n_range)
        if not 0 < n_lo <= n_hi:
            raise ValueError(f"n_range must satisfy 0 < lo <= hi (billions), got {n_range}")
        lo = max(lo, left / flops_lib.llm_linear_flops(n_hi * PARAMS_PER_UNIT, 1.0) - text_tokens)
        hi = min(hi, left / flops_lib.llm_linear_flops(n_lo * PARAMS_PER_UNIT, 1.0) - text_tokens)
        # Relative slack 1e-9: a budget computed as exactly a corner configuration's cost must stay feasible.
        if hi < v_lo * (1 - 1e-9):
            cheapest = inference_flops(n_lo, v_lo, text_tokens, overhead_flops)
            raise ValueError(f"budget {units.flops(budget)} cannot afford the smallest configuration "
                             f"(N={units.params_billions(n_lo)}, V={v_lo:g}, Q={text_tokens:g}), which costs "
                             f"{units.flops(cheapest)}")
        if lo > v_hi * (1 + 1e-9):
            return v_hi, v_hi, False
    return min(lo, v_hi), max(hi, v_lo), True


def optimum_from_params(form: str | LawForm, thetas, budget: float, text_tokens: float, *,
                        v_range=DEFAULT_V_RANGE, n_range=None, overhead_flops: float = 0.0):
    """Continuous optimum for each parameter vector: thetas float[S, P] -> (n, v, error, binding).

    n (billions), v, error: float[S]; binding: see FrontierPoint. Searches log V on a grid, then refines by
    golden section between the best grid point's neighbours, so any law form works, not only unimodal ones.
    """
    form = get_form(form)
    thetas = np.atleast_2d(np.asarray(thetas, dtype=np.float64))
    return _optimum(lambda n, v: _predict_rows(form, thetas, n, v), len(thetas), budget, text_tokens,
                    v_range=v_range, n_range=n_range, overhead_flops=overhead_flops)


def optimum_for_fit(fit: FitResult, budget: float, text_tokens: float, *, v_range=DEFAULT_V_RANGE, n_range=None,
                    overhead_flops: float = 0.0, point_only: bool = False):
    """optimum_from_params for a fit's point and bootstrap fits (only the point with `point_only`), predicted
    from their centred coordinates, which stay finite where a degenerate fit's natural parameters do not."""
    coords = fit.coords[None] if point_only else fit.all_coords()
    return _optimum(lambda n, v: fit.predict_coords(coords, n, v), len(coords), budget, text_tokens,
                    v_range=v_range, n_range=n_range, overhead_flops=overhead_flops)


def _optimum(predict_rows, s: int, budget, text_tokens, *, v_range, n_range, overhead_flops):
    """The search of optimum_from_params over S parameter vectors; predict_rows(n, v float[S, K]) -> [S, K]."""
    _check_budget(budget, text_tokens, overhead_flops)
    lo, hi, binding = _feasible_v(budget, text_tokens, v_range, n_range, overhead_flops)
    left = budget - overhead_flops
    if not binding:
        n, v = np.full(s, float(n_range[1])), np.full(s, float(v_range[1]))
        return n, v, predict_rows(n[:, None], v[:, None])[:, 0], False

    def error_at(log_v):  # log_v float[S, K] -> float[S, K]
        v = np.exp(log_v)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return predict_rows(_n_at_budget(left, v, text_tokens), v)

    grid = np.linspace(np.log(lo), np.log(hi), _GRID)
    errs = error_at(np.broadcast_to(grid, (s, _GRID)))
    errs = np.where(np.isfinite(errs), errs, np.inf)
    best = np.argmin(errs, axis=1)
    a = grid[np.maximum(best - 1, 0)][:, None]
    b = grid[np.minimum(best + 1, _GRID - 1)][:, None]
    inv_phi = (np.sqrt(5.0) - 1) / 2
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = error_at(c), error_at(d)
    for _ in range(_GOLDEN_STEPS):   # one new evaluation per step: the kept inner point is the next one's
        lower = fc < fd   # the minimum lies in [a, d]: d's place goes to c, a new c comes in
        a, b = np.where(lower, a, c), np.where(lower, d, b)
        x = np.where(lower, b - inv_phi * (b - a), a + inv_phi * (b - a))
        fx = error_at(x)
        c, d, fc, fd = (np.where(lower, x, d), np.where(lower, c, x), np.where(lower, fx, fd),
                        np.where(lower, fc, fx))
    refined = (a + b) / 2
    grid_best = grid[best][:, None]
    log_v = np.where(error_at(refined) <= error_at(grid_best), refined, grid_best)[:, 0]
    v = np.exp(log_v)
    return _n_at_budget(left, v, text_tokens), v, error_at(log_v[:, None])[:, 0], True


def _predict_rows(form, thetas, n, v):
    """Row-wise prediction: thetas float[S, P], n and v float[S, K] -> float[S, K]."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return form.predict(thetas[:, None, :], n[..., None], v[..., None])[..., 0]


def multiplicative_optimum(alpha, beta, budget: float, text_tokens: float, *, v_range=DEFAULT_V_RANGE,
                           overhead_flops: float = 0.0):
    """The closed-form optimum derived in the module docstring: (n billions, v), broadcast over alpha, beta."""
    _check_budget(budget, text_tokens, overhead_flops)
    alpha, beta = np.broadcast_arrays(np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64))
    v_lo, v_hi = map(float, v_range)
    with np.errstate(divide="ignore", invalid="ignore"):
        v0 = np.where(alpha > beta, beta * text_tokens / (alpha - beta), np.inf)
    v = np.clip(v0, v_lo, v_hi)
    return _n_at_budget(budget - overhead_flops, v, text_tokens), v


def continuous_optimum(fit: FitResult, budget: float, text_tokens: float, *, v_range=DEFAULT_V_RANGE,
                       n_range=None, overhead_flops: float = 0.0) -> FrontierPoint:
    """The best continuous (N, V) for a budget under the fitted law, with bootstrap intervals."""
    n, v, err, binding = optimum_for_fit(fit, budget, text_tokens, v_range=v_range, n_range=n_range,
                                         overhead_flops=overhead_flops)
    err = np.where(np.isfinite(err), err, np.nan)  # a resample whose law diverges everywhere has no optimum error
    est = lambda x: Estimate.from_samples(x[0], x[1:], fit.level)
    return FrontierPoint(float(budget), float(text_tokens), est(n), est(v), est(err), binding)


def frontier(fit: FitResult, budgets: Sequence[float], text_tokens: float, **kwargs) -> list[FrontierPoint]:
    """continuous_optimum over several budgets (the compute-optimal frontier)."""
    return [continuous_optimum(fit, c, text_tokens, **kwargs) for c in budgets]


def optimal_v_by_text_length(fit: FitResult, budget: float, text_tokens: Sequence[float],
                             **kwargs) -> list[FrontierPoint]:
    """continuous_optimum at one budget over several text lengths Q: how the best V grows with Q."""
    return [continuous_optimum(fit, budget, q, **kwargs) for q in text_tokens]


def discrete_optimum(fit: FitResult, budget: float, text_tokens: float, n_menu: Sequence[float],
                     v_menu: Sequence[float], *, overhead_flops: float = 0.0) -> DiscreteChoice:
    """The best affordable (N, V) from menus of LLM sizes (billions) and allowed visual-token counts."""
    _check_budget(budget, text_tokens, overhead_flops)
    n_menu, v_menu = np.asarray(n_menu, dtype=np.float64), np.asarray(v_menu, dtype=np.float64)
    if n_menu.size == 0 or v_menu.size == 0 or (n_menu <= 0).any() or (v_menu <= 0).any():
        raise ValueError(f"menus must be non-empty and positive, got N {n_menu.tolist()} and V {v_menu.tolist()}")
    nn, vv = (x.ravel() for x in np.meshgrid(n_menu, v_menu, indexing="ij"))
    cost = inference_flops(nn, vv, text_tokens, overhead_flops)
    affordable = cost <= budget
    if not affordable.any():
        raise ValueError(f"budget {units.flops(budget)} affords no menu entry at Q={text_tokens:g}; the cheapest "
                         f"costs {units.flops(cost.min())}")
    s = len(fit.all_coords())
    errs = fit.predict_rows(np.broadcast_to(nn, (s, nn.size)), np.broadcast_to(vv, (s, vv.size)))
    # A resample whose law diverges at some entry (no finite prediction) cannot rank that entry: it is left out
    # of the ranking there, and a resample with no finite entry at all is left out of the interval (NaN).
    errs = np.where(affordable & np.isfinite(errs), errs, np.inf)
    pick = np.argmin(errs, axis=1)
    best_err = errs[np.arange(s), pick]
    best_err = np.where(np.isfinite(best_err), best_err, np.nan)
    picks, counts = np.unique(pick[1:], return_counts=True)
    shares = {(float(nn[i]), float(vv[i])): float(c) / max(s - 1, 1) for i, c in zip(picks, counts)}
    p = pick[0]
    return DiscreteChoice(float(budget), float(text_tokens), float(nn[p]), float(vv[p]), float(cost[p]),
                          Estimate.from_samples(best_err[0], best_err[1:], fit.level),
                          shares.get((float(nn[p]), float(vv[p])), np.nan), shares)
