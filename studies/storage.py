"""Study storages: URLs and study names, opening a storage, outages told apart from permanent errors,
and retries of idempotent storage calls.

A storage is opened in one of two modes. `create=True` (`mergetune run`) makes a missing SQLite
file or journal and Optuna's tables; `create=False` (every other command) never writes: a missing
file or a database without Optuna's tables is a one-line error. Any error while opening is final
(nothing is running yet, so there is nothing to wait for): no database, authentication, an
unwritable path, an unknown dialect, a wrong port. Mid-run, `StorageRetry` retries connection
losses with backoff and lets permanent errors through at once. It must only wrap idempotent calls
(reads, upserts of attrs, `tell(skip_if_finished=True)`); creating a trial is made idempotent in
search/bookkeeping.py, which looks up what a committed-but-unanswered attempt created.

SQLite transactions start with BEGIN IMMEDIATE, so one process's read-check-write (Optuna's
claim of a WAITING trial, a trial's number) cannot interleave with another's: several drivers on
one SQLite file see each other's claims.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergetune.core.errors import ConfigError, MergetuneError

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# No path separators and no leading dot: the default storage file stays inside studies/.
STUDY_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
SQLITE_BUSY_TIMEOUT_S = 30


class StorageError(MergetuneError):
    """The study storage cannot be used (missing, unreachable at start, refused, unwritable)."""


class StorageMissing(StorageError):
    """There is no study storage at the URL (no file, or a database without Optuna's tables)."""


class StorageUnavailable(StorageError):
    """The study storage stopped answering mid-run and did not come back within the retry window."""


def check_study_name(name: str) -> str:
    if not re.match(STUDY_NAME_PATTERN, name):
        raise ConfigError(
            f"study name {name!r}: use letters, digits, '_', '.' and '-' (not first), no '/' — it names the file studies/NAME.db"
        )
    return name


def default_storage(study: str) -> str:
    return f"sqlite:///studies/{check_study_name(study)}.db"


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    if url.startswith("journal://"):
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has its own error; never echo a password
        return url.split("@")[-1] if "@" in url else url


def storage_path(url: str) -> Path | None:
    """The file behind a journal or SQLite URL; None for a database server."""
    if url.startswith("journal://"):
        return Path(url.removeprefix("journal://"))
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_storage(url: str, *, create: bool) -> optuna.storages.BaseStorage:
    """The storage behind `url` (`journal:///path` or an SQLAlchemy URL); see the module docstring for
    `create`. Without `create`, a storage that is not there raises StorageMissing."""
    try:
        if url.startswith("journal://"):
            return _open_journal(url, create)
        return _open_rdb(url, create)
    except MergetuneError:
        raise
    except Exception as exc:
        raise StorageError(f"storage {redacted(url)}: {reason(exc)}") from None


def _open_journal(url: str, create: bool) -> optuna.storages.BaseStorage:
    import optuna
    from optuna.storages.journal import JournalFileBackend

    path = Path(url.removeprefix("journal://"))
    if not create and not path.is_file():
        raise StorageMissing(f"no study storage at {url}; pass --storage with the URL the study was run with")
    if create:
        check_creatable(path)
        path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _open_rdb(url: str, create: bool) -> optuna.storages.BaseStorage:
    import optuna
    import sqlalchemy
    import sqlalchemy.exc

    try:
        path = storage_path(url)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"storage: {redacted(url)} is not a storage URL (sqlite:///PATH, postgresql+psycopg://..., journal:///PATH)") from None
    engine_kwargs: dict[str, object]
    if path is not None:
        if not create and not path.is_file():
            raise StorageMissing(f"no study storage at {url}; pass --storage with the URL the study was run with")
        if create:
            check_creatable(path)
            path.parent.mkdir(parents=True, exist_ok=True)
        # pysqlite's own BEGIN is turned off; `_begin_immediate` below emits BEGIN IMMEDIATE instead.
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S, "isolation_level": None}}
    else:
        # A database server may restart under a long study: test pooled connections before use.
        engine_kwargs = {"pool_pre_ping": True}
    try:
        if not create:
            # Optuna's RDBStorage would create its tables in an empty database: look first.
            probe = sqlalchemy.create_engine(url, **engine_kwargs)
            try:
                has_tables = sqlalchemy.inspect(probe).has_table("studies")
            finally:
                probe.dispose()
            if not has_tables:
                raise StorageMissing(f"no study storage at {redacted(url)} (no Optuna tables there); pass --storage with the URL the study was run with")
        storage = _rdb_storage(url, engine_kwargs, create)
    except sqlalchemy.exc.NoSuchModuleError:
        dialect = url.split("://")[0]
        raise ConfigError(f"storage: unknown database dialect {dialect!r} in {redacted(url)}; use sqlite:///PATH, postgresql+psycopg://... or journal:///PATH") from None
    except ImportError as exc:  # a missing database driver (Optuna wraps it; a bare engine does not)
        missing = getattr(exc.__cause__, "name", None) or getattr(exc, "name", None) or "its database driver"
        extra = " (pip install 'mergetune[postgres]')" if url.startswith("postgresql") else ""
        raise ConfigError(f"storage: {url.split('://')[0]} URLs need the Python package {missing}{extra}") from None
    if path is not None:
        sqlalchemy.event.listen(storage.engine, "begin", _begin_immediate)
    return storage


