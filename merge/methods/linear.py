"""Linear averaging (model soups): θ = Σ w_k θ_k, divided by Σ w_k when normalising."""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


@register("linear", needs_base=False, min_models=1, sliceable=True)
def linear(x: TensorInputs, *, normalize: bool = True) -> Tensor:
    """Weighted average of the models' tensors (mergekit `linear`)."""
    total = sum(x.weights)
    # mergekit has no zero-sum guard (NaN); we leave the weighted sum unscaled instead.
    scale = 1 / total if normalize and abs(total) > 1e-8 else 1.0
    if x.deltas_given is not None:
        # Σ w_k(θ₀ + τ_k)·s = θ₀·Σw·s + Σ w_k τ_k·s, without materialising the models.
        out = x.base * (total * scale)
        for w, d in zip(x.weights, x.deltas_given):
            out.add_(d, alpha=w * scale)
        return out
    # From the models (as stored, when sliced): mergekit's float32 order (fused multiply-adds, then one division).
    divisor = float(torch.tensor(x.weights, dtype=torch.float32).sum()) if scale != 1.0 else None
    models = x.stored.models if x.stored is not None else x.models
    return x.kernels.linear_slice(models, [float(w) for w in x.weights], divisor, x.out)
