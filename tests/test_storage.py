"""Study storages: permanent errors fail at once, read-only commands never create anything, study
names stay inside studies/, and storage calls that create trials survive a lost answer."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
import sqlalchemy.exc
import yaml
from optuna.trial import TrialState

from test_driver import FakeWorker, quiet, states, study_config

from mergetune.core.errors import ConfigError
from mergetune.search.driver import run_study
from mergetune.studies.storage import StorageError, StorageRetry
from mergetune.studies.store import open_study

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules["test_driver"])
optuna.logging.set_verbosity(optuna.logging.WARNING)

CLI = [sys.executable, "-m", "mergetune.cli.main"]


def cli(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def files_under(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --- permanent errors: one line, at once ---
def test_an_unwritable_sqlite_path_fails_at_once_without_retrying(tmp_path, caplog):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    config = study_config(tmp_path, "unwritable", 4, storage=f"sqlite:///{blocker}/studies/x.db")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="not a writable directory"):
        run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert time.monotonic() - started < 10
    assert "retrying" not in caplog.text


def test_an_unwritable_sqlite_path_is_one_line_from_the_cli(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    config = study_config(tmp_path, "unwritable", 4, storage=f"sqlite:///{blocker}/x.db")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert "not a writable directory" in one_line_error(cli("run", str(path)))


@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlit:///x.db", "unknown database dialect 'sqlit'"),
        ("postgres//nohost", "is not a storage URL"),
    ],
)
def test_a_storage_url_typo_is_one_line(tmp_path, url, message):
    assert message in one_line_error(cli("status", "--study", "s", "--storage", url, cwd=tmp_path))
    config = study_config(tmp_path, "typo", 4, storage=url)
    with pytest.raises(ConfigError, match=message):
        run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert files_under(tmp_path) == ["base", "base/config.json"]


def test_permanent_errors_mid_run_are_not_retried():
    calls = []

    def refused():
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception('FATAL:  database "gone" does not exist'))

    with pytest.raises(StorageError, match="does not exist"):
        StorageRetry(window_s=60)(refused)
    assert len(calls) == 1


def test_connection_losses_are_retried_until_they_heal():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("server closed the connection unexpectedly"))
        return "answer"

    retry = StorageRetry(window_s=60, first_delay_s=0.01)
    assert retry(flaky) == "answer" and len(calls) == 3 and retry.outages == 1


def test_drivers_creating_one_storage_at_the_same_instant_all_open_it(tmp_path):
    # Optuna's table creation races (UNIQUE constraint failed: alembic_version); open_storage retries it.
    script = tmp_path / "open.py"
    script.write_text(
        "import sys, time\n"
        "from mergetune.studies.storage import open_storage\n"
        "while time.time() < float(sys.argv[2]):\n    time.sleep(0.001)\n"
        "open_storage(f'sqlite:///{sys.argv[1]}', create=True)\n"
    )
    for round_ in range(2):
        start = time.time() + 6  # every process has imported optuna by then
        procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"r{round_}.db"), str(start)], stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for proc in procs:
            _, stderr = proc.communicate(timeout=120)
            assert proc.returncode == 0, stderr[-2000:]


# --- read-only commands create nothing; names stay inside studies/ ---
@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["resume"],
        ["front"],
        ["export", "--out", "out", "--format", "recipe"],
        ["report", "--out", "out"],
    ],
)
def test_read_only_commands_never_create_a_storage(tmp_path, command):
    line = one_line_error(cli(*command, "--study", "typo", cwd=tmp_path))
    assert "no study storage at sqlite:///studies/typo.db" in line
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("command", [["status"], ["resume"], ["front"], ["export", "--out", "out"], ["report", "--out", "out"]])
def test_a_study_name_with_a_path_in_it_is_refused(tmp_path, command):
    work = tmp_path / "work"
    work.mkdir()
    line = one_line_error(cli(*command, "--study", "../outside/evil", cwd=work))
    assert "study name '../outside/evil'" in line
    assert files_under(tmp_path) == ["work"]


def test_a_config_study_name_with_a_path_in_it_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="study"):
        study_config(tmp_path, "../evil", 4)
    with pytest.raises(ConfigError, match="study"):
        study_config(tmp_path, "..", 4)


def test_a_database_without_optuna_tables_is_not_written_by_status(tmp_path):
    # An SQLite file without Optuna's tables; test_faults.py checks an empty PostgreSQL database.
    empty = tmp_path / "empty.db"
    sqlalchemy.create_engine(f"sqlite:///{empty}").connect().close()
    before = hashlib.sha256(empty.read_bytes()).hexdigest()
    line = one_line_error(cli("status", "--study", "s", "--storage", f"sqlite:///{empty}"))
    assert "no Optuna tables there" in line
    assert hashlib.sha256(empty.read_bytes()).hexdigest() == before


# --- creating trials survives a lost answer ---
LOST = "server closed the connection unexpectedly"


def lose_answers(monkeypatch, method: str, calls: set[int], only=lambda *args, **kwargs: True):
    """Make RDBStorage.`method` commit, then raise a connection error, on its `calls`-th matching calls."""
    original = getattr(optuna.storages.RDBStorage, method)
    seen = Counter()

    def committed_then_lost(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if only(*args, **kwargs):
            seen[method] += 1
            if seen[method] in calls:
                raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception(LOST))
        return result

    monkeypatch.setattr(optuna.storages.RDBStorage, method, committed_then_lost)
    return seen


def test_a_lost_answer_after_ask_or_enqueue_committed_creates_no_extra_trial(ray_session, tmp_path, monkeypatch, caplog):
    # _create_new_trial (what Optuna's cached storage calls) serves both enqueue_trial (WAITING baselines, calls 1-4) and a fresh ask (RUNNING, call 6+).
    created = lose_answers(monkeypatch, "_create_new_trial", {2, 7})
    # set_trial_state_values(RUNNING) claims an enqueued trial: lose the answer of the first claim.
    claimed = lose_answers(monkeypatch, "set_trial_state_values", {1}, only=lambda trial_id, state, values=None: state == TrialState.RUNNING)
    with caplog.at_level(logging.WARNING):
        study = run_study(study_config(tmp_path, "lossy", 10), console=quiet(), worker_cls=FakeWorker)
    assert caplog.text.count(LOST) == 3  # every injected fault was hit and retried
    assert created["_create_new_trial"] >= 7 and claimed["set_trial_state_values"] >= 1
    trials = study.get_trials()
    assert states(study) == {TrialState.COMPLETE: 10} and len(trials) == 10
    baselines = Counter(t.user_attrs["baseline"] for t in trials if "baseline" in t.user_attrs)
    assert baselines == Counter(["uniform_average", "task_arithmetic", "task_arithmetic_tuned", "ties"])


def test_a_changed_search_space_is_refused_and_the_study_untouched(ray_session, tmp_path):
    run_study(study_config(tmp_path, "space", 6), console=quiet(), worker_cls=FakeWorker)
    db = tmp_path / "studies.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    other = study_config(tmp_path, "space", 8, search={"layer_groups": 2, "methods": ["linear", "ties"]})
    with pytest.raises(ConfigError) as raised:
        run_study(other, console=quiet(), worker_cls=FakeWorker)
    message = str(raised.value)
    assert "\n" not in message
    assert "created with another search space (emb.method was one of linear, task_arithmetic, ties, now one of linear, ties)" in message
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    study = open_study("space", f"sqlite:///{db}")
    assert states(study) == {TrialState.COMPLETE: 6} and study.user_attrs["config"]["budget"]["n_trials"] == 6
    more_groups = study_config(tmp_path, "space", 8, search={"layer_groups": 3, "methods": ["linear", "task_arithmetic", "ties"]})
    with pytest.raises(ConfigError, match=r"\(g2\.method is new\)"):
        run_study(more_groups, console=quiet(), worker_cls=FakeWorker)
