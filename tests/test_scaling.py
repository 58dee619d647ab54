"""Scaling-law fits, intervals, frontier and results tables, checked against known laws and independent references."""

import json

import numpy as np
import pytest
import scipy.optimize

from vlm_jax import scaling
from vlm_jax.scaling import ADDITIVE, MULTIPLICATIVE

N = (0.464, 1.84, 3.95, 7.72)
V = (1, 4, 16, 36, 64, 144, 576)
TRUE = {"multiplicative": np.array([0.35, 0.45, 0.06, 0.12]),
        "additive": np.array([0.08, 0.15, 0.5, 0.5, 0.35]),
        # ceiling 0.6 binding at the small corner (0.42 there), a power law at the large one (0.015)
        "saturating": np.array([0.8, 0.7, 0.4, 0.6])}
FORMS = list(TRUE)


def independent_loss(form, theta, table, delta=1e-3):
    """Hoffmann et al.'s objective written out directly: sum of Huber(log pred - log err)."""
    if form == "multiplicative":
        a, alpha, beta, d = theta
        pred = a * table.n ** -alpha * table.v ** -beta + d
    elif form == "saturating":   # the power law's harmonic sum with the ceiling C
        a, alpha, beta, c = theta
        pred = 1.0 / (1.0 / (a * table.n ** -alpha * table.v ** -beta) + 1.0 / c)
    else:
        e, a, alpha, b, beta = theta
        pred = e + a * table.n ** -alpha + b * table.v ** -beta
    r = np.abs(np.log(pred) - np.log(table.error))
    return float(np.sum(np.where(r <= delta, 0.5 * r ** 2, delta * (r - 0.5 * delta))))


# ------------------------------------------------------------------------------------------------ fitting

@pytest.mark.parametrize("form", FORMS)
def test_noise_free_table_is_recovered_to_one_part_per_million(form):
    table = scaling.synthetic_table(form, TRUE[form], N, V)
    fit = scaling.fit_law(table, form, n_bootstrap=0, loo=False)
    np.testing.assert_allclose(fit.theta, TRUE[form], rtol=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("form", FORMS)
def test_noisy_fit_recovers_true_parameters_within_its_confidence_intervals(form):
    table = scaling.synthetic_table(form, TRUE[form], N, V, noise=0.02, seed=3)
    fit = scaling.fit_law(table, form, n_bootstrap=1000, seed=0, loo=False)
    assert fit.bootstrap.shape == (1000, len(TRUE[form]))
    for (name, est), truth in zip(fit.params.items(), TRUE[form]):
        assert est.lo <= est.point <= est.hi, name
        assert est.lo <= truth <= est.hi, f"{name}: true {truth} outside {est}"
    assert fit.at_grid_edge == ()


@pytest.mark.parametrize("form", FORMS)
def test_fit_loss_is_the_huber_objective_and_scipy_finds_nothing_lower(form):
    table = scaling.synthetic_table(form, TRUE[form], N, V, noise=0.03, seed=7)
    fit = scaling.fit_law(table, form, n_bootstrap=0, loo=False)
    assert fit.loss == pytest.approx(independent_loss(form, fit.theta, table), rel=1e-9)
    # scipy L-BFGS-B on the natural parameters (positive scales via bounds), from the truth and perturbations.
    rng = np.random.default_rng(0)
    p = len(TRUE[form])
    bounds = [(1e-9, None) if name not in ("alpha", "beta") else (None, None)
              for name in scaling.get_form(form).param_names]
    best = np.inf
    for start in [TRUE[form]] + [TRUE[form] * np.exp(0.3 * rng.standard_normal(p)) for _ in range(6)]:
        res = scipy.optimize.minimize(lambda th: independent_loss(form, th, table), start, method="L-BFGS-B",
                                      bounds=bounds, options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12})
        best = min(best, res.fun)
    assert fit.loss <= best * (1 + 1e-6) + 1e-12


