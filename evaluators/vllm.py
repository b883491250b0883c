"""The vLLM backend: lm-eval's vLLM model, whose engine weights every merge replaces in place.

The engine is built by lm-eval's `VLLM` class with our worker extension
(`worker_extension_cls`, evaluators/vllm_worker.py); a merge streams into it through
`VLLMWeightSink` (evaluators/vllm_push.py): bounded buckets in the engine's dtype, announced
over `collective_rpc` with plain messages, loaded by vLLM's own layerwise reload into the
existing parameter storage, then the prefix cache reset and the reset confirmed.

Supported: vLLM `SUPPORTED_VLLM` (the `vllm` extra pins the same range), one engine per
trial worker with `tensor_parallel_size: 1` and `data_parallel_size: 1` (use more trial
workers instead). Exercised here only against a fake engine (no GPU):
tests/test_evaluators_vllm.py; benchmarks/gpu_check.py checks it on a real GPU.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mergetune.core.errors import ConfigError
from mergetune.evaluators.base import ForwardGuard
from mergetune.evaluators.config import VLLM_SINGLE_ENGINE_ARGS, VLLM_WORKER_EXTENSION, vllm_engine_args_problem
from mergetune.evaluators.vllm_push import (
    DEFAULT_BUCKET_BYTES,
    EngineInfo,
    VLLMWeightSink,
    WeightPusher,
    choose_transport,
    rpc,
)

# The vLLM releases this backend is written against (read from their source: the worker-extension
# injection, msgpack-only collective_rpc, `model_loader.reload`'s layerwise reload from 0.16 on).
SUPPORTED_VLLM = ">=0.16,<0.34"
def installed_vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def check_vllm_version(installed: str | None) -> None:
    """One-line ConfigError unless `installed` is in SUPPORTED_VLLM."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    fix = f"pip install 'mergetune[vllm]' (vllm{SUPPORTED_VLLM})"
    if installed is None:
        raise ConfigError(f"evaluator.backend: vllm needs vLLM, which is not installed; {fix}")
    try:
        inside = SpecifierSet(SUPPORTED_VLLM).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        inside = False
    if not inside:
        raise ConfigError(f"evaluator.backend: vllm supports vLLM {SUPPORTED_VLLM}, but vLLM {installed} is installed; {fix}")


def vllm_model_args(path: str | Path, model_args: dict[str, Any], batch_size: int | str = "auto") -> dict[str, Any]:
    """Keyword arguments for lm-eval's `VLLM` (which passes unknown ones on to `vllm.LLM`), our worker extension added.

    Refuses settings under which a push would miss part of the engine, in one line each.
    """
    problem = vllm_engine_args_problem(model_args)
    if problem is not None:
        raise ConfigError(f"evaluator.{problem}")
    return {"pretrained": str(path), "batch_size": batch_size, **model_args, "worker_extension_cls": VLLM_WORKER_EXTENSION}


def vllm_models_problem(modelset: Any) -> str | None:
    """Why a vLLM engine started from the base model cannot take this model set's merges (one line), or None.

    The engine's shapes and ties come from the base's config.json: a merged vocabulary has other
    shapes, and a head merged on its own (a tied base, untied experts) would be skipped by vLLM's
    loaders, which drop `lm_head.` when the config ties it.
    """
    if modelset.vocabulary is not None:
        return (
            f"tokenizer: the merged vocabulary ({modelset.vocabulary.size} tokens) differs from the base's, which the vLLM "
            "engine is started from; score this study with `evaluator.backend: hf`, or give the experts the base's vocabulary"
        )
    base = modelset.base
    if base is not None and (base.path / "config.json").is_file():
        head = next((name for name in base.tied_weights() if name in base.infos), None)
        if head is not None:
            return (
                f"the base ties {head} to its embeddings but an expert stores its own, and vLLM (started from the base) would "
                "ignore the merged head; use `evaluator.backend: hf`, or save the base untied (tie_word_embeddings: false)"
            )
    return None


def vllm_weight_name(name: str, renames: list[tuple[str, str]]) -> str:
    """The name vLLM's `load_weights` expects for a checkpoint tensor `name`.

    vLLM's loaders take Hugging Face checkpoint names, so by default this is the identity;
    `renames` (regex → replacement, in order) cover checkpoints saved under another prefix,
    e.g. `("^base_model\\.model\\.", "")` for a PEFT-merged save.
    """
    for pattern, replacement in renames:
        name = re.sub(pattern, replacement, name)
    return name


class VLLMBackend:
    """A vLLM engine (inside lm-eval's `VLLM` model) whose weights each merge replaces in place."""

    def __init__(
        self,
        lm: Any,
        renames: list[tuple[str, str]] | None = None,
        device: str | torch.device = "cpu",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> None:
        """`device` is where the merge's tensors are made (a CUDA merge on the engine's GPU pushes by CUDA IPC)."""
        self.lm = lm
        self.renames = list(renames or [])
        llm = getattr(lm, "model", None)
        if llm is None or not hasattr(llm, "collective_rpc"):
            raise ConfigError(
                "evaluator: lm-eval's VLLM model holds no single engine (data_parallel_size > 1?); "
                "a push could not reach it; " + VLLM_SINGLE_ENGINE_ARGS["data_parallel_size"]
            )
        infos = [EngineInfo.from_reply(reply) for reply in rpc(llm, "mergetune_engine_info")]
        workers = infos[0].world_size if len(infos) == 1 else len(infos)
        if workers != 1:
            raise ConfigError(f"evaluator: the vLLM engine runs {workers} workers; " + VLLM_SINGLE_ENGINE_ARGS["tensor_parallel_size"])
        self.engine = infos[0]
        merge_device = torch.device(device)
        self.pusher = WeightPusher(llm, self.engine, choose_transport(self.engine, merge_device), merge_device, bucket_bytes)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        model_args: dict[str, Any],
        batch_size: int | str = "auto",
        renames: list[tuple[str, str]] | None = None,
        device: str = "cpu",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> VLLMBackend:
        """Start the engine on `path` (an HF dir or hub id) with the evaluator's model_args passed through."""
        check_vllm_version(installed_vllm_version())
        args = vllm_model_args(path, model_args, batch_size)
        from lm_eval.models.vllm_causallms import VLLM

        return cls(VLLM(**args), renames, device, bucket_bytes)

    @property
    def llm(self) -> Any:
        """The `vllm.LLM` engine."""
        return self.lm.model

    @property
    def last_push(self) -> dict[str, float]:
        """The last push's tensors, bytes, buckets, seconds and prefix-cache reset attempts."""
        return self.pusher.last_push

    def weight_sink(self) -> VLLMWeightSink:
        return VLLMWeightSink(self.pusher, partial(vllm_weight_name, renames=self.renames))

    def lm_eval_model(self, batch_size: int | str, model_args: dict[str, Any]) -> Any:
        """lm-eval's vLLM model itself; model_args were applied when the engine started."""
        return self.lm

    def close(self) -> None:
        """Free the push bucket (the engine itself stays up until lm-eval's model is dropped)."""
        self.pusher.close()

    @contextmanager
    def guarded(self, timeout_s: float | None) -> Iterator[ForwardGuard]:
        """Forward passes run inside the engine, out of reach of hooks: `run_guarded` fails a task once it
        ran over its timeout, and NaN outputs show up as non-finite scores (the worker fails those trials)."""
        yield ForwardGuard(deadline=None if timeout_s is None else time.monotonic() + timeout_s)
