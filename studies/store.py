"""Open an existing study by name and storage URL (default SQLite under studies/), with errors that help."""

from __future__ import annotations

from pathlib import Path

import optuna

from mergetune.core.errors import MergetuneError
from mergetune.search.config import default_storage
from mergetune.search.driver import open_storage


def open_study(name: str, storage: str | None = None) -> optuna.Study:
    """Load a study for reading; a missing one is a MergetuneError naming the studies that exist."""
    url = storage or default_storage(name)
    # optuna would silently create an empty SQLite file for a mistyped path.
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise MergetuneError(f"no study storage at {url}; pass --storage with the URL the study was run with")
    backend = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=backend, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage=backend)]
        known = ", ".join(names) or "(none)"
        raise MergetuneError(f"no study named {name!r} in {url}; studies there: {known}") from None
