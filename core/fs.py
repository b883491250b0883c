"""Atomic output directories: build into a temp dir beside the target, rename at the end."""

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
        # A DiskFullError from an atomic dir nested in this one names our temp dir; name `out` instead.
        if isinstance(exc, DiskFullError) or exc.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing {out}; nothing was written, free space and retry") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
