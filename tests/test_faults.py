"""Fault injection on the real software stack: PostgreSQL store, driver kill -9, database outage,
several drivers on one study, storages that cannot be used.

Each test asserts the same invariants: COMPLETE trials = budget, no trial recorded twice,
no RUNNING or WAITING leftovers, and the stored Pareto front equals the one recomputed from
all trials. The stand-in workers of test_driver keep the trials cheap; the real worker path
(merge + score on the tiny zoo) has its own fault tests in test_faults_e2e.py.
"""

from __future__ import annotations

import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from servers import free_port, postgres_bin_dir, start_postgres
from test_driver import FakeWorker, quiet, start_driver, states, study_config, wait_for_complete
from test_several_drivers import check_a_killed_driver_is_taken_over, check_two_drivers_share_the_budget

from mergetune.core.errors import MergetuneError
from mergetune.search.driver import run_study
from mergetune.studies.storage import StorageError
from mergetune.studies.store import open_study

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules["test_driver"])
optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.skipif(postgres_bin_dir() is None, reason="needs Debian's postgresql package (.ci/run installs it)")


@pytest.fixture(scope="module")
def postgres():
    server = start_postgres()
    yield server
    server.remove()


def pareto_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Non-dominated COMPLETE trials (all objectives maximised), recomputed from scratch."""
    done = [t for t in trials if t.state == TrialState.COMPLETE]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a.values, b.values)) and any(x > y for x, y in zip(a.values, b.values))

    return {t.number for t in done if not any(dominates(o, t) for o in done)}


def assert_consistent(study: optuna.Study, budget: int) -> None:
    trials = study.get_trials()
    counts = states(study)
    assert counts[TrialState.COMPLETE] == budget
    assert TrialState.RUNNING not in counts and TrialState.WAITING not in counts
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # A trial's seed is derived from its number; a duplicated record would repeat it.
    assert len({t.user_attrs["seed"] for t in complete}) == len(complete)
    retried = [t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs]
    assert len(retried) == len(set(retried)), "a failed trial was re-run more than once"
    assert {t.number for t in study.best_trials} == pareto_numbers(trials)


def test_postgres_study_survives_driver_kill_9_and_resumes(ray_session, postgres, tmp_path):
    config = study_config(tmp_path, "pg_killed", 12, storage=postgres.url, ray={"workers": 2, "address": ray_session})
    driver = start_driver(tmp_path, config, delay=0.4)
    try:
        wait_for_complete(config, 3, driver=driver)
    finally:
        driver.kill()
        driver.wait()
    before = states(open_study("pg_killed", postgres.url))
    assert before[TrialState.COMPLETE] >= 3 and before.get(TrialState.RUNNING, 0) >= 1

    resumed = run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert_consistent(resumed, 12)
    orphans = [t for t in resumed.get_trials() if t.user_attrs.get("fail_reason", "").startswith("left RUNNING")]
    assert len(orphans) == before[TrialState.RUNNING]


def test_postgres_outage_mid_study_is_retried_and_nothing_is_lost(ray_session, postgres, tmp_path):
    config = study_config(tmp_path, "pg_outage", 14, storage=postgres.url, ray={"workers": 2, "address": ray_session})
    driver = start_driver(tmp_path, config, delay=0.3)
    try:
        wait_for_complete(config, 3, driver=driver)
        postgres.stop("immediate")  # like a crash: open connections die mid-session
        down = time.monotonic()
        time.sleep(4)
        postgres.start()
        print(f"PostgreSQL down for {time.monotonic() - down:.1f} s")
        assert driver.wait(timeout=180) == 0
    finally:
        driver.kill()
    assert_consistent(open_study("pg_outage", postgres.url), 14)


def test_storage_outage_longer_than_the_window_stops_cleanly_and_resumes(ray_session, postgres, tmp_path):
    config = study_config(
        tmp_path, "pg_gone", 10, storage=postgres.url, storage_retry_s=2, ray={"workers": 2, "address": ray_session}
    )
    driver = start_driver(tmp_path, config, delay=0.3)
    try:
        wait_for_complete(config, 2, driver=driver)
        postgres.stop("immediate")
        assert driver.wait(timeout=60) != 0  # gave up after the retry window, without hanging
    finally:
        driver.kill()
        postgres.start()
    resumed = run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert_consistent(resumed, 10)


def test_postgres_two_drivers_share_budget_and_warm_start(ray_session, postgres, databases, tmp_path):
    check_two_drivers_share_the_budget(tmp_path, ray_session, storage=server_url(postgres, "shared"))


def test_postgres_killed_driver_is_taken_over_by_the_other(ray_session, postgres, databases, tmp_path):
    check_a_killed_driver_is_taken_over(tmp_path, ray_session, storage=server_url(postgres, "taken_over"))


@pytest.fixture(scope="module")
def databases(postgres):
    """Separate databases for tests that share the server (`shared`, `taken_over`, `empty`)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for name in ("shared", "taken_over", "empty"):
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()


def server_url(postgres, database="postgres", port=None):
    return f"postgresql+psycopg://postgres@127.0.0.1:{port or postgres.port}/{database}"


@pytest.mark.parametrize(
    "where, message",
    [
        ({"database": "nosuchdb"}, 'database "nosuchdb" does not exist'),
        ({"port": "free"}, "Connection refused"),
    ],
)
def test_an_unusable_postgres_storage_is_one_line_at_once(postgres, tmp_path, caplog, where, message):
    url = server_url(postgres, where.get("database", "postgres"), free_port() if where.get("port") else None)
    config = study_config(tmp_path, "unusable", 4, storage=url)
    started = time.monotonic()
    with caplog.at_level("WARNING"), pytest.raises(StorageError, match=message) as raised:
        run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert time.monotonic() - started < 10 and "retrying" not in caplog.text
    assert "\n" not in str(raised.value)


def test_status_of_an_empty_postgres_database_writes_nothing(postgres, databases):
    import sqlalchemy

    from mergetune.studies.store import open_study

    url = server_url(postgres, "empty")
    with pytest.raises(MergetuneError, match="no Optuna tables there"):
        open_study("s", url)
    assert sqlalchemy.inspect(sqlalchemy.create_engine(url)).get_table_names() == []
