"""Linear averaging (model soups): θ = Σ w_k θ_k, divided by Σ w_k when normalising."""

from __future__ import annotations

from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


@register("linear", needs_base=False, min_models=1)
def linear(x: TensorInputs, *, normalize: bool = True) -> Tensor:
    """Weighted average of the models' tensors (mergekit `linear`)."""
    out = sum(w * m for w, m in zip(x.weights, x.models))
    total = sum(x.weights)
    # mergekit has no zero-sum guard (NaN); we leave the weighted sum unscaled instead.
    if normalize and abs(total) > 1e-8:
        out = out / total
    return out
