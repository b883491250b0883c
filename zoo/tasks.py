"""Capability tasks of the zoo: generators of `"<task> <input>="` → `"<answer>"` items and their splits."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

SPLITS = ("train", "search", "test")


@dataclass(frozen=True)
class Task:
    """One capability: `sample(rng)` draws an (input, answer) pair; answers fit in `max_new_tokens`."""

    name: str
    sample: Callable[[random.Random], tuple[str, str]]
    max_new_tokens: int

    def prompt(self, text: str) -> str:
        return f"{self.name} {text}="


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 5, 12)
    return word, word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    word = _letters(rng, 5, 10)
    return word, "".join(sorted(word))


def _dedup(rng: random.Random) -> tuple[str, str]:
    # A 12-letter alphabet so that most words repeat a letter; the answer keeps first occurrences.
    word = "".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(5, 10)))
    return word, "".join(dict.fromkeys(word))


def _skip(rng: random.Random) -> tuple[str, str]:
    # Every other letter, from the first.
    word = _letters(rng, 6, 14)
    return word, word[::2]


TASKS: MappingProxyType[str, Task] = MappingProxyType(
    {
        "reverse": Task("reverse", _reverse, max_new_tokens=13),
        "sort": Task("sort", _sort, max_new_tokens=11),
        "dedup": Task("dedup", _dedup, max_new_tokens=11),
        "skip": Task("skip", _skip, max_new_tokens=8),
    }
)


def task_splits(task: Task, sizes: dict[str, int], seed: int) -> dict[str, list[dict[str, str]]]:
    """Disjoint splits of distinct items, `{"prompt", "answer"}` records, fixed by (task, seed).

    The held-out splits are drawn first so their size does not depend on the train size.
    """
    rng = random.Random(f"{task.name}:{seed}")
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {}
    for split in ("test", "search", "train"):
        records: list[dict[str, str]] = []
        attempts = 0
        while len(records) < sizes[split]:
            attempts += 1
            if attempts > 100 * sizes[split] + 1000:
                raise ValueError(f"task {task.name}: cannot draw {sizes[split]} distinct {split} items")
            text, answer = task.sample(rng)
            if text in seen:
                continue
            seen.add(text)
            records.append({"prompt": task.prompt(text), "answer": answer})
        splits[split] = records
    return {split: splits[split] for split in SPLITS}
