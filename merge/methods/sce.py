"""SCE (Wan et al., FuseChat; mergekit `sce`): select high-variance entries, weight experts by energy, erase sign conflicts.

With τ_k the task vectors: (select) when `select_topk` < 1, keep only the k = ⌊ρ·m⌋ entries with
the largest variance across experts (m = entries of nonzero variance; chosen with `torch.topk`
on the CPU, as mergekit); (calculate) each expert's weight is its mean τ² over the tensor,
normalised to sum 1 (uniform when they sum to < 1e-6); (erase) entries whose sign disagrees
with sign(Σ_k τ_k) (0 elects +) drop out. θ = θ₀ + Σ_k c_k m_k τ_k / max(Σ_k c_k m_k, 1e-6).
Recipe weights are not used (mergekit takes none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


def variance_mask(vectors: Tensor, density: float) -> Tensor:
    """Entries among the ⌊ρ·(#nonzero variance)⌋ of largest variance across experts (torch.topk's choice)."""
    if density >= 1:
        return torch.ones_like(vectors[0], dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(vectors[0], dtype=torch.bool)
    variance = torch.var(vectors, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * density)
    mask = torch.zeros(variance.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(variance.abs().reshape(-1).cpu(), k=k, largest=True).indices] = True
    return mask.reshape(variance.shape).to(vectors.device)


@register("sce", needs_base=True, min_models=1)
def sce(x: TensorInputs, *, select_topk: float = 1.0) -> Tensor:
    """Variance-selected, energy-weighted, sign-consistent mean of the task vectors."""
    vectors = torch.stack(x.deltas)
    if select_topk < 1:
        vectors = vectors * variance_mask(vectors, select_topk)
    positive = vectors.sum(dim=0) >= 0
    agree = torch.where(positive, vectors > 0, vectors < 0)
    energy = vectors.square().reshape(vectors.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    coefficients = torch.full_like(energy, 1 / energy.numel()) if abs(total) < 1e-6 else energy / total
    coefficients = coefficients.reshape(-1, *([1] * (vectors.dim() - 1))) * agree
    merged = (vectors * coefficients).sum(dim=0) / coefficients.sum(dim=0).clamp(min=1e-6)
    return x.base + merged
