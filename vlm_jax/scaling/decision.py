"""The decision the study exists for, with how sure the bootstrap is of it.

Per law form: each family's compute-optimal N* and V* at each inference budget and text length (intervals from its
bootstrap fits), its V and N exponents (or why they are not identified), and for every pair of families the
probability that the bootstrap orders their V exponents as the point fits do, e.g. P(beta_detail > beta_reasoning).

Pairing: fits of tables with the same cells and seeds, bootstrapped with the same seed, drew the same resample
indices (`resampling.py`), so resample b of one family and resample b of the other saw the same cells and seeds;
the probability is then the share of resamples b with beta_a[b] > beta_b[b] (paired), which keeps what the two
families share (the same trained models) out of the comparison. Otherwise the two bootstraps are independent and
the probability is taken over all pairs (b, b'). Ties within the solver's tolerance count one half.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from vlm_jax.scaling import frontier, identification, units
from vlm_jax.scaling.laws import Estimate, FitResult
from vlm_jax.scaling.tables import PARAMS_PER_UNIT

_TIE = {"rtol": 1e-6, "atol": 1e-9}


@dataclasses.dataclass(frozen=True)
class Ordering:
    """P(param of a > param of b) over the bootstrap; p is NaN (with `why`) when either fit has no bootstrap."""

    a: str
    b: str
    param: str
    p: float
    paired: bool
    resamples: int
    why: str = ""


def ordering_probability(fit_a: FitResult, fit_b: FitResult, param: str = "beta") -> Ordering:
    """How often the bootstrap puts `param` of fit_a above that of fit_b (see the module docstring)."""
    a_name, b_name = fit_a.table.task, fit_b.table.task
    i, j = fit_a.form.param_names.index(param), fit_b.form.param_names.index(param)
    x, y = fit_a.bootstrap[:, i], fit_b.bootstrap[:, j]
    if not len(x) or not len(y):
        missing = [f for f in (fit_a, fit_b) if not len(f.bootstrap)]
        why = "; ".join(f"{f.table.task}: {f.no_interval or 'no bootstrap'}" for f in missing)
        return Ordering(a_name, b_name, param, np.nan, False, 0, why)
    paired = (fit_a.resample_key != "" and fit_a.resample_key == fit_b.resample_key
              and fit_a.table.design() == fit_b.table.design())
    if paired:
        keep = ~(np.isnan(x) | np.isnan(y))
        x, y = x[keep], y[keep]
        tie = np.isclose(x, y, **_TIE)
        p = float(np.mean(np.where(tie, 0.5, x > y))) if len(x) else np.nan
        return Ordering(a_name, b_name, param, p, True, len(x))
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    tie = np.isclose(x[:, None], y[None, :], **_TIE)
    p = float(np.mean(np.where(tie, 0.5, x[:, None] > y[None, :])))
    return Ordering(a_name, b_name, param, p, False, int(min(len(x), len(y))))


# ----------------------------------------------------------------------------------------------- JSON pieces

def estimate_json(est: Estimate, *, reason: str = "", scale: float = 1.0) -> dict:
    """{point, lo, hi} (times `scale`) with null for what is not a finite number, and a reason next to it."""
    out = {k: (float(x) * scale if np.isfinite(x) else None) for k, x in
           (("point", est.point), ("lo", est.lo), ("hi", est.hi))}
    if reason:
        out["identified"] = False
        out["reason"] = reason
    elif out["lo"] is None or out["hi"] is None:
        if np.isnan(est.lo) and np.isnan(est.hi):
            out["reason"] = "no interval"
        else:
            out["reason"] = "interval unbounded: " + ", ".join(
                f"{k} is {'undefined' if np.isnan(x) else 'infinite'}" for k, x in (("lo", est.lo), ("hi", est.hi))
                if not np.isfinite(x))
    if out["point"] is None and "reason" not in out:
        out["reason"] = "no finite value"
    return out


def param_json(fit: FitResult, reasons: Mapping[str, str]) -> dict:
    return {name: dict(estimate_json(est, reason=reasons.get(name, "")), identified=not reasons.get(name))
            for name, est in fit.params.items()}


# ----------------------------------------------------------------------------------------------- the decision

def common_budgets(fits: Sequence[FitResult], text_tokens: float, count: int = 4) -> np.ndarray:
    """float[count] budgets spanning every table's own inference costs at Q = text_tokens."""
    costs = np.concatenate([frontier.inference_flops(f.table.n, f.table.v, text_tokens) for f in fits])
    return np.geomspace(costs.min(), costs.max(), count)


