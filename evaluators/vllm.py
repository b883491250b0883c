"""The vLLM backend: lm-eval's vLLM model, whose engine weights a merge replaces in place through vLLM's own loader.

Kept thin on purpose (vLLM's internals move every release): the engine is built by
lm-eval's `VLLM` class, and new weights go in through the public `LLM.apply_model`,
which runs the model's own `load_weights` (checkpoint names in, vLLM's sharding and
fused projections handled by vLLM) inside every worker; then the prefix cache is reset
so no KV block computed with the old weights is reused. Exercised here only against a
fake engine (no GPU): see tests/test_evaluators_vllm.py.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from mergetune.evaluators.base import ForwardGuard

def vllm_model_args(path: str | Path, model_args: dict[str, Any], batch_size: int | str = "auto") -> dict[str, Any]:
    """Keyword arguments for lm-eval's `VLLM` (which passes unknown ones on to `vllm.LLM`)."""
    return {"pretrained": str(path), "batch_size": batch_size, **model_args}


def vllm_weight_name(name: str, renames: list[tuple[str, str]]) -> str:
    """The name vLLM's `load_weights` expects for a checkpoint tensor `name`.

    vLLM's loaders take Hugging Face checkpoint names, so by default this is the identity;
    `renames` (regex → replacement, in order) cover checkpoints saved under another prefix,
    e.g. `("^base_model\\.model\\.", "")` for a PEFT-merged save.
    """
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


def load_weights_into_model(weights: list[tuple[str, Tensor]], model: Any) -> int:
    """Runs inside each vLLM worker (through `apply_model`): the model's own loader copies the tensors in."""
    loaded = model.load_weights(weights=iter(weights))
    return len(loaded) if loaded is not None else len(weights)


def push_weights(llm: Any, weights: list[tuple[str, Tensor]]) -> list[int]:
    """Replace the engine's weights in place, then drop KV blocks cached under the old weights."""
    loaded = llm.apply_model(functools.partial(load_weights_into_model, weights))
    llm.reset_prefix_cache()
    return loaded


class VLLMWeightSink:
    """Collects a merge's tensors (by reference; the merge hands over fresh tensors) and pushes them at `close`."""

    def __init__(self, llm: Any, renames: list[tuple[str, str]]) -> None:
        self._llm = llm
        self._renames = renames
        self._weights: list[tuple[str, Tensor]] = []

    def write(self, name: str, tensor: Tensor) -> None:
        self._weights.append((vllm_weight_name(name, self._renames), tensor))

    def close(self) -> None:
        weights, self._weights = self._weights, []
        if weights:
            push_weights(self._llm, weights)


class VLLMBackend:
    """A vLLM engine (inside lm-eval's `VLLM` model) whose weights each merge replaces in place."""

    def __init__(self, lm: Any, renames: list[tuple[str, str]] | None = None) -> None:
        self.lm = lm
        self.renames = list(renames or [])

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        model_args: dict[str, Any],
        batch_size: int | str = "auto",
        renames: list[tuple[str, str]] | None = None,
    ) -> VLLMBackend:
        """Start the engine on `path` (an HF dir or hub id) with the evaluator's model_args passed through."""
        from lm_eval.models.vllm_causallms import VLLM

        return cls(VLLM(**vllm_model_args(path, model_args, batch_size)), renames)

    @property
    def llm(self) -> Any:
        """The `vllm.LLM` engine."""
        return self.lm.model

    def weight_sink(self) -> VLLMWeightSink:
        return VLLMWeightSink(self.llm, self.renames)

    def lm_eval_model(self, batch_size: int | str, model_args: dict[str, Any]) -> Any:
        """lm-eval's vLLM model itself; model_args were applied when the engine started."""
        return self.lm

    @contextmanager
    def guarded(self, timeout_s: float | None) -> Iterator[ForwardGuard]:
        """Forward passes run inside the engine, out of reach of hooks: `run_guarded` fails a task once it
        ran over its timeout, and NaN outputs show up as non-finite scores (the worker fails those trials)."""
        yield ForwardGuard(deadline=None if timeout_s is None else time.monotonic() + timeout_s)
