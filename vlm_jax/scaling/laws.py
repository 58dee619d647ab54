"""Scaling laws of downstream error over LLM size N (billions of parameters) and visual tokens V.

Three law forms:
    multiplicative (the paper's):  err = A * N^-alpha * V^-beta + D
    additive (Chinchilla-style):   err = E + A / N^alpha + B / V^beta
    saturating:                    err = 1 / (N^alpha V^beta / A + 1 / C)

The saturating law is the paper's power term capped by a ceiling C: the harmonic sum of A N^-alpha V^-beta and C,
so err ~ A N^-alpha V^-beta far below C (the multiplicative law with D = 0) and err -> C where the power term
outgrows it; C lies in (0, 1) (its coordinate is its logit). C is the error of a model that has learnt nothing of
the family (answering without the image, or guessing among the answers), which no model exceeds and a power law
does exceed at small N and V. On the smoke grid
a family is learnt only from some LLM size on (reasoning: 0.8 / 0.6 / 0.07 over 27K / 99K / 308K), a bend one power
of N cannot follow; the misfit then leaks into V's exponent in every bootstrap resample that is unbalanced in N.

Fitting follows Hoffmann et al. (2022, approach 3) as replicated by Besiroglu et al. (2024): minimise the summed
Huber loss (delta = 1e-3) of log-error residuals, with each law written as a log-sum-exp of its terms so that the
scale parameters are optimised on a log scale, by L-BFGS from a grid of starting points. Each cell is weighed by
its precision (evaluation's binomial noise and its seeds' spread, `resampling.py`). Uncertainty comes from a seeded
two-level bootstrap (cells, then seeds within cells; percentile intervals), and out-of-sample quality from
refitting without each LLM size in turn (leave-one-N-out). A table with no more cells than the law has parameters
is interpolated, not fitted: it gets no interval at all (`FitResult.no_interval` says why), never a zero-width one.

Internally N and V are divided by their geometric means over the table, so a single start grid suits any unit of N.
The reported parameters are in the original units (N in billions, V in tokens); predictions are made from the
centred coordinates, since a degenerate fit's natural scale can under- or overflow (A = exp(log A_centre +
alpha log N_centre) is 0 in floating point for alpha = 139 and N ~ 1e-4 B) while its predictions stay finite.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np

from vlm_jax.scaling import resampling, solvers, units
from vlm_jax.scaling.resampling import bootstrap_weights  # noqa: F401  (re-exported: laws.bootstrap_weights)
from vlm_jax.scaling.tables import ScalingTable

# ----------------------------------------------------------------------------------------------- law forms

@dataclasses.dataclass(frozen=True)
class LawForm:
    """A parametric law err(N, V).

    log_predict(coords float[..., P], log_n float[M], log_v float[M], xp) -> float[..., M]: log error in the
        optimisation coordinates, with log N and log V centred on the table (xp is numpy or jax.numpy).
    to_natural(coords float[..., P], log_n0, log_v0) -> float[..., P]: the parameters in original units.
    predict(theta float[..., P], n float[M], v float[M]) -> float[..., M]: error from natural parameters.
    terms: the parameters of each additive term of the law, e.g. (("A", "alpha", "beta"), ("D",)); a term's
        scale parameter comes first, and its log value at the table's centre is that parameter's coordinate.
    exponent_of: which variable ('n' or 'v') each exponent acts on.
    log_terms(coords float[..., P], log_n float[M], log_v float[M], xp) -> float[..., T, M]: each term's log value.
    """

    name: str
    formula: str
    param_names: tuple[str, ...]
    coord_names: tuple[str, ...]
    start_grid: tuple[tuple[float, ...], ...]
    log_predict: Callable
    to_natural: Callable
    predict: Callable
    terms: tuple[tuple[str, ...], ...] = ()
    exponent_of: tuple[tuple[str, str], ...] = ()
    log_terms: Callable | None = None

    @property
    def num_params(self) -> int:
        return len(self.param_names)

    def grid(self) -> np.ndarray:
        """float[G, P]: the Cartesian product of the per-coordinate start values."""
        return np.array(list(itertools.product(*self.start_grid)), dtype=np.float64)


def _split(x, k):
    return tuple(x[..., i, None] for i in range(k))


def _mult_log_predict(c, log_n, log_v, xp):
    log_a, alpha, beta, log_d = _split(c, 4)
    return xp.logaddexp(log_a - alpha * log_n - beta * log_v, log_d)


def _mult_log_terms(c, log_n, log_v, xp):
    log_a, alpha, beta, log_d = _split(c, 4)
    main = log_a - alpha * log_n - beta * log_v
    return xp.stack([main, xp.broadcast_to(log_d, main.shape)], axis=-2)


@np.errstate(over="ignore")   # a resample's extreme exponents (see _mult_predict)
def _mult_to_natural(c, log_n0, log_v0):
    log_a, alpha, beta, log_d = (c[..., i] for i in range(4))
    return np.stack([np.exp(log_a + alpha * log_n0 + beta * log_v0), alpha, beta, np.exp(log_d)], axis=-1)


def _power_term(scale, exponents_and_logs):
    """scale * prod x^-e computed as exp(log scale - sum e log x): a zero scale stays 0 where x^-e overflows
    (0 * inf would be nan)."""
    log = np.log(scale)
    for e, log_x in exponents_and_logs:
        log = log - e * log_x
    return np.exp(log)


# A bootstrap resample's extreme exponents can overflow far from the table (inf): the frontier and the plots drop
# those resamples; numpy's warnings about them would only drown the report.
@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def _mult_predict(theta, n, v):
    a, alpha, beta, d = _split(np.asarray(theta, dtype=np.float64), 4)
    return _power_term(a, ((alpha, np.log(n)), (beta, np.log(v)))) + d


def _add_log_predict(c, log_n, log_v, xp):
    log_e, log_a, alpha, log_b, beta = _split(c, 5)
    return xp.logaddexp(xp.logaddexp(log_e, log_a - alpha * log_n), log_b - beta * log_v)


def _add_log_terms(c, log_n, log_v, xp):
    log_e, log_a, alpha, log_b, beta = _split(c, 5)
    a_term, b_term = log_a - alpha * log_n, log_b - beta * log_v
    shape = xp.broadcast_shapes(a_term.shape, b_term.shape)
    return xp.stack([xp.broadcast_to(log_e, shape), xp.broadcast_to(a_term, shape), xp.broadcast_to(b_term, shape)],
                    axis=-2)


@np.errstate(over="ignore")
def _add_to_natural(c, log_n0, log_v0):
    log_e, log_a, alpha, log_b, beta = (c[..., i] for i in range(5))
    return np.stack([np.exp(log_e), np.exp(log_a + alpha * log_n0), alpha, np.exp(log_b + beta * log_v0), beta],
                    axis=-1)


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def _add_predict(theta, n, v):
    e, a, alpha, b, beta = _split(np.asarray(theta, dtype=np.float64), 5)
    return e + _power_term(a, ((alpha, np.log(n)),)) + _power_term(b, ((beta, np.log(v)),))


def _sat_log_power(c, log_n, log_v):
    log_a, alpha, beta, _ = _split(c, 4)
    return log_a - alpha * log_n - beta * log_v


def log_sigmoid(x, xp=np):
    """log(1 / (1 + e^-x)): the log of a rate in (0, 1) from its logit coordinate (the saturating law's C)."""
    return -xp.logaddexp(0.0, -x)


def _sat_log_ceiling(c, xp):
    """log C from its coordinate, the logit of C: an error rate's ceiling lies in (0, 1)."""
    return log_sigmoid(_split(c, 4)[3], xp)


def _sat_log_predict(c, log_n, log_v, xp):
    return -xp.logaddexp(-_sat_log_power(c, log_n, log_v), -_sat_log_ceiling(c, xp))


def _sat_log_terms(c, log_n, log_v, xp):
    main = _sat_log_power(c, log_n, log_v)
    return xp.stack([main, xp.broadcast_to(_sat_log_ceiling(c, xp), main.shape)], axis=-2)


@np.errstate(over="ignore")
def _sat_to_natural(c, log_n0, log_v0):
    """As the multiplicative law's (A, alpha, beta), with C = sigmoid of its coordinate in place of D = exp."""
    theta = _mult_to_natural(c, log_n0, log_v0)
    theta[..., 3] = 1.0 / (1.0 + np.exp(-c[..., 3]))
    return theta


@np.errstate(over="ignore", invalid="ignore", divide="ignore")
def _sat_predict(theta, n, v):
    a, alpha, beta, c = _split(np.asarray(theta, dtype=np.float64), 4)
    power = _power_term(a, ((alpha, np.log(n)), (beta, np.log(v))))
    return 1.0 / (1.0 / power + 1.0 / c)


# Start grids span error scales from 0.5% to 50% and exponents from 0 to 1 (coordinates are at the table centre).
_EXPONENTS = (0.0, 0.1, 0.3, 0.6, 1.0)
MULTIPLICATIVE = LawForm(
    name="multiplicative",
    formula="err = A * N^-alpha * V^-beta + D",
    param_names=("A", "alpha", "beta", "D"),
    coord_names=("log_A_centre", "alpha", "beta", "log_D"),
    start_grid=((-5.0, -3.5, -2.0, -0.5), _EXPONENTS, _EXPONENTS, tuple(np.log([0.005, 0.03, 0.15, 0.5]))),
    log_predict=_mult_log_predict,
    to_natural=_mult_to_natural,
    predict=_mult_predict,
    terms=(("A", "alpha", "beta"), ("D",)),
    exponent_of=(("alpha", "n"), ("beta", "v")),
    log_terms=_mult_log_terms,
)
ADDITIVE = LawForm(
    name="additive",
    formula="err = E + A / N^alpha + B / V^beta",
    param_names=("E", "A", "alpha", "B", "beta"),
    coord_names=("log_E", "log_A_centre", "alpha", "log_B_centre", "beta"),
    start_grid=(tuple(np.log([0.005, 0.05, 0.3])), (-5.0, -3.0, -1.0), (0.0, 0.2, 0.5, 1.0),
                (-5.0, -3.0, -1.0), (0.0, 0.2, 0.5, 1.0)),
    log_predict=_add_log_predict,
    to_natural=_add_to_natural,
    predict=_add_predict,
    terms=(("E",), ("A", "alpha"), ("B", "beta")),
    exponent_of=(("alpha", "n"), ("beta", "v")),
    log_terms=_add_log_terms,
)
SATURATING = LawForm(
    name="saturating",
    formula="err = 1 / (N^alpha V^beta / A + 1 / C)",
    param_names=("A", "alpha", "beta", "C"),
    coord_names=("log_A_centre", "alpha", "beta", "logit_C"),
    start_grid=((-3.0, -1.5, 0.0, 1.5), _EXPONENTS + (2.0,), _EXPONENTS,
                tuple(np.log(p) - np.log1p(-p) for p in (0.1, 0.3, 0.6, 0.9))),   # C's logit
    log_predict=_sat_log_predict,
    to_natural=_sat_to_natural,
    predict=_sat_predict,
    terms=(("A", "alpha", "beta"), ("C",)),
    exponent_of=(("alpha", "n"), ("beta", "v")),
    log_terms=_sat_log_terms,
)
LAW_FORMS = {f.name: f for f in (MULTIPLICATIVE, ADDITIVE, SATURATING)}


def get_form(form: str | LawForm) -> LawForm:
    """The LawForm called `form` ('multiplicative' or 'additive'), or `form` itself."""
    if isinstance(form, LawForm):
        return form
    try:
        return LAW_FORMS[form]
    except KeyError:
        raise ValueError(f"unknown law form {form!r}; choose one of {sorted(LAW_FORMS)}") from None


# ----------------------------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class Estimate:
    """A point estimate with a bootstrap percentile interval (nan when there was no bootstrap)."""

    point: float
    lo: float
    hi: float
    level: float

    @classmethod
    def from_samples(cls, point, samples, level: float) -> Estimate:
        """samples: float[B]. NaN (a quantity undefined for that resample) is left out; +-inf is kept, since
        it is an answer (e.g. "use every visual token") and dropping it would narrow the interval."""
        samples = np.asarray(samples, dtype=np.float64)
        samples = samples[~np.isnan(samples)]
        if samples.size == 0:
            return cls(float(point), np.nan, np.nan, level)
        # Interpolating towards an infinite sample gives nan; take the nearest order statistic then.
        method = "linear" if np.isfinite(samples).all() else "nearest"
        lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], method=method)
        return cls(float(point), float(lo), float(hi), level)

    def __str__(self) -> str:
        return units.interval(self)


