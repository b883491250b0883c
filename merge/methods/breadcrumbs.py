"""Model Breadcrumbs (Davari & Belilovsky): drop the top-γ outliers and the small entries of each τ.

`breadcrumbs` sums the masked task vectors, `breadcrumbs_ties` adds TIES sign election; both
un-normalised and not rescaled by default (mergekit 0.1.5). The band is exact: ascending |τ|
positions [n_bot, n_bot + ⌊ρn⌋) in mergekit's tie order (`sparsify.band_mask`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.gta import gta
from mergetune.merge.methods.registry import PerModel, TensorInputs, register

ORDERS = ("magnitude.asc", "magnitude.desc")  # the band per tensor; global bands cut the descending order


@register("breadcrumbs", needs_base=True, min_models=1, sliceable=True, totals=True, orders=ORDERS)
def breadcrumbs(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = False,
    scope: Literal["tensor", "global"] = "tensor",
) -> Tensor:
    """Outlier-and-small-entry drop, weighted sum of task vectors (mergekit `breadcrumbs`)."""
    return gta(
        x, "breadcrumbs", sparsify="band", consensus=False,
        density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, rescale=rescale, scope=scope,
    )  # fmt: skip


@register("breadcrumbs_ties", needs_base=True, min_models=1, sliceable=True, totals=True, orders=ORDERS)
def breadcrumbs_ties(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    gamma: PerModel = 0.01,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = False,
    scope: Literal["tensor", "global"] = "tensor",
) -> Tensor:
    """Outlier-and-small-entry drop with TIES sign election (mergekit `breadcrumbs_ties`)."""
    return gta(
        x, "breadcrumbs_ties", sparsify="band", consensus=True,
        density=density, gamma=gamma, lambda_=lambda_, normalize=normalize, rescale=rescale, scope=scope,
    )  # fmt: skip
