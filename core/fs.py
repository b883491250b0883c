"""Atomic outputs: build into a temp dir (or file) beside the target, rename at the end; a full disk is one error."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mergetune.core.errors import DiskFullError, OutputExistsError


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty directory unless force; call before any expensive work."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir on the same filesystem; on success it replaces `out` in one rename.

    On any error (including a full disk) the temp dir is removed and `out` is untouched.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Move the old tree aside first so the new one appears in a single rename.
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except (OSError, DiskFullError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # A DiskFullError from an atomic output nested in this one names our temp dir; name `out` instead.
        full = _disk_full(out, exc)
        if full is not None:
            raise full from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _disk_full(out: Path, exc: BaseException) -> DiskFullError | None:
    if isinstance(exc, DiskFullError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return DiskFullError(f"disk full while writing {out}; nothing was written, free space and retry")
    return None


@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp file path beside `out`; on success it replaces `out` in one rename.

    An existing `out` needs `force`. On any error the temp file is removed and `out` is untouched;
    a full disk (also as safetensors reports it) becomes a DiskFullError.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise OutputExistsError(f"{out} is a directory; choose a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with safetensors_disk_errors():
            yield tmp
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = _disk_full(out, exc)
        if full is not None:
            raise full from exc
        raise


@contextlib.contextmanager
def safetensors_disk_errors() -> Iterator[None]:
    """safetensors reports a full disk as SafetensorError; re-raise it as the OSError the atomic outputs handle."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        if "os error 28" in str(exc):
            raise OSError(errno.ENOSPC, str(exc)) from exc
        raise
