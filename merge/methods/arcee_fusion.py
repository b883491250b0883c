"""Arcee Fusion (mergekit `arcee_fusion`): graft only the expert's most important changes onto the base.

Importance of each entry: |θ₁ − θ₀| times the KL divergence Σ p·log(p/q) between the softmaxes
(over the last axis, +1e-8) of the expert's and the base's rows. An entry is grafted when its
importance reaches median + 1.5·(q₃ − q₁) of the tensor's importances, the quantile q taken as
the sorted value at index ⌊q·(n−1)⌋. One expert. Departure: mergekit estimates the quantiles
from 1M entries drawn at random for larger tensors; ours are exact (deterministic, no seed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register

SOFTMAX_EPS = 1e-8
QUANTILES = (0.25, 0.5, 0.75)


def importance(expert: Tensor, base: Tensor) -> Tensor:
    p = F.softmax(expert, dim=-1) + SOFTMAX_EPS
    q = F.softmax(base, dim=-1) + SOFTMAX_EPS
    return (expert - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(scores: Tensor) -> Tensor:
    ordered = torch.sort(scores.reshape(-1)).values
    index = (torch.tensor(QUANTILES) * (ordered.numel() - 1)).long().to(ordered.device)
    q1, median, q3 = ordered[index]
    return median + 1.5 * (q3 - q1)


@register("arcee_fusion", needs_base=True, min_models=1, max_models=1)
def arcee_fusion(x: TensorInputs) -> Tensor:
    """The base plus the expert's task vector where its KL-weighted importance is an outlier."""
    (expert,) = x.models
    scores = importance(expert, x.base)
    return x.base + x.deltas[0] * (scores >= fusion_threshold(scores))
