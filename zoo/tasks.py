"""Capability tasks of the zoo: `"<task> <word>="` → `"<answer>"` items, their splits, and the base's pretraining mix.

The base is weak at every task by construction: it is pretrained on each task's short words
only, so it knows the format and every rule, but length generalisation fails and it scores
about the share of short words in a split. An expert's fine-tune on its task's words of
every length is what teaches the rule on long words.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

SPLITS = ("train", "search", "test")
SHORTEST_WORD = 2


@dataclass(frozen=True)
class Task:
    """One capability on words of `lengths` letters from `alphabet`; `solve(word)` is the answer.

    The base is pretrained on words of at most `pretrain_max_letters` letters only, so it
    knows the format and the rule on short words but not on the longer words of the splits.
    """

    name: str
    solve: Callable[[str], str]
    lengths: tuple[int, int]
    pretrain_max_letters: int
    max_new_tokens: int
    alphabet: str = string.ascii_lowercase

    def prompt(self, word: str) -> str:
        return f"{self.name} {word}="

    def draw(self, rng: random.Random, lengths: tuple[int, int] | None = None) -> str:
        low, high = lengths or self.lengths
        return "".join(rng.choice(self.alphabet) for _ in range(rng.randint(low, high)))

    def record(self, word: str) -> dict[str, str]:
        return {"prompt": self.prompt(word), "answer": self.solve(word)}


def _dedup(word: str) -> str:
    return "".join(dict.fromkeys(word))


TASKS: MappingProxyType[str, Task] = MappingProxyType(
    {
        "reverse": Task("reverse", lambda w: w[::-1], lengths=(5, 12), pretrain_max_letters=6, max_new_tokens=13),
        "sort": Task("sort", lambda w: "".join(sorted(w)), lengths=(5, 10), pretrain_max_letters=7, max_new_tokens=11),
        # A 12-letter alphabet so that most words repeat a letter; the answer keeps first occurrences.
        "dedup": Task(
            "dedup", _dedup, lengths=(5, 10), pretrain_max_letters=7, max_new_tokens=11,
            alphabet=string.ascii_lowercase[:12],
        ),
        # Every other letter, from the first.
        "skip": Task("skip", lambda w: w[::2], lengths=(6, 14), pretrain_max_letters=7, max_new_tokens=8),
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
            word = task.draw(rng)
            if word in seen:
                continue
            seen.add(word)
            records.append(task.record(word))
        splits[split] = records
    return {split: splits[split] for split in SPLITS}


def pretraining_records(task: Task, count: int, seed: int, held_out: set[str]) -> list[dict[str, str]]:
    """`count` items of `task` on short words (≤ `pretrain_max_letters`), none of whose prompts is in `held_out`.

    Short words repeat (there are only so many); a corpus does too.
    """
    rng = random.Random(f"pretrain:{task.name}:{seed}")
    records: list[dict[str, str]] = []
    while len(records) < count:
        word = task.draw(rng, (SHORTEST_WORD, task.pretrain_max_letters))
        if task.prompt(word) not in held_out:
            records.append(task.record(word))
    return records
