"""DARE (Yu et al.): drop each task-vector entry with probability 1−ρ, rescale survivors, then combine.

`dare_ties` combines with TIES sign election, `dare_linear` by a plain weighted sum (both
un-normalised and rescaled by default, as mergekit). Masks come from `x.generator`.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.combine import combine, rescaler
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.sparsify import apply_mask, random_mask


def dare_deltas(x: TensorInputs, density: PerModel, rescale: bool, rescale_mode: str, method: str) -> list[Tensor]:
    """Each expert's τ after a random drop (experts drawn in order from the tensor's generator)."""
    rho = per_model(density, x.num_models)
    mode = rescaler(method, rescale, rescale_mode)
    return [apply_mask(tau, random_mask(tau, r, x.generator), mode, r) for tau, r in zip(x.deltas, rho)]


@register("dare_ties", needs_base=True, min_models=1, random=True)
def dare_ties(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: Literal["inverse_keep", "l1"] = "inverse_keep",
) -> Tensor:
    """Random drop + rescale, TIES sign election (mergekit `dare_ties`)."""
    deltas = dare_deltas(x, density, rescale, rescale_mode, "dare_ties")
    return combine(x.base, deltas, x.weights, consensus=True, normalize=normalize, lambda_=lambda_)


@register("dare_linear", needs_base=True, min_models=1, random=True)
def dare_linear(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = True,
    rescale_mode: Literal["inverse_keep", "l1"] = "inverse_keep",
) -> Tensor:
    """Random drop + rescale, weighted sum of task vectors (mergekit `dare_linear`)."""
    deltas = dare_deltas(x, density, rescale, rescale_mode, "dare_linear")
    return combine(x.base, deltas, x.weights, consensus=False, normalize=normalize, lambda_=lambda_)
