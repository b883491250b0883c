"""DELLA (Deep et al.): MagPrune — drop entries with a keep probability rising with their |τ| rank per row.

`della` combines with TIES sign election and normalises; `della_linear` sums (mergekit's
defaults). `rescale: true` (the default) restores each τ's L1 norm, as mergekit 0.1.5 does;
`rescale: inverse_keep` divides each survivor by its own keep probability π_i (the paper,
and mergekit before 0.1).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.combine import combine
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.sparsify import apply_mask, magprune_mask, rescale_mode


def della_deltas(x: TensorInputs, density: PerModel, epsilon: PerModel, rescale: object, method: str) -> list[Tensor]:
    rho = per_model(density, x.num_models)
    eps = per_model(epsilon, x.num_models)
    mode = rescale_mode(method, rescale)
    out = []
    for tau, r, e in zip(x.deltas, rho, eps):
        mask, probs = magprune_mask(tau, r, e, x.generator)
        out.append(apply_mask(tau, mask, mode, probs))
    return out


@register("della", needs_base=True, min_models=1, random=True)
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
    deltas = della_deltas(x, density, epsilon, rescale, "della")
    return combine(x.base, deltas, x.weights, consensus=True, normalize=normalize, lambda_=lambda_)


@register("della_linear", needs_base=True, min_models=1, random=True)
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
    deltas = della_deltas(x, density, epsilon, rescale, "della_linear")
    return combine(x.base, deltas, x.weights, consensus=False, normalize=normalize, lambda_=lambda_)