@dataclasses.dataclass(frozen=True)
class LooResult:
    """Extrapolation to one held-out LLM size from a fit on the others (errors over its cells)."""

    n_held_out: float
    cells: int
    rms_log_error: float
    mean_abs_rel_error: float
    theta: np.ndarray  # float[P] natural parameters of the fit without this N
    coords: np.ndarray | None = None  # float[P] its optimisation coordinates (centred as the full fit's)


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
    """A fitted law with its diagnostics.

    theta: float[P] natural parameters; log_residuals: float[M] log(pred) - log(observed);
    at_grid_edge: optimisation coordinates (form.coord_names) that ended at or beyond the start grid's range,
        a sign the grid did not bracket the optimum (or that it lies at infinity, e.g. D -> 0);
    bootstrap: float[B, P] natural parameters refitted on each resample (B = 0 without bootstrap);
    coords: float[P] and bootstrap_coords: float[B, P] the same in optimisation coordinates, with log N and log V
        centred at `centre` (predictions use these: they never under- or overflow on the table);
    weights: float[M] each cell's weight in the fit; noise: the cell noise behind them;
    resampled: what the bootstrap resampled ('cells' or 'cells, then seeds within cells');
    resample_key: equal for fits that used the same resample indices;
    no_interval: why there is no interval ('' when there is one, or when none was asked for).
    """

    form: LawForm
    table: ScalingTable
    theta: np.ndarray
    loss: float
    delta: float
    converged: bool
    at_grid_edge: tuple[str, ...]
    log_residuals: np.ndarray
    r2: float
    loo: tuple[LooResult, ...]
    bootstrap: np.ndarray
    bootstrap_unconverged: int
    level: float
    coords: np.ndarray = None
    centre: tuple[float, float] = (0.0, 0.0)
    bootstrap_coords: np.ndarray = None
    weights: np.ndarray = None
    noise: resampling.CellNoise | None = None
    resampled: str = ""
    resample_key: str = ""
    no_interval: str = ""

    @property
    def params(self) -> dict[str, Estimate]:
        """Each natural parameter with its bootstrap interval."""
        return {name: Estimate.from_samples(self.theta[i], self.bootstrap[:, i], self.level)
                for i, name in enumerate(self.form.param_names)}

    def thetas(self) -> np.ndarray:
        """float[1 + B, P]: the point fit followed by the bootstrap fits (for vectorised derived quantities)."""
        return np.concatenate([self.theta[None], self.bootstrap], axis=0)

    def predict(self, n, v) -> np.ndarray:
        """Predicted error at N (billions) and V, broadcast together: float[...]."""
        n, v = np.broadcast_arrays(np.asarray(n, dtype=np.float64), np.asarray(v, dtype=np.float64))
        return self.predict_coords(self.coords, n.ravel(), v.ravel()).reshape(n.shape)

    def predict_coords(self, coords, n, v) -> np.ndarray:
        """Error from optimisation coordinates float[..., P] at N (billions) float[..., K] and V: float[..., K]."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return np.exp(self.form.log_predict(np.asarray(coords, dtype=np.float64), np.log(n) - self.centre[0],
                                                np.log(v) - self.centre[1], np))

    def all_coords(self) -> np.ndarray:
        """float[1 + B, P]: the point fit's coordinates followed by the bootstrap fits' (rows of thetas())."""
        return np.concatenate([self.coords[None], self.bootstrap_coords], axis=0)

    def predict_rows(self, n, v) -> np.ndarray:
        """Row-wise prediction of the point fit and every bootstrap fit: n, v float[1 + B, K] -> float[1 + B, K]."""
        return self.predict_coords(self.all_coords(), n, v)

    def estimate(self, fn: Callable[[np.ndarray], np.ndarray]) -> Estimate:
        """A derived quantity fn(theta float[S, P]) -> float[S] with its bootstrap interval."""
        values = np.asarray(fn(self.thetas()), dtype=np.float64)
        return Estimate.from_samples(values[0], values[1:], self.level)


# ----------------------------------------------------------------------------------------------- fitting

def check_fittable(table: ScalingTable, form: LawForm) -> None:
    """Raises ValueError when the table cannot determine the law's parameters."""
    if not isinstance(table, ScalingTable):
        raise TypeError(f"expected a ScalingTable, got {type(table).__name__}")
    where = f"task {table.task!r}"
    if len(table) < form.num_params:
        raise ValueError(f"{where}: {len(table)} cells cannot determine the {form.num_params} parameters "
                         f"({', '.join(form.param_names)}) of the {form.name} law")
    if len(table.n_values) < 2:
        only = units.params_billions(table.n_values[0])
        raise ValueError(f"{where}: every cell has N = {only}; fitting the N exponent needs at least two LLM sizes")
    if len(table.v_values) < 2:
        raise ValueError(f"{where}: every cell has V = {table.v_values[0]:g}; fitting the V exponent needs at "
                         "least two visual-token counts")


