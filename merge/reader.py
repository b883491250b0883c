"""Lazy tensor reads over a ModelSet's files for the disk-to-disk engine: one tensor at a time, float32 on a device."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from mergetune.merge.modelset import Checkpoint, ModelSet, rebuild_stat
from mergetune.merge.safetensors_io import read_tensor
from mergetune.merge.thresholds import tensor_scores


def read_stored(ckpt: Checkpoint, name: str) -> Tensor:
    """One stored tensor of a checkpoint, in its own dtype, on the CPU (a fresh tensor the caller owns)."""
    path = ckpt.files[name]
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_tensor(fd, path, name, ckpt.infos[name])
    finally:
        os.close(fd)


class ModelSetReader:
    """Reads weights and statistics with positional reads at the offsets the (validated) headers give.

    Every tensor is a fresh one: read pages do not pile up in the process's RSS, as they would
    through a memory map, and no tensor aliases another.
    """

    def __init__(self, modelset: ModelSet, device: str, stack: contextlib.ExitStack) -> None:
        self.modelset = modelset
        self.device = torch.device(device)
        self._stack = stack
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
            self._stack.callback(os.close, self._fds[path])
        return self._fds[path]

    def raw(self, ckpt: Checkpoint, name: str) -> Tensor:
        """The stored tensor, in its own dtype, on the CPU (a fresh tensor the caller owns)."""
        path = ckpt.files[name]
        return read_tensor(self._fd(path), path, name, ckpt.infos[name])

    def tensor(self, ckpt: Checkpoint, name: str) -> Tensor:
        return self.raw(ckpt, name).to(self.device, torch.float32)

    def stored(self, ckpt: Checkpoint, name: str) -> Tensor:
        """The stored tensor, in its own dtype, on the merge's device."""
        return self.raw(ckpt, name).to(self.device)

    def stat(self, kind: str, expert: str, name: str) -> Tensor | None:
        stats = self.modelset.stats[kind].get(expert)
        key = stats.key(name) if stats is not None else None
        if key is None:
            return None
        stored = [read_tensor(self._fd(stats.path), stats.path, k, stats.infos[k]) for k in stats.stored_keys(key)]
        return rebuild_stat(stored).to(self.device)

    def scores(self, kind: str, expert: str) -> Iterator[tuple[str, Tensor]]:
        """(name, score) per tensor for an expert's global cut: |τ| or v·τ² (tensors without v are skipped)."""
        ms = self.modelset
        for name in ms.tensor_names:
            v = self.stat("moments", expert, name) if kind == "saliency" else None
            if kind == "saliency" and v is None:
                continue
            delta = self.tensor(ms.experts[expert], name)
            if ms.base is not None:
                delta.sub_(self.tensor(ms.base, name))
            yield name, tensor_scores(kind, delta, v)


@contextlib.contextmanager
def open_reader(modelset: ModelSet, device: str = "cpu") -> Iterator[ModelSetReader]:
    with contextlib.ExitStack() as stack:
        yield ModelSetReader(modelset, device, stack)