# Optuna's table creation and schema stamp are not safe against a second process doing the same
# at the same instant ("table ... already exists", a UNIQUE failure on alembic_version); once the
# other process has finished, opening again succeeds.
_CONCURRENT_CREATION = re.compile(r"already exists|UNIQUE constraint failed: alembic_version|duplicate key|database is locked", re.IGNORECASE)


def _rdb_storage(url: str, engine_kwargs: dict, create: bool) -> optuna.storages.RDBStorage:
    import optuna
    import sqlalchemy.exc

    for attempt in range(9):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create)
        except sqlalchemy.exc.DBAPIError as exc:
            if not create or not _CONCURRENT_CREATION.search(str(exc.orig)):
                raise
            time.sleep(0.2 + 0.1 * attempt)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=not create)


def check_creatable(path: Path) -> None:
    """A storage file can be made at `path` (its nearest existing folder is a writable directory)."""
    if path.exists():
        if path.is_dir():
            raise StorageError(f"storage: {path} is a directory, not a storage file")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise StorageError(f"storage: cannot create {path}: {parent} is not a writable directory")


def _begin_immediate(connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# --- telling outages from permanent errors ---
def storage_errors() -> tuple[type[BaseException], ...]:
    import optuna
    import sqlalchemy.exc

    # Optuna turns SQLAlchemy errors inside its sessions into StorageInternalError; the engine's
    # own connect errors come through as SQLAlchemy errors; journal files raise OSError.
    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError)


def reason(exc: BaseException) -> str:
    """The root cause of a storage error as one short line."""
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, OSError) and root.strerror:
        text = f"{root.strerror}" + (f": {root.filename}" if root.filename else "")
    else:
        text = str(getattr(root, "orig", None) or root)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else type(root).__name__
    return text.removeprefix("connection failed: ")


# Mid-run errors that no retry fixes: the database, role or file went away, or access was revoked.
_PERMANENT = re.compile(
    r"does not exist|authentication failed|no pg_hba\.conf entry|permission denied|unable to open database file"
    r"|readonly database|no such table|not a database",
    re.IGNORECASE,
)
_PERMANENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOENT, errno.ENOTDIR, errno.EISDIR}


def is_permanent(exc: BaseException) -> bool:
    root = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, OSError) and root.errno in _PERMANENT_ERRNOS:
        return True
    return bool(_PERMANENT.search(str(getattr(root, "orig", None) or root)))


@dataclass
class StorageRetry:
    """Calls an idempotent storage operation, retrying connection losses with exponential backoff.

    A permanent error raises StorageError at once; an outage longer than `window_s` raises
    StorageUnavailable. `outages` counts calls that needed a retry (the driver's liveness check
    uses it to know it may have missed other drivers' heartbeats)."""

    window_s: float
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0
    outages: int = 0

    def __call__(self, operation, *args, **kwargs):
        errors = storage_errors()
        delay, deadline = self.first_delay_s, None
        while True:
            try:
                return operation(*args, **kwargs)
            except errors as exc:
                if is_permanent(exc):
                    raise StorageError(f"the study storage refused a call: {reason(exc)}") from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.window_s
                    self.outages += 1
                if now >= deadline:
                    raise StorageUnavailable(
                        f"the study storage has not answered for {self.window_s:.0f} s ({reason(exc)}); "
                        "finished trials are saved — run `mergetune resume` once it is back"
                    ) from None
                log.warning("storage unreachable (%s); retrying in %.1f s", reason(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay_s)