def _refit(form, grid, point_coords, weights, data, *, delta, k):
    """Best of (the point fit + the k best grid points) for each weight vector: coords float[B, P], converged.

    data: (log_n, log_v, log_err), log_err float[M] shared or float[B, M] per weight vector."""
    screened = solvers.screen_starts(form, grid, weights, *data, delta=delta, k=k)  # [B, k, P]
    starts = np.concatenate([np.broadcast_to(point_coords, (len(weights), 1, len(point_coords))), screened], 1)
    s = starts.shape[1]
    log_n, log_v, log_err = data
    if np.ndim(log_err) == 2:
        log_err = np.repeat(log_err, s, axis=0)
    coords, loss, converged = solvers.minimize_batched(
        form, starts.reshape(-1, starts.shape[-1]), np.repeat(weights, s, axis=0), log_n, log_v, log_err,
        delta=delta)
    loss = np.where(np.isfinite(loss), loss, np.inf).reshape(-1, s)
    best = np.argmin(loss, axis=1)
    rows = np.arange(len(weights))
    return coords.reshape(-1, s, coords.shape[-1])[rows, best], converged.reshape(-1, s)[rows, best]


_LOO_STARTS = 32


def fit_law(table: ScalingTable, form: str | LawForm = "multiplicative", *, n_bootstrap: int = 1000,
            seed: int = 0, delta: float = 1e-3, n_starts: int = 256, bootstrap_starts: int = 2,
            loo: bool = True, level: float = 0.95, resample_seeds: bool = True, weighted: bool = True) -> FitResult:
    """Fits a law to one task family's table.

    The point fit runs L-BFGS from the `n_starts` best points of the form's start grid (ranked by loss) and
    keeps the lowest loss. Each leave-one-N-out refit starts from the point fit and the 32 best grid points of
    its own data; each of the `n_bootstrap` seeded resamples from the point fit and its `bootstrap_starts - 1`
    best grid points. All runs of a stage go through one batched, compiled L-BFGS (`solvers.py`), so the
    point fit and its bootstrap replicates are the same estimator. `weighted`: cells weighed by their noise
    (`resampling.cell_noise`; uniform when the table carries neither question counts nor seeds);
    `resample_seeds`: the bootstrap's second level (seeds within cells; False: cells only).
    """
    form = get_form(form)
    check_fittable(table, form)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if delta <= 0:
        raise ValueError(f"Huber delta must be positive, got {delta}")
    if n_bootstrap < 0 or n_starts < 1 or bootstrap_starts < 1:
        raise ValueError(f"need n_bootstrap >= 0, n_starts >= 1 and bootstrap_starts >= 1; got {n_bootstrap}, "
                         f"{n_starts}, {bootstrap_starts}")
    log_n, log_v, log_err = np.log(table.n), np.log(table.v), np.log(table.error)
    log_n0, log_v0 = log_n.mean(), log_v.mean()
    data = (log_n - log_n0, log_v - log_v0, log_err)
    grid = form.grid()
    noise = resampling.cell_noise(table)
    cell_w = noise.weights if weighted else np.ones(len(table))

    # ---- point fit
    ones = cell_w[None]
    starts = solvers.screen_starts(form, grid, ones, *data, delta=delta, k=n_starts)[0]
    runs, losses, converged = solvers.minimize_batched(form, starts, np.repeat(ones, len(starts), 0),
                                                               *data, delta=delta)
    best = int(np.argmin(np.where(np.isfinite(losses), losses, np.inf)))
    coords, loss, point_converged = runs[best], losses[best], bool(converged[best])
    if not np.isfinite(loss):
        raise ValueError(f"task {table.task!r}: the {form.name} law could not be fitted (no start gave a finite "
                         "loss)")
    theta = form.to_natural(coords, log_n0, log_v0)
    with np.errstate(over="ignore", invalid="ignore"):
        pred = np.exp(form.log_predict(coords, data[0], data[1], np))
    lo, hi = grid.min(0), grid.max(0)
    at_edge = tuple(name for name, c, a, b in zip(form.coord_names, coords, lo, hi) if c <= a or c >= b)
    ss_tot = np.sum((table.error - table.error.mean()) ** 2)
    r2 = 1.0 - np.sum((table.error - pred) ** 2) / ss_tot if ss_tot > 0 else np.nan

    # ---- refits on reweighted cells: leave-one-N-out (zero weights) and bootstrap (multiplicities)
    loo_sets = []
    if loo:
        for n_out in table.n_values:
            keep = table.n != n_out
            rest = table.subset(keep)
            if len(rest) >= form.num_params and len(rest.n_values) >= 2 and len(rest.v_values) >= 2:
                loo_sets.append((n_out, keep))
    # An interval needs residuals to resample: with no more cells than parameters every resample that can
    # identify the law holds every cell, and its "interval" would have zero width.
    no_interval = ""
    if n_bootstrap > 0 and len(table) <= form.num_params:
        no_interval = (f"{len(table)} cells for {form.num_params} parameters: every resample that can determine "
                       "the law is the table itself, so the bootstrap has nothing to vary (an interval needs at "
                       f"least {form.num_params + 1} cells)")
    boot = (resampling.resample(table, form.num_params, n_bootstrap, seed, seeds=resample_seeds)
            if n_bootstrap > 0 and not no_interval else None)
    loo_results, unconverged = [], 0
    boot_coords = np.zeros((0, form.num_params))
    if loo_sets:
        weights = np.stack([keep.astype(np.float64) * cell_w for _, keep in loo_sets])
        refit, _ = _refit(form, grid, coords, weights, data, delta=delta, k=_LOO_STARTS)
        for (n_out, keep), c in zip(loo_sets, refit):
            th = form.to_natural(c, log_n0, log_v0)
            held = ~keep
            with np.errstate(over="ignore", invalid="ignore"):
                log_res = form.log_predict(c, data[0][held], data[1][held], np) - log_err[held]
                loo_results.append(LooResult(float(n_out), int(held.sum()), float(np.sqrt(np.mean(log_res ** 2))),
                                             float(np.mean(np.abs(np.expm1(log_res)))), th, c))
    if boot is not None:
        boot_data = (data[0], data[1], boot.log_error)
        boot_coords, boot_converged = _refit(form, grid, coords, boot.counts * cell_w, boot_data, delta=delta,
                                             k=max(bootstrap_starts - 1, 0))
        unconverged = int((~boot_converged).sum())
    kind = ("cells, then seeds within cells" if boot is not None and boot.seeds_resampled else "cells")

    return FitResult(form=form, table=table, theta=theta, loss=float(loss), delta=delta,
                     converged=point_converged, at_grid_edge=at_edge,
                     log_residuals=np.log(pred) - log_err, r2=float(r2), loo=tuple(loo_results),
                     bootstrap=form.to_natural(boot_coords, log_n0, log_v0).reshape(-1, form.num_params),
                     bootstrap_unconverged=unconverged, level=level, coords=coords, centre=(log_n0, log_v0),
                     bootstrap_coords=boot_coords, weights=cell_w, noise=noise, resampled=kind,
                     resample_key=boot.key if boot is not None else "", no_interval=no_interval)


