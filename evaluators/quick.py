"""The quick evaluator: local JSONL tasks scored by batched greedy exact match and/or answer log-likelihood.

No lm-eval in the loop: the fixed subsets are read once at construction, and a call is
a few batched forward passes per task — for fast searches and tests. Scores are means of
per-item scores, so a subset can also be scored in two parts (head, then rest) whose
per-item scores combine into exactly the one-call result (two-stage pruning, search/pruning.py).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mergetune.core.errors import ConfigError
from mergetune.evaluators.base import (
    SPLITS,
    HFBackend,
    Objective,
    Part,
    ScoreSummary,
    Split,
    read_zoo,
    run_guarded,
    subset_indices,
)
from mergetune.evaluators.config import QuickConfig, QuickTaskConfig
from mergetune.evaluators.generation import answer_logprobs, exact_matches, greedy_generate
from mergetune.evaluators.stderr import item_summary

log = logging.getLogger(__name__)

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
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: {path} is not UTF-8 text; save it as UTF-8") from None
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
        return mean_scores(self.score_items(backend, split))

    def summarise(self, backend: HFBackend, split: Split = "search") -> dict[str, ScoreSummary]:
        """`evaluate`'s scores with their standard errors (evaluators/stderr.py) and item counts."""
        return item_summary(self.score_items(backend, split))

    def head_size(self, items: int, first_share: float) -> int:
        """Items of a subset scored in the head: ceil(share · items) rounded up to whole batches, so the head
        and the rest run exactly the batches a one-call evaluation runs (bit-identical per-item scores)."""
        batch = self.config.batch_size
        return min(items, math.ceil(math.ceil(first_share * items) / batch) * batch)

    def score_items(
        self, backend: HFBackend, split: Split = "search", part: Part = "all", first_share: float = 1.0
    ) -> dict[str, list[float]]:
        """Per objective, per-item scores of the backend's current weights on `part` of each task's `split` subset:
        all of it, its head (`head_size(first_share)` items) or the rest after the head."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        scores: dict[str, list[float]] = {}
        for task in self.tasks:
            size = len(task.prompts[split])
            head = self.head_size(size, first_share)
            items = {"all": slice(0, size), "head": slice(0, head), "rest": slice(head, size)}[part]
            scores.update(run_guarded(task.name, backend, self.config.timeout_s, partial(self._score, backend, task, split, items)))
        return scores

    def _score(self, backend: HFBackend, task: QuickTask, split: Split, items: slice) -> dict[str, list[float]]:
        prompts, answers = task.prompts[split][items], task.answers[split][items]
        batch = self.config.batch_size
        scores = {}
        for metric in self.config.metrics:
            if metric == "exact_match":
                predictions = greedy_generate(backend.model, backend.tokenizer, prompts, task.max_new_tokens, batch)
                scores[task.name] = exact_matches(predictions, answers)
            else:
                scores[f"{task.name}.logprob"] = answer_logprobs(backend.model, backend.tokenizer, prompts, answers, batch)
        return scores


def mean_scores(items: dict[str, list[float]]) -> dict[str, float]:
    """Per objective, the mean of its per-item scores (0.0 for none)."""
    return {name: sum(values) / max(len(values), 1) for name, values in items.items()}