def test_saturating_law_stays_under_its_ceiling_and_is_the_power_law_far_below_it():
    """Invariants of err = 1 / (1 / (A N^-alpha V^-beta) + 1 / C): never above C nor above the power term; with C
    out of reach it is the multiplicative law with D = 0; where the power term equals C the error is C / 2."""
    sat, mult = scaling.get_form("saturating"), scaling.MULTIPLICATIVE
    n, v = np.array([1e-5, 1e-3, 0.5, 7.0, 70.0]), np.array([1.0, 4.0, 64.0, 576.0, 1.0])
    theta = TRUE["saturating"]
    err = sat.predict(theta, n, v)
    power = mult.predict(np.array([*theta[:3], 0.0]), n, v)
    assert np.all(err < theta[3]) and np.all(err < power)
    assert err[0] == pytest.approx(theta[3], rel=1e-3)          # tiny N: the power term is huge, the ceiling rules
    far = sat.predict(np.array([*theta[:3], 1e12]), n, v)
    np.testing.assert_allclose(far, power, rtol=1e-8)   # 1/C adds power/C: 2.5e-9 at the largest
    n_half = (theta[0] / theta[3]) ** (1 / theta[1])             # A N^-alpha = C at V = 1
    assert sat.predict(theta, np.array([n_half]), np.array([1.0]))[0] == pytest.approx(theta[3] / 2, rel=1e-12)
    # log_predict in centred coordinates agrees with predict in natural units
    log_n, log_v = np.log(n), np.log(v)
    coords = np.array([np.log(theta[0]) - theta[1] * log_n.mean() - theta[2] * log_v.mean(), theta[1], theta[2],
                       np.log(theta[3] / (1 - theta[3]))])   # C's coordinate is its logit: a rate's ceiling < 1
    np.testing.assert_allclose(sat.to_natural(coords, log_n.mean(), log_v.mean()), theta, rtol=1e-12)
    np.testing.assert_allclose(np.exp(sat.log_predict(coords, log_n - log_n.mean(), log_v - log_v.mean(), np)),
                               err, rtol=1e-12)


def test_an_error_that_sets_in_late_along_n_is_fitted_by_the_saturating_law_and_not_the_power_law():
    """A family learnt only by the larger LLMs: error near its no-information level (0.8) for the small ones,
    then falling fast, flat in V (the grid's reasoning row). The power law cannot bend; the ceiling can, and then
    reads V's exponent as ~0 with a tight interval."""
    n = np.array([2.7e-5, 9.9e-5, 3.08e-4])
    table = scaling.synthetic_table("saturating", np.array([1.2e-11, 2.8, 0.0, 0.81]), n, (1, 4, 16, 64),
                                    noise=0.03, seed=2, seeds=2, seed_noise=0.03)
    assert table.error.max() > 0.75 and table.error.min() < 0.1
    sat = scaling.fit_law(table, "saturating", n_bootstrap=200, seed=0, loo=False)
    mult = scaling.fit_law(table, "multiplicative", n_bootstrap=200, seed=0, loo=False)
    assert sat.r2 > 0.98 and mult.r2 < 0.9
    beta = sat.params["beta"]
    assert beta.lo < 0 < beta.hi and beta.hi - beta.lo < 0.2
    assert mult.params["beta"].hi - mult.params["beta"].lo > beta.hi - beta.lo
    ceilings = sat.bootstrap[:, 3]
    assert np.all((ceilings > 0) & (ceilings <= 1)) and sat.params["C"].lo > 0.7   # an error rate's ceiling
    assert not scaling.identification.not_identified(sat)


def test_a_ceiling_the_table_barely_reaches_is_bounded_by_one_and_read_as_identified_on_the_log_scale():
    """Errors that reach C only in one corner: some resamples put the ceiling out of the way (C -> 1, its logit
    unbounded); C's interval is then [~0.4, 1], under a decade, which the identification reads as log C."""
    n = np.array([2.7e-5, 9.9e-5, 3.08e-4])
    table = scaling.synthetic_table("saturating", np.array([3e-3, 0.6, 0.8, 0.5]), n, (1, 4, 16, 64), noise=0.08,
                                    seed=1, seeds=2, seed_noise=0.05)
    fit = scaling.fit_law(table, "saturating", n_bootstrap=200, seed=0, loo=False)
    c = fit.params["C"]
    assert c.hi > 0.99 and c.hi <= 1.0 and 0.2 < c.lo < 0.6, c
    assert np.log(c.hi / c.lo) < np.log(100) and "C" not in scaling.identification.not_identified(fit)


