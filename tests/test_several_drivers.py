"""Several drivers on one study (SQLite here; test_faults.py runs the same on PostgreSQL).

Drivers run in subprocesses joined to the test's Ray, one stand-in worker each. Their trials
wait at a gate (a file) until both drivers have one in flight, so the overlap does not depend
on how fast a loaded machine starts them.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import optuna
from optuna.trial import TrialState

from test_driver import start_driver, states, study_config

from mergetune.search.liveness import driver_records
from mergetune.search.warmstart import CLASSIC_RECIPES
from mergetune.studies.store import open_study

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules["test_driver"])
optuna.logging.set_verbosity(optuna.logging.WARNING)

BUDGET = 12
BASELINES = ["uniform_average", "task_arithmetic", "task_arithmetic_tuned", "ties"]  # those the test space can express
assert set(BASELINES) <= {name for name, _, _ in CLASSIC_RECIPES}


def wait_until(config, condition, drivers, what, timeout=120):
    """Poll the study until `condition(study)`; a driver that exits first fails the test with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for driver in drivers:
            if driver.poll() is not None:
                raise AssertionError(f"a driver exited ({driver.returncode}) before {what}:\n{driver.log_path.read_text()[-3000:]}")
        try:
            study = open_study(config.study, config.storage_url)
            if condition(study):
                return study
        except Exception:  # the storage may not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting until {what}")


def running_drivers(study) -> set[str]:
    return {t.user_attrs.get("driver") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def ran_on(trial, driver) -> bool:
    """Whether the driver process `driver` claimed `trial` (driver ids are host-pid-random)."""
    return f"-{driver.pid}-" in trial.user_attrs.get("driver", "")


def start_two(tmp_path, config, **first_attrs):
    """The first driver, then the second while the first has a trial in flight; then the gate opens."""
    gate = tmp_path / "gate"
    first = start_driver(tmp_path, config, 0.3, name="first", gate=str(gate), **first_attrs)
    drivers = [first]
    try:
        wait_until(config, lambda s: len(running_drivers(s)) >= 1, drivers, "the first driver had a trial in flight")
        drivers.append(start_driver(tmp_path, config, 0.3, name="second", gate=str(gate)))
        wait_until(config, lambda s: len(running_drivers(s)) >= 2, drivers, "both drivers had a trial in flight")
        gate.touch()
    except BaseException:
        for driver in drivers:
            driver.kill()
        raise
    return drivers


def finish(drivers, timeout=180):
    try:
        for driver in drivers:
            code = driver.wait(timeout=timeout)
            assert code == 0, f"exit {code}:\n{driver.log_path.read_text()[-3000:]}"
    finally:
        for driver in drivers:
            driver.kill()


def assert_shared_run(study, budget: int, n_drivers: int) -> None:
    """At the budget (plus at most one per extra driver), nothing failed or re-run, each baseline once."""
    trials = study.get_trials()
    counts = states(study)
    assert budget <= counts[TrialState.COMPLETE] <= budget + n_drivers - 1, counts
    assert set(counts) == {TrialState.COMPLETE}, counts  # no FAIL, RUNNING or WAITING
    assert not [t for t in trials if "retry_of" in t.user_attrs]
    baselines = Counter(t.user_attrs["baseline"] for t in trials if "baseline" in t.user_attrs)
    assert baselines == Counter(BASELINES)
    assert len({t.user_attrs["seed"] for t in trials}) == len(trials)  # no trial recorded twice
    assert len({t.user_attrs["driver"] for t in trials}) == n_drivers  # every driver ran trials
    records = driver_records(study.user_attrs)
    assert len(records) == n_drivers and all(r.stopped is not None and not r.in_flight for r in records)


def check_two_drivers_share_the_budget(tmp_path, ray_address, storage=None):
    config = study_config(tmp_path, "shared", BUDGET, ray={"workers": 1, "address": ray_address}, **({"storage": storage} if storage else {}))
    finish(start_two(tmp_path, config))
    assert_shared_run(open_study(config.study, config.storage_url), BUDGET, 2)


def check_a_killed_driver_is_taken_over(tmp_path, ray_address, storage=None):
    """SIGKILL the first driver while its third trial hangs: the second reclaims it after the grace period."""
    config = study_config(tmp_path, "taken_over", BUDGET, ray={"workers": 1, "address": ray_address}, **({"storage": storage} if storage else {}))
    first, second = start_two(tmp_path, config, hang_after=2)

    def first_hangs(study):
        mine = [t for t in study.get_trials(deepcopy=False) if ran_on(t, first)]
        # Hung in its worker: dispatched (its recipe stored, every param suggested), not merely claimed.
        hung = any(t.state == TrialState.RUNNING and "recipe" in t.user_attrs for t in mine)
        return sum(t.state == TrialState.COMPLETE for t in mine) >= 2 and hung

    try:
        wait_until(config, first_hangs, [first, second], "the first driver's third trial hung")
    finally:
        first.kill()  # SIGKILL: no cleanup at all
        first.wait()
    killed = [t for t in open_study(config.study, config.storage_url).get_trials() if t.state == TrialState.RUNNING and ran_on(t, first)]
    assert len(killed) == 1
    finish([second])

    study = open_study(config.study, config.storage_url)
    counts = states(study)
    assert BUDGET <= counts[TrialState.COMPLETE] <= BUDGET + 1 and counts[TrialState.FAIL] == 1, counts
    assert TrialState.RUNNING not in counts and TrialState.WAITING not in counts
    orphan = study.trials[killed[0].number]
    assert orphan.state == TrialState.FAIL and orphan.user_attrs["fail_reason"].startswith("left RUNNING by a driver that stopped")
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == orphan.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE and retries[0].params == orphan.params
    assert ran_on(retries[0], second)


def test_two_drivers_share_budget_and_warm_start(ray_session, tmp_path):
    check_two_drivers_share_the_budget(tmp_path, ray_session)


def test_a_killed_driver_is_taken_over_by_the_other_after_the_grace_period(ray_session, tmp_path):
    check_a_killed_driver_is_taken_over(tmp_path, ray_session)
