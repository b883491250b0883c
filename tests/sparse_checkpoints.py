"""Stand-ins for real checkpoints: valid safetensors headers with a model's exact names and shapes, and no data.

Files are extended with ftruncate, so a 16 GB Llama-3-8B shard costs a few KB of disk;
reading a tensor of one returns zeros. Only header-level code (validation, the memory plan)
may be pointed at them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from mergetune.merge.sinks import SAFETENSORS_DTYPES

SHARD_BYTES = 5 * 1024**3


def llama3_config(size: str):
    """transformers' LlamaConfig with Llama-3-8B's or Llama-3-70B's published dimensions."""
    from transformers import LlamaConfig

    dims = {
        "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32},
        "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64},
    }[size]
    return LlamaConfig(
        vocab_size=128256,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
        dtype="bfloat16",
        **dims,
    )


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name → shape of every weight of the model, from its module tree on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_sparse_file(path: Path, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None) -> int:
    """A safetensors file with these (shape, dtype) entries, its data a hole; returns its size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        os.ftruncate(f.fileno(), 8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_sparse_checkpoint(directory: Path, config, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A sharded model directory (config.json, index, shards of ≤ 5 GiB) with the config's exact tensors."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    shards: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [{}]
    size = 0
    for name, shape in tensor_shapes(config).items():
        nbytes = math.prod(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = (shape, dtype)
        size += nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_file(directory / file, tensors)
        weight_map.update({name: file for name in tensors})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def write_sparse_moments(path: Path, config, rank1: bool) -> Path:
    """Adam second moments (float32) for every weight: full, or in `mergetune moments compress`'s rank-1 form."""
    from mergetune.merge.moments import COL_SUFFIX, FORMAT_KEY, RANK1, ROW_SUFFIX

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in tensor_shapes(config).items():
        if rank1 and len(shape) == 2:
            tensors[name + ROW_SUFFIX] = ((shape[0],), torch.float32)
            tensors[name + COL_SUFFIX] = ((shape[1],), torch.float32)
        else:
            tensors[name] = (shape, torch.float32)
    write_sparse_file(path, tensors, {FORMAT_KEY: RANK1} if rank1 else {"step": "1000"})
    return path
