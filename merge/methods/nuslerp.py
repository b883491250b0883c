"""NuSLERP (mergekit `nuslerp`): SLERP of two experts with t from their weights, per row or flattened.

t = w₂/(w₁+w₂) (0.5 when the weights sum to ~0). With a base, the experts' task vectors are
interpolated and added to it; without one, the weights themselves. `nuslerp_flatten` (default)
treats each tensor as one vector; otherwise every slice along the last axis is its own vector,
or along the first axis with `nuslerp_row_wise`. Vectors closer than 1e-8 to colinear
(1 − cos² ≤ 1e-16) are lerped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register

COLINEAR_EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp_tensors(t: float, v0: Tensor, v1: Tensor, *, row_wise: bool, flatten: bool) -> Tensor:
    """SLERP from v0 (t = 0) to v1 (t = 1) over whole tensors (`flatten`) or their rows/columns."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register("nuslerp", needs_base=False, min_models=2, max_models=2)
def nuslerp(x: TensorInputs, *, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> Tensor:
    """SLERP between two experts (their task vectors when there is a base), t = w₂/(w₁+w₂)."""
    total = sum(x.weights)
    t = 0.5 if abs(total) < 1e-6 else x.weights[1] / total
    if x.base is not None:
        a, b = x.deltas
        return x.base + nuslerp_tensors(t, a, b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
    a, b = x.models
    return nuslerp_tensors(t, a, b, row_wise=nuslerp_row_wise, flatten=nuslerp_flatten)
