"""Combining (sparsified) task vectors: weights, TIES sign election, normalisation, λ.

The shared tail of the task-arithmetic family (mergekit's generalized task arithmetic):
d_k = w_k τ̂_k; with consensus, the elected sign is s = sign(Σ_k d_k) (0 → +1) and only the d_k
of sign s count; θ = θ₀ + λ·Σ d_k / divisor, the divisor being Σ w_k over the counted entries
when normalising (a zero divisor counts as 1, so weights summing to 0 never give NaN). The
float32 operations follow mergekit's order (weight, sum over experts in order, divide, scale,
add the base), so both round alike and bf16 outputs agree to the last bit almost always; the
elementwise work is `kernels.combined`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.kernels import EAGER, Kernels


def combine_weights(weights: list[float], consensus: bool, normalize: bool) -> tuple[list[float], float | None]:
    """(each weight as float32 rounds it, the float32 Σw an unelected normalised sum is divided by — None for
    none: a zero sum counts as 1, so weights summing to 0 never give NaN)."""
    weights32 = torch.tensor(weights, dtype=torch.float32)
    total = None
    if normalize and not consensus:
        total = float(weights32.sum())
        if abs(total) < 1e-8:
            total = None
    return [float(w) for w in weights32], total


def combine(
    base: Tensor,
    deltas: list[Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    kernels: Kernels = EAGER,
) -> Tensor:
    """θ₀ + λ·(weighted, optionally sign-elected and normalised) sum of the task vectors."""
    weights32, total = combine_weights(weights, consensus, normalize)
    return kernels.combined(base, deltas, weights32, consensus, normalize, total, lambda_)
