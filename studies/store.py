"""The one study opener: every command that reads a study, and the driver that runs one, opens it here.

`open_study` never writes (a missing storage or study is a one-line error naming what exists);
`create_or_open_study` is the driver's: it makes the storage and the study when missing and says
whether this call created it (the creator sets the study up; see search/bookkeeping.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergetune.core.errors import MergetuneError
from mergetune.studies.storage import (
    StorageError,
    StorageMissing,
    check_creatable,
    check_study_name,
    default_storage,
    open_storage,
    reason,
    redacted,
    storage_errors,
    storage_path,
)


class StudyMissing(MergetuneError):
    """The storage holds no study of that name."""

if TYPE_CHECKING:
    import optuna


def open_study(
    name: str,
    storage: str | None = None,
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Load an existing study (default storage sqlite:///studies/NAME.db); never creates a file, table or study."""
    url = storage or default_storage(name)
    return _load(name, url, open_storage(url, create=False), sampler, pruner)


def find_study(name: str, storage: str | None) -> optuna.Study | None:
    """The study if it exists, else None after checking a storage could be created there; writes nothing.

    The driver calls it before Ray starts, so a storage it cannot use fails in a second."""
    import optuna

    check_study_name(name)
    url = storage or default_storage(name)
    try:
        backend = open_storage(url, create=False)
    except StorageMissing:
        path = storage_path(url)
        if path is not None:
            check_creatable(path)
        return None
    try:
        return _load(name, url, backend, None, None)
    except StudyMissing:
        return None


def create_or_open_study(
    name: str,
    storage: str | None,
    directions: list[str],
    *,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> tuple[optuna.Study, bool]:
    """The study `name`, created (with its storage) when missing; True when this call created it.

    Creation is atomic in every storage (study names are unique), so of several drivers starting
    at once exactly one is the creator."""
    import optuna
    from optuna.study import StudyDirection

    check_study_name(name)
    url = storage or default_storage(name)
    backend = open_storage(url, create=True)
    try:
        backend.create_new_study([StudyDirection[d.upper()] for d in directions], name)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    except storage_errors() as exc:
        raise StorageError(f"storage {redacted(url)}: {reason(exc)}") from None
    return _load(name, url, backend, sampler, pruner), created


def _load(name, url, backend, sampler, pruner) -> optuna.Study:
    import optuna

    check_study_name(name)
    try:
        return optuna.load_study(
            study_name=name, storage=backend, sampler=sampler or optuna.samplers.RandomSampler(), pruner=pruner
        )
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage=backend)]
        known = ", ".join(names) or "(none)"
        raise StudyMissing(f"no study named {name!r} in {redacted(url)}; studies there: {known}") from None
    except storage_errors() as exc:
        raise StorageError(f"storage {redacted(url)}: {reason(exc)}") from None
