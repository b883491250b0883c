"""Pareto front, trial picking, recipe summaries and study opening on synthetic studies."""

from __future__ import annotations

import optuna
import pytest
from rich.console import Console
from test_studies_fixtures import EXPERTS, linear_recipe, make_study

from mergetune.core.errors import MergetuneError
from mergetune.studies.front import (
    best_vs_baselines,
    configured_weights,
    front_table,
    front_trials,
    pick_trial,
    recipe_summary,
    scalarised,
)
from mergetune.studies.store import open_study

MODELS = {"base": "/models/base", **{e: f"/models/{e}" for e in EXPERTS}}


@pytest.fixture()
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return make_study(f"sqlite:///{tmp_path}/s.db", MODELS)


def test_front_is_the_non_dominated_complete_trials(study):
    front = front_trials(study)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in front:
        assert not any(all(o >= v for o, v in zip(other.values, t.values)) and other.values != t.values for other in complete)
    dominated = [t for t in complete if t.number not in {f.number for f in front}]
    for t in dominated:
        assert any(all(f >= v for f, v in zip(f_t.values, t.values)) for f_t in front)


def test_pick_best_uses_configured_weights_and_objectives(study):
    assert configured_weights(study) == {"arith": 2.0, "code": 1.0}
    best = pick_trial(study, "best")
    front = front_trials(study)
    weights = configured_weights(study)
    assert scalarised(study, best, weights) == max(scalarised(study, t, weights) for t in front)
    by_code = pick_trial(study, "best", "code")
    assert by_code.values[1] == max(t.values[1] for t in study.trials if t.values)
    by_given = pick_trial(study, "best", "code=1")
    assert by_given.number == by_code.number
    assert pick_trial(study, "3").number == 3


@pytest.mark.parametrize(
    ("trial", "pick", "message"),
    [("99", None, "no trial 99"), ("12", None, "FAIL"), ("x", None, "trial number"), ("best", "nope", "--pick")],
)
def test_pick_errors_are_user_errors(study, trial, pick, message):
    with pytest.raises(MergetuneError, match=message):
        pick_trial(study, trial, pick)


def test_table_and_summary(study):
    recipe = linear_recipe(MODELS, 0.3)
    assert recipe_summary(recipe) == "L0 linear · rest linear"
    console = Console(record=True, width=200)
    console.print(front_table(study, front_trials(study)))
    text = console.export_text()
    assert "Pareto front of synthetic" in text and "L0 linear · rest linear" in text
    assert str(front_trials(study)[0].number) in text


def test_open_study_errors_name_what_exists(tmp_path, study):
    url = f"sqlite:///{tmp_path}/s.db"
    assert open_study("synthetic", url).study_name == "synthetic"
    with pytest.raises(MergetuneError, match="studies there: synthetic"):
        open_study("other", url)
    with pytest.raises(MergetuneError, match="no study storage"):
        open_study("x", f"sqlite:///{tmp_path}/missing.db")


def test_journal_storage(tmp_path):
    from mergetune.studies.storage import open_storage

    url = f"journal://{tmp_path}/j/log.jsonl"
    make_study(open_storage(url, create=True), MODELS, n_trials=3, name="j")
    assert len(front_trials(open_study("j", url))) >= 1


def test_run_ends_with_the_best_trial_against_the_best_baseline(study):
    weights = configured_weights(study)
    best = pick_trial(study, "best")
    baselines = [t for t in study.trials if t.user_attrs.get("baseline")]
    top = max(baselines, key=lambda t: scalarised(study, t, weights))
    gain = scalarised(study, best, weights) - scalarised(study, top, weights)
    line = best_vs_baselines(study)
    assert line.startswith(f"best trial #{best.number}: weighted mean {scalarised(study, best, weights):.4f}")
    assert f"{gain:+.4f} over the best warm-start baseline ({top.user_attrs['baseline']}, #{top.number})" in line
