"""TIES merging (Yadav et al.): trim each τ to its top-ρ magnitudes, elect signs, average agreeing entries."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.combine import combine, global_thresholds, rescaler
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.sparsify import apply_mask, magnitude_mask


@register("ties", needs_base=True, min_models=1)
def ties(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool = False,
    rescale_mode: Literal["inverse_keep", "l1"] = "inverse_keep",
    scope: Literal["tensor", "global"] = "tensor",
) -> Tensor:
    """Magnitude trim, sign election, mean over agreeing entries (mergekit `ties`).

    `scope: global` keeps each expert's top-ρ |τ| over all its tensors (the paper; threshold
    from the engine) instead of per tensor (mergekit).
    """
    rho = per_model(density, x.num_models)
    mode = rescaler("ties", rescale, rescale_mode)
    thresholds = global_thresholds(x, "ties", scope, "magnitude", rho)
    trimmed = [apply_mask(tau, magnitude_mask(tau, r, t), mode, r) for tau, r, t in zip(x.deltas, rho, thresholds)]
    return combine(x.base, trimmed, x.weights, consensus=True, normalize=normalize, lambda_=lambda_)
