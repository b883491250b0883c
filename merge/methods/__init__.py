"""Merge methods, one small module each, registered by name on import.

Use `get_method(name)(inputs, **params)`; see `registry.py` for the calling convention.
"""

from mergetune.merge.methods.registry import (
    MethodSpec,
    PerModel,
    TensorInputs,
    get_method,
    method_names,
    per_model,
    register,
    tensor_generator,
)

# Importing a method module registers it.
from mergetune.merge.methods import (  # noqa: E402,F401
    arcee_fusion,
    breadcrumbs,
    dare,
    della,
    fisher,
    karcher,
    linear,
    m3,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    ota,
    passthrough,
    ram,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)

__all__ = [
    "MethodSpec",
    "PerModel",
    "TensorInputs",
    "get_method",
    "method_names",
    "per_model",
    "register",
    "tensor_generator",
]
