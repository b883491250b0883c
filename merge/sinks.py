"""Where merged tensors go: a loaded model's parameters (in place) or files on disk."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class Sink(Protocol):
    """Receives each merged tensor once, by its name in the checkpoint; `close` ends the merge."""

    def write(self, name: str, tensor: Tensor) -> None: ...

    def close(self) -> None: ...


class LiveModelSink:
    """Copies merged tensors into an already-loaded model's parameters and buffers, in place.

    No reallocation: the model's storage (and anything holding a view of it) stays valid,
    so an evaluator can score the model right after the merge.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._targets: dict[str, Tensor] = dict(model.state_dict(keep_vars=True))
        self._written: set[str] = set()

    def write(self, name: str, tensor: Tensor) -> None:
        target = self._targets.get(name)
        if target is None:
            raise KeyError(f"the live model has no tensor {name!r}")
        with torch.no_grad():
            target.copy_(tensor)
        self._written.add(name)

    @property
    def written(self) -> frozenset[str]:
        return frozenset(self._written)

    def close(self) -> None:
        self._written.clear()
