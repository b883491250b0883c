"""Task arithmetic (Ilharco et al.): θ = θ₀ + λ·Σ w_k τ_k, divided by Σ w_k when normalising."""

from __future__ import annotations

from torch import Tensor

from mergetune.merge.methods.combine import combine_weights
from mergetune.merge.methods.registry import TensorInputs, register


@register("task_arithmetic", needs_base=True, min_models=1, sliceable=True)
def task_arithmetic(x: TensorInputs, *, lambda_: float = 1.0, normalize: bool = False) -> Tensor:
    """Scaled weighted sum of task vectors added to the base (mergekit `task_arithmetic`)."""
    stored = x.stored is not None
    base, given = (x.stored.base, x.stored.models) if stored else (x.base, x.deltas)
    weights, total = combine_weights(x.weights, False, normalize)
    return x.kernels.combined_slice(base, given, stored, weights, False, normalize, total, lambda_, x.out)
