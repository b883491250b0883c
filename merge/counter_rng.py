"""Counter-based random numbers: each draw is a pure function of (seed, tensor name, stream, element index).

DARE and DELLA keep each entry of a task vector with some probability. The draw for entry i
of expert k's τ on tensor `name` is `uniform(seed, name, k, i)`: no generator state, so a CPU
and a GPU merge of the same recipe and seed keep exactly the same entries, any slice of a
tensor is drawn on its own, and nothing is made on the CPU and copied.

The bits are two rounds of a 32-bit integer hash over the element index — "lowbias32"
(C. Wellons, hash-prospector: xorshift-multiply with 0x7feb352d and 0x846ca68b, a bijection of
the 32-bit words with very low bias) — the first keyed by (seed, tensor) and shared by the
tensor's streams, the second by the stream (expert):

    bits(i) = mix(mix(i xor tensor_key) xor stream_key),   uniform(i) = (bits(i) >> 8) · 2^-24

in int32 tensors: multiplication wraps mod 2^32 (two's complement, on every backend torch runs:
CPU vector units, CUDA, Triton), right shifts are masked to be logical, constant shifts only —
integer ops, so a CPU, a GPU and a compiled kernel compute the same bits (tests/test_counter_rng.py
checks them against numpy's uint32 arithmetic). A uniform has 24 bits, exact in float32, like
`torch.rand`; "uniform < p" is decided exactly, on the integers (`keep_threshold`, `keep_below`).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

MULTIPLIERS = (0x7FEB352D, 0x846CA68B - (1 << 32))  # lowbias32's, as int32 values
MAX_ELEMENTS = 1 << 31  # element indices are non-negative int32 (the largest LLM tensors have ~2e9 entries at most)
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


def _shifted(x: Tensor, bits: int) -> Tensor:
    """x >> bits as unsigned 32-bit words (int32's >> sign-extends)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def mix(x: Tensor) -> Tensor:
    """lowbias32 of 32-bit words held in int32 (a bijection)."""
    x = x ^ _shifted(x, 16)
    x = x * MULTIPLIERS[0]
    x = x ^ _shifted(x, 15)
    x = x * MULTIPLIERS[1]
    return x ^ _shifted(x, 16)


def _signed(key: int) -> int:
    """A 32-bit key as the int32 value with its bits."""
    return key - (1 << 32) if key >= 1 << 31 else key


def check_range(start: int, count: int) -> None:
    if start < 0 or start + count > MAX_ELEMENTS:
        raise ValueError(f"counter-based draws index elements below 2^31, not [{start}, {start + count})")


def key_tensor(key: int, device: torch.device | str = "cpu") -> Tensor:
    """A 32-bit key (or an element offset) as a 0-dim int32 tensor: a kernel's input, not a constant compiled into it."""
    return torch.tensor(_signed(key), dtype=torch.int32, device=device)


def first_round(index: Tensor, key: Tensor | int) -> Tensor:
    """mix(i xor tensor_key) of int32 element indices: the round a tensor's streams share."""
    return mix(index ^ key)


def hashed_index(key: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """The first round for elements [start, start + count), int32."""
    check_range(start, count)
    return first_round(torch.arange(start, start + count, dtype=torch.int32, device=device), _signed(key))


def stream_bits(hashed: Tensor, key: Tensor | int) -> Tensor:
    """The second round: 32 random bits (int32) of one stream (`key`: a `stream_key`, or its `key_tensor`)."""
    return mix(hashed ^ (_signed(key) if isinstance(key, int) else key))


def keep_threshold(probability: float) -> int:
    """The integer t with uniform < probability ⇔ (bits >> 8) < t: ⌈p·2^24⌉ (p·2^24 is exact in a double), in [0, 2^24]."""
    return min(max(math.ceil(probability * (1 << UNIFORM_BITS)), 0), 1 << UNIFORM_BITS)


def keep_below(bits: Tensor, threshold: Tensor | int) -> Tensor:
    """(bits >> 8) < threshold: keep where the uniform is below threshold/2^24 — one probability's `keep_threshold`
    (a 0-dim int32 tensor in a kernel), or an int32 tensor of them (DELLA's `kernels.della_thresholds`). An int32
    compare: a float probability makes a compiled CPU kernel compare in doubles (2.2× slower), a float tensor of
    them convert the bits to float one lane at a time."""
    return _shifted(bits, 32 - UNIFORM_BITS) < threshold


def uniforms(seed: int, tensor_name: str, stream: int, start: int, count: int, device: torch.device | str = "cpu") -> Tensor:
    """U[0, 1) in float32 (multiples of 2^-24) for elements [start, start + count) of one stream."""
    bits = stream_bits(hashed_index(tensor_key(seed, tensor_name), start, count, device), stream_key(seed, tensor_name, stream))
    return _shifted(bits, 32 - UNIFORM_BITS).to(torch.float32) * 2.0**-UNIFORM_BITS
