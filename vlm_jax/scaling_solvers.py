"""Minimisers of the robust scaling-law objective: a grid screen, scipy L-BFGS-B, and a batched L-BFGS.

The objective (Hoffmann et al. 2022, approach 3) is a weighted sum of Huber losses of log-error residuals,
    L(c) = sum_i w_i * huber_delta(log_predict(c, log_n_i, log_v_i) - log_err_i),
where integer weights w express bootstrap resampling (a cell drawn k times has weight k) and zero weights
leave-one-out. Everything runs in float64 (`jax.enable_x64` locally, never globally): noise-free tables must be
recovered to 1e-6, which float32 cannot resolve.

`form` is a law form (see `vlm_jax.scaling.LawForm`): only its `log_predict(coords, log_n, log_v, xp)` is used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

_CELL_BUCKET = 16  # cells are padded to a multiple of this, so similar tables share one compiled solver
_CHUNK = 256  # problems per batched solve: the vmapped loop runs until its slowest member converges


def _huber_residuals(form, coords, log_n, log_v, log_err, delta):
    return optax.losses.huber_loss(form.log_predict(coords, log_n, log_v, jnp) - log_err, delta=delta)


def _objective(coords, weights, log_n, log_v, log_err, *, form, delta):
    """float[] weighted Huber loss of coords float[P] over cells float[M]."""
    return jnp.sum(weights * _huber_residuals(form, coords, log_n, log_v, log_err, delta))


_value_and_grad = jax.jit(jax.value_and_grad(_objective), static_argnames=("form", "delta"))


@functools.partial(jax.jit, static_argnames=("form", "delta"))
def _grid_losses(grid, weights, log_n, log_v, log_err, *, form, delta):
    """float[B, G]: the loss of each of G start points (float[G, P]) under each weight vector (float[B, M])."""
    huber = _huber_residuals(form, grid, log_n, log_v, log_err, delta)  # [G, M]
    return weights @ huber.T


def screen_starts(form, grid, weights, log_n, log_v, log_err, *, delta: float, k: int) -> np.ndarray:
    """float[B, k, P]: for each weight vector (float[B, M]) the k grid points (float[G, P]) of lowest loss.

    Ranking the whole grid by its loss first and running L-BFGS from the best few is what keeps a fit from a
    start grid of hundreds of points fast; the rest would mostly descend into the same basins.
    """
    with jax.enable_x64(True):
        losses = np.asarray(_grid_losses(grid, weights, log_n, log_v, log_err, form=form, delta=delta))
    losses = np.where(np.isfinite(losses), losses, np.inf)
    k = min(k, grid.shape[0])
    best = np.argsort(losses, axis=1, kind="stable")[:, :k]
    return np.asarray(grid)[best]


def minimize_lbfgsb(form, start, log_n, log_v, log_err, *, delta: float, weights=None, max_iter: int = 2000):
    """Runs scipy L-BFGS-B from float[P] `start`; returns (coords float[P], loss, converged).

    Tolerances are far below scipy's defaults: its default ftol stops once the loss decreases by < 2e-9 in
    absolute terms (the loss is < 1 here), which leaves noise-free fits only ~1e-4 accurate.
    """
    weights = np.ones_like(log_err) if weights is None else weights
    args = tuple(np.asarray(a, dtype=np.float64) for a in (weights, log_n, log_v, log_err))

    def fun(c):
        value, grad = _value_and_grad(c, *args, form=form, delta=delta)
        return float(value), np.asarray(grad, dtype=np.float64)

    with jax.enable_x64(True):
        res = scipy.optimize.minimize(fun, np.asarray(start, dtype=np.float64), jac=True, method="L-BFGS-B",
                                      options=dict(maxiter=max_iter, ftol=1e-15, gtol=1e-12))
    return res.x, float(res.fun), bool(res.success)


def _lbfgs_one(start, weights, log_n, log_v, log_err, *, form, delta, max_iter, gtol):
    fun = functools.partial(_objective, weights=weights, log_n=log_n, log_v=log_v, log_err=log_err,
                            form=form, delta=delta)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        coords, state = carry
        value, grad = value_and_grad(coords, state=state)
        updates, state = opt.update(grad, state, coords, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(coords, updates), state

    def running(carry):
        _, state = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        return (count == 0) | ((count < max_iter) & (jnp.max(jnp.abs(grad)) > gtol))

    coords, state = jax.lax.while_loop(running, step, (start, opt.init(start)))
    return coords, fun(coords), optax.tree.get(state, "count") < max_iter


@functools.partial(jax.jit, static_argnames=("form", "delta", "max_iter", "gtol"))
def _lbfgs_batch(starts, weights, log_n, log_v, log_err, *, form, delta, max_iter, gtol):
    solve = functools.partial(_lbfgs_one, form=form, delta=delta, max_iter=max_iter, gtol=gtol)
    return jax.vmap(solve, in_axes=(0, 0, None, None, None))(starts, weights, log_n, log_v, log_err)


def minimize_batched(form, starts, weights, log_n, log_v, log_err, *, delta: float, max_iter: int = 500,
                     gtol: float = 1e-10):
    """Independent L-BFGS runs (optax, vmapped), one per row of starts float[B, P] and weights float[B, M].

    This is what makes 1000 bootstrap refits take seconds: they run as one compiled program instead of 1000
    scipy calls. Returns (coords float[B, P], loss float[B], converged bool[B]); converged means the gradient's
    max-norm fell below `gtol` within `max_iter` iterations.
    """
    starts = np.asarray(starts, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    b, m = weights.shape
    if starts.shape[0] != b:
        raise ValueError(f"{starts.shape[0]} starts but {b} weight vectors")
    # Pad cells (zero weight: no loss, no gradient) and problems (all-zero weights: converge at once), so that
    # every call hits the same compiled shapes.
    m_pad = -m % _CELL_BUCKET
    data = [np.pad(np.asarray(a, dtype=np.float64), (0, m_pad)) for a in (log_n, log_v, log_err)]
    weights = np.pad(weights, ((0, -b % _CHUNK), (0, m_pad)))
    starts = np.pad(starts, ((0, -b % _CHUNK), (0, 0)), mode="edge")
    outs = []
    with jax.enable_x64(True):
        for i in range(0, weights.shape[0], _CHUNK):
            outs.append(_lbfgs_batch(starts[i:i + _CHUNK], weights[i:i + _CHUNK], *data, form=form, delta=delta,
                                     max_iter=max_iter, gtol=gtol))
        coords, loss, converged = (np.concatenate([np.asarray(o[j]) for o in outs])[:b] for j in range(3))
    return coords, loss, converged
