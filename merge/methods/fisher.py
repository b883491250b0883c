"""Fisher averaging (Matena & Raffel): θ = Σ w_k F_k θ_k / Σ w_k F_k elementwise, F a diagonal Fisher.

F_k is the expert's diagonal Fisher (squared gradients on calibration data) or, lacking one,
its Adam second moments as a proxy. ε is added to every F so elements that no expert's Fisher
covers get the plain weighted mean; it defaults to 1e-30 rather than MergeLM's 1e-6 because
second moments of LLM fine-tunes are ~1e-20..1e-12 and 1e-6 would swamp them.
`normalize` scales each F_k by 1/‖F_k‖ (norm over this tensor; MergeLM takes it over the
whole model), so experts with differently scaled statistics count alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge.methods.registry import TensorInputs, register


def fisher_of(x: TensorInputs) -> list[Tensor]:
    """The experts' diagonal Fishers, else their second moments."""
    stats = x.fisher if x.fisher is not None else x.moments
    if stats is None:
        raise ValueError(f"{x.name}: fisher merging needs a Fisher or second moments per expert")
    return stats


@register("fisher", needs_base=False, min_models=1, any_of=("fisher", "moments"))
def fisher(x: TensorInputs, *, epsilon: float = 1e-30, normalize: bool = False) -> Tensor:
    """Fisher-weighted elementwise average of the experts (moments as a Fisher proxy)."""
    if any(w < 0 for w in x.weights) or not any(x.weights):
        raise ConfigError("method 'fisher': weights must be ≥ 0 and not all 0 (they scale each expert's Fisher)")
    stats = fisher_of(x)
    if normalize:
        stats = [f / f.norm().clamp_min(torch.finfo(torch.float32).tiny) for f in stats]
    coefficients = [w * (f + epsilon) for w, f in zip(x.weights, stats)]
    total = sum(coefficients)
    return sum(c * m for c, m in zip(coefficients, x.models)) / total
