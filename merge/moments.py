"""Rank-1 compression of Adam second moments (ALGORITHMS.md §1.5) and its transparent reconstruction.

A 2-D second moment V (m×n) is stored as its row sums r = V·1 and column sums c = 1ᵀV;
it reads back as V̂ = r cᵀ / (1ᵀV1) (the I-divergence-optimal nonnegative rank-1 factorisation
Adafactor uses), or 0 where ΣV = 0. Tensors of any other rank are stored exactly. A compressed
file is marked in its safetensors metadata, so readers (`modelset.StatsFile`) tell the forms apart.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from mergetune.core.errors import ModelSetError
from mergetune.core.fs import atomic_output_file

FORMAT_KEY = "mergetune_moments"
RANK1 = "rank1"
ROW_SUFFIX = "::row_sums"
COL_SUFFIX = "::col_sums"


def rank1_factors(v: Tensor) -> tuple[Tensor, Tensor]:
    """(row sums, column sums) of a 2-D second moment, in float32."""
    v = v.float()
    return v.sum(dim=1), v.sum(dim=0)


def rank1_reconstruct(row_sums: Tensor, col_sums: Tensor, out: Tensor | None = None) -> Tensor:
    """V̂ = r cᵀ / Σr (into `out` when given); all zeros when the total is 0."""
    total = row_sums.sum()
    if total <= 0:
        if out is not None:
            return out.zero_()
        return torch.zeros(row_sums.numel(), col_sums.numel(), dtype=torch.float32, device=row_sums.device)
    if out is None:
        return torch.outer(row_sums / total, col_sums)
    return torch.mul((row_sums / total).unsqueeze(1), col_sums.unsqueeze(0), out=out)  # the same products as `outer`


def rank1_reconstruct_slice(row_sums: Tensor, col_sums: Tensor, start: int, stop: int, out: Tensor | None = None) -> Tensor:
    """Entries [start, stop) of the flattened V̂ (`rank1_reconstruct`, the same products), into `out` when given."""
    total = row_sums.sum()
    cols = col_sums.numel()
    if out is None:
        out = torch.empty(stop - start, dtype=torch.float32, device=row_sums.device)
    out = out[: stop - start]
    if total <= 0:
        return out.zero_()
    scaled = row_sums / total
    # Written in place, row piece by row piece: a partial first row, the whole rows, a partial last row.
    row, at = start // cols, start
    while at < stop:
        if at % cols == 0 and stop - at >= cols:
            rows = (stop - at) // cols
            piece = out[at - start : at - start + rows * cols].view(rows, cols)
            torch.mul(scaled[row : row + rows].unsqueeze(1), col_sums.unsqueeze(0), out=piece)
            row, at = row + rows, at + rows * cols
        else:
            end = min(stop, (row + 1) * cols)
            torch.mul(scaled[row], col_sums[at - row * cols : end - row * cols], out=out[at - start : end - start])
            row, at = row + 1, end
    return out


Factors = tuple[Tensor, Tensor]
"""A rank-1 V̂ over whole rows, as a kernel reads it: the scaled row sums r/Σr of the rows ([rows, 1]) and the
column sums ([1, cols]); entry (i, j) is their product (`kernels.moment`), the same product `rank1_reconstruct` makes."""


def rank1_slice(row_sums: Tensor, col_sums: Tensor, start: int, stop: int, out: Tensor | None = None) -> Tensor | Factors:
    """Entries [start, stop) of the flattened V̂ for a kernel: its `Factors` when the slice is whole rows — multiplied
    as the kernel reads them, so no float32 slice of V̂ is written and read again (OTA's rank-1 expansion was ~15% of
    its resident merge, and its moments 12 of the 22 bytes per entry its kernel moved, 3 experts) — else
    `rank1_reconstruct_slice` into `out`."""
    cols = col_sums.numel()
    total = row_sums.sum()
    if start % cols or (stop - start) % cols or total <= 0:
        return rank1_reconstruct_slice(row_sums, col_sums, start, stop, out=out)
    return (row_sums[start // cols : stop // cols] / total).unsqueeze(1), col_sums.unsqueeze(0)


def moment_entries(v: Tensor | Factors, at: Tensor) -> Tensor:
    """The flat entries `at` of a slice's moment, dense or `Factors` (their products, as the kernel makes them)."""
    if isinstance(v, Tensor):
        return v.reshape(-1)[at]
    rows, cols = v
    return rows.reshape(-1)[at // cols.numel()] * cols.reshape(-1)[at % cols.numel()]


def is_compressed(metadata: dict[str, str] | None) -> bool:
    return (metadata or {}).get(FORMAT_KEY) == RANK1


def compress_moments(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """Write the rank-1 form of the second-moment file `src` to `dst` (atomically); returns element counts.

    The source's metadata (step, betas, lr) is kept, so bias correction still works on the result.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    tensors: dict[str, Tensor] = {}
    before = 0
    try:
        with safe_open(src, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if is_compressed(metadata):
                raise ModelSetError(f"{src} is already compressed")
            for name in f.keys():
                v = f.get_tensor(name)
                before += v.numel()
                if v.dim() == 2:
                    tensors[name + ROW_SUFFIX], tensors[name + COL_SUFFIX] = rank1_factors(v)
                else:
                    tensors[name] = v.float()
    except (SafetensorError, OSError) as exc:
        raise ModelSetError(f"{src}: cannot read second moments ({exc}); check the file") from exc
    metadata[FORMAT_KEY] = RANK1
    with atomic_output_file(dst, force=True) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata=metadata)
    return {"elements_before": before, "elements_after": sum(t.numel() for t in tensors.values())}

