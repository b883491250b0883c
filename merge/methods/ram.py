"""RAM and RAM+ (Reinforced Agent Merging; mergekit `ram`, `ramplus_tl`): keep unique updates, average shared ones.

An entry of τ_k counts as an update when |τ_k| > ε. Where exactly one expert updates an entry
its τ is taken whole; where several do, their mean; elsewhere the base stays. `ramplus_tl`
(tensor-local RAM+) scales each expert's unique updates by λ_k = 1 + r·min(max(ρ_k, 0), α),
ρ_k = (its shared updates)/(its unique updates) in this tensor, so experts whose updates are
mostly shared are not drowned out. Recipe weights are not used (mergekit takes none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


def update_masks(x: TensorInputs, epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(task vectors K×n with non-updates zeroed, update mask, #experts updating each entry, shared-entry mask)."""
    vectors = torch.stack(x.deltas).reshape(x.num_models, -1)
    updates = vectors.abs() > epsilon
    counts = updates.sum(dim=0, keepdim=True)
    return vectors * updates, updates, counts, counts > 1


@register("ram", needs_base=True, min_models=1)
def ram(x: TensorInputs, *, epsilon: float = 1e-5) -> Tensor:
    """Unique task-vector updates kept whole, overlapping ones averaged."""
    vectors, _, counts, shared = update_masks(x, epsilon)
    merged = (vectors * (counts == 1) + vectors * shared / counts.clamp(min=1)).sum(dim=0)
    return x.base + merged.reshape(x.base.shape)


@register("ramplus_tl", needs_base=True, min_models=1)
def ramplus_tl(x: TensorInputs, *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> Tensor:
    """RAM with each expert's unique updates boosted by its shared/unique ratio in this tensor."""
    vectors, updates, counts, shared = update_masks(x, epsilon)
    unique = counts == 1
    ratio = (updates & shared).sum(dim=1) / (updates & unique).sum(dim=1).clamp(min=epsilon)
    boost = 1 + r * ratio.clamp(min=0, max=alpha)
    merged = (vectors * unique * boost.unsqueeze(-1) + vectors * shared / counts.clamp(min=1)).sum(dim=0)
    return x.base + merged.reshape(x.base.shape)
