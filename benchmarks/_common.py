"""Helpers shared by the search benchmarks: study config variants, trial rates, the git commit."""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from optuna.trial import TrialState
from rich.console import Console

from mergetune.search.config import StudyConfig, parse_study_config


def variant(base: StudyConfig, storage_dir: Path, name: str, **changes) -> StudyConfig:
    """`base` renamed to `name`, stored in its own SQLite file under `storage_dir`, with `changes`
    (a dict updates that section, anything else replaces it)."""
    data = base.model_dump(mode="json")
    data["study"] = name
    data["storage"] = f"sqlite:///{storage_dir / name}.db"
    for section, values in changes.items():
        if isinstance(values, dict):
            data[section].update(values)
        else:
            data[section] = values
    return parse_study_config(data, name)


def trials_per_hour(study, states=(TrialState.COMPLETE,)) -> float:
    """Steady-state rate: trials in `states` ÷ (last completion − first start), worker start-up excluded."""
    done = study.get_trials(deepcopy=False, states=states)
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    return 3600.0 * len(done) / span


def mean(scores: dict[str, float]) -> float:
    return statistics.fmean(scores.values())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def wide_console() -> Console:
    """A console at least 140 columns wide: the tables stay whole when the output goes to a log file."""
    return Console(width=max(Console().width, 140))
