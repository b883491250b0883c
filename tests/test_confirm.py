"""Noise-aware selection end to end: a tiny-zoo study whose run ends by re-scoring its top trials.

The search scores 6 of each task's 16 search items (answer log-likelihood: the tiny zoo's exact
match is 0 everywhere); the confirmation re-scores the top 2 trials on all 16, on the real
TrialWorker, and `best` follows the confirmed scores. A resume re-scores
nothing already confirmed; a confirmation lost to a crash is redone by the next run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console

from mergetune.evaluators.stderr import standard_error
from mergetune.search.config import parse_study_config
from mergetune.search.confirm import confirm_top_trials, skip_reason
from mergetune.search.driver import run_study
from mergetune.search.workers import TrialWorker
from mergetune.studies.front import (
    CONFIRMED_ATTR_PREFIX,
    confirmation_candidates,
    confirmed_records,
    confirmed_values,
    configured_weights,
    objective_names,
    pick_trial,
    scalarised,
)

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
optuna.logging.set_verbosity(optuna.logging.WARNING)

SEARCH_ITEMS, SPLIT_ITEMS, TOP_K = 6, 16, 2


class CountingWorker(TrialWorker):
    """The real worker; every `confirm` call appends a line to the file `log`."""

    log = ""

    def confirm(self, recipe, seed):
        with open(self.log, "a") as f:
            f.write(f"{seed}\n")
        return super().confirm(recipe, seed)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    from mergetune.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, "tiny", seed=0, console=Console(quiet=True))
    return out


def study_config(zoo: Path, root: Path):
    data = {
        "study": "confirmed",
        "zoo": str(zoo),
        "evaluator": {"kind": "quick", "zoo": str(zoo), "limit": SEARCH_ITEMS, "metrics": ["logprob"]},
        "search": {"layer_groups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
        "sampler": {"m3_prior": {"n_startup": 4}},
        "budget": {"n_trials": 6},
        "confirm": {"top_k": TOP_K, "limit": None},
        "storage": f"sqlite:///{root / 'studies.db'}",
        "ray": {"workers": 1, "cpus_per_worker": 1},
    }
    return parse_study_config(data, "test")


LOGPROB_TOL = 1e-5  # a float sum; thread counts differ between the Ray worker and this process


def test_run_confirms_its_top_trials_and_the_best_follows_the_confirmed_scores(zoo, tmp_path, ray_session):
    config = study_config(zoo, tmp_path)
    calls = tmp_path / "confirm_calls"
    worker = type("Worker", (CountingWorker,), {"log": str(calls)})
    study = run_study(config, console=Console(quiet=True), worker_cls=worker)
    names = objective_names(study)
    records = confirmed_records(study)
    candidates = confirmation_candidates(study, TOP_K)
    assert sorted(records) == sorted(t.number for t in candidates) and len(records) == TOP_K
    assert len(calls.read_text().splitlines()) == TOP_K

    # The same recipes on a worker in this process: the stored SEs are those of the per-item scores.
    threads = torch.get_num_threads()
    here = TrialWorker(config.to_json())  # sets this process's torch threads to cpus_per_worker
    for trial in candidates:
        recipe, seed = trial.user_attrs["recipe"], trial.user_attrs["seed"]
        assert here.run(recipe, seed)["score_se"] == {name: pytest.approx(se, abs=LOGPROB_TOL) for name, se in trial.user_attrs["score_se"].items()}
        items = here.evaluator.score_items(here.backend, "search")
        assert {name: len(v) for name, v in items.items()} == {name: SEARCH_ITEMS for name in names}
        assert trial.user_attrs["score_se"] == {name: pytest.approx(standard_error(items[name]), abs=LOGPROB_TOL) for name in names}
        record = records[trial.number]["scores"]
        here.confirm(recipe, seed)
        items = here._confirm_evaluator.score_items(here.backend, "search")
        for name in names:
            assert record[name]["items"] == SPLIT_ITEMS
            assert record[name]["score"] == pytest.approx(sum(items[name]) / SPLIT_ITEMS, abs=LOGPROB_TOL)
            assert record[name]["se"] == pytest.approx(standard_error(items[name]), abs=LOGPROB_TOL)
    torch.set_num_threads(threads)
    assert any(  # the re-score on more items moved some score: it measures something the search did not
        abs(records[t.number]["scores"][name]["score"] - v) > 1e-3 for t in candidates for name, v in zip(names, t.values)
    )
    weights = configured_weights(study)
    best = pick_trial(study, "best")
    assert best.number == max(
        candidates, key=lambda t: (scalarised(study, t, weights, confirmed_values(study, records[t.number])), -t.number)
    ).number

    # a resume at the same budget re-scores nothing; a confirmation a crash lost is redone
    run_study(config, console=Console(quiet=True), worker_cls=worker)
    assert len(calls.read_text().splitlines()) == TOP_K
    _delete_study_user_attr(config.storage_url, study, f"{CONFIRMED_ATTR_PREFIX}{candidates[-1].number}")
    run_study(config, console=Console(quiet=True), worker_cls=worker)
    assert len(calls.read_text().splitlines()) == TOP_K + 1
    redone = confirmed_records(optuna.load_study(study_name="confirmed", storage=config.storage_url))
    assert sorted(redone) == sorted(records)
    assert {"merge_s", "eval_s"} <= set(records[candidates[0].number]["timings"])
    for name in names:
        entry = records[candidates[-1].number]["scores"][name]
        assert redone[candidates[-1].number]["scores"][name] == {**entry, "score": pytest.approx(entry["score"], abs=LOGPROB_TOL), "se": pytest.approx(entry["se"], abs=LOGPROB_TOL)}


def _delete_study_user_attr(url: str, study: optuna.Study, key: str) -> None:
    """What a driver killed before it wrote a confirmation leaves: no record for that trial."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text("DELETE FROM study_user_attributes WHERE study_id = :id AND key = :key"),
            {"id": study._study_id, "key": key},
        )
    engine.dispose()


def test_confirmation_is_skipped_when_it_would_score_the_same_items(zoo, tmp_path):
    config = study_config(zoo, tmp_path)
    assert skip_reason(config) is None
    same = config.model_copy(update={"confirm": config.confirm.model_copy(update={"limit": SEARCH_ITEMS})})
    assert "already scores every item" in skip_reason(same)
    off = config.model_copy(update={"confirm": config.confirm.model_copy(update={"top_k": 0})})
    assert skip_reason(off) == "confirm.top_k is 0"
    assert confirm_top_trials(None, None, None, off, Console(quiet=True), None) == 0
