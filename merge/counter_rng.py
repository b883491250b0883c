"""Counter-based random numbers: each draw is a pure function of (seed, tensor name, stream, element index).

DARE and DELLA keep each entry of a task vector with some probability. The draw for entry i
of expert k's τ on tensor `name` is `uniform(seed, name, k, i)`: no generator state, so a CPU
and a GPU merge of the same recipe and seed keep exactly the same entries, any slice of a
tensor is drawn on its own, and nothing is made on the CPU and copied.

The bits are two rounds of the PCG hash (Jarzynski & Olano, "Hash Functions for GPU
Rendering", 2020) over the 32-bit element index: the first keyed by (seed, tensor) and shared
by the tensor's streams, the second by the stream (expert):

    bits(i) = pcg(pcg(i xor tensor_key) xor stream_key),   uniform(i) = (bits(i) >> 8) · 2^-24

All in int64 integer ops whose products stay below 2^63 (no overflow, no rounding), so every
backend — CPU, CUDA, a compiled kernel — computes the same bits. A uniform has 24 bits, exact
in float32, like `torch.rand`; "uniform < p" is decided on the integers (`keep_from_bits`).
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
LCG_MULTIPLIER, LCG_INCREMENT, OUTPUT_MULTIPLIER = 747796405, 2891336453, 277803737  # the PCG hash's constants
MAX_ELEMENTS = 1 << 32  # element indices are 32-bit counters (the largest LLM tensors have ~1e9 entries)
UNIFORM_BITS = 24


def _key(*parts: object) -> int:
    digest = hashlib.blake2b("\x00".join(str(p) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def tensor_key(seed: int, tensor_name: str) -> int:
    """The 32-bit key of a merge's draws on one tensor (shared by its streams)."""
    return _key(seed, tensor_name)


def stream_key(seed: int, tensor_name: str, stream: int) -> int:
    """The 32-bit key of one stream (expert `stream`'s draws) on one tensor."""
    return _key(seed, tensor_name, stream)


def pcg_hash(x: Tensor) -> Tensor:
    """The PCG hash of 32-bit values held in int64 (a bijection of [0, 2^32))."""
    state = (x * LCG_MULTIPLIER + LCG_INCREMENT) & MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * OUTPUT_MULTIPLIER) & MASK32
    return (word >> 22) ^ word


def hashed_index(key: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The first round for elements [start, start + count): pcg(i xor tensor_key), int64."""
    if start < 0 or start + count > MAX_ELEMENTS:
        raise ValueError(f"counter-based draws index elements below 2^32, not [{start}, {start + count})")
    return pcg_hash(torch.arange(start, start + count, dtype=torch.int64, device=device) ^ key)


def stream_bits(hashed: Tensor, key: int) -> Tensor:
    """The second round: 32 random bits (int64 in [0, 2^32)) of one stream, from `hashed_index`."""
    return pcg_hash(hashed ^ key)


def keep_from_bits(bits: Tensor, probability: float | Tensor) -> Tensor:
    """uniform < probability, elementwise (a float or a float32 tensor of probabilities), decided exactly."""
    return (bits >> (32 - UNIFORM_BITS)) < probability * float(1 << UNIFORM_BITS)


def uniforms(seed: int, tensor_name: str, stream: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """U[0, 1) in float32 (multiples of 2^-24) for elements [start, start + count) of one stream."""
    bits = stream_bits(hashed_index(tensor_key(seed, tensor_name), start, count, device), stream_key(seed, tensor_name, stream))
    return (bits >> (32 - UNIFORM_BITS)).to(torch.float32) * 2.0**-UNIFORM_BITS
