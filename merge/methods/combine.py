"""Combining (sparsified) task vectors: weights, TIES sign election, normalisation, λ.

The shared tail of the task-arithmetic family (mergekit's generalized task arithmetic):
d_k = w_k τ̂_k; with consensus, the elected sign is s = sign(Σ_k d_k) (0 → +1) and only the d_k
of sign s count; θ = θ₀ + λ·Σ d_k / divisor, the divisor being Σ w_k over the counted entries
when normalising (a zero divisor counts as 1, so weights summing to 0 never give NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor



def combine(
    base: Tensor, deltas: list[Tensor], weights: list[float], *, consensus: bool, normalize: bool, lambda_: float
) -> Tensor:
    """θ₀ + λ·(weighted, optionally sign-elected and normalised) sum of the task vectors.

    The float32 operations follow mergekit's order (weight, sum over experts in order, divide,
    scale, add the base), so both round alike and bf16 outputs agree to the last bit almost always.
    """
    w = torch.tensor(weights, dtype=torch.float32)
    if not consensus:
        mixed = deltas[0] * w[0]
        for d, wk in zip(deltas[1:], w[1:]):
            mixed.add_(d * wk)
        divisor = w.sum()
        if normalize and divisor.abs() >= 1e-8:  # a zero sum counts as 1: weights summing to 0 never give NaN
            mixed.div_(divisor)
    else:
        weighted = [d * wk for d, wk in zip(deltas, w)]
        mixed = weighted[0].clone()
        for d in weighted[1:]:
            mixed.add_(d)
        positive = mixed >= 0  # the elected sign; 0 elects +
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for wk, d in zip(w, weighted):
            agree = torch.where(positive, d > 0, d < 0)  # zeros never agree
            mixed.add_(d * agree)
            divisor.add_(agree * wk)
        if normalize:
            mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)