def test_residuals_and_r2_follow_their_definitions():
    table = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V, noise=0.05, seed=1)
    fit = scaling.fit_law(table, "multiplicative", n_bootstrap=0, loo=False)
    pred = fit.predict(table.n, table.v)
    np.testing.assert_allclose(fit.log_residuals, np.log(pred) - np.log(table.error), rtol=1e-12)
    r2 = 1 - np.sum((table.error - pred) ** 2) / np.sum((table.error - table.error.mean()) ** 2)
    assert fit.r2 == pytest.approx(r2, rel=1e-12)
    assert 0.9 < fit.r2 < 1.0


def test_leave_one_n_out_extrapolates_a_noise_free_law_exactly_and_a_noisy_one_with_error():
    exact = scaling.fit_law(scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V),
                            "multiplicative", n_bootstrap=0)
    assert [r.n_held_out for r in exact.loo] == list(N)
    assert all(r.cells == len(V) and r.rms_log_error < 1e-6 for r in exact.loo)
    noisy = scaling.fit_law(scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V, noise=0.03,
                                                    seed=2), "multiplicative", n_bootstrap=0)
    assert all(1e-4 < r.rms_log_error < 0.2 for r in noisy.loo)
    # The held-out cells really were held out: the refit differs from the full fit.
    assert all(not np.allclose(r.theta, noisy.theta) for r in noisy.loo)


def test_leave_one_n_out_is_skipped_when_too_few_llm_sizes_remain():
    table = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N[:2], V)
    fit = scaling.fit_law(table, "multiplicative", n_bootstrap=0)
    assert fit.loo == ()


def test_bootstrap_is_seeded_and_noise_free_resamples_all_recover_the_law():
    table = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V)
    a = scaling.fit_law(table, n_bootstrap=200, seed=5, loo=False)
    b = scaling.fit_law(table, n_bootstrap=200, seed=5, loo=False)
    np.testing.assert_array_equal(a.bootstrap, b.bootstrap)
    # Every resample of an exact table has the same optimum: each refit converged to it.
    np.testing.assert_allclose(a.bootstrap, np.broadcast_to(TRUE["multiplicative"], a.bootstrap.shape), rtol=1e-6)
    noisy = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V, noise=0.02)
    c = scaling.fit_law(noisy, n_bootstrap=50, seed=1, loo=False)
    d = scaling.fit_law(noisy, n_bootstrap=50, seed=2, loo=False)
    assert not np.allclose(c.bootstrap, d.bootstrap)


def test_bootstrap_weights_are_multinomial_draws_that_identify_the_law():
    table = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V)
    w = scaling.laws.bootstrap_weights(table, 4, 500, seed=0)
    assert w.shape == (500, len(table))
    np.testing.assert_array_equal(w.sum(1), len(table))
    assert np.all(w == np.round(w))
    # Each cell is drawn with probability 1/M per draw: mean multiplicity 1.
    assert abs(w.mean() - 1) < 0.02


def test_derived_quantity_gets_a_bootstrap_interval():
    table = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V, noise=0.02, seed=4)
    fit = scaling.fit_law(table, n_bootstrap=300, seed=0, loo=False)
    ratio = fit.estimate(lambda th: th[:, 2] / (th[:, 1] - th[:, 2]))  # V*/Q of the multiplicative optimum
    a, b = fit.theta[1], fit.theta[2]
    assert ratio.point == pytest.approx(b / (a - b))
    samples = fit.bootstrap[:, 2] / (fit.bootstrap[:, 1] - fit.bootstrap[:, 2])
    assert (ratio.lo, ratio.hi) == pytest.approx(tuple(np.percentile(samples, [2.5, 97.5])))


