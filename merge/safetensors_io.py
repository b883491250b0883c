"""Safetensors files by their headers: tensor infos checked against the file size, positional reads, read-only maps.

Nothing here reads more than a header unless asked for a tensor: the memory plan and the
model-set checks run on headers alone, so they work on sparse stand-in checkpoints too.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mergetune.core.errors import ModelSetError

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # byte offset of the data in its file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _corrupt(path: Path, reason: str) -> ModelSetError:
    return ModelSetError(f"{path}: not a valid safetensors file ({reason}); re-save or re-download it")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and metadata of a safetensors file, checked against the file size (reads the header only)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _corrupt(path, "shorter than its 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, MAX_HEADER_BYTES):
                raise _corrupt(path, "truncated header")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelSetError(f"{path} not found") from None
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decoding
        raise _corrupt(path, str(exc)) from None
    data_bytes = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = DTYPES.get(entry["dtype"])
            if dtype is None:
                raise _corrupt(path, f"unknown dtype {entry['dtype']!r} of {name}")
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
            if end - start != math.prod(shape) * dtype.itemsize:
                raise _corrupt(path, f"tensor {name} has {end - start} bytes for shape {list(shape)}")
            if end > data_bytes:
                raise _corrupt(path, f"truncated: tensor {name} ends at byte {end} of {data_bytes}")
            infos[name] = TensorInfo(dtype, shape, 8 + n + start)
        metadata = dict(header.get("__metadata__") or {})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _corrupt(path, f"malformed header: {exc}") from None
    return infos, metadata


def read_tensor(fd: int, path: Path, name: str, info: TensorInfo) -> Tensor:
    """The stored tensor `name` of the open file `fd`, in its own dtype, on the CPU (a fresh tensor the caller owns).

    Positional reads into a fresh tensor: unlike a memory map, the pages read do not stay in
    the process's RSS, and no tensor aliases a file mapping.
    """
    out = torch.empty(info.shape, dtype=info.dtype)
    buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    try:
        while done < len(buffer):  # a read may return less than asked for
            count = os.preadv(fd, [buffer[done:]], info.offset + done)
            if count == 0:
                raise EOFError("the file ends early")
            done += count
    except (OSError, EOFError) as exc:
        raise ModelSetError(f"{path}: cannot read tensor {name!r} ({exc}); re-save the model") from None
    return out


class MappedFile:
    """A safetensors file mapped copy-on-write: its tensors are zero-copy views of the OS page cache.

    Every process that maps the same file shares those pages, so a node holds one copy however
    many workers read it. Copy-on-write (not read-only) so that a stray in-place write makes a
    private page instead of a segfault; nothing is ever written back to the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise ModelSetError(f"{path}: cannot map the file ({exc})") from None
        finally:
            os.close(fd)

    def tensor(self, info: TensorInfo) -> Tensor:
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        return torch.frombuffer(self._map, dtype=info.dtype, count=info.numel, offset=info.offset).view(info.shape)

    def prefetch(self) -> None:
        """Ask the kernel to read the whole file ahead (asynchronously), so the first merge does not wait on the disk."""
        if hasattr(mmap, "MADV_WILLNEED"):
            self._map.madvise(mmap.MADV_WILLNEED)
