"""OTA merging with Fast Fisher Grafting (Mahdavinia et al.; ALGORITHMS.md §1 and Part A).

Per expert k, with τ_k = θ_k − θ₀ and v_k its Adam second moment (raw, or the rank-1
reconstruction the engine hands over):
- FFG mask m_k: the top-ρ_k saliencies v_k·τ_k², exactly ⌊ρ_k·n⌋ of them (per tensor, or over
  all the expert's tensors with `scope: global`, the paper's choice; `sparsify`); ρ ≥ 1: no mask.
- curvature weight W_k = (s_k·v_k^p + ε)·m_k, with s_k the expert's recipe weight (the
  reference's `scaling_factor`, 1 by default), p = `power`.
- θ = θ₀ + Σ W_k τ_k / Σ W_k; when any mask is active, elements with Σ W_k ≤ 1.1·K·ε (every
  expert masked, or only zero-curvature survivors) fall back to θ₀.
ε defaults to 1e-30: second moments of LLM fine-tunes are ~1e-20..1e-12, so the reference
code's 1e-8 would turn OTA into a plain average.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from mergetune.core.errors import ConfigError
from mergetune.merge.boundary import boundary, gathered, overwrite
from mergetune.merge.kernels import EAGER, moment
from mergetune.merge.methods.gta import top_selection
from mergetune.merge.methods.registry import PerModel, TensorInputs, per_model, register
from mergetune.merge.moments import moment_entries
from mergetune.merge.sparsify import SCOPES, check_choice


@register("ota", needs_base=True, min_models=1, needs=("moments",), sliceable=True, orders=("saliency.desc",))
def ota(
    x: TensorInputs,
    *,
    density: PerModel = 1.0,
    power: float = 0.5,
    epsilon: float = 1e-30,
    scope: Literal["tensor", "global"] = "tensor",
) -> Tensor:
    """Curvature-weighted (√v) average of FFG-masked task vectors."""
    if power <= 0:
        raise ConfigError(f"method 'ota': power must be > 0, not {power}")
    if any(w < 0 for w in x.weights):
        raise ConfigError("method 'ota': weights must be ≥ 0 (they scale each expert's curvature)")
    if x.moments is None:
        raise ValueError(f"{x.name}: ota needs second moments per expert")
    check_choice("ota", "scope", scope, SCOPES)
    rho = per_model(density, x.num_models)
    stored = x.stored is not None
    base, given = (x.stored.base, x.stored.models) if stored else (x.base, x.deltas)
    flat_shape, out, moments = given[0].shape, x.out, x.moments
    factors = next((v for v in moments if not isinstance(v, Tensor)), None)
    if factors is not None:  # rank-1 moments of whole rows (`moments.rank1_slice`): the slice as [rows, cols]
        shape = (factors[0].shape[0], factors[1].shape[1])
        base, given = base.view(shape), [g.view(shape) for g in given]
        out = None if out is None else out.view(shape)
        moments = [v.view(shape) if isinstance(v, Tensor) else v for v in moments]
    selections = [top_selection(x, "saliency", k, r, scope) if r < 1 else None for k, r in enumerate(rho)]
    edges = boundary(selections, x.numel, x.offset, given[0], x.kernels.mark_dtype(given[0].device))

    def bounds(marks: list[Tensor | None]) -> list[tuple | None]:
        return [None if s is None else (*s.bounds(), m) for s, m in zip(selections, marks)]

    curvatures = None if power == 0.5 else [moment(v).pow(power) for v in moments]  # √v: in the kernel (`kernels.ota_slice`)
    weights = [float(w) for w in x.weights]
    merged = x.kernels.ota_slice(base, given, stored, curvatures, moments, bounds(edges.kernel_marks), weights, epsilon, out)
    merged = merged.view(flat_shape)
    if edges.at is None:
        return merged
    at = edges.at
    patch = EAGER.ota_slice(
        gathered(base, at), [gathered(g, at) for g in given], stored, None if curvatures is None else [gathered(c, at) for c in curvatures],
        [moment_entries(v, at) for v in moments], bounds(edges.patch_marks), weights, epsilon,
    )  # fmt: skip
    return overwrite(merged, at, patch)
