"""Speed of scaling-law fits on a 4 x 7 table (4 LLM sizes x 7 visual-token counts), both law forms.

    python -m benchmarks.bench_fit [--bootstrap 1000] [--repeats 3]

Prints seconds for: the point fit (first call, which compiles the solver, and later calls), the full fit (point
fit + leave-one-N-out + bootstrap), and, as the reference a per-resample script would give, scipy L-BFGS-B run
once per bootstrap resample (timed on 50 resamples, scaled to the requested count).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # scipy's L-BFGS-B stalls on BLAS threads on a busy 2-core box

import argparse
import functools
import statistics
import time

import numpy as np
import scipy.optimize

from vlm_jax import scaling

N = (0.464, 1.84, 3.95, 7.72)
V = (1, 4, 16, 36, 64, 144, 576)
LAWS = {"multiplicative": (0.35, 0.45, 0.06, 0.12), "additive": (0.08, 0.15, 0.5, 0.5, 0.35)}


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def scipy_per_resample_seconds(fit, weights, delta):
    """Seconds per resample of a plain loop: scipy L-BFGS-B (finite-difference gradients) from the point fit."""
    table, form = fit.table, fit.form
    log_err = np.log(table.error)

    def loss(theta, w):
        r = np.abs(np.log(np.maximum(form.predict(theta, table.n, table.v), 1e-300)) - log_err)
        return float(np.sum(w * np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))))

    start = time.perf_counter()
    for w in weights:
        scipy.optimize.minimize(loss, fit.theta, args=(w,), method="L-BFGS-B",
                                options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    return (time.perf_counter() - start) / len(weights)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"4 x 7 table, lognormal noise 2%, {args.bootstrap} bootstrap resamples; seconds (median of "
          f"{args.repeats} after the first call)")
    for form, theta in LAWS.items():
        table = scaling.synthetic_table(form, theta, N, V, noise=0.02, seed=0)
        point = functools.partial(scaling.fit_law, table, form, n_bootstrap=0, loo=False)
        full = functools.partial(scaling.fit_law, table, form, n_bootstrap=args.bootstrap, seed=0)
        first, fit = timed(point)
        point_s = statistics.median(timed(point)[0] for _ in range(args.repeats))
        full_s = statistics.median(timed(full)[0] for _ in range(args.repeats))
        weights = scaling.laws.bootstrap_weights(table, fit.form.num_params, 50, seed=0)
        loop_s = scipy_per_resample_seconds(fit, weights, fit.delta) * args.bootstrap
        print(f"{form:>14}: point fit {point_s:.3f} s (first call, compiling: {first:.2f} s); full fit with "
              f"bootstrap + leave-one-N-out {full_s:.2f} s; scipy loop over resamples ~{loop_s:.1f} s "
              f"({loop_s / full_s:.1f}x the full fit)")


if __name__ == "__main__":
    main()