def _optimum_json(fit: FitResult, budget: float, q: float, v_range) -> dict:
    p = frontier.continuous_optimum(fit, budget, q, v_range=v_range)
    return {"budget_flops": float(budget), "budget": units.flops(budget),
            "n_params": estimate_json(p.n, scale=PARAMS_PER_UNIT), "v": estimate_json(p.v),
            "error": estimate_json(p.error), "extrapolated": not identification.within_table(fit, p.n.point),
            "binding": bool(p.binding)}


def noise_json(fit: FitResult) -> dict:
    """What noise the intervals and weights include, in words and numbers."""
    t, noise = fit.table, fit.noise
    counts = t.seed_counts
    out = {"seeds_per_cell": {"min": int(counts.min()), "max": int(counts.max())},
           "resampled": fit.resampled or None}
    if noise.seed_identified:
        out["seed_log_sd"] = noise.pooled_seed_log_sd
        out["seed_dof"] = noise.seed_dof
        out["seed_noise"] = (f"seed-to-seed sd of log error {noise.pooled_seed_log_sd:.2g} (pooled over the cells, "
                             f"{noise.seed_dof} degrees of freedom)")
    else:
        out["seed_log_sd"] = None
        out["seed_noise"] = ("training (seed) noise not identified: one seed per cell, so the intervals hold the "
                             "cells' scatter and evaluation noise only")
    if noise.binomial_known:
        q = t.questions[np.isfinite(t.questions)]
        out["questions"] = {"min": float(q.min()), "max": float(q.max())}
        out["evaluation_noise"] = (f"binomial on {units.number(q.min())}"
                                   + (f"-{units.number(q.max())}" if q.max() > q.min() else "")
                                   + " questions per cell, in the weights")
    else:
        out["questions"] = None
        out["evaluation_noise"] = "not known: the results carry no question counts"
    w = fit.weights
    out["weights"] = {"min": float(w.min()), "max": float(w.max())}
    return out


def decide(fits: Mapping[str, Mapping[str, object]], forms: Sequence[str], *, text_tokens: Sequence[float],
           budgets: Sequence[float] | None = None, v_range=frontier.DEFAULT_V_RANGE) -> dict:
    """The decision per law form. fits: {task: {form name: FitResult or the exception its fit raised}}."""
    out = {}
    for form in forms:
        good = {task: f[form] for task, f in fits.items() if isinstance(f.get(form), FitResult)}
        failed = {task: _error_text(f[form]) for task, f in fits.items()
                  if form in f and not isinstance(f[form], FitResult)}
        entry: dict = {"families": {}, "failed": failed}
        if good:
            first = next(iter(good.values()))
            entry.update(formula=first.form.formula, level=first.level, resamples=len(first.bootstrap))
        reasons = {task: identification.identify(fit) for task, fit in good.items()}
        for task, fit in good.items():
            fam = {name: dict(estimate_json(fit.params[name], reason=reasons[task][name]),
                              identified=not reasons[task][name]) for name in ("beta", "alpha")}
            fam["not_identified"] = {k: v for k, v in reasons[task].items() if v}
            fam["noise"] = noise_json(fit)
            fam["optimum"] = {}
            entry["families"][task] = fam
        for q in text_tokens:
            qb = list(budgets) if budgets else (list(common_budgets(list(good.values()), q)) if good else [])
            for task, fit in good.items():
                rows = []
                for c in qb:
                    try:
                        rows.append(_optimum_json(fit, c, q, v_range))
                    except ValueError as e:  # a budget this family's law cannot place
                        rows.append({"budget_flops": float(c), "budget": units.flops(c), "error_text": str(e)})
                entry["families"][task]["optimum"][f"{q:g}"] = rows
        ranked = sorted(good, key=lambda t: -good[t].params["beta"].point
                        if np.isfinite(good[t].params["beta"].point) else math.inf)
        orders = []
        for a, b in itertools.combinations(ranked, 2):
            o = ordering_probability(good[a], good[b], "beta")
            why = o.why or _caveat(a, b, reasons)
            orders.append({"a": a, "b": b, "param": "beta", "p": None if np.isnan(o.p) else o.p,
                           "paired": o.paired, "resamples": o.resamples,
                           "pairing": ("paired: both families resampled on the same cells and seeds" if o.paired
                                       else "independent: the families do not share cells and seeds"),
                           **({"caveat": why} if why else {})})
        entry["v_exponent_order"] = orders
        out[form] = entry
    return {"primary_form": forms[0] if forms else None, "forms": out}


