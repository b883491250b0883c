"""Model Stock (Jang et al.): move from the base toward the experts' mean by their task vectors' agreement.

c = mean pairwise cos(τ_i, τ_j) (norm product clamped ≥ 1e-6, cos clamped to [−1, 1]),
t = N·c / (1 + (N−1)·c), θ = t·mean_k θ_k + (1−t)·θ₀ — mergekit 0.1.5, including its guard:
where 1 + (N−1)·c ≈ 0 (|·| < 1e-6) the base is kept. `filter_wise` computes c per row.
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


@register("model_stock", needs_base=True, min_models=2)
def model_stock(x: TensorInputs, *, filter_wise: bool = False) -> Tensor:
    """Interpolate base ↔ expert mean with the ratio implied by the task vectors' angles."""
    def rows(v: Tensor) -> Tensor:
        if not filter_wise:
            return v.reshape(-1)
        return v.unsqueeze(0) if v.dim() == 1 else v

    deltas = [rows(d) for d in x.deltas]
    cosines = []
    for a, b in combinations(deltas, 2):
        norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-6)
        cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(deltas)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, 0.0, n * cos / torch.where(singular, 1.0, denominator))
    mean = sum(rows(m) for m in x.models) / n
    return (ratio * mean + (1 - ratio) * rows(x.base)).reshape(x.base.shape)
