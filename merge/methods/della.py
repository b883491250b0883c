"""DELLA (Deep et al.): MagPrune — drop entries with a keep probability rising with their |τ| rank per row.

`della` combines with TIES sign election and normalises; `della_linear` sums (mergekit's
defaults). `rescale: true` (the default) restores each τ's L1 norm, as mergekit 0.1.5 does;
`rescale: inverse_keep` divides each survivor by its own keep probability π_i (the paper,
and mergekit before 0.1). The ranks are computed once per tensor (ties in index order) and
the draws are counter-based, so the masks are the same on every device.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.gta import gta
from mergetune.merge.methods.registry import PerModel, TensorInputs, register


@register("della", needs_base=True, min_models=1, random=True, sliceable=True, totals=True, orders=("row_ranks",))
def della(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    lambda_: float = 1.0,
    normalize: bool = True,
    rescale: bool | Literal["inverse_keep"] = True,
) -> Tensor:
    """MagPrune drop + rescale, TIES sign election, normalised (mergekit `della`)."""
    return gta(
        x, "della", sparsify="magprune", consensus=True,
        density=density, epsilon=epsilon, lambda_=lambda_, normalize=normalize, rescale=rescale,
    )  # fmt: skip


@register("della_linear", needs_base=True, min_models=1, random=True, sliceable=True, totals=True, orders=("row_ranks",))
def della_linear(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    epsilon: PerModel = 0.15,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = True,
) -> Tensor:
    """MagPrune drop + rescale, weighted sum of task vectors (mergekit `della_linear`)."""
    return gta(
        x, "della_linear", sparsify="magprune", consensus=False,
        density=density, epsilon=epsilon, lambda_=lambda_, normalize=normalize, rescale=rescale,
    )  # fmt: skip