def _caveat(a: str, b: str, reasons) -> str:
    weak = [f"beta of {t!r} is not identified" for t in (a, b) if reasons[t].get("beta")]
    return "; ".join(weak)


def _error_text(e) -> str:
    return f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)


# ----------------------------------------------------------------------------------------------- text

def _est_text(d: dict, fmt=units.number) -> str:
    """'point [lo, hi]' from estimate_json's dict (null endpoints in words)."""
    point = fmt(d["point"]) if d["point"] is not None else "undefined"
    if d["lo"] is None and d["hi"] is None:
        return f"{point} (no interval)"
    ends = [fmt(x) if x is not None else "unbounded" for x in (d["lo"], d["hi"])]
    if ends[0] == ends[1] == point:
        return f"{point} (every resample agrees)"
    return f"{point} [{ends[0]}, {ends[1]}]"


def _param_text(d: dict) -> str:
    if d.get("identified") is False:
        return f"not identified ({d['reason']})"
    return _est_text(d)


def format_decision(decision: dict) -> str:
    """The report's opening: the primary form in full, the other forms' orderings in one line each."""
    forms = decision["forms"]
    primary = decision["primary_form"]
    if primary is None or not forms.get(primary, {}).get("families"):
        lines = ["DECISION: none -- no law could be fitted"]
        for form, entry in forms.items():
            for task, err in entry["failed"].items():
                lines.append(f"  {form} law for {task!r} failed: {err}")
        return "\n".join(lines)
    entry = forms[primary]
    fams = entry["families"]
    boot = (f"{entry['level']:.0%} intervals from {entry['resamples']} bootstrap resamples of "
            f"{_resampled(fams)}" if entry["resamples"] else "no bootstrap intervals")
    lines = [f"DECISION ({primary} law {entry['formula']}; {boot})"]
    for o in entry["v_exponent_order"]:
        lines.append("  " + _order_text(o))
    if not entry["v_exponent_order"]:
        lines.append("  one family only: no ordering of V exponents to give")
    for name, what in (("beta", "V exponent beta"), ("alpha", "N exponent alpha")):
        lines.append(f"  {what}: " + ";  ".join(f"{t} {_param_text(f[name])}" for t, f in fams.items()))
    for q in next(iter(fams.values()))["optimum"]:
        lines.append(f"  compute-optimal N*, V* at Q = {q} text tokens (! = N* outside the table's N range):")
        budgets = [r["budget"] for r in next(iter(fams.values()))["optimum"][q]]
        for k, budget in enumerate(budgets):
            parts = []
            for t, f in fams.items():
                r = f["optimum"][q][k]
                if "error_text" in r:
                    parts.append(f"{t}: {r['error_text']}")
                    continue
                bang = "!" if r["extrapolated"] else ""
                parts.append(f"{t}: N* {_est_text(r['n_params'], units.params)}{bang}, V* {_est_text(r['v'])}")
            lines.append(f"    {budget:>12}   " + "   |   ".join(parts))
    for t, f in fams.items():
        lines.append(f"  noise ({t}): {f['noise']['seed_noise']}; evaluation {f['noise']['evaluation_noise']}")
    for t, f in fams.items():
        for name, why in f["not_identified"].items():
            if name not in ("alpha", "beta"):
                lines.append(f"  not identified ({t}): {name}: {why}")
    for t, err in entry["failed"].items():
        lines.append(f"  {primary} law for {t!r} failed: {err}")
    for form, other in forms.items():
        if form == primary:
            continue
        parts = [_order_text(o) for o in other["v_exponent_order"]] or ["no ordering"]
        parts += [f"{t!r} failed: {err}" for t, err in other["failed"].items()]
        lines.append(f"  {form} law: " + "; ".join(parts) + " (details below)")
    return "\n".join(lines)


def _resampled(fams) -> str:
    kinds = {f["noise"]["resampled"] for f in fams.values()} - {None}
    return " / ".join(sorted(kinds)) or "cells"


def _order_text(o: dict) -> str:
    name = f"P(beta_{o['a']} > beta_{o['b']})"
    if o["p"] is None:
        return f"{name}: not available ({o.get('caveat', 'no bootstrap')})"
    text = f"{name} = {o['p']:.2f}  ({o['pairing']}; {o['resamples']} resamples)"
    return text + (f"; caution: {o['caveat']}" if o.get("caveat") else "")
