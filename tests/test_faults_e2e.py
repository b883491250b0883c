"""Fault injection on the real worker path (merge + score on a tiny zoo built here).

A worker killed with SIGKILL in the middle of a merge, damaged safetensors among the experts,
and a disk that fills up while a trial is exported. test_faults.py covers the storage side
with stand-in workers; these use the real `TrialWorker`.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from rich.console import Console

from test_faults import assert_consistent

from mergetune.cli.main import main
from mergetune.search.config import parse_study_config
from mergetune.search.driver import run_study
from mergetune.studies.store import open_study
from mergetune.search.workers import TrialWorker

import ray  # a runtime dependency: a missing Ray must fail, not skip
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers can't import tests/
optuna.logging.set_verbosity(optuna.logging.WARNING)

BUDGET = 6
CLI = [sys.executable, "-m", "mergetune.cli.main"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    from mergetune.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, "tiny", seed=0, console=Console(quiet=True))
    return out


def zoo_config(zoo: Path, root: Path, name: str, **extra) -> dict:
    return {
        "study": name,
        "zoo": str(zoo),
        "evaluator": {"kind": "quick", "zoo": str(zoo), "limit": 6},
        "search": {"layer_groups": 2, "methods": ["linear", "task_arithmetic", "ties"]},
        "sampler": {"m3_prior": {"n_startup": 4}},
        "budget": {"n_trials": BUDGET},
        "storage": f"sqlite:///{root / 'studies.db'}",
        "ray": {"workers": 2, "cpus_per_worker": 1},
        **extra,
    }


class KillingSink:
    """Passes tensors on to the live model; the third write SIGKILLs this process unless `marker` exists."""

    def __init__(self, sink, marker: str) -> None:
        self.sink, self.marker, self.writes = sink, marker, 0

    def write(self, name, tensor) -> None:
        self.writes += 1
        if self.writes == 3:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass  # some worker already died once
            else:
                os.kill(os.getpid(), signal.SIGKILL)  # mid-merge: the live model is half overwritten
        self.sink.write(name, tensor)

    def __getattr__(self, name):
        return getattr(self.sink, name)


class KillMidMerge:
    """The worker's resident model set, with every merge's sink wrapped in a KillingSink."""

    def __init__(self, resident, marker: str) -> None:
        self.resident, self.marker = resident, marker

    def merge_into(self, recipe, sink, **kwargs):
        return self.resident.merge_into(recipe, KillingSink(sink, self.marker), **kwargs)

    def __getattr__(self, name):
        return getattr(self.resident, name)


@pytest.fixture(scope="module")
def killed_study(zoo, ray_session, tmp_path_factory):
    """A study whose first merge SIGKILLs its worker; returns (study, storage URL, marker file)."""
    root = tmp_path_factory.mktemp("killed")
    marker = str(root / "died")

    class DyingTrialWorker(TrialWorker):
        def __init__(self, config_json):
            super().__init__(config_json)
            self.resident = KillMidMerge(self.resident, marker)

    config = parse_study_config(zoo_config(zoo, root, "killed"), "test")
    study = run_study(config, console=Console(quiet=True), worker_cls=DyingTrialWorker)
    return study, config.storage_url, Path(marker)


@pytest.mark.slow  # ~30 s zoo build, ~20 s study
def test_worker_kill_9_mid_merge_fails_its_trial_retries_it_once_and_the_study_completes(killed_study):
    study, url, marker = killed_study
    assert marker.exists()
    study = open_study(study.study_name, url)  # what the storage holds, not the driver's copy
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"].startswith("worker died")
    retries = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == failed[0].number]
    assert len(retries) == 1 and retries[0].params == failed[0].params and retries[0].state == TrialState.COMPLETE
    assert len(study.get_trials()) == BUDGET + 1
    assert_consistent(study, BUDGET)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.user_attrs["timings"]["merge_s"] > 0 for t in complete)  # the real merge ran


def _damaged_copy(expert: Path, dest: Path, damage: str) -> Path:
    dest.mkdir(parents=True)
    for src in expert.iterdir():
        (dest / src.name).write_bytes(src.read_bytes())
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + data[24:])
    return weights


@pytest.mark.slow  # the zoo build; the test itself ~10 s (a CLI subprocess)
@pytest.mark.parametrize(("damage", "message"), [("truncated", "truncated: tensor"), ("corrupt", "not a valid safetensors file")])
def test_damaged_expert_stops_run_before_any_trial_with_one_line(zoo, tmp_path, damage, message):
    experts = sorted(p for p in (zoo / "experts").iterdir() if p.is_dir())
    broken = _damaged_copy(experts[1], tmp_path / "broken" / experts[1].name, damage)
    data = zoo_config(zoo, tmp_path, "damaged")
    data["models"] = {
        "base": str(zoo / "base"),
        "experts": {experts[0].name: str(experts[0]), experts[1].name: str(broken.parent)},
    }
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))

    result = subprocess.run([*CLI, "run", str(config)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(broken) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    try:
        study = open_study("damaged", data["storage"])
    except Exception:  # noqa: BLE001 (no study at all is the expected outcome too)
        return
    assert study.get_trials() == []


def _fill_disk_after(calls: int, monkeypatch, target: str) -> None:
    """`target` (`os.pwrite` or `shutil.copyfile`) works `calls` times, then fails with ENOSPC."""
    import shutil

    module, name = (os, "pwrite") if target == "os.pwrite" else (shutil, "copyfile")
    real = getattr(module, name)
    done = [0]

    def full(*args, **kwargs):
        done[0] += 1
        if done[0] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, full)


@pytest.mark.slow  # needs the killed study
@pytest.mark.parametrize("target", ["os.pwrite", "shutil.copyfile"])
def test_disk_full_during_export_is_one_line_and_leaves_nothing(killed_study, tmp_path, monkeypatch, capsys, target):
    study, url, _ = killed_study
    parent = tmp_path / "exports"
    parent.mkdir()
    out = parent / "best"
    _fill_disk_after(3, monkeypatch, target)
    with pytest.raises(SystemExit) as done:
        main(["export", "--study", study.study_name, "--storage", url, "--out", str(out), "--format", "all"])
    monkeypatch.undo()
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2
    assert len(err.splitlines()) == 1 and "disk full" in err and str(out) in err, err
    assert "Traceback" not in err and ".tmp-" not in err
    assert list(parent.iterdir()) == []  # no partial output, no temp dirs beside it

    # with space again, the same export works
    with pytest.raises(SystemExit) as done:
        main(["export", "--study", study.study_name, "--storage", url, "--out", str(out), "--format", "all"])
    assert done.value.code == 0
    assert (out / "model.safetensors").is_file() and (out / "recipe.yaml").is_file()
    assert sorted(p.name for p in parent.iterdir()) == ["best"]
