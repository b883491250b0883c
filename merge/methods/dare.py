"""DARE (Yu et al.): drop each task-vector entry with probability 1−ρ, rescale survivors, then combine.

`dare_ties` combines with TIES sign election, `dare_linear` by a plain weighted sum (both
un-normalised and rescaled by default, as mergekit: `rescale: true` restores each τ's L1 norm;
`rescale: inverse_keep` divides survivors by ρ, the paper's 1/(1−p)). Masks come from `x.generator`.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.combine import combine
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.sparsify import apply_mask, random_mask, rescale_mode


def dare_deltas(x: TensorInputs, density: PerModel, rescale: object, method: str) -> list[Tensor]:
    """Each expert's τ after a random drop (experts drawn in order from the tensor's generator)."""
    rho = per_model(density, x.num_models)
    mode = rescale_mode(method, rescale)
    return [apply_mask(tau, random_mask(tau, r, x.generator), mode, r) for tau, r in zip(x.deltas, rho)]


@register("dare_ties", needs_base=True, min_models=1, random=True)
def dare_ties(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = True,
) -> Tensor:
    """Random drop + rescale, TIES sign election (mergekit `dare_ties`)."""
    deltas = dare_deltas(x, density, rescale, "dare_ties")
    return combine(x.base, deltas, x.weights, consensus=True, normalize=normalize, lambda_=lambda_)


@register("dare_linear", needs_base=True, min_models=1, random=True)
def dare_linear(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = True,
) -> Tensor:
    """Random drop + rescale, weighted sum of task vectors (mergekit `dare_linear`)."""
    deltas = dare_deltas(x, density, rescale, "dare_linear")
    return combine(x.base, deltas, x.weights, consensus=False, normalize=normalize, lambda_=lambda_)