def test_a_vanished_term_predicts_zero_not_nan():
    # A = 0 with alpha = 139 at N = 27K (2.7e-5 billions): N^-alpha overflows, and 0 * inf must not turn into nan.
    n, v = np.array([27_040e-9, 99_392e-9]), np.array([1.0, 4.0])
    np.testing.assert_allclose(ADDITIVE.predict(np.array([0.1, 0.0, 139.0, 0.4, 0.5]), n, v), 0.1 + 0.4 * v ** -0.5)
    np.testing.assert_allclose(MULTIPLICATIVE.predict(np.array([0.0, 139.0, 0.2, 0.05]), n, v), 0.05)


def test_fit_at_the_start_grid_edge_is_reported():
    # D = 1e-4 lies far below the grid's smallest D (0.005): the report must say the grid did not bracket it.
    theta = np.array([0.35, 0.45, 0.06, 1e-4])
    fit = scaling.fit_law(scaling.synthetic_table("multiplicative", theta, N, V), n_bootstrap=0, loo=False)
    np.testing.assert_allclose(fit.theta, theta, rtol=1e-5)
    assert fit.at_grid_edge == ("log_D",)


def test_estimate_uses_percentiles_drops_undefined_samples_and_keeps_infinite_ones():
    est = scaling.Estimate.from_samples(1.0, np.r_[np.arange(101.0), np.nan], 0.9)
    assert (est.lo, est.hi) == pytest.approx((5.0, 95.0))
    # A quarter of the resamples say "infinitely many": the upper end of a 90% interval must say so too.
    est = scaling.Estimate.from_samples(1.0, np.r_[np.arange(75.0), np.full(25, np.inf)], 0.9)
    assert est.lo == pytest.approx(5.0) and est.hi == np.inf
    assert np.isnan(scaling.Estimate.from_samples(1.0, [np.nan], 0.95).lo)


# ------------------------------------------------------------------------------------------------ bad input

def _table(n, v, err, task="t"):
    return scaling.ScalingTable.from_arrays(n, v, err, task=task)


def test_fewer_cells_than_parameters_is_refused():
    table = _table([1, 2, 1], [1, 1, 4], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match=r"3 cells cannot determine the 4 parameters"):
        scaling.fit_law(table, "multiplicative")


def test_a_single_llm_size_is_refused():
    table = _table([1] * 5, [1, 2, 4, 8, 16], [0.5, 0.4, 0.3, 0.25, 0.2])
    with pytest.raises(ValueError, match=r"every cell has N = 1B"):
        scaling.fit_law(table)


def test_a_single_visual_token_count_is_refused():
    table = _table([1, 2, 4, 8, 16], [64] * 5, [0.5, 0.4, 0.3, 0.25, 0.2])
    with pytest.raises(ValueError, match=r"every cell has V = 64"):
        scaling.fit_law(table)


@pytest.mark.parametrize("column,n,v,err", [
    ("n_params", -1.0, 4.0, 0.5), ("n_params", 0.0, 4.0, 0.5), ("visual_tokens", 1.0, 0.0, 0.5),
    ("error", 1.0, 4.0, 0.0), ("error", 1.0, 4.0, 1.5), ("error", 1.0, 4.0, np.nan), ("n_params", np.nan, 4.0, 0.5),
    ("visual_tokens", 1.0, np.inf, 0.5),
])
def test_bad_cells_are_refused_naming_the_column(column, n, v, err):
    with pytest.raises(ValueError, match=column):
        _table([2.0, n], [1.0, v], [0.3, err])


def test_unknown_law_form_is_refused():
    with pytest.raises(ValueError, match="unknown law form 'cubic'"):
        scaling.get_form("cubic")


def test_synthetic_table_checks_parameter_count():
    with pytest.raises(ValueError, match="takes 5 parameters"):
        scaling.synthetic_table("additive", [1, 2, 3], N, V)


# ------------------------------------------------------------------------------------------------ tables

def _rows():
    rows = []
    for task, theta in (("reasoning", TRUE["multiplicative"]),):
        for n in N:
            for v in V:
                err = float(MULTIPLICATIVE.predict(theta, np.array([n]), np.array([v]))[0])
                rows.append({"llm": f"m{n}", "n_params": n * 1e9, "visual_tokens": v, "task": task, "error": err, "seed": 0})
    return rows


