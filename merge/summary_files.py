"""Order statistics on disk: computed once per node (or shared filesystem), mapped by every worker.

A node's workers merge the same experts, so the per-tensor order statistics of one
(expert, kind) are written once, as one safetensors file per tensor in a directory named by
a key of everything they depend on — the base's and expert's weight files (path, size,
mtime), the moments file for saliency, the kind, torch's version (its sort decides the tie
order) and this format's version — and every worker maps them: the OS page cache holds one
copy per node, shared like the mapped inputs (`placement`), and a restarted worker or a new
study on the same models finds them ready.

Workers starting together divide the work: each takes the (expert, kind) directories whose
lock it gets (`fcntl.flock`), builds them into a temp directory renamed into place when whole,
then waits for the others' directories. The cache lives in `$MERGETUNE_CACHE_DIR/order-stats`
(default `~/.cache/mergetune/order-stats`; put it on a local disk). Delete it to reclaim space.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from mergetune.merge.safetensors_io import MappedFile, read_header

FORMAT_VERSION = 1
CACHE_ENV = "MERGETUNE_CACHE_DIR"


def cache_root() -> Path:
    base = os.environ.get(CACHE_ENV)
    return (Path(base) if base else Path.home() / ".cache" / "mergetune") / "order-stats"


def file_identity(path: Path) -> list[object]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def summary_key(kind: str, sources: Iterable[Path]) -> str:
    """The directory name of one (expert, kind)'s statistics: a digest of what they are computed from."""
    facts = [FORMAT_VERSION, torch.__version__, kind, *(file_identity(p) for p in sorted(set(sources)))]
    digest = hashlib.blake2b(json.dumps(facts).encode(), digest_size=12).hexdigest()
    return f"{kind}-{digest}"


def _file_name(tensor: str) -> str:
    return hashlib.blake2b(tensor.encode(), digest_size=10).hexdigest() + ".safetensors"


class SummaryDirectory:
    """One (expert, kind)'s statistics: tensor name → a dict of tensors (mapped from disk once written)."""

    def __init__(self, root: Path, key: str) -> None:
        self.path = root / key
        self._lock_path = root / f"{key}.lock"
        self._maps: list[MappedFile] = []

    @property
    def exists(self) -> bool:
        return self.path.is_dir()

    @contextlib.contextmanager
    def locked(self, wait: bool) -> Iterator[bool]:
        """Hold this directory's build lock (blocking when `wait`); yields whether it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def build(self, tensors: list[str], compute: Callable[[str], dict[str, Tensor]], threads: int) -> None:
        """Compute every tensor's arrays (in `threads` threads) into a temp directory, then rename it into place."""
        from concurrent.futures import ThreadPoolExecutor

        tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        try:

            def write(name: str) -> None:
                arrays = {field: t.contiguous() for field, t in compute(name).items()}
                save_file(arrays, tmp / _file_name(name), metadata={"tensor": name})

            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                list(pool.map(write, tensors))
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load(self, tensors: list[str]) -> dict[str, dict[str, Tensor]]:
        """Every tensor's arrays, as views of the mapped files."""
        out = {}
        for name in tensors:
            path = self.path / _file_name(name)
            infos, _ = read_header(path)
            mapped = MappedFile(path)
            self._maps.append(mapped)
            out[name] = {field: mapped.tensor(info) for field, info in infos.items()}
        return out

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir()) if self.exists else 0
