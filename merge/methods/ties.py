"""TIES merging (Yadav et al.): trim each τ to its top-ρ magnitudes, elect signs, average agreeing entries."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.combine import combine, global_cuts
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.sparsify import apply_mask, magnitude_mask, rescale_mode


@register("ties", needs_base=True, min_models=1)
def ties(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool | Literal["inverse_keep"] = False,
    scope: Literal["tensor", "global"] = "tensor",
) -> Tensor:
    """Magnitude trim, sign election, mean over agreeing entries (mergekit `ties`).

    The trim keeps exactly k = max(1, ⌊ρ·n⌋) entries per tensor in mergekit's tie order
    (`sparsify.topk_mask`); `scope: global` keeps each expert's top ⌊ρ·N⌋ |τ| over all its
    tensors (the paper; the cut comes from the engine) instead.
    """
    rho = per_model(density, x.num_models)
    mode = rescale_mode("ties", rescale)
    cuts = global_cuts(x, "ties", scope, "magnitude", rho)
    trimmed = [apply_mask(tau, magnitude_mask(tau, r, c), mode, r) for tau, r, c in zip(x.deltas, rho, cuts)]
    return combine(x.base, trimmed, x.weights, consensus=True, normalize=normalize, lambda_=lambda_)
