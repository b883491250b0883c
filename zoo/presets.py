"""Zoo presets: model shape, data sizes and training schedules (no torch import, so the CLI checks names fast)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

from mergetune.core.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """AdamW settings of one training run; the lr warms up linearly, then follows a cosine to `final_lr_ratio`."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    final_lr_ratio: float = 1.0  # 1.0: constant after warm-up
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * cosine


@dataclass(frozen=True)
class Preset:
    """Everything that fixes a zoo besides the seed: tasks, model shape, data sizes, training schedules."""

    name: str
    tasks: tuple[str, ...]
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    split_sizes: tuple[tuple[str, int], ...]
    pretrain: Schedule
    sft: Schedule
    # Share of each expert's SFT items replayed from the base's pretraining mix, so that an
    # expert keeps (most of) the other tasks, as a fine-tune on mixed data does.
    sft_replay: float = 0.5
    # The build fails unless the zoo meets the demo acceptance (zoo/build.py `acceptance`).
    requires_acceptance: bool = False
    max_position_embeddings: int = 64


PRESETS: MappingProxyType[str, Preset] = MappingProxyType(
    {
        "tiny": Preset(
            name="tiny",
            tasks=("reverse", "sort", "dedup", "skip"),
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            split_sizes=(("train", 200), ("search", 16), ("test", 16)),
            pretrain=Schedule(steps=30, batch_size=16, lr=3e-3, warmup_steps=5, final_lr_ratio=0.1, weight_decay=0.01),
            sft=Schedule(steps=8, batch_size=16, lr=3e-4),
        ),
        "demo": Preset(
            name="demo",
            tasks=("reverse", "sort", "dedup", "skip"),
            hidden_size=128,
            intermediate_size=256,
            num_layers=4,
            num_heads=4,
            split_sizes=(("train", 5000), ("search", 600), ("test", 200)),
            pretrain=Schedule(steps=2000, batch_size=32, lr=2e-3, warmup_steps=100, final_lr_ratio=0.1, weight_decay=0.01),
            sft=Schedule(steps=600, batch_size=32, lr=5e-4),
            requires_acceptance=True,
        ),
    }
)


def get_preset(name: str) -> Preset:
    """The named preset, or a ConfigError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown zoo preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


