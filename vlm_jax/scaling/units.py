"""Numbers as a person reads them: parameter counts as 27K or 1.8B, FLOPs as 3.2 GFLOPs, intervals without nan.

One rule everywhere (reports, plots, the grid's table): two significant digits, but never fewer than the integer
part (308K, not 310K; 14B, not 1.4e1B); a value that rounds up to 1000 moves to the next unit (999.6K -> 1M).
Parameter counts use K, M, B (from 0.1B, as LLMs are named: 0.46B, not 464M) and T; FLOPs use SI prefixes.
Anything not finite is written in words ("unbounded", "undefined"), never as nan or inf.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib import ticker

# (from this value on, divide by, suffix)
_PARAM_UNITS = ((1e12, 1e12, "T"), (1e8, 1e9, "B"), (1e6, 1e6, "M"), (1e3, 1e3, "K"))
_SI = tuple((f, f, name) for f, name in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")))


def _digits(x: float) -> str:
    """Two significant digits, all integer digits kept, no trailing zeros: 27.04 -> 27, 0.4640 -> 0.46."""
    if x >= 10:
        return f"{x:.0f}"
    text = f"{x:.2g}"
    return text.rstrip("0").rstrip(".") if "." in text and "e" not in text else text


def _scaled(x: float, units, below: str = "") -> str:
    """x in the largest unit it reaches (after rounding), e.g. (27040, K) -> '27K'."""
    if not math.isfinite(x):
        return "undefined"
    sign, x = ("-" if x < 0 else ""), abs(float(x))
    ladder = list(units)[::-1]  # smallest unit first
    scale, suffix, rung = 1.0, below, -1
    for i, (start, factor, name) in enumerate(ladder):
        if x >= start:
            scale, suffix, rung = factor, name, i
    text = _digits(x / scale)
    if text == "1000" and rung + 1 < len(ladder):  # 999.6K rounds to 1000K: say 1M
        _, scale, suffix = ladder[rung + 1]
        text = _digits(x / scale)
    if x == 0:
        text = "0"
    return sign + text + suffix


def params(count: float) -> str:
    """A raw parameter count: 27_040 -> '27K', 463_987_712 -> '0.46B', 1_836_828_672 -> '1.8B'."""
    return _scaled(count, _PARAM_UNITS)


def params_billions(n: float) -> str:
    """N in billions (the laws' unit) as a parameter count."""
    return params(float(n) * 1e9)


def flops(value: float) -> str:
    """FLOPs with an SI prefix: 25_278_144 -> '25 MFLOPs', 1.1e12 -> '1.1 TFLOPs'."""
    text = _scaled(value, _SI)
    if text == "undefined":
        return text
    number = text.rstrip("kMGTPE")
    return f"{number} {text[len(number):]}FLOPs"


def number(x: float) -> str:
    """A plain quantity to three significant digits; non-finite values in words."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "undefined"
    if math.isinf(x):
        return "unbounded" if x > 0 else "-unbounded"
    return f"{x:.0f}" if 100 <= abs(x) < 1e6 else f"{x:.3g}"


def interval(est, fmt=number) -> str:
    """'point [lo, hi]' of an Estimate, with an endpoint that is infinite written as 'unbounded' and a missing
    interval as '(no interval)'."""
    point = fmt(est.point) if np.isfinite(est.point) else number(est.point)
    if np.isnan(est.lo) and np.isnan(est.hi):
        return f"{point} (no interval)"
    ends = [fmt(x) if np.isfinite(x) else ("unbounded" if not np.isnan(x) else "undefined") for x in (est.lo, est.hi)]
    if ends[0] == ends[1] == point:
        return f"{point} (every resample agrees)"
    return f"{point} [{ends[0]}, {ends[1]}]"


def param_formatter(scale: float = 1e9) -> ticker.FuncFormatter:
    """Matplotlib tick formatter for an axis in units of `scale` parameters (the laws' billions by default)."""
    return ticker.FuncFormatter(lambda x, _: params(x * scale) if x > 0 else "")


def flops_formatter() -> ticker.FuncFormatter:
    """Matplotlib tick formatter for a FLOPs axis."""
    return ticker.FuncFormatter(lambda x, _: flops(x) if x > 0 else "")
