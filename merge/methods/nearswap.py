"""NearSwap (mergekit `nearswap`): take the expert's value where it is close to the base's, keep the base elsewhere.

Per entry, with a = θ₀ and b = θ₁ (one expert): w = clamp(t / max(|a − b|, 1e-6), 0, 1) and
θ = w·b + (1 − w)·a — entries within t of the base swap fully to the expert, larger
differences move by t only. t is in weight units (mergekit requires it; our default 1e-4 is
the method's reference model's).
"""

from __future__ import annotations

from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


@register("nearswap", needs_base=True, min_models=1, max_models=1)
def nearswap(x: TensorInputs, *, t: float = 1e-4) -> Tensor:
    """Move each entry from the base toward the expert by at most t."""
    (b,) = x.models
    weight = (t / (x.base - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * x.base