@pytest.mark.parametrize("ext", ["csv", "jsonl"])
def test_results_file_round_trips_into_one_table_per_task(tmp_path, ext):
    rows = _rows() + [{"llm": "x", "n_params": 1e9, "visual_tokens": 4, "task": "ocr", "error": 0.5}]
    path = tmp_path / f"results.{ext}"
    scaling.tables.write_rows(path, rows)
    tables = scaling.tables.load_tables(path)
    assert set(tables) == {"reasoning", "ocr"}
    t = tables["reasoning"]
    assert len(t) == len(N) * len(V)
    np.testing.assert_allclose(np.unique(t.n), N)  # n_params converted to billions
    np.testing.assert_allclose(t.error, MULTIPLICATIVE.predict(TRUE["multiplicative"], t.n, t.v), rtol=1e-12)


def test_repeated_cells_are_averaged():
    tables = scaling.tables.tables_from_rows([
        {"llm": "a", "n_params": 1e9, "visual_tokens": 4, "task": "t", "error": 0.2},
        {"llm": "a", "n_params": 1e9, "visual_tokens": 4, "task": "t", "error": 0.4},
        {"llm": "b", "n_params": 2e9, "visual_tokens": 4, "task": "t", "error": 0.1}])
    t = tables["t"]
    assert len(t) == 2
    assert t.error[0] == pytest.approx(0.3) and t.replicates.tolist() == [2, 1]


def test_missing_column_and_non_numbers_are_named_with_their_row(tmp_path):
    with pytest.raises(ValueError, match=r"row 2 lacks column\(s\) error"):
        scaling.tables.tables_from_rows([{"llm": "a", "n_params": 1, "visual_tokens": 1, "task": "t", "error": 0.5},
                                        {"llm": "a", "n_params": 1, "visual_tokens": 1, "task": "t"}])
    with pytest.raises(ValueError, match=r"row 1: visual_tokens='many' is not a number"):
        scaling.tables.tables_from_rows([{"llm": "a", "n_params": 1, "visual_tokens": "many", "task": "t", "error": 0.5}])
    with pytest.raises(ValueError, match=r"row 1 \(llm 'a', task 't'\): error must lie in \(0, 1\]"):
        scaling.tables.tables_from_rows([{"llm": "a", "n_params": 1, "visual_tokens": 1, "task": "t", "error": 2}])
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"llm": "a"}) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2: expected a JSON object"):
        scaling.tables.read_rows(path)
    with pytest.raises(ValueError, match="unknown results format '.txt'"):
        scaling.tables.read_rows(tmp_path / "r.txt")


# ------------------------------------------------------------------------------------------------ frontier

@pytest.mark.parametrize("q", [0.0, 16.0, 64.0, 300.0, 5000.0])
@pytest.mark.parametrize("budget", [1e11, 3e12, 1e14])
def test_numerical_frontier_matches_the_analytic_multiplicative_optimum(q, budget):
    theta = TRUE["multiplicative"]
    n, v, err, binding = scaling.frontier.optimum_from_params("multiplicative", theta, budget, q)
    n_star, v_star = scaling.frontier.multiplicative_optimum(theta[1], theta[2], budget, q)
    assert binding
    assert v[0] == pytest.approx(v_star, rel=1e-6)
    assert n[0] == pytest.approx(n_star, rel=1e-6)
    assert err[0] == pytest.approx(MULTIPLICATIVE.predict(theta, n_star, v_star)[0], rel=1e-9)
    assert scaling.frontier.inference_flops(n[0], v[0], q) == pytest.approx(budget, rel=1e-12)


def test_analytic_optimum_uses_one_token_at_q0_and_a_budget_free_v_for_q_positive():
    alpha, beta = 0.45, 0.06
    for budget in (1e11, 1e13):
        n0, v0 = scaling.frontier.multiplicative_optimum(alpha, beta, budget, 0.0)
        assert v0 == 1.0 and n0 == pytest.approx(budget / 2 / 1e9)
        nq, vq = scaling.frontier.multiplicative_optimum(alpha, beta, budget, 100.0)
        assert vq == pytest.approx(beta * 100 / (alpha - beta))
        assert nq == pytest.approx(budget * (alpha - beta) / (2 * alpha * 100) / 1e9)
    # Tokens that pay off faster than parameters (beta > alpha): use every token allowed.
    _, v = scaling.frontier.multiplicative_optimum(0.1, 0.3, 1e12, 50.0)
    _, v_num, _, _ = scaling.frontier.optimum_from_params("multiplicative", [0.35, 0.1, 0.3, 0.1], 1e12, 50.0)
    assert v == 576.0 and v_num[0] == pytest.approx(576.0)


