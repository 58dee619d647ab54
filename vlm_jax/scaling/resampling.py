"""How noisy each cell is, and the bootstrap's resamples of a table: cells, then seeds within cells.

Two kinds of noise sit in a cell's error. Evaluation: the error is a rate over q questions, binomial with variance
p(1-p)/q, which in log error (what the law is fitted in) is (1-p)/(p q) by the delta method -- large for a cell
that got almost everything right. Evaluated at the measured p, the delta method overstates that for small counts
(a zero count entered as half a question would get a log-error sd of 1.4, as if 0/500 said nothing against 13%);
p is therefore taken with two errors and two right answers added, p~ = (p q + 2) / (q + 4) (Agresti & Coull
1998), which leaves a mid-range cell unchanged and gives the zero count a sd of 0.63.
Training: another seed trains another model; the spread of the cell's seeds measures it. A cell's mean error then
has log variance  (1-p)/(p q) + s^2 / S  (S seeds, s^2 the variance of their log errors). The binomial term is not
divided by S: the seeds are evaluated on the same questions, so that draw is shared (conservative when they are
not). With two or three seeds a cell's own s^2 rests on one or two degrees of freedom, too few to trust when it
happens to be small, so each cell uses the larger of its own and the table's pooled variance; a cell with one seed
uses the pooled one; with one seed everywhere, training noise is not identified and only the binomial term
remains (the report says so).

The fit weighs each cell by 1 / sd (normalised to mean 1), not 1 / variance: the objective is a Huber loss with a
small delta, nearly the absolute log residual, i.e. a Laplace likelihood whose scale grows with the sd.

The bootstrap is two-level (the usual scheme for nested data, e.g. Davison & Hinkley 1997, sec. 3.8): draw M cells
with replacement, then within each drawn cell draw its S seeds with replacement and average them. Resampling cells
carries the law's misfit and, through the residuals, some of the seed noise; resampling seeds adds the seed noise
a cell's mean really has. Counting the seed noise at both levels makes the interval somewhat conservative (wider),
never narrower than cells alone -- the right side to err on for a decision. A cell drawn k times keeps one seed
resample for its k copies (again adding, never removing, variance). With one seed per cell the second level
changes nothing. Each cell keeps its point-fit weight in every resample (times its multiplicity). The draws depend
only on the table's design (cells, seeds per cell) and the seed, so two task
families measured on the same cells and seeds get the same resample indices: their fits are paired.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from vlm_jax.scaling.tables import ScalingTable


@dataclasses.dataclass(frozen=True)
class CellNoise:
    """Per-cell noise of a table's mean errors, in log error.

    binomial_log_var: float[M] (1-p~)/(p~ q), NaN where the question count is unknown; seed_log_var: float[M] the
    seed term s^2 / S (0 where not identified); pooled_seed_log_sd: the table's pooled seed sd of log error (NaN
    without a cell of two seeds); seed_dof: its degrees of freedom; log_sd: float[M] the total; weights: float[M]
    1 / log_sd normalised to mean 1 (all 1 when nothing is known).
    """

    binomial_log_var: np.ndarray
    seed_log_var: np.ndarray
    pooled_seed_log_sd: float
    seed_dof: int
    log_sd: np.ndarray
    weights: np.ndarray

    @property
    def seed_identified(self) -> bool:
        return self.seed_dof > 0

    @property
    def binomial_known(self) -> bool:
        return bool(np.isfinite(self.binomial_log_var).any())


def cell_noise(table: ScalingTable) -> CellNoise:
    """The module docstring's noise model for each cell of `table`."""
    q = table.questions
    p = (table.error * q + 2.0) / (q + 4.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        binomial = (1.0 - p) / (p * q)
    known = np.isfinite(binomial)
    # A cell whose question count is missing gets the table's typical binomial term rather than none (which would
    # make it the most trusted cell).
    binom_used = np.where(known, binomial, np.median(binomial[known]) if known.any() else 0.0)
    counts = table.seed_counts
    log_seeds = np.log(table.seed_errors)
    several = counts >= 2
    own = np.full(len(table), np.nan)
    if several.any():
        own[several] = np.nanvar(log_seeds[several], axis=1, ddof=1)
    dof = int(np.sum(counts[several] - 1))
    pooled = float(np.sum((counts[several] - 1) * own[several]) / dof) if dof else np.nan
    seed_var = np.where(several, np.fmax(own, pooled), pooled if dof else 0.0) / counts
    total = binom_used + seed_var
    positive = total > 0
    if positive.any():
        total = np.where(positive, total, total[positive].min())  # p = 1 has no binomial term: not infinitely sure
        sd = np.sqrt(total)
        weights = (1.0 / sd) / np.mean(1.0 / sd)
    else:
        sd, weights = np.sqrt(total), np.ones(len(table))
    return CellNoise(binomial_log_var=binomial, seed_log_var=seed_var,
                     pooled_seed_log_sd=float(np.sqrt(pooled)) if dof else np.nan, seed_dof=dof, log_sd=sd,
                     weights=weights)


def _identifiable(weights: np.ndarray, n_idx: np.ndarray, v_idx: np.ndarray, num_params: int) -> np.ndarray:
    """bool[B]: weight vectors (float[B, M]) that keep >= P cells, >= 2 distinct N and >= 2 distinct V."""
    present = weights > 0
    distinct_n = np.stack([(present & (n_idx == k)).any(1) for k in range(n_idx.max() + 1)], 1).sum(1)
    distinct_v = np.stack([(present & (v_idx == k)).any(1) for k in range(v_idx.max() + 1)], 1).sum(1)
    return (present.sum(1) >= num_params) & (distinct_n >= 2) & (distinct_v >= 2)


def _cell_draws(rng, table: ScalingTable, num_params: int, n_resamples: int) -> np.ndarray:
    m = len(table)
    n_idx = np.searchsorted(table.n_values, table.n)
    v_idx = np.searchsorted(table.v_values, table.v)
    weights = rng.multinomial(m, np.full(m, 1.0 / m), size=n_resamples).astype(np.float64)
    for _ in range(100):
        bad = ~_identifiable(weights, n_idx, v_idx, num_params)
        if not bad.any():
            return weights
        weights[bad] = rng.multinomial(m, np.full(m, 1.0 / m), size=int(bad.sum()))
    raise ValueError(f"task {table.task!r}: resamples keep failing to identify the law; the table is too small "
                     "to bootstrap")


def bootstrap_weights(table: ScalingTable, num_params: int, n_resamples: int, seed: int) -> np.ndarray:
    """float[B, M] cell multiplicities of B resamples (M draws with replacement each).

    The rare resample that cannot identify the law (too few distinct cells, a single N or V) is redrawn, since
    its fit would be arbitrary rather than a sample of the estimator.
    """
    return _cell_draws(np.random.default_rng(seed), table, num_params, n_resamples)


@dataclasses.dataclass(frozen=True)
class Resamples:
    """B bootstrap resamples of a table: counts float[B, M] (cell multiplicities), log_error float[B, M] (each
    resample's cell errors, its seeds redrawn when `seeds_resampled`), and `key`, equal for equal draws."""

    counts: np.ndarray
    log_error: np.ndarray
    seeds_resampled: bool
    key: str


def resample(table: ScalingTable, num_params: int, n_resamples: int, seed: int, *,
             seeds: bool = True) -> Resamples:
    """The two-level bootstrap of the module docstring (`seeds=False`: cells only)."""
    rng = np.random.default_rng(seed)
    counts = _cell_draws(rng, table, num_params, n_resamples)  # the same draws as bootstrap_weights
    width = table.seed_errors.shape[1]
    uniform = rng.random((n_resamples, len(table), width))   # drawn always: the stream stays the same
    per_cell = table.seed_counts
    draws = np.floor(uniform * per_cell[None, :, None]).astype(np.int64)  # [B, M, S]: seed index per slot
    resampled = seeds and (per_cell > 1).any()
    if resampled:
        slots = np.arange(width)[None, None, :] < per_cell[None, :, None]
        values = np.take_along_axis(np.broadcast_to(table.seed_errors, draws.shape), draws, axis=2)
        means = np.where(slots, values, 0.0).sum(2) / per_cell[None, :]
    else:
        means = np.broadcast_to(table.error, counts.shape)
    digest = hashlib.sha1(counts.tobytes())
    if resampled:
        digest.update(draws.tobytes())
    return Resamples(counts=counts, log_error=np.log(means), seeds_resampled=bool(resampled),
                     key=digest.hexdigest())
