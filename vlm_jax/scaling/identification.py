"""Which fitted parameters the data pin down, and why the others are reported as "not identified".

A parameter is not identified when
- there is no interval: the table has no more cells than the law has parameters (`FitResult.no_interval`);
- it sits at a bound of the optimisation: a term of the law that contributes under 0.1% of the predicted error in
  every cell has gone to its bound 0 (its scale's log ran off to -infinity); its scale is at that bound, and the
  term's exponents act on nothing, so any value fits as well;
- its interval spans orders of magnitude: more than a factor of 100 in what it does to the error on the table. A
  scale parameter is judged by the term's value at the table's centre (the natural A also carries N's unit: with N
  in billions, A of a 27K-parameter LLM is multiplied by 1e-4^alpha, whose spread says nothing about the data); an
  exponent e by exp((hi - lo) * log(max/min)) over the table's N or V range -- the change in error its interval
  leaves open across the table. Exponents near zero stay identified: "V hardly matters" is an answer;
- its interval is unbounded (resamples whose fit diverged).
These are the rules the report, summary.json and the plots use; the limits are module constants.
"""

from __future__ import annotations

import math

import numpy as np

from vlm_jax.scaling import units
from vlm_jax.scaling.laws import Estimate, FitResult, log_sigmoid

FACTOR_LIMIT = 100.0  # an interval that leaves the error open by more than this factor on the table: too wide
NEGLIGIBLE_SHARE = 1e-3  # a term under this share of the predicted error in every cell has vanished


def _term_text(form, params) -> str:
    scale, *exps = params
    if not exps:
        return scale
    if form.name == "additive":
        return f"{scale}/{'·'.join(('N' if dict(form.exponent_of)[e] == 'n' else 'V') + '^' + e for e in exps)}"
    return f"{scale}·" + "·".join(("N" if dict(form.exponent_of)[e] == "n" else "V") + "^-" + e for e in exps)


def _decades(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _table_range(fit: FitResult, var: str) -> tuple[float, float, str]:
    t = fit.table
    if var == "n":
        return (float(t.n_values[0]), float(t.n_values[-1]),
                f"N range ({units.params_billions(t.n_values[0])}-{units.params_billions(t.n_values[-1])})")
    return float(t.v_values[0]), float(t.v_values[-1]), f"V range ({t.v_values[0]:g}-{t.v_values[-1]:g})"


def identify(fit: FitResult) -> dict[str, str]:
    """{parameter: reason it is not identified, '' when it is}, by the module docstring's rules."""
    form, table = fit.form, fit.table
    reasons: dict[str, list[str]] = {name: [] for name in form.param_names}
    if fit.no_interval:
        for why in reasons.values():
            why.append(f"no interval: {fit.no_interval}")

    # ---- terms at their bound 0
    log_n, log_v = np.log(table.n) - fit.centre[0], np.log(table.v) - fit.centre[1]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        share = np.exp(form.log_terms(fit.coords, log_n, log_v, np) - form.log_predict(fit.coords, log_n, log_v, np))
    for t, params in enumerate(form.terms):
        if not np.nanmax(share[t], initial=0.0) >= NEGLIGIBLE_SHARE:
            term = _term_text(form, params)
            reasons[params[0]].append(f"at its bound 0: the term {term} is under {NEGLIGIBLE_SHARE:.1%} of the "
                                      "predicted error in every cell")
            for e in params[1:]:
                reasons[e].append(f"its term {term} has vanished ({params[0]} at its bound 0), so any value fits")

    # ---- intervals too wide or unbounded
    exponent_of = dict(form.exponent_of)
    boot = fit.bootstrap_coords if fit.bootstrap_coords is not None else np.zeros((0, form.num_params))
    for i, name in enumerate(form.param_names):
        point = fit.theta[i]
        if not np.isfinite(point) or (name not in exponent_of and point == 0 and not reasons[name]):
            reasons[name].append(f"its value in natural units under- or overflows ({units.number(point)})")
        if not len(boot):
            continue
        c = boot[:, i]
        if form.coord_names[i].startswith("logit_"):   # a rate in (0, 1) (the saturating law's C): its log
            c = log_sigmoid(c)
        finite = np.isfinite(c)
        if finite.mean() < fit.level:
            reasons[name].append(f"unbounded: {int((~finite).sum())} of {len(c)} resamples diverged")
            continue
        est = Estimate.from_samples(0.0, c[finite], fit.level)   # only the interval's width is read
        if name in exponent_of:
            lo_x, hi_x, where = _table_range(fit, exponent_of[name])
            log_factor = (est.hi - est.lo) * math.log(hi_x / lo_x)
            if log_factor > math.log(FACTOR_LIMIT):
                reasons[name].append(
                    f"interval [{units.number(est.lo)}, {units.number(est.hi)}] too wide: across the table's {where} "
                    f"it leaves the error open by a factor of 10^{_decades(log_factor / math.log(10))} "
                    f"(limit {FACTOR_LIMIT:g})")
        else:
            log_factor = est.hi - est.lo
            if log_factor > math.log(FACTOR_LIMIT):
                at = " at the table's centre" if "centre" in form.coord_names[i] else ""
                reasons[name].append(f"interval spans {_decades(log_factor / math.log(10))} orders of magnitude{at} "
                                     f"(limit {math.log10(FACTOR_LIMIT):g})")
    return {name: "; ".join(r) for name, r in reasons.items()}


def within_table(fit: FitResult, n: float) -> bool:
    """Whether N (billions) lies inside the table's N range (to rounding: a budget spent on the smallest cell)."""
    return fit.table.n_values[0] * (1 - 1e-9) <= n <= fit.table.n_values[-1] * (1 + 1e-9)


def not_identified(fit: FitResult) -> dict[str, str]:
    """Only the parameters that are not identified, with their reasons."""
    return {name: why for name, why in identify(fit).items() if why}
