"""Pareto front, trial picking, recipe summaries and study opening on synthetic studies."""

from __future__ import annotations

import optuna
import pytest
from rich.console import Console
from test_studies_fixtures import EXPERTS, linear_recipe, make_study

from mergetune.core.errors import MergetuneError
from mergetune.studies.front import (
    CONFIRMED_ATTR_PREFIX,
    best_scored,
    best_vs_baselines,
    confirmation_candidates,
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


# --- noise-aware selection ---
def confirm(study, trial, shift: float, se: float = 0.01, items: int = 64) -> None:
    """Record a confirmation re-score of `trial`: its search scores moved by `shift`."""
    scores = {name: {"score": v + shift, "se": se, "items": items} for name, v in zip(["arith", "code"], trial.values)}
    study.set_user_attr(f"{CONFIRMED_ATTR_PREFIX}{trial.number}", {"scores": scores, "limit": None})


def test_a_search_score_inflated_by_noise_is_not_picked_once_the_confirmation_disagrees(study):
    weights = configured_weights(study)
    inflated = pick_trial(study, "best")  # the highest weighted search mean
    runner_up = confirmation_candidates(study, 2)[1]
    assert scalarised(study, runner_up, weights) < scalarised(study, inflated, weights)
    confirm(study, inflated, -0.2)  # on more items, its lead was noise
    confirm(study, runner_up, 0.0)
    best = pick_trial(study, "best")
    assert best.number == runner_up.number
    assert best_scored(study) == (best, pytest.approx(scalarised(study, runner_up, weights)))
    # an objective or other weights choose by search scores: the confirmation covered the configured weights only
    assert pick_trial(study, "best", "arith").values[0] == max(t.values[0] for t in study.trials if t.values)
    assert pick_trial(study, "best", "arith=2,code=1").number == inflated.number
    line = best_vs_baselines(study)
    # weights 2:1, SE 0.01 each: the weighted mean's SE is √((2/3)² + (1/3)²) · 0.01
    assert line.startswith(f"best trial #{runner_up.number}: weighted mean {scalarised(study, runner_up, weights):.4f} on the search split")
    assert f"confirmed {scalarised(study, runner_up, weights):.4f} ± {0.01 * (5 / 9) ** 0.5:.4f} on 64 items per task" in line


def test_confirmation_candidates_are_the_front_by_weighted_mean_then_the_next_best(study):
    weights = configured_weights(study)
    front = {t.number for t in front_trials(study)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    every = confirmation_candidates(study, len(complete))
    assert [t.number for t in every[: len(front)]] == [
        t.number for t in sorted(front_trials(study), key=lambda t: -scalarised(study, t, weights))
    ]
    rest = [scalarised(study, t, weights) for t in every[len(front):]]
    assert rest == sorted(rest, reverse=True) and len(every) == len(complete)
    assert [t.number for t in confirmation_candidates(study, 1)] == [pick_trial(study, "best").number]
    assert confirmation_candidates(study, 0) == []


def test_front_table_shows_search_scores_with_their_se_and_confirmed_scores(study):
    trials = front_trials(study)
    confirm(study, trials[0], 0.0, se=0.0123)
    console = Console(record=True, width=250)
    console.print(front_table(study, trials))
    text = console.export_text()
    assert "confirmed" in text and f"{trials[0].values[0]:.4f} ± 0.0123" in text and "–" in text
