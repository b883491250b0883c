"""The M³ prior sampler (Beta/Dirichlet draws, joint per group, then deferring) and samplers by name."""

import numpy as np
import optuna
import pytest
from scipy import stats

from mergetune.core.errors import ConfigError
from mergetune.search.config import SamplerConfig
from mergetune.search.samplers import M3PriorSampler, make_sampler
from mergetune.search.space import weight_param


optuna.logging.set_verbosity(optuna.logging.WARNING)


def draw_weights(experts, alpha, n_trials, n_startup, seed=0, wrapped=None):
    wrapped = wrapped or optuna.samplers.RandomSampler(seed=seed)
    sampler = M3PriorSampler(wrapped, experts, alpha=alpha, n_startup=n_startup, seed=seed)
    study = optuna.create_study(sampler=sampler)
    rows = []

    def objective(trial):
        row = {g: [trial.suggest_float(weight_param(g, e), 0.0, 1.0) for e in experts] for g in ("g0", "g1")}
        trial.suggest_float("g0.ties.lambda", 0.2, 1.5)
        rows.append(row)
        return 0.0

    study.optimize(objective, n_trials=n_trials)
    return {g: np.array([r[g] for r in rows]) for g in ("g0", "g1")}


def test_two_experts_draw_beta_alpha_alpha():
    draws = draw_weights(["math", "code"], alpha=0.5, n_trials=400, n_startup=400)
    w = draws["g0"]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)  # one joint draw per (trial, group)
    assert stats.kstest(w[:, 0], stats.beta(0.5, 0.5).cdf).pvalue > 0.01
    assert stats.kstest(w[:, 0], stats.uniform().cdf).pvalue < 0.01  # the test can tell Beta(.5,.5) from U(0,1)
    assert not np.allclose(draws["g0"], draws["g1"])  # groups draw independently


def test_k_experts_draw_dirichlet():
    alpha = 0.5
    w = draw_weights(["a", "b", "c"], alpha=alpha, n_trials=400, n_startup=400, seed=3)["g1"]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    for k in range(3):  # Dirichlet(α,α,α) marginals are Beta(α, 2α)
        assert stats.kstest(w[:, k], stats.beta(alpha, 2 * alpha).cdf).pvalue > 0.01
    assert stats.kstest(w[:, 0], stats.beta(alpha, alpha).cdf).pvalue < 0.01


def test_prior_stops_after_n_startup_and_defers_to_the_wrapped_sampler():
    tpe = optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=5)
    w = draw_weights(["math", "code"], alpha=0.5, n_trials=30, n_startup=20, wrapped=tpe)["g0"]
    sums = w.sum(axis=1)
    assert np.allclose(sums[:20], 1.0)
    assert not np.isclose(sums[20:], 1.0).any()  # multivariate TPE samples the weights jointly itself


def test_independent_fallback_keeps_the_prior():
    # RandomSampler never samples relatively: every weight is an independent fallback.
    w = draw_weights(["math", "code"], alpha=0.5, n_trials=30, n_startup=5)["g0"]
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)


def test_same_seed_same_draws():
    a = draw_weights(["x", "y", "z"], 0.5, 10, 10, seed=7)["g0"]
    b = draw_weights(["x", "y", "z"], 0.5, 10, 10, seed=7)["g0"]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp", "random", "cmaes"])
def test_samplers_by_name_run_a_few_trials(name):
    sampler = make_sampler(SamplerConfig(name=name, m3_prior={"n_startup": 3}), ["a", "b"], seed=0, n_objectives=1)
    assert isinstance(sampler, M3PriorSampler)
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        method = trial.suggest_categorical("g0.method", ["linear", "ties"])
        w = [trial.suggest_float(weight_param("g0", e), 0.0, 1.0) for e in ("a", "b")]
        return w[0] + (0.1 if method == "ties" else 0.0)

    study.optimize(objective, n_trials=6)
    assert len(study.trials) == 6


def test_cmaes_refuses_several_objectives_and_prior_can_be_off():
    with pytest.raises(ConfigError, match="cmaes"):
        make_sampler(SamplerConfig(name="cmaes"), ["a", "b"], seed=0, n_objectives=2)
    assert isinstance(make_sampler(SamplerConfig(name="tpe", m3_prior=None), ["a"], 0, 1), optuna.samplers.TPESampler)


def trade_off_study(target, n_trials=60):
    """Two objectives on one line (a = x, b = 0.5 − 0.5x: every x is Pareto-optimal); weights 3:1 put the best
    weighted mean, 0.625x + 0.125, at x = 1. Returns the study and the x of the trials TPE chose."""
    config = SamplerConfig(target=target, m3_prior=None)
    sampler = make_sampler(config, ["a", "b"], seed=0, n_objectives=2)
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    study.set_user_attr("objectives", [{"name": "a", "weight": 3.0}, {"name": "b", "weight": 1.0}])
    study.set_metric_names(["a", "b"])

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.suggest_categorical("g0.method", ["ties", "linear"])
        return x, 0.5 - 0.5 * x

    study.optimize(objective, n_trials=n_trials)
    return study, [t.params["x"] for t in study.trials[10:]]  # after TPE's 10 start-up trials


def test_weighted_mean_target_drives_tpe_to_the_best_weighted_mean():
    _, chosen = trade_off_study("weighted_mean")
    _, spread = trade_off_study("objectives")
    assert np.mean(chosen) > 0.75  # (3x + 0.5 − 0.5x) / 4 grows with x
    assert np.mean(spread) < 0.6  # multi-objective TPE spreads along the front


def test_weighted_mean_view_values_are_the_configured_weighted_means():
    from mergetune.search.samplers import WeightedMeanSampler, _WeightedMeanView

    study, _ = trade_off_study("weighted_mean", n_trials=3)
    sampler = study.sampler
    assert isinstance(sampler, WeightedMeanSampler)
    view = sampler._view(study)
    assert isinstance(view, _WeightedMeanView) and not view._is_multi_objective()
    for trial, seen in zip(study.trials, view.get_trials()):
        x = trial.params["x"]
        assert seen.values == [pytest.approx((3 * x + 0.5 - 0.5 * x) / 4)]
        assert trial.values == [pytest.approx(x), pytest.approx(0.5 - 0.5 * x)]  # the study keeps both objectives
