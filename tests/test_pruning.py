"""Two-stage pruning: config, the multi-objective rule, exact two-stage scores on a tiny zoo, the driver with stand-ins."""

from __future__ import annotations

import math
import sys

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from mergetune.core.errors import ConfigError
from mergetune.evaluators.stderr import item_summary, standard_error
from mergetune.search.config import ObjectiveConfig, parse_study_config
from mergetune.search.driver import run_study
from mergetune.search.pruning import beaten_beyond_noise

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
optuna.logging.set_verbosity(optuna.logging.WARNING)


def study_data(tmp_path, name="p", **extra) -> dict:
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    return {
        "study": name,
        "models": {"base": str(base), "experts": {"a": "/nowhere/a", "b": "/nowhere/b"}},
        "evaluator": {"kind": "quick", "zoo": "/zoo"},
        "search": {"layer_groups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
        "storage": f"sqlite:///{tmp_path / 'studies.db'}",
        "sampler": {"m3_prior": {"n_startup": 6}},
        **extra,
    }


# --- config ---
def test_pruning_is_off_by_default_and_validated(tmp_path):
    config = parse_study_config(study_data(tmp_path), "test")
    assert not config.pruning.enabled
    assert (config.pruning.first_share, config.pruning.min_complete, config.pruning.keep_percentile) == (0.25, 8, 50.0)
    on = parse_study_config(study_data(tmp_path, pruning={"enabled": True, "first_share": 0.5}), "test")
    assert on.pruning.enabled and on.pruning.first_share == 0.5


@pytest.mark.parametrize(
    ("pruning", "evaluator", "message"),
    [
        ({"enabled": True, "first_shar": 0.5}, {"kind": "quick", "zoo": "/zoo"}, "first_shar"),
        ({"first_share": 1.0}, {"kind": "quick", "zoo": "/zoo"}, "first_share"),
        ({"min_complete": 0}, {"kind": "quick", "zoo": "/zoo"}, "min_complete"),
        ({"enabled": True}, {"kind": "lm_eval", "tasks": ["t"]}, "pruning.enabled: two-stage scoring needs `evaluator.kind: quick`"),
    ],
)
def test_pruning_config_errors_are_one_line(tmp_path, pruning, evaluator, message):
    with pytest.raises(ConfigError) as caught:
        parse_study_config(study_data(tmp_path, pruning=pruning, evaluator=evaluator), "test")
    assert message in str(caught.value) and "\n" not in str(caught.value)


# --- the multi-objective rule ---
def test_standard_error_is_the_binomial_one_floored_at_one_item():
    assert standard_error([1.0, 0.0, 1.0, 0.0]) == pytest.approx(math.sqrt(0.5 * 0.5 / 4))
    assert standard_error([1.0] * 8) == 1 / 8 and standard_error([0.0] * 8) == 1 / 8
    summary = item_summary({"t": [1.0, 1.0, 0.0, 1.0] * 4})
    assert summary["t"] == {"score": 0.75, "se": pytest.approx(math.sqrt(0.75 * 0.25 / 16)), "items": 16}


def test_pruned_iff_some_complete_trial_beats_it_by_more_than_one_se_on_every_objective():
    objectives = [ObjectiveConfig(name="x"), ObjectiveConfig(name="y")]
    first = {"x": {"score": 0.5, "se": 0.1, "items": 16}, "y": {"score": 0.4, "se": 0.05, "items": 16}}
    assert beaten_beyond_noise(first, [[0.65, 0.5]], objectives) == 0  # +0.15 > 0.1 and +0.1 > 0.05
    assert beaten_beyond_noise(first, [[0.6, 0.9]], objectives) is None  # +0.1 on x is within one SE
    assert beaten_beyond_noise(first, [[0.9, 0.42]], objectives) is None  # within one SE on y
    assert beaten_beyond_noise(first, [[0.9, 0.3], [0.3, 0.9], [0.7, 0.7]], objectives) == 2  # no single trial until #2
    assert beaten_beyond_noise(first, [], objectives) is None
    minimised = [ObjectiveConfig(name="x"), ObjectiveConfig(name="y", direction="minimize")]
    assert beaten_beyond_noise(first, [[0.65, 0.3]], minimised) == 0
    assert beaten_beyond_noise(first, [[0.65, 0.5]], minimised) is None


# --- exact two-stage scores on a tiny zoo ---
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    import torch

    from test_evaluators import build_zoo

    torch.set_num_threads(1)
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.mark.parametrize(("batch_size", "first_share"), [(4, 0.25), (5, 0.25), (3, 0.5), (64, 0.25)])
def test_two_stage_scores_equal_one_stage_scores_exactly(zoo, tmp_path, monkeypatch, batch_size, first_share):
    """The worker's two stages (merge + head, then the rest on the same live model) give exactly `run`'s scores."""
    from mergetune.evaluators.base import HFBackend, build_evaluator
    from mergetune.merge.resident import ResidentModelSet
    from mergetune.search import workers
    from mergetune.search.space import SearchSpace
    from mergetune.search.warmstart import baseline_params
    from mergetune.search.workers import TrialWorker, load_modelset

    evaluator = {"kind": "quick", "zoo": str(zoo), "metrics": ["exact_match", "logprob"], "batch_size": batch_size}
    config = parse_study_config({"study": "exact", "zoo": str(zoo), "evaluator": evaluator}, "test")
    monkeypatch.setattr(workers, "placement", lambda: {})  # no Ray here
    worker = object.__new__(TrialWorker)
    worker.resident = ResidentModelSet.load(load_modelset(config), device="cpu")
    worker.backend = HFBackend.from_pretrained(config.models.base, "cpu")
    worker.evaluator = build_evaluator(config.evaluator)
    worker.versions, worker._head, worker.paths = {}, {}, None
    space = SearchSpace(config)
    for _, params in baseline_params(space)[:3]:
        recipe = space.recipe(optuna.trial.FixedTrial(params)).to_dict()
        one = worker.run(recipe, seed=0)
        first = worker.run_first_stage(recipe, 0, first_share)
        second = worker.run_second_stage(first_share)
        assert second["scores"] == one["scores"]  # bit-identical, not approximately equal
        head = worker.evaluator.head_size(12, first_share)
        assert first["first_stage"]["rev"]["items"] == head and head % batch_size in (0, 12 % batch_size)
        assert {"merge_s", "eval_s"} <= set(first["timings"]) and "eval_rest_s" in second["timings"]


# --- the driver with stand-in workers ---
class StagedWorker:
    """Both objectives = 1 − |share of expert a − 0.2|, minus 0.3 unless group 0 is linear; first stage = full score."""

    names = ("a", "b")

    def __init__(self, config_json):
        self.last = {}

    def objectives(self):
        return [(name, "maximize") for name in self.names]

    def describe(self):
        return {}

    def quality(self, recipe):
        shares = []
        for rule in recipe["rules"]:
            w = rule.get("weights") or {"a": 1.0, "b": 1.0}
            shares.append(w["a"] / (w["a"] + w["b"] + 1e-9))
        penalty = 0.0 if recipe["rules"][0]["method"] == "linear" else 0.3
        return 1.0 - abs(sum(shares) / len(shares) - 0.2) - penalty

    def run_first_stage(self, recipe, seed, first_share):
        q = self.quality(recipe)
        self.last = {name: q for name in self.names}
        first = {name: {"score": q, "se": 0.01, "items": 4} for name in self.names}
        return {"first_stage": first, "scores": self.last, "timings": {"merge_s": 0.0, "eval_s": 0.0}}

    def run_second_stage(self, first_share):
        return {"scores": self.last, "timings": {"eval_rest_s": 0.0}}


class SingleObjectiveWorker(StagedWorker):
    names = ("a",)


def pruned_study(tmp_path, name, worker_cls, n_trials=24):
    data = study_data(
        tmp_path, name, budget={"n_trials": n_trials}, ray={"workers": 1},
        pruning={"enabled": True, "min_complete": 1},
    )  # fmt: skip
    return run_study(parse_study_config(data, "test"), console=Console(quiet=True), worker_cls=worker_cls)


@pytest.mark.parametrize("worker_cls", [StagedWorker, SingleObjectiveWorker])
def test_driver_with_pruning_reaches_its_budget_and_never_prunes_baselines(ray_session, tmp_path, worker_cls):
    study = pruned_study(tmp_path, worker_cls.__name__, worker_cls)
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 24 and len(trials) == 24  # PRUNED trials count toward the budget
    assert pruned, "the stand-in's bad recipes should be pruned"
    baselines = [t for t in trials if "baseline" in t.user_attrs]
    assert len(baselines) == 4 and all(t.state == TrialState.COMPLETE for t in baselines)
    # task_arithmetic baselines are beaten by uniform_average by 0.3 on every objective, yet complete
    assert baselines[1].values[0] < baselines[0].values[0] - 0.2
    for trial in pruned:
        assert "prune_reason" in trial.user_attrs and "scores" not in trial.user_attrs
        assert set(trial.user_attrs["first_stage"]) == set(worker_cls.names)
    for trial in complete:
        assert set(trial.user_attrs["timings"]) == {"merge_s", "eval_s", "eval_rest_s"}
        assert trial.user_attrs["scores"] == dict(zip(worker_cls.names, trial.values))
        if len(worker_cls.names) == 1:
            assert trial.intermediate_values == {0: trial.values[0]}
