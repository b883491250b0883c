"""DARE (Yu et al.): drop each task-vector entry with probability 1−ρ, rescale survivors, then combine.

`dare_ties` combines with TIES sign election, `dare_linear` by a plain weighted sum (both
un-normalised and rescaled by default, as mergekit: `rescale: true` restores each τ's L1 norm;
`rescale: inverse_keep` divides survivors by ρ, the paper's 1/(1−p)). The drop of entry i of
expert k is decided by the counter-based draw (seed, tensor, k, i) (`counter_rng`): the same on
every device. (Masks differ from mergetune releases before the counter-based generator.)
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.merge.methods.gta import gta
from mergetune.merge.methods.registry import PerModel, TensorInputs, register


@register("dare_ties", needs_base=True, min_models=1, random=True, sliceable=True, totals=True)
def dare_ties(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = True,
) -> Tensor:
    """Random drop + rescale, TIES sign election (mergekit `dare_ties`)."""
    return gta(
        x, "dare_ties", sparsify="random", consensus=True,
        density=density, lambda_=lambda_, normalize=normalize, rescale=rescale,
    )  # fmt: skip


@register("dare_linear", needs_base=True, min_models=1, random=True, sliceable=True, totals=True)
def dare_linear(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool | Literal["inverse_keep"] = True,
) -> Tensor:
    """Random drop + rescale, weighted sum of task vectors (mergekit `dare_linear`)."""
    return gta(
        x, "dare_linear", sparsify="random", consensus=False,
        density=density, lambda_=lambda_, normalize=normalize, rescale=rescale,
    )  # fmt: skip
