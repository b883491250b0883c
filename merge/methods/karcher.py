"""Karcher mean (mergekit `karcher`): the weighted Riemannian mean of the experts' directions.

Each expert's tensor (whole weights; a base is not used) is split into norm and unit direction.
Directions of experts with norm > `tol` are averaged on the unit sphere by at most `max_iter`
fixed-point steps (log map, weighted mean in the tangent space, exp map; stop once the step is
shorter than `tol`), starting from the normalised weighted mean; the result is scaled by the
weighted mean norm. Weights are the mean's coefficients α_k = w_k/Σw (mergekit: equal).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register


def karcher_mean(tensors: list[Tensor], alphas: list[float], max_iter: int, tol: float) -> Tensor:
    norms = [t.norm() for t in tensors]
    units = [torch.zeros_like(t) if float(n) == 0.0 else t / n for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    coefficients = [alphas[i] / total for i in valid]
    directions = [units[i] for i in valid]
    mean = torch.zeros_like(directions[0])
    for a, u in zip(coefficients, directions):
        mean += a * u
    mean_norm = mean.norm()
    mean = directions[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in zip(coefficients, directions):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        step = tangent.norm()
        if float(step) < tol:
            break
        mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
        mean_norm = mean.norm()
        if float(mean_norm) > tol:
            mean = mean / mean_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


@register("karcher", needs_base=False, min_models=1)
def karcher(x: TensorInputs, *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Weighted Karcher mean of the experts' directions, scaled by their weighted mean norm."""
    if x.num_models == 1:
        return x.models[0].clone()
    total = sum(x.weights)
    alphas = [w / total for w in x.weights]
    return karcher_mean(x.models, alphas, max_iter, tol)
