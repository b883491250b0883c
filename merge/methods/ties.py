"""TIES merging (Yadav et al.): trim each τ to its top-ρ magnitudes, elect signs, average agreeing entries."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.gta import gta
from mergetune.merge.methods.registry import PerModel, TensorInputs, register


@register("ties", needs_base=True, min_models=1, sliceable=True, totals=True, orders=("magnitude.desc",))
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
    return gta(
        x, "ties", sparsify="magnitude", consensus=True,
        density=density, lambda_=lambda_, normalize=normalize, rescale=rescale, scope=scope,
    )  # fmt: skip
