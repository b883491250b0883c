"""Model Breadcrumbs (Davari & Belilovsky): drop the top-γ outliers and the small entries of each τ.

`breadcrumbs` sums the masked task vectors, `breadcrumbs_ties` adds TIES sign election; both
un-normalised and not rescaled by default (mergekit 0.1.5). The band is exact: ascending |τ|
positions [n_bot, n_bot + ⌊ρn⌋) in mergekit's tie order (`sparsify.band_mask`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.combine import combine
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.sparsify import (
    KEEP_ALL,
    KEEP_NONE,
    SCOPES,
    TensorCut,
    apply_mask,
    band_fractions,
    band_mask,
    check_choice,
    rescale_mode,
)

FRACTION_TOLERANCE = 1e-9  # ρ + γ sums like 0.9 + 0.1 land a hair below 1


def top_fraction_cut(x: TensorInputs, model: int, top_fraction: float) -> TensorCut:
    """The expert's global cut keeping its top `top_fraction` of |τ| (all or nothing at the ends)."""
    if top_fraction <= FRACTION_TOLERANCE:
        return lambda scores: KEEP_NONE.mask(x.name, scores)
    if top_fraction >= 1 - FRACTION_TOLERANCE:
        return lambda scores: KEEP_ALL.mask(x.name, scores)
    return x.cut("magnitude", model, top_fraction)


def breadcrumbs_deltas(
    x: TensorInputs, density: PerModel, gamma: PerModel, rescale: object, scope: str, method: str
) -> list[Tensor]:
    check_choice(method, "scope", scope, SCOPES)
    rho = per_model(density, x.num_models)
    gammas = per_model(gamma, x.num_models)
    mode = rescale_mode(method, rescale)
    out = []
    for k, (tau, r, g) in enumerate(zip(x.deltas, rho, gammas)):
        cuts = None
        if scope == "global" and r < 1:
            top, bottom = band_fractions(r, g)
            cuts = (top_fraction_cut(x, k, top), top_fraction_cut(x, k, bottom))
        out.append(apply_mask(tau, band_mask(tau, r, g, cuts), mode, r))
    return out


@register("breadcrumbs", needs_base=True, min_models=1)
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
    deltas = breadcrumbs_deltas(x, density, gamma, rescale, scope, "breadcrumbs")
    return combine(x.base, deltas, x.weights, consensus=False, normalize=normalize, lambda_=lambda_)


@register("breadcrumbs_ties", needs_base=True, min_models=1)
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
    deltas = breadcrumbs_deltas(x, density, gamma, rescale, scope, "breadcrumbs_ties")
    return combine(x.base, deltas, x.weights, consensus=True, normalize=normalize, lambda_=lambda_)
