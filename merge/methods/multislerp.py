"""Multi-SLERP (mergekit `multislerp`): a weighted barycentre of K experts on the hypersphere.

Each expert's vector (its task vector when there is a base) is scaled to unit norm; the
weighted mean of the unit vectors, normalised, is the tangent point; the weighted mean of the
tangent components is mapped back to the sphere with the exponential map, and the result is
scaled by the weighted mean norm. One expert: its own tensor. Two antipodal experts whose
weighted mean vanishes fall back to the weighted sum; for more, that is an error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.core.errors import MergetuneError
from mergetune.merge.methods.registry import TensorInputs, register


@register("multislerp", needs_base=False, min_models=1)
def multislerp(x: TensorInputs, *, normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Spherical barycentric interpolation of the experts (around the base when there is one)."""
    if x.num_models == 1:
        return x.models[0].clone()
    vectors = torch.stack(x.deltas if x.base is not None else x.models)
    flat = vectors.reshape(vectors.shape[0], -1)
    weights = torch.tensor(x.weights, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = flat.norm(dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        if x.num_models != 2:
            raise MergetuneError(
                f"multislerp: the weighted mean direction of {x.name} is zero (antipodal experts with "
                "balancing weights); change the weights"
            )
        out = (vectors[0] * weights[0] + vectors[1] * weights[1]).reshape(vectors.shape[1:])
        return out + x.base if x.base is not None else out
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = tangent.norm() + eps
    on_sphere = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (on_sphere * (norms.squeeze(-1) * weights).sum()).reshape(vectors.shape[1:])
    return out + x.base if x.base is not None else out
