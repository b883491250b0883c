"""Mixup Model Merge (M³; Zhou et al.): mixing weights drawn at random, once per merge.

w ~ Beta(α, α) for two experts (w, 1−w), Dirichlet(α, …, α) for K (ALGORITHMS.md Part A);
α ≤ 0 puts all weight on the first expert (the reference's λ_m = 1). The merge is
θ = θ₀ + λ·Σ w_k τ_k — with λ = 1 the same as the mixup average Σ w_k θ_k, which is what a
recipe without a base gets. The draw comes from the merge's seed (not the tensor's), so every
tensor of one merge uses the same weights and the same seed gives the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge.methods.registry import TensorInputs, register, tensor_generator


def mixing_weights(alpha: float, num_models: int, seed: int) -> list[float]:
    """One Dirichlet(α,…,α) draw (Beta(α,α) for two), reproducible from `seed`."""
    if alpha <= 0 or num_models == 1:
        return [1.0] + [0.0] * (num_models - 1)
    draw_seed = int(torch.randint(0, 2**62, (1,), generator=tensor_generator(seed, "m3")).item())
    return np.random.default_rng(draw_seed).dirichlet([alpha] * num_models).tolist()


@register("m3", needs_base=False, min_models=1, random=True)
def m3(x: TensorInputs, *, alpha: float = 0.5, lambda_: float = 1.0) -> Tensor:
    """Task arithmetic (or averaging, without a base) with Beta/Dirichlet-drawn mixing weights."""
    if x.seed is None:
        raise ValueError(f"{x.name}: m3 draws one set of weights per merge; the engine must pass TensorInputs.seed")
    weights = mixing_weights(alpha, x.num_models, x.seed)
    if x.base is None:
        if lambda_ != 1:
            raise ConfigError("method 'm3': lambda needs a base model (set `base:` in the recipe)")
        return sum(w * m for w, m in zip(weights, x.models))
    return x.base + lambda_ * sum(w * d for w, d in zip(weights, x.deltas))
