"""The quick evaluator: local JSONL tasks scored by batched greedy exact match and/or answer log-likelihood.

No lm-eval in the loop: the fixed subsets are read once at construction, and a call is
a few batched forward passes per task — for fast searches and tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mergetune.core.errors import ConfigError
from mergetune.evaluators.base import (
    SPLITS,
    HFBackend,
    LimitedConfig,
    Objective,
    Split,
    StrictConfig,
    read_zoo,
    run_guarded,
    subset_indices,
)
from mergetune.evaluators.generation import answer_logprob, exact_match, greedy_generate

log = logging.getLogger(__name__)

Metric = Literal["exact_match", "logprob"]


class QuickTaskConfig(StrictConfig):
    search: Path = Field(description="JSONL of {prompt, answer} records scored during the search")
    test: Path = Field(description="JSONL of held-out {prompt, answer} records")
    max_new_tokens: int = Field(ge=1)


class QuickConfig(LimitedConfig):
    kind: Literal["quick"]
    zoo: Path | None = Field(default=None, description="a zoo directory: all its tasks and splits")
    tasks: dict[str, QuickTaskConfig] | None = Field(default=None, description="tasks spelled out (instead of zoo)")
    metrics: list[Metric] = Field(default=["exact_match"], min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> QuickConfig:
        if (self.zoo is None) == (self.tasks is None):
            raise ValueError("give either `zoo:` or `tasks:`")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metrics: each metric once")
        return self


@dataclass(frozen=True)
class QuickTask:
    """One task's fixed subsets: prompts and answers per split."""

    name: str
    max_new_tokens: int
    prompts: dict[str, list[str]]
    answers: dict[str, list[str]]


def read_records(path: Path, source: str) -> list[dict[str, str]]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read {path} ({exc.strerror})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{source}: {path}:{number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not isinstance(record.get("answer"), str):
            raise ConfigError(f"{source}: {path}:{number} needs string fields `prompt` and `answer`")
        records.append(record)
    if not records:
        raise ConfigError(f"{source}: {path} has no records")
    return records


def zoo_task_configs(zoo: Path, source: str) -> dict[str, QuickTaskConfig]:
    """The tasks of a zoo (its zoo.json), with absolute split paths."""
    manifest = read_zoo(zoo, source)
    return {
        name: QuickTaskConfig(
            search=Path(zoo) / task["splits"]["search"],
            test=Path(zoo) / task["splits"]["test"],
            max_new_tokens=task["max_new_tokens"],
        )
        for name, task in manifest["tasks"].items()
    }


class QuickEvaluator:
    """Scores `<task>` (exact match) and/or `<task>.logprob` (mean answer log-likelihood per token), maximized."""

    def __init__(self, config: QuickConfig, source: str = "evaluator") -> None:
        self.config = config
        specs = zoo_task_configs(config.zoo, source) if config.zoo is not None else config.tasks
        assert specs is not None
        self.tasks: list[QuickTask] = []
        for name, spec in specs.items():
            prompts, answers = {}, {}
            for split in SPLITS:
                records = read_records(getattr(spec, split), source)
                chosen = subset_indices(len(records), config.limit, config.seed, f"{name}:{split}")
                prompts[split] = [records[i]["prompt"] for i in chosen]
                answers[split] = [records[i]["answer"] for i in chosen]
            self.tasks.append(QuickTask(name, spec.max_new_tokens, prompts, answers))
        self.objectives = [
            Objective(task.name if metric == "exact_match" else f"{task.name}.logprob", "maximize")
            for task in self.tasks
            for metric in config.metrics
        ]

    def evaluate(self, backend: HFBackend, split: Split = "search") -> dict[str, float]:
        """Scores of the backend's current weights on each task's fixed `split` subset."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        scores: dict[str, float] = {}
        for task in self.tasks:
            scores.update(run_guarded(task.name, backend, self.config.timeout_s, lambda: self._score(backend, task, split)))
        return scores

    def _score(self, backend: HFBackend, task: QuickTask, split: Split) -> dict[str, float]:
        prompts, answers = task.prompts[split], task.answers[split]
        batch = self.config.batch_size
        scores = {}
        for metric in self.config.metrics:
            if metric == "exact_match":
                predictions = greedy_generate(backend.model, backend.tokenizer, prompts, task.max_new_tokens, batch)
                scores[task.name] = exact_match(predictions, answers)
            else:
                scores[f"{task.name}.logprob"] = answer_logprob(backend.model, backend.tokenizer, prompts, answers, batch)
        return scores
