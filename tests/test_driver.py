"""The Ray driver with stand-in workers: budget, warm start, failures, worker death, kill -9 + resume, GPU placement.

The stand-ins score a recipe from its weights in microseconds, so these tests exercise the
driver (Ray actors, Optuna storage) and not the merge or the evaluator.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from rich.console import Console

from mergetune.core.errors import ConfigError, MergetuneError
from mergetune.search.config import parse_study_config
from mergetune.search.driver import run_study
from mergetune.search.pool import WorkerPool
from mergetune.studies.store import open_study

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
optuna.logging.set_verbosity(optuna.logging.WARNING)


class FakeWorker:
    """Scores a = share of expert a in the weights, b = share of b: a two-objective trade-off."""

    delay = 0.0

    def __init__(self, config_json):
        self.config = json.loads(config_json)

    def objectives(self):
        return [("a", "maximize"), ("b", "maximize")]

    def describe(self):
        from mergetune.search.workers import placement

        return placement()

    def scores(self, recipe):
        shares = []
        for rule in recipe["rules"]:
            w = rule.get("weights") or {"a": 1.0, "b": 1.0}
            shares.append(w["a"] / (w["a"] + w["b"] + 1e-9))
        a = sum(shares) / len(shares)
        return {"a": a, "b": 1.0 - a}

    def run(self, recipe, seed):
        time.sleep(self.delay)
        from mergetune.search.workers import placement

        return {**placement(), "scores": self.scores(recipe), "timings": {"merge_s": 0.0, "eval_s": 0.0}}


class GatedWorker(FakeWorker):
    """A FakeWorker whose trials wait until the file `gate` exists; after `hang_after` trials the next
    never ends, after `fail_after` trials every one fails."""

    gate = ""
    hang_after: int | None = None
    fail_after: int | None = None
    done = 0

    def run(self, recipe, seed):
        while self.gate and not os.path.exists(self.gate):
            time.sleep(0.05)
        if self.hang_after is not None and self.done >= self.hang_after:
            time.sleep(3600)  # in flight until its driver is killed
        if self.fail_after is not None and self.done >= self.fail_after:
            return {"error": "RuntimeError: merge exploded"}
        self.done += 1
        return super().run(recipe, seed)


class FlakyWorker(FakeWorker):
    """Every 4th seed raises in the 'merge', every 4th+1 scores NaN."""

    def run(self, recipe, seed):
        if seed % 4 == 1:
            return {"error": "RuntimeError: merge exploded"}
        result = super().run(recipe, seed)
        if seed % 4 == 2:
            result["scores"]["a"] = math.nan
        return result


def study_config(tmp_path, name, n_trials, workers=2, **extra):
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    data = {
        "study": name,
        "models": {"base": str(base), "experts": {"a": "/nowhere/a", "b": "/nowhere/b"}},
        "evaluator": {"kind": "quick", "zoo": "/zoo"},
        "search": {"layer_groups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
        "budget": {"n_trials": n_trials},
        "storage": f"sqlite:///{tmp_path / 'studies.db'}",
        "ray": {"workers": workers},
        "sampler": {"m3_prior": {"n_startup": 6}},
        # Short beats so tests of dead drivers wait seconds; long enough for a loaded 2-core machine.
        "heartbeat": {"interval_s": 0.5, "grace_s": 6},
        **extra,
    }
    return parse_study_config(data, "test")


def quiet():
    return Console(quiet=True)


def states(study):
    counts = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def test_study_reaches_budget_with_warm_start_first_and_records_trials(ray_session, tmp_path):
    study = run_study(study_config(tmp_path, "basic", 12), console=quiet(), worker_cls=FakeWorker)
    trials = study.get_trials()
    assert states(study) == {TrialState.COMPLETE: 12}
    baselines = [t.user_attrs.get("baseline") for t in trials[:4]]
    assert baselines == ["uniform_average", "task_arithmetic", "task_arithmetic_tuned", "ties"]
    assert all("baseline" not in t.user_attrs for t in trials[4:])
    first = trials[0]
    assert first.user_attrs["recipe"]["rules"][0]["method"] == "linear"
    assert set(first.user_attrs["scores"]) == {"a", "b"}
    assert {"node_id", "timings", "seed", "worker"} <= set(first.user_attrs)
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both actors served trials
    assert study.user_attrs["config"]["study"] == "basic"
    assert [o["name"] for o in study.user_attrs["objectives"]] == ["a", "b"]
    assert study.metric_names == ["a", "b"]  # what optuna-dashboard labels the objectives with
    # running `run` again with a larger budget continues the same study
    more = run_study(study_config(tmp_path, "basic", 15), console=quiet(), worker_cls=FakeWorker)
    assert states(more) == {TrialState.COMPLETE: 15}


def test_failed_and_nan_trials_are_failed_with_a_reason_and_do_not_count(ray_session, tmp_path):
    study = run_study(study_config(tmp_path, "flaky", 8, warm_start=False), console=quiet(), worker_cls=FlakyWorker)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8
    reasons = {t.user_attrs["fail_reason"] for t in failed}
    assert "RuntimeError: merge exploded" in reasons and "non-finite score" in reasons


class BrokenStartWorker(FakeWorker):
    def __init__(self, config_json):
        raise ConfigError("evaluator: cannot read /zoo/tasks/sort/search.jsonl (No such file or directory)")


class RaisingWorker(FakeWorker):
    def run(self, recipe, seed):
        raise KeyError("model.layers.0.mlp.up_proj.weight")


def test_a_worker_that_cannot_start_is_the_user_error_s_one_line(ray_session, tmp_path):
    with pytest.raises(MergetuneError) as raised:
        run_study(study_config(tmp_path, "broken", 2, workers=1), console=quiet(), worker_cls=BrokenStartWorker)
    assert str(raised.value) == (
        "the first worker failed to start: evaluator: cannot read /zoo/tasks/sort/search.jsonl (No such file or directory)"
    )


def test_a_trial_whose_worker_raised_fails_with_the_exception_not_ray_s_process_line(ray_session, tmp_path):
    config = study_config(tmp_path, "raising", 2, workers=1, warm_start=False, budget={"n_trials": 2, "max_consecutive_failures": 2})
    with pytest.raises(MergetuneError, match="stopped after 2 failed trials in a row"):
        run_study(config, console=quiet(), worker_cls=RaisingWorker)
    study = open_study("raising", config.storage)
    reasons = {t.user_attrs.get("fail_reason") for t in study.get_trials(states=(TrialState.FAIL,))}
    assert reasons == {"worker error: KeyError: 'model.layers.0.mlp.up_proj.weight'"}


def test_worker_kill_fails_its_trial_retries_it_once_and_the_study_completes(ray_session, tmp_path):
    marker = tmp_path / "died"

    class DyingWorker(FakeWorker):
        def run(self, recipe, seed):
            if seed == 3 and not os.path.exists(marker_path):
                open(marker_path, "w").close()
                os._exit(1)  # the worker process dies mid-trial, like an OOM kill
            return super().run(recipe, seed)

    marker_path = str(marker)
    study = run_study(study_config(tmp_path, "dying", 8), console=quiet(), worker_cls=DyingWorker)
    assert marker.exists()
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("worker died")
    retries = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params and retries[0].state == TrialState.COMPLETE
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8


def start_driver(tmp_path, config, delay, name="driver", **worker_attrs):
    """A driver in a subprocess (joined to the test's Ray cluster, unless `ray.address` is unset) with
    slow stand-in workers; `worker_attrs` (gate, hang_after) make them GatedWorkers."""
    script = tmp_path / f"{name}.py"
    base = "GatedWorker" if worker_attrs else "FakeWorker"
    attrs = "".join(f"\n            {k} = {v!r}" for k, v in {"delay": delay, **worker_attrs}.items())
    script.write_text(textwrap.dedent(f"""
        import sys, ray
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_driver
        from mergetune.search.config import parse_study_config
        from mergetune.core.errors import MergetuneError
        from mergetune.search.driver import run_study
        ray.cloudpickle.register_pickle_by_value(test_driver)
        class SlowWorker(test_driver.{base}):{attrs}
        config = parse_study_config({config.model_dump(mode="json")!r}, "test")
        try:
            run_study(config, worker_cls=SlowWorker)
        except MergetuneError as exc:  # as the CLI does: one line, its exit code (130 after Ctrl-C)
            print(exc, file=sys.stderr)
            sys.exit(exc.exit_code)
    """))
    log_path = tmp_path / f"{name}.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=log)
    driver.log_path = log_path  # wait_for_complete shows the driver's stderr when it fails
    return driver


def wait_for_complete(config, n, timeout=90, driver=None):
    """Poll the storage until `n` trials are COMPLETE; a driver that exits first fails at once with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if driver is not None and driver.poll() is not None:
            break
        try:
            study = open_study(config.study, config.storage_url)
        except Exception:
            continue
        if len(study.get_trials(states=(TrialState.COMPLETE,))) >= n:
            return
    stderr = driver.log_path.read_text()[-3000:] if driver is not None else ""
    raise AssertionError(f"the driver did not complete {n} trials in {timeout}s\n{stderr}")


def test_resume_after_kill_9_of_the_driver_ends_at_the_budget(ray_session, tmp_path):
    config = study_config(tmp_path, "killed", 14, ray={"workers": 2, "address": ray_session})
    driver = start_driver(tmp_path, config, delay=0.4)
    try:
        wait_for_complete(config, 3, driver=driver)
    finally:
        driver.kill()  # SIGKILL: no cleanup at all
        driver.wait()
    before = states(open_study("killed", config.storage_url))
    assert before.get(TrialState.COMPLETE, 0) >= 3 and before.get(TrialState.RUNNING, 0) >= 1

    resumed = run_study(config.model_copy(update={"ray": config.ray.model_copy(update={"address": None})}), console=quiet(), worker_cls=FakeWorker)
    after = states(resumed)
    assert after[TrialState.COMPLETE] == 14 and TrialState.RUNNING not in after and TrialState.WAITING not in after
    orphans = [t for t in resumed.get_trials() if t.user_attrs.get("fail_reason", "").startswith("left RUNNING")]
    assert len(orphans) == before[TrialState.RUNNING]
    retried = {t.user_attrs["retry_of"] for t in resumed.get_trials() if "retry_of" in t.user_attrs}
    assert {t.number for t in orphans} <= retried


def test_ctrl_c_lets_in_flight_trials_finish_and_leaves_the_study_consistent(ray_session, tmp_path):
    config = study_config(tmp_path, "interrupted", 40, ray={"workers": 2, "address": ray_session})
    driver = start_driver(tmp_path, config, delay=0.4)
    try:
        wait_for_complete(config, 2, driver=driver)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(timeout=30) == 130  # scripts can tell an interrupted run from a finished one
    finally:
        driver.kill()
    after = states(open_study("interrupted", config.storage_url))
    assert TrialState.RUNNING not in after and TrialState.FAIL not in after
    assert 2 <= after[TrialState.COMPLETE] < 40


def test_journal_storage(ray_session, tmp_path):
    config = study_config(tmp_path, "journal", 5, storage=f"journal:///{tmp_path / 'j' / 'study.log'}")
    study = run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert (tmp_path / "j" / "study.log").is_file()
    assert states(open_study("journal", config.storage_url)) == {TrialState.COMPLETE: 5}
    assert study.user_attrs["config"]["storage"].startswith("journal://")


def test_one_actor_per_logical_gpu(ray_session, tmp_path):
    config = study_config(tmp_path, "gpus", 2, ray={"workers": 2, "gpus_per_worker": 1})
    pool = WorkerPool(FakeWorker, config, 2)
    try:
        placed = ray.get([actor.describe.remote() for actor in pool.actors])
    finally:
        pool.shutdown()
    assert sorted(p["gpu_ids"][0] for p in placed) == ["0", "1"]
    assert sorted(p["cuda_visible_devices"] for p in placed) == ["0", "1"]


def test_gpus_that_are_not_there_are_one_line_before_ray_starts(tmp_path):
    config = study_config(tmp_path, "nogpu", 2, ray={"workers": 2, "gpus_per_worker": 1})
    with pytest.raises(ConfigError, match="2 worker\\(s\\) × 1 GPU need 2 GPU\\(s\\), this machine shows 0"):
        run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert not (tmp_path / "studies.db").exists()  # nothing written either


def test_a_joined_cluster_without_the_resources_stops_after_the_placement_timeout(ray_session, tmp_path):
    # The test's Ray has 2 logical GPUs; a worker asking for 3 can never be placed there.
    config = study_config(tmp_path, "toobig", 2, ray={"workers": 1, "gpus_per_worker": 3, "address": ray_session, "placement_timeout_s": 2})
    started = time.monotonic()
    with pytest.raises(MergetuneError, match="did not offer 1 worker\\(s\\) × CPU 1, GPU 3 within 2 s \\(it has CPU 2, GPU 2\\)"):
        run_study(config, console=quiet(), worker_cls=FakeWorker)
    assert time.monotonic() - started < 60


class TradeOffWorker(FakeWorker):
    """Scores whose weighted sum and weighted mean rank the same but differ in value (b = (1 - a)²)."""

    def scores(self, recipe):
        a = super().scores(recipe)["a"]
        return {"a": a, "b": (1.0 - a) ** 2}


def test_progress_bar_final_line_and_export_agree_on_the_best_trial(ray_session, tmp_path):
    from mergetune.search.cli import _finish
    from mergetune.studies.front import pick_trial

    console = Console(record=True, width=250, force_terminal=False)
    study = run_study(study_config(tmp_path, "best", 10), console=console, worker_cls=TradeOffWorker)
    _finish(study, console)
    text = console.export_text()
    progress = re.search(r"best (\d\.\d{4}) \(#(\d+)\)", text)
    final = re.search(r"best trial #(\d+): weighted mean (\d\.\d{4})", text)
    assert progress and final, text
    exported = pick_trial(study, "best")  # what `export --trial best` exports
    assert progress.group(2) == final.group(1) == str(exported.number)
    assert progress.group(1) == final.group(2) == f"{sum(exported.values) / 2:.4f}"


def ray_processes_of(pid: int) -> list[int]:
    """The descendants of `pid` (its local Ray: gcs_server, raylet, agents, workers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parent = int((proc / "stat").read_text().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize(
    "stop, code",
    [
        (signal.SIGTERM, 143),
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
        pytest.param("error", 2, marks=pytest.mark.slow),  # too many failed trials in a row
    ],
)
def test_a_stopped_driver_stops_the_ray_it_started(tmp_path, stop, code):
    budget = {"n_trials": 40, "max_consecutive_failures": 2}
    config = study_config(tmp_path, "own_ray", 40, budget=budget, ray={"workers": 1})  # no address: its own Ray
    driver = start_driver(tmp_path, config, delay=0.4, **({"fail_after": 2} if stop == "error" else {}))
    try:
        wait_for_complete(config, 2, timeout=180, driver=driver)
        ray_pids = ray_processes_of(driver.pid)
        assert len(ray_pids) >= 3  # gcs_server, raylet, the worker, ...
        if stop != "error":
            driver.send_signal(stop)
        assert driver.wait(timeout=60) == code, driver.log_path.read_text()[-3000:]
    finally:
        driver.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(alive(p) for p in ray_pids):
        time.sleep(0.5)
    assert not [p for p in ray_pids if alive(p)], "processes of the driver's Ray outlived it"
    after = states(open_study("own_ray", config.storage_url))
    assert TrialState.RUNNING not in after and 2 <= after[TrialState.COMPLETE] < 40