def synthetic_table(form: str | LawForm, theta, n, v, *, noise: float = 0.0, seed: int = 0,
                    task: str = "synthetic", seeds: int = 1, seed_noise: float = 0.0) -> ScalingTable:
    """A full N x V table drawn from a known law: error * exp(noise * standard normal), clipped into (0, 1].

    n: float[K] LLM sizes (billions); v: float[L] visual-token counts; theta: float[P] natural parameters.
    seeds: runs per cell, each multiplied by its own exp(seed_noise * standard normal) (training noise; `noise`
    is shared by a cell's seeds).
    """
    form = get_form(form)
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (form.num_params,):
        raise ValueError(f"the {form.name} law takes {form.num_params} parameters {form.param_names}, "
                         f"got shape {theta.shape}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    nn, vv = (x.ravel() for x in np.meshgrid(np.asarray(n, float), np.asarray(v, float), indexing="ij"))
    error = form.predict(theta, nn, vv)
    rng = np.random.default_rng(seed)
    if noise > 0:
        error = error * np.exp(noise * rng.standard_normal(error.shape))
    if seeds == 1 and seed_noise == 0:
        return ScalingTable.from_arrays(nn, vv, np.clip(error, 1e-9, 1.0), task=task)
    runs = error[:, None] * np.exp(seed_noise * rng.standard_normal((len(error), seeds)))
    return ScalingTable.from_arrays(np.repeat(nn, seeds), np.repeat(vv, seeds), np.clip(runs, 1e-9, 1.0).ravel(),
                                    task=task, seed=np.tile(np.arange(seeds), len(error)))
