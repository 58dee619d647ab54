"""Minimisers of the robust scaling-law objective: a start-grid screen and a batched, compiled L-BFGS.

The objective (Hoffmann et al. 2022, approach 3) is a weighted sum of Huber losses of log-error residuals,
    L(c) = sum_i w_i * huber_delta(log_predict(c, log_n_i, log_v_i) - log_err_i),
where weights w express bootstrap resampling (a cell drawn k times has k times its weight), zero weights
leave-one-out, and a cell's precision (`resampling.cell_noise`). The observed log errors may differ from one
problem to the next (float[B, M]): a bootstrap that resamples seeds within cells changes the cells' errors too.
Everything runs in float64 (`jax.enable_x64` locally, never globally): noise-free tables must be recovered to
1e-6, which float32 cannot resolve.

`form` is a law form (see `vlm_jax.scaling.LawForm`): only its `log_predict(coords, log_n, log_v, xp)` is used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

_CELL_BUCKET = 16  # cells are padded to a multiple of this, so similar tables share one compiled solver
_CHUNK = 256  # problems per compiled call; every call is padded to this many, so it compiles once


def _huber_residuals(form, coords, log_n, log_v, log_err, delta):
    return optax.losses.huber_loss(form.log_predict(coords, log_n, log_v, jnp) - log_err, delta=delta)


def _objective(coords, weights, log_n, log_v, log_err, *, form, delta):
    """float[] weighted Huber loss of coords float[P] over cells float[M]."""
    return jnp.sum(weights * _huber_residuals(form, coords, log_n, log_v, log_err, delta))


@functools.partial(jax.jit, static_argnames=("form", "delta"))
def _grid_losses(grid, weights, log_n, log_v, log_err, *, form, delta):
    """float[B, G]: the loss of each of G start points (float[G, P]) under each weight vector (float[B, M]) and
    its observed log errors (float[B, M])."""
    pred = form.log_predict(grid, log_n, log_v, jnp)  # [G, M]
    huber = optax.losses.huber_loss(pred[None] - log_err[:, None], delta=delta)  # [B, G, M]
    return jnp.einsum("bm,bgm->bg", weights, huber)


def _per_problem(log_err, b: int) -> np.ndarray:
    """float[B, M]: one row of observed log errors per problem (a shared float[M] is repeated)."""
    log_err = np.asarray(log_err, dtype=np.float64)
    return np.broadcast_to(log_err, (b, log_err.shape[-1])) if log_err.ndim == 1 else log_err


def screen_starts(form, grid, weights, log_n, log_v, log_err, *, delta: float, k: int) -> np.ndarray:
    """float[B, k, P]: for each weight vector (float[B, M]) the k grid points (float[G, P]) of lowest loss.

    log_err: float[M] shared by all problems, or float[B, M]. Ranking the whole grid by its loss first and running
    L-BFGS from the best few is what keeps a fit from a start grid of hundreds of points fast; the rest would
    mostly descend into the same basins.
    """
    weights = np.asarray(weights, dtype=np.float64)
    log_err = _per_problem(log_err, len(weights))
    with jax.enable_x64(True):
        losses = np.concatenate([np.asarray(_grid_losses(grid, weights[i:i + _CHUNK], log_n, log_v,
                                                         log_err[i:i + _CHUNK], form=form, delta=delta))
                                 for i in range(0, len(weights), _CHUNK)]) if len(weights) else np.zeros((0, 0))
    losses = np.where(np.isfinite(losses), losses, np.inf)
    k = min(k, grid.shape[0])
    best = np.argsort(losses, axis=1, kind="stable")[:, :k]
    return np.asarray(grid)[best]


def _lbfgs_one(start, weights, log_n, log_v, log_err, *, form, delta, max_iter, gtol, ftol):
    fun = functools.partial(_objective, weights=weights, log_n=log_n, log_v=log_v, log_err=log_err,
                            form=form, delta=delta)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        coords, state, _ = carry
        value, grad = value_and_grad(coords, state=state)
        updates, state = opt.update(grad, state, coords, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(coords, updates), state, value

    def stalled(state, previous):
        # As scipy's ftol: the Huber loss is nearly L1 away from the data, where the gradient need not vanish
        # at the optimum, so a loss that stops decreasing also ends the run.
        value = optax.tree.get(state, "value")
        return previous - value <= ftol * jnp.abs(value)

    def running(carry):
        _, state, previous = carry
        count = optax.tree.get(state, "count")
        grad = optax.tree.get(state, "grad")
        small_grad = jnp.max(jnp.abs(grad)) <= gtol
        return (count == 0) | ((count < max_iter) & ~small_grad & ~stalled(state, previous))

    init = (start, opt.init(start), jnp.asarray(jnp.inf, start.dtype))
    coords, state, _ = jax.lax.while_loop(running, step, init)
    return coords, fun(coords), optax.tree.get(state, "count") < max_iter


# The optimiser loops for thousands of iterations, so XLA's default optimisation (2) pays for its compile time
# even where XLA_FLAGS lowers it for compile-heavy workloads (as the test session does).
@functools.partial(jax.jit, static_argnames=("form", "delta", "max_iter", "gtol", "ftol"),
                   compiler_options={"xla_backend_optimization_level": 2})
def _lbfgs_batch(starts, weights, log_n, log_v, log_err, *, form, delta, max_iter, gtol, ftol):
    solve = functools.partial(_lbfgs_one, log_n=log_n, log_v=log_v, form=form, delta=delta,
                              max_iter=max_iter, gtol=gtol, ftol=ftol)
    # lax.map runs the problems one after another inside one program. vmap would be slower: batched, the line
    # search's branches all execute and every problem waits for the slowest (measured 10-50x slower here).
    return jax.lax.map(lambda swe: solve(swe[0], swe[1], log_err=swe[2]), (starts, weights, log_err))


def minimize_batched(form, starts, weights, log_n, log_v, log_err, *, delta: float, max_iter: int = 500,
                     gtol: float = 1e-10, ftol: float = 1e-13):
    """Independent L-BFGS runs (optax), one per row of starts float[B, P], weights float[B, M] and log errors
    (float[M] shared, or float[B, M]).

    This is what makes 1000 bootstrap refits take about a second: they run inside compiled programs, with no
    Python between iterations. Returns (coords float[B, P], loss float[B], converged bool[B]); converged means
    that within `max_iter` iterations the gradient's max-norm fell below `gtol` or the loss stopped decreasing
    (relative decrease <= `ftol`).
    """
    starts = np.asarray(starts, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    b, m = weights.shape
    if starts.shape[0] != b:
        raise ValueError(f"{starts.shape[0]} starts but {b} weight vectors")
    # Pad cells (zero weight: no loss, no gradient) and problems (all-zero weights: stop after one step), so
    # that every call hits the same compiled shapes.
    m_pad = -m % _CELL_BUCKET
    data = [np.pad(np.asarray(a, dtype=np.float64), (0, m_pad)) for a in (log_n, log_v)]
    log_err = np.pad(_per_problem(log_err, b), ((0, -b % _CHUNK), (0, m_pad)))
    weights = np.pad(weights, ((0, -b % _CHUNK), (0, m_pad)))
    starts = np.pad(starts, ((0, -b % _CHUNK), (0, 0)), mode="edge")
    outs = []
    with jax.enable_x64(True):
        for i in range(0, weights.shape[0], _CHUNK):
            outs.append(_lbfgs_batch(starts[i:i + _CHUNK], weights[i:i + _CHUNK], *data, log_err[i:i + _CHUNK],
                                     form=form, delta=delta, max_iter=max_iter, gtol=gtol, ftol=ftol))
        coords, loss, converged = (np.concatenate([np.asarray(o[j]) for o in outs])[:b] for j in range(3))
    return coords, loss, converged