def test_additive_frontier_matches_a_dense_search_along_the_budget_line():
    theta = TRUE["additive"]
    for q, budget in ((0.0, 1e12), (64.0, 1e12), (64.0, 1e14)):
        _, v, err, _ = scaling.frontier.optimum_from_params("additive", theta, budget, q)
        vs = np.geomspace(1, 576, 400_001)
        ns = budget / (2e9 * (q + vs))
        errs = ADDITIVE.predict(theta, ns, vs)
        i = np.argmin(errs)
        assert v[0] == pytest.approx(vs[i], rel=1e-4)
        assert err[0] <= errs[i] + 1e-15


def test_frontier_for_a_fit_carries_bootstrap_intervals():
    table = scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V, noise=0.02, seed=4)
    fit = scaling.fit_law(table, n_bootstrap=200, seed=0, loo=False)
    p = scaling.frontier.continuous_optimum(fit, 1e12, 64.0)
    for est in (p.n, p.v, p.error):
        assert est.lo <= est.point <= est.hi
    assert p.v.point == pytest.approx(64 * fit.theta[2] / (fit.theta[1] - fit.theta[2]), rel=1e-6)
    # V* grows linearly with Q for the multiplicative law.
    points = scaling.frontier.optimal_v_by_text_length(fit, 1e12, [32.0, 64.0, 128.0])
    assert [pt.v.point for pt in points] == pytest.approx([p.v.point / 2, p.v.point, 2 * p.v.point], rel=1e-6)


def test_discrete_optimum_is_the_best_affordable_menu_entry():
    table = scaling.synthetic_table("additive", TRUE["additive"], N, V, noise=0.02, seed=4)
    fit = scaling.fit_law(table, "additive", n_bootstrap=100, seed=0, loo=False)
    for q, budget in ((0.0, 1e11), (64.0, 1e12), (64.0, 1e13)):
        choice = scaling.frontier.discrete_optimum(fit, budget, q, N, V)
        best = min(((fit.predict(n, v), n, v) for n in N for v in V
                    if 2e9 * n * (q + v) <= budget), key=lambda t: t[0])
        assert (choice.n, choice.v) == (best[1], best[2])
        assert choice.flops <= budget
        assert choice.error.point == pytest.approx(best[0])
        assert sum(choice.shares.values()) == pytest.approx(1.0)


def test_unaffordable_budgets_are_refused():
    fit = scaling.fit_law(scaling.synthetic_table("multiplicative", TRUE["multiplicative"], N, V), n_bootstrap=0,
                          loo=False)
    with pytest.raises(ValueError, match="affords no menu entry"):
        scaling.frontier.discrete_optimum(fit, 1e8, 0.0, N, V)
    with pytest.raises(ValueError, match="cannot afford the smallest configuration"):
        scaling.frontier.continuous_optimum(fit, 1e8, 0.0, n_range=(0.464, 7.72))
    with pytest.raises(ValueError, match="does not cover the fixed overhead"):
        scaling.frontier.continuous_optimum(fit, 1e10, 0.0, overhead_flops=2e10)


def test_a_budget_beyond_the_largest_configuration_buys_the_largest_configuration():
    theta = TRUE["multiplicative"]
    n, v, _, binding = scaling.frontier.optimum_from_params("multiplicative", theta, 1e20, 64.0,
                                                            n_range=(0.5, 14.0))
    assert not binding and (n[0], v[0]) == (14.0, 576.0)
    # With the N cap binding part-way, V takes up the rest of the budget.
    n, v, _, binding = scaling.frontier.optimum_from_params("multiplicative", theta, 2e9 * 14 * (64 + 100), 64.0,
                                                            n_range=(0.5, 14.0))
    assert binding and n[0] == pytest.approx(14.0) and v[0] == pytest.approx(100.0)
