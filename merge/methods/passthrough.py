"""Passthrough: one model's tensor, optionally scaled (mergekit `passthrough`; layer stacking is a recipe matter)."""

from __future__ import annotations

from torch import Tensor

from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register


@register("passthrough", needs_base=False, min_models=1, max_models=1)
def passthrough(x: TensorInputs, *, scale: PerModel = 1.0) -> Tensor:
    """The single model's tensor times `scale`."""
    (factor,) = per_model(scale, 1)
    return x.models[0] * factor  # a new tensor: callers may write into the result
