"""The engine side of the weight push: a vLLM worker extension that loads merged weights in place.

vLLM mixes `MergetuneWorkerExtension` into its GPU worker class (the engine argument
`worker_extension_cls`), so these methods run inside each worker process with `self` the
worker. The backend (evaluators/vllm_push.py) drives them through
`LLM.collective_rpc("mergetune_…", args=…)`, a control channel whose messages vLLM encodes
with msgpack: every argument and return value here is plain data (str, int, float, bool,
bytes, lists, dicts), never a tensor, callable or pickled object.

Data travels in a staging bucket the backend owns and the worker maps once: CUDA memory
shared by its IPC handle (same GPU, another process), or a shared-memory file (host memory).
A push is `mergetune_begin_push`, one `mergetune_load_bucket` per filled bucket, then
`mergetune_end_push`. Loading uses vLLM's layerwise reload (vllm.model_executor.model_loader.reload,
vLLM ≥ 0.16): the model's own `load_weights` takes checkpoint names and full tensors (fused
projections and tensor-parallel shards handled by vLLM), `process_weights_after_loading` runs per
layer once it is complete, and the processed values are copied into the parameters' original
storage, so CUDA graphs and torch.compile artifacts that captured those addresses stay valid.
This module imports nothing from vLLM at import time; it must import where vLLM is absent.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import torch

# Dtype names a bucket entry may carry (what `str(dtype)` gives without "torch.").
TENSOR_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def open_bucket(bucket: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The bucket a message describes, as a flat uint8 tensor mapped into this process (no copy)."""
    if bucket["transport"] == "cuda_ipc":
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        ipc = bucket["ipc"]
        size = int(ipc["size_bytes"])
        # The handle opens on this worker's device: logical indices differ between processes.
        return rebuild_cuda_tensor(
            torch.Tensor, (size,), (1,), 0, torch.UntypedStorage, torch.uint8,
            device.index if device.index is not None else torch.cuda.current_device(),
            ipc["handle"], size, int(ipc["offset_bytes"]), False,
            ipc["ref_counter_handle"], int(ipc["ref_counter_offset"]), ipc["event_handle"], bool(ipc["event_sync_required"]),
        )  # fmt: skip
    if bucket["transport"] == "shm":
        return torch.from_file(bucket["path"], shared=True, size=int(bucket["size_bytes"]), dtype=torch.uint8)
    raise ValueError(f"unknown bucket transport {bucket['transport']!r}")


def bucket_tensors(flat: torch.Tensor, entries: list[list[Any]]) -> list[tuple[str, torch.Tensor]]:
    """(name, view) for each `[name, dtype, shape, byte offset]` entry of a bucket."""
    views = []
    for name, dtype, shape, offset in entries:
        dt = TENSOR_DTYPES[dtype]
        numel = 1
        for d in shape:
            numel *= int(d)
        views.append((name, flat[offset : offset + numel * dt.itemsize].view(dt).view(tuple(int(d) for d in shape))))
    return views


def layerwise_reload() -> tuple[Any, Any]:
    """vLLM's in-place reload entry points: (initialize(model), finalize(model, model_config))."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    return initialize_layerwise_reload, finalize_layerwise_reload


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MergetuneWorkerExtension:
    """Methods vLLM adds to its worker for mergetune's weight push (names prefixed: vLLM refuses clashes)."""

    def mergetune_engine_info(self) -> dict[str, Any]:
        """Where this worker runs and what it holds: the backend picks the transport and bucket dtype from it."""
        device = torch.device(self.device)
        uuid = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
        parallel = self.parallel_config
        return {
            "pid": os.getpid(),
            "rank": int(self.rank),
            "world_size": int(parallel.world_size),
            "dtype": dtype_name(self.model_config.dtype),
            "device": str(device),
            "device_uuid": uuid,
            "quantization": self.model_config.quantization,
        }

    def mergetune_begin_push(self) -> dict[str, Any]:
        """Start a push; a push left open by a failed merge is finalized first (the next push rewrites every tensor)."""
        aborted = bool(getattr(self, "_mergetune_push", None))
        if aborted:
            self.mergetune_end_push()
        initialize, _ = layerwise_reload()
        initialize(self.get_model())
        self._mergetune_push = {"started": time.perf_counter(), "tensors": 0, "bytes": 0}
        return {"aborted_open_push": aborted}

    def mergetune_load_bucket(self, bucket: dict[str, Any], entries: list[list[Any]]) -> int:
        """Load one filled bucket through the model's own `load_weights`; returns how many tensors it held.

        Each tensor is copied out of the bucket first: vLLM's layerwise reload keeps the tensors of a
        layer until the layer is complete, and a layer may straddle two buckets, while the backend
        refills the same bucket as soon as this call returns.
        """
        if not getattr(self, "_mergetune_push", None):
            raise RuntimeError("mergetune_load_bucket outside a push; call mergetune_begin_push first")
        device = torch.device(self.device)
        cached = getattr(self, "_mergetune_bucket", None)
        if cached is None or cached[0] != bucket["key"]:
            cached = (bucket["key"], open_bucket(bucket, device))  # one bucket at a time: drop the old mapping
            self._mergetune_bucket = cached
        weights = [(name, view.to(device, copy=True)) for name, view in bucket_tensors(cached[1], entries)]
        self.get_model().load_weights(iter(weights))
        _synchronize(device)
        self._mergetune_push["tensors"] += len(weights)
        self._mergetune_push["bytes"] += sum(t.numel() * t.element_size() for _, t in weights)
        return len(weights)

    def mergetune_end_push(self) -> dict[str, Any]:
        """Finish the push: layers still waiting are processed and copied into their original storage."""
        push = getattr(self, "_mergetune_push", None)
        if not push:
            raise RuntimeError("mergetune_end_push without a push; call mergetune_begin_push first")
        _, finalize = layerwise_reload()
        try:
            finalize(self.get_model(), self.model_config)
            _synchronize(torch.device(self.device))
        finally:
            self._mergetune_push = None
        return {"tensors": push["tensors"], "bytes": push["bytes"], "seconds": time.perf_counter() - push["started"]}

    def mergetune_parameter_storage(self) -> str:
        """A digest of every parameter's (name, address, shape, dtype): unchanged by a push done in place."""
        digest = hashlib.sha256()
        for name, param in self.get_model().named_parameters():
            digest.update(f"{name}:{param.data_ptr()}:{tuple(param.shape)}:{param.dtype};".encode())
        return digest.hexdigest()
