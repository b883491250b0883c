"""Comparing two merged models tensor by tensor, as the mergekit parity tests require.

float32 outputs: max |Δ| / max |θ| ≤ 1e-5 per tensor. bfloat16 outputs: both sides round a
float32 result, so a value may land on the neighbouring bf16 number: every difference at most
1 ulp, on at most 0.1 % of all values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

REL_TOLERANCE = 1e-5
BF16_MAX_ULPS = 1.0
BF16_MAX_DIFFERING = 1e-3


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (8 significant bits)."""
    _, exponent = torch.frexp(x.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8)


@dataclass
class Parity:
    max_rel: float  # max over tensors of max |Δ| / max |θ|
    differing: float  # fraction of all values that differ at all
    max_ulps: float  # largest difference in bf16 ulps (0 for float32 outputs)
    worst: str  # the tensor of max_rel
    dtypes: set[torch.dtype]


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Parity:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    max_rel, worst, differing, total, max_ulps = 0.0, "", 0, 0, 0.0
    for name in ours:
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs mergekit's {b.dtype}"
        x, y = a.float(), b.float()
        rel = float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)) if x.numel() else 0.0
        if rel > max_rel:
            max_rel, worst = rel, name
        differing += int((x != y).sum())
        total += x.numel()
        if a.dtype == torch.bfloat16 and x.numel():
            ulps = (x - y).abs() / bf16_ulp(torch.maximum(x.abs(), y.abs()))
            max_ulps = max(max_ulps, float(ulps.max()))
    return Parity(max_rel, differing / max(total, 1), max_ulps, worst, {t.dtype for t in ours.values()})


def assert_parity(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Parity:
    result = compare(ours, theirs)
    if result.dtypes == {torch.bfloat16}:
        assert result.max_ulps <= BF16_MAX_ULPS, f"{result.max_ulps:.2f} ulps (worst tensor {result.worst})"
        assert result.differing <= BF16_MAX_DIFFERING, f"{result.differing:.3%} of values differ"
    else:
        assert result.max_rel <= REL_TOLERANCE, f"{result.worst}: relative difference {result.max_rel:.2e}"
    return result
