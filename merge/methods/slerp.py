"""Spherical linear interpolation between two tensors (mergekit `slerp`), colinear → lerp.

One expert: interpolate from the base (t = 0) to the expert (t = 1), on the whole weights —
exactly mergekit's `slerp`. Two experts: interpolate their task vectors around the base,
θ = θ₀ + slerp(τ₁, τ₂, t) (t = 0 is the first expert); whole weights of two fine-tunes of one
base are nearly parallel, so their SLERP would almost always fall back to lerp.
"""

from __future__ import annotations

import math

from torch import Tensor

from mergetune.merge.methods.registry import TensorInputs, register

DOT_THRESHOLD = 0.9995  # |cos| above this: lerp (mergekit)
NORM_EPS = 1e-8


def slerp_tensors(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """[sin((1−t)Ω)·v0 + sin(tΩ)·v1] / sin Ω on the unnormalised tensors, Ω the angle between them;
    (1−t)·v0 + t·v1 when |cos Ω| > 0.9995. Norms ≤ 1e-8 count as 1 for the angle."""
    norm0, norm1 = v0.norm().item(), v1.norm().item()
    u0 = v0 / norm0 if norm0 > NORM_EPS else v0
    u1 = v1 / norm1 if norm1 > NORM_EPS else v1
    dot = max(-1.0, min(1.0, (u0 * u1).sum().item()))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1


@register("slerp", needs_base=True, min_models=1, max_models=2)
def slerp(x: TensorInputs, *, t: float = 0.5) -> Tensor:
    """SLERP base→expert (one expert, mergekit) or between two experts' task vectors."""
    if x.num_models == 1:
        return slerp_tensors(t, x.base, x.models[0])
    return x.base + slerp_tensors(t, x.deltas[0], x.deltas[1])
