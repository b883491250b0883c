"""The evaluator interface: backends that own a live model, objectives, typed failures and `build_evaluator`.

A backend holds the model the merge writes into (`weight_sink()`); an evaluator scores
whatever weights the backend holds right now (`evaluate(backend, split)`), on the same
seeded subset of each task every call, without writing any file; `summarise(backend, split)`
gives each score with its standard error and item count (evaluators/stderr.py).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch
from mergetune.core.errors import ConfigError
from mergetune.evaluators.config import EvaluatorConfig, Limit, LmEvalConfig, validate_evaluator_config
from mergetune.evaluators.generation import NonFiniteLogits
from mergetune.merge.sinks import LiveModelSink, Sink
from mergetune.merge.vocabulary import Vocabulary

Split = Literal["search", "test"]
Part = Literal["all", "head", "rest"]
SPLITS: tuple[Split, ...] = ("search", "test")
T = TypeVar("T")
# {"score": mean, "se": its standard error (None where the evaluator cannot tell), "items": n}
ScoreSummary = dict[str, Any]


class EvaluationFailed(Exception):
    """Scoring this model failed (NaN/inf logits, a task raised, a timeout); the trial is marked failed."""


@dataclass(frozen=True)
class Objective:
    """One reported score: its name in `evaluate`'s result and whether larger is better."""

    name: str
    direction: Literal["maximize", "minimize"] = "maximize"


class Evaluator(Protocol):
    objectives: list[Objective]

    def evaluate(self, backend: Any, split: Split = "search") -> dict[str, float]: ...

    def summarise(self, backend: Any, split: Split = "search") -> dict[str, ScoreSummary]: ...


class StagedEvaluator(Evaluator, Protocol):
    """An evaluator that can score the head of each task's subset, then the rest, for two-stage pruning;
    the per-item scores of both parts, concatenated, are exactly those of `part="all"`."""

    def score_items(
        self, backend: Any, split: Split = "search", part: Part = "all", first_share: float = 1.0
    ) -> dict[str, list[float]]: ...


def subset_indices(size: int, limit: Limit, seed: int, key: str) -> list[int]:
    """The fixed item subset of a task: `limit` items (a count, or a fraction < 1 of `size`),
    drawn with a RNG seeded by (seed, key), sorted; every item when `limit` is None."""
    if limit is None:
        return list(range(size))
    count = math.ceil(size * limit) if isinstance(limit, float) and limit < 1.0 else int(limit)
    count = min(max(count, 1), size)
    return sorted(random.Random(f"{seed}:{key}").sample(range(size), count))


@dataclass(frozen=True)
class ForwardGuard:
    """Forward hooks of one scoring run: stop past the deadline, raise on NaN/inf logits."""

    deadline: float | None = None

    def before(self, module: torch.nn.Module, args: Any) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise EvaluationFailed("timed out (timeout_s)")

    def after(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        logits = getattr(output, "logits", None)
        if logits is not None and not torch.isfinite(logits).all():
            raise NonFiniteLogits("the model produced NaN or inf logits")


class HFBackend:
    """A transformers causal LM on cpu/cuda, scored where it lives; merges write into its parameters."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._lm_eval_models: dict[str, Any] = {}

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", dtype: str | torch.dtype = "auto", vocabulary: Vocabulary | None = None
    ) -> HFBackend:
        """Load an HF model dir (or hub id, through transformers' cache) and its tokenizer onto `device`; with a
        merged `vocabulary`, its embeddings take the output's size (the merge fills them) and its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        if vocabulary is not None:
            model.resize_token_embeddings(vocabulary.size, mean_resizing=False)
        model = model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(vocabulary.template_dir if vocabulary is not None else path))
        # Batched greedy generation pads on the left; many causal LMs ship without a pad token.
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def weight_sink(self) -> Sink:
        return LiveModelSink(self.model)

    def lm_eval_model(self, batch_size: int | str, model_args: dict[str, Any]) -> Any:
        """lm-eval's HFLM over the live model (built once per argument set; it reads the weights at call time)."""
        from lm_eval.models.huggingface import HFLM

        key = repr((batch_size, sorted(model_args.items())))
        if key not in self._lm_eval_models:
            self._lm_eval_models[key] = HFLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch_size, **model_args)
        return self._lm_eval_models[key]

    @contextmanager
    def guarded(self, timeout_s: float | None) -> Iterator[ForwardGuard]:
        """Hooks on the model's forward for the duration: timeout and NaN/inf check on every call."""
        guard = ForwardGuard(deadline=None if timeout_s is None else time.monotonic() + timeout_s)
        handles = [self.model.register_forward_pre_hook(guard.before), self.model.register_forward_hook(guard.after)]
        try:
            yield guard
        finally:
            for handle in handles:
                handle.remove()


def run_guarded(name: str, backend: Any, timeout_s: float | None, score: Callable[[], T]) -> T:
    """`score()` under the backend's guard; any failure becomes `EvaluationFailed` naming the task."""
    started = time.monotonic()
    try:
        with backend.guarded(timeout_s):
            result = score()
    except (NonFiniteLogits, EvaluationFailed) as exc:
        raise EvaluationFailed(f"task {name}: {exc}") from exc
    except Exception as exc:  # a task that breaks must fail the trial, not the worker
        raise EvaluationFailed(f"task {name}: {type(exc).__name__}: {exc}") from exc
    # Backends that cannot interrupt a running task (vLLM) still fail it once it ran over.
    if timeout_s is not None and time.monotonic() - started > timeout_s:
        raise EvaluationFailed(f"task {name}: timed out (timeout_s={timeout_s})")
    return result


def read_zoo(zoo: Path, source: str) -> dict[str, Any]:
    """A zoo's `zoo.json` (issue 2's layout), or a ConfigError saying how to build one."""
    import json

    manifest = Path(zoo) / "zoo.json"
    if not manifest.is_file():
        raise ConfigError(f"{source}: zoo: {zoo} has no zoo.json; build one with `mergetune zoo build`")
    return json.loads(manifest.read_text())


def build_evaluator(config: EvaluatorConfig | dict[str, Any], source: str = "evaluator") -> Evaluator:
    """The evaluator a study config describes (`kind: quick` or `kind: lm_eval`), its data loaded once."""
    from mergetune.evaluators.lmeval import LmEvalEvaluator
    from mergetune.evaluators.quick import QuickEvaluator

    validated = validate_evaluator_config(config, source)
    if isinstance(validated, LmEvalConfig):
        return LmEvalEvaluator(validated, source)
    return QuickEvaluator(validated, source)


def load_backend(
    evaluator_config: EvaluatorConfig | dict[str, Any], path: str | Path, device: str = "cpu", vocabulary: Vocabulary | None = None
) -> Any:
    """The backend an evaluator config asks for: `backend: vllm` (lm_eval only) → VLLMBackend, else HFBackend
    (with the merge's output `vocabulary` when the models' vocabularies were aligned)."""
    config = validate_evaluator_config(evaluator_config)
    if isinstance(config, LmEvalConfig) and config.backend == "vllm":
        from mergetune.evaluators.vllm import VLLMBackend

        if vocabulary is not None:
            raise ConfigError("tokenizer: a merged vocabulary cannot be pushed into a vLLM engine started from the base; use backend: hf")
        return VLLMBackend.from_pretrained(
            path, config.model_args, config.batch_size, config.weight_renames, device, config.push_bucket_mib * 2**20
        )
    return HFBackend.from_pretrained(path, device, vocabulary=vocabulary)
