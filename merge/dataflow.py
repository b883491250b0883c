"""A data-flow path (Sakana's DFS): the sequence of decoder layers a token passes through, with a scale per hop.

    dataflow:
      slots:                           # T' kept slots, in order (skipped slots are not listed)
        - {source: base, layer: 0, scale: 1.0}
        - {source: math, layer: 1, scale: 0.8}
        - {source: merged, layer: 1}   # `merged`: the parameter-space merge of the same recipe (PS+DFS)

Slot t computes h_{t+1} = layer(s_t · h_t): the scale multiplies the whole hidden state entering the
slot's layer (residual included), as Sakana's W. Embeddings, final norm and head are the live
model's: the base's for a recipe without rules (space `dataflow`), else the merge's. Torch-free.

`folded_divisors` gives the exact rewrite of a scaled path into a plain model: with C_t = s_0·…·s_t,
y_t = h_t / C_{t-1} follows y_{t+1} = y_t + Δ'_t(y_t), where Δ'_t is layer t with its residual-branch
outputs (o_proj, down_proj and their biases) divided by C_t; RMSNorm is scale-invariant up to its eps.
"""

from __future__ import annotations

import math
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field, field_validator

MERGED = "merged"  # the source name of the parameter-space merge


class DataflowSlot(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    source: str = Field(description="base, an expert, or `merged` (the parameter-space merge)")
    layer: int = Field(ge=0, description="decoder layer index in the source model")
    scale: float = Field(default=1.0, gt=0, description="multiplies the hidden state entering the layer")


class DataflowPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slots: list[DataflowSlot] = Field(min_length=1, description="the layers a token passes through, in order")

    @field_validator("slots")
    @classmethod
    def _finite_product(cls, slots: list[DataflowSlot]) -> list[DataflowSlot]:
        if not math.isfinite(math.prod(slot.scale for slot in slots)):
            raise ValueError("the product of the slot scales overflows; give scales nearer 1")
        return slots

    @classmethod
    def identity(cls, source: str, num_layers: int) -> DataflowPath:
        """Every layer of one model in order, scale 1: that model itself."""
        return cls(slots=[DataflowSlot(source=source, layer=i) for i in range(num_layers)])

    @property
    def sources(self) -> set[str]:
        return {slot.source for slot in self.slots}

    @property
    def unscaled(self) -> bool:
        return all(slot.scale == 1.0 for slot in self.slots)

    def folded_divisors(self) -> list[float]:
        """C_t = s_0·…·s_t per slot: what slot t's o_proj and down_proj are divided by in the folded model."""
        return [math.prod(slot.scale for slot in self.slots[: t + 1]) for t in range(len(self.slots))]

    def runs(self) -> list[tuple[str, int, int]]:
        """Consecutive slots of one source and consecutive layers as (source, first layer, stop): mergekit's
        passthrough slices."""
        out: list[tuple[str, int, int]] = []
        for slot in self.slots:
            if out and out[-1][0] == slot.source and out[-1][2] == slot.layer:
                out[-1] = (slot.source, out[-1][1], slot.layer + 1)
            else:
                out.append((slot.source, slot.layer, slot.layer + 1))
        return out

    def summary(self) -> str:
        """`dfs: 6 slots, 4 from base, 2 from math, scales 0.80–1.20`: the path in one line."""
        counts = Counter(slot.source for slot in self.slots)
        parts = ", ".join(f"{n} from {source}" for source, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        scales = [slot.scale for slot in self.slots]
        scaled = "" if self.unscaled else f", scales {min(scales):.2f}–{max(scales):.2f}"
        return f"dfs: {len(self.slots)} slots, {parts}{scaled}"
