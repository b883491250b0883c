"""The client side of the weight push: merged tensors → a bounded staging bucket → vLLM's workers, in place.

A merge hands each tensor to `VLLMWeightSink.write`, which copies it at once (the sink
contract: a written tensor is valid only during the call) into a staging bucket, cast to the
engine's dtype. A full bucket is announced to every worker with
`collective_rpc("mergetune_load_bucket", args=(bucket, entries))`: the bucket's transport
description (a CUDA IPC handle as bytes and ints, or a shared-memory file path) and one
`[name, dtype, shape, byte offset]` entry per tensor — plain msgpack data, a few KB, whatever
the model size. The worker extension (evaluators/vllm_worker.py) maps the bucket once and loads
the tensors through vLLM's own loader. After the last bucket the push is closed, and vLLM's
prefix cache is reset — and the reset confirmed — so no KV block computed under the old
weights is reused.

One bucket serves every push of a backend: `bucket_bytes` (default 1 GiB) bounds it, except
that a tensor larger than that gets a bucket of its own size.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergetune.evaluators.base import EvaluationFailed
from mergetune.evaluators.vllm_worker import TENSOR_DTYPES, dtype_name

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 1 << 30
ALIGN_BYTES = 256  # every tensor starts 256-byte aligned in the bucket (any dtype's view, coalesced copies)
RPC_TIMEOUT_S = 600.0  # one bucket's load; a worker that takes longer has hung
RESET_ATTEMPTS = 5
RESET_FIRST_WAIT_S = 0.1  # doubling: 0.1 + 0.2 + 0.4 + 0.8 s between the five attempts


class PrefixCacheNotReset(EvaluationFailed):
    """vLLM kept KV blocks computed under the previous weights; scoring now could reuse them."""


@dataclass(frozen=True)
class EngineInfo:
    """One vLLM worker as it describes itself (`mergetune_engine_info`)."""

    pid: int
    rank: int
    world_size: int
    dtype: torch.dtype
    device: str
    device_uuid: str | None
    quantization: str | None

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> EngineInfo:
        return cls(
            pid=int(reply["pid"]),
            rank=int(reply["rank"]),
            world_size=int(reply["world_size"]),
            dtype=TENSOR_DTYPES[reply["dtype"]],
            device=str(reply["device"]),
            device_uuid=reply.get("device_uuid"),
            quantization=reply.get("quantization"),
        )


def rpc(llm: Any, method: str, *args: Any) -> list[Any]:
    """`method` of our worker extension on every worker (by name: vLLM refuses to pickle callables)."""
    return llm.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args)


def cuda_device_uuid(device: torch.device) -> str | None:
    return str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None


def choose_transport(info: EngineInfo, merge_device: torch.device) -> str:
    """CUDA IPC when the merge runs on the engine's GPU in another process; else a shared-memory bucket.

    (CUDA IPC cannot open a handle in the process that made it, nor map another GPU's memory.)
    """
    if merge_device.type == "cuda" and info.pid != os.getpid() and info.device_uuid == cuda_device_uuid(merge_device):
        return "cuda_ipc"
    return "shm"


def shared_memory_dir(nbytes: int) -> str:
    """/dev/shm when it has room for the bucket (containers often give it 64 MB), else the temp dir."""
    try:
        stats = os.statvfs("/dev/shm")
        if stats.f_bavail * stats.f_frsize >= 2 * nbytes and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class WeightBucket:
    """A staging buffer the engine's workers map once: CUDA memory shared by IPC handle, or a shared file.

    `description` is what a worker needs to map it — plain data, sent with every bucket load.
    """

    def __init__(self, nbytes: int, transport: str, device: torch.device) -> None:
        self.nbytes = nbytes
        self.transport = transport
        key = f"{os.getpid()}-{uuid.uuid4().hex}"
        if transport == "cuda_ipc":
            self.flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
            (_, handle, size_bytes, offset_bytes, counter_handle, counter_offset, event_handle, event_sync) = (
                self.flat.untyped_storage()._share_cuda_()
            )
            ipc = {
                "handle": bytes(handle),
                "size_bytes": int(size_bytes),
                "offset_bytes": int(offset_bytes),
                "ref_counter_handle": bytes(counter_handle),
                "ref_counter_offset": int(counter_offset),
                "event_handle": None if event_handle is None else bytes(event_handle),
                "event_sync_required": bool(event_sync),
            }
            self.description: dict[str, Any] = {"transport": transport, "key": key, "ipc": ipc}
            self._unlink = None
        elif transport == "shm":
            fd, path = tempfile.mkstemp(prefix="mergetune-bucket-", dir=shared_memory_dir(nbytes))
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
            self.flat = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            self.description = {"transport": transport, "key": key, "path": path, "size_bytes": nbytes}
            self._unlink = weakref.finalize(self, _unlink, path)
        else:
            raise ValueError(f"unknown bucket transport {transport!r}")

    def slot(self, offset: int, dtype: torch.dtype, shape: torch.Size) -> Tensor:
        """The bucket's bytes at `offset` as a tensor of `dtype` and `shape`."""
        return self.flat[offset : offset + shape.numel() * dtype.itemsize].view(dtype).view(shape)

    def ready(self) -> None:
        """Wait until every copy into the bucket has landed (the worker reads it on another stream/process)."""
        if self.flat.is_cuda:
            torch.cuda.synchronize(self.flat.device)

    def close(self) -> None:
        self.flat = torch.empty(0, dtype=torch.uint8)
        if self._unlink is not None:
            self._unlink()


def reset_prefix_cache_confirmed(llm: Any, attempts: int, first_wait_s: float) -> int:
    """`llm.reset_prefix_cache()` until it reports success (it refuses while KV blocks are in use);
    returns the attempts it took, or raises PrefixCacheNotReset."""
    wait = first_wait_s
    for attempt in range(1, attempts + 1):
        if llm.reset_prefix_cache() is True:
            return attempt
        if attempt < attempts:
            time.sleep(wait)
            wait *= 2
    raise PrefixCacheNotReset(
        f"vLLM's prefix cache could not be reset after the weight push ({attempts} attempts): KV blocks are "
        "still in use, so cached KV from the previous weights could be reused; the trial is failed instead"
    )


class WeightPusher:
    """Streams one merge at a time into the engine: tensors → bucket (engine dtype) → workers; then the cache reset."""

    def __init__(self, llm: Any, info: EngineInfo, transport: str, device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.llm = llm
        self.info = info
        self.transport = transport
        self.device = device
        self.bucket_bytes = bucket_bytes
        self.reset_attempts = RESET_ATTEMPTS
        self.reset_first_wait_s = RESET_FIRST_WAIT_S
        self.bucket: WeightBucket | None = None
        self._entries: list[list[Any]] = []
        self._used = 0
        self._open = False
        self._pushed = {"tensors": 0, "bytes": 0, "buckets": 0, "seconds": 0.0}
        self.last_push: dict[str, float] = {}

    def begin(self) -> None:
        """Start a merge's push afresh: whatever a failed merge left unsent is dropped (the workers finalize a
        push left open when the next one begins; vLLM's layerwise reload ignores a second load of a layer)."""
        self._entries, self._used, self._open = [], 0, False
        self._pushed = {"tensors": 0, "bytes": 0, "buckets": 0, "seconds": 0.0}

    def add(self, name: str, tensor: Tensor) -> None:
        """Copy `tensor` into the bucket (in the engine's dtype if floating); full buckets go out first."""
        started = time.perf_counter()
        dtype = self.info.dtype if tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * dtype.itemsize
        if self.bucket is None or self._used + nbytes > self.bucket.nbytes:
            self._flush()
            if self.bucket is None or nbytes > self.bucket.nbytes:
                self._replace_bucket(max(self.bucket_bytes, nbytes))
        offset = self._used
        with torch.no_grad():
            self.bucket.slot(offset, dtype, tensor.shape).copy_(tensor)
        self._entries.append([name, dtype_name(dtype), list(tensor.shape), offset])
        self._used = -(-(offset + nbytes) // ALIGN_BYTES) * ALIGN_BYTES
        self._pushed["tensors"] += 1
        self._pushed["bytes"] += nbytes
        self._pushed["seconds"] += time.perf_counter() - started

    def finish(self) -> dict[str, float]:
        """Send the last bucket, close the push on every worker, reset the prefix cache; returns the push's stats."""
        started = time.perf_counter()
        self._flush()
        if self._open:
            self._open = False
            replies = rpc(self.llm, "mergetune_end_push")
            loaded = {int(reply["tensors"]) for reply in replies}
            if loaded != {self._pushed["tensors"]}:
                raise RuntimeError(f"the engine loaded {sorted(loaded)} tensors of the {self._pushed['tensors']} pushed")
            self._pushed["reset_attempts"] = reset_prefix_cache_confirmed(self.llm, self.reset_attempts, self.reset_first_wait_s)
        self._pushed["seconds"] += time.perf_counter() - started
        self.last_push, self._pushed = self._pushed, {"tensors": 0, "bytes": 0, "buckets": 0, "seconds": 0.0}
        return self.last_push

    def close(self) -> None:
        if self.bucket is not None:
            self.bucket.close()
            self.bucket = None

    def _replace_bucket(self, nbytes: int) -> None:
        self.close()
        self.bucket = WeightBucket(nbytes, self.transport, self.device)
        log.info("vLLM push bucket: %.1f MiB (%s)", nbytes / 2**20, self.transport)

    def _flush(self) -> None:
        if not self._entries:
            return
        if not self._open:
            rpc(self.llm, "mergetune_begin_push")
            self._open = True
        self.bucket.ready()
        counts = rpc(self.llm, "mergetune_load_bucket", self.bucket.description, self._entries)
        if any(int(count) != len(self._entries) for count in counts):
            raise RuntimeError(f"a vLLM worker loaded {counts} of the bucket's {len(self._entries)} tensors")
        self._pushed["buckets"] += 1
        self._entries, self._used = [], 0


class VLLMWeightSink:
    """A merge's sink into a vLLM engine: each tensor is copied into the push bucket at `write` (renamed to
    the names vLLM's loader expects); `close` sends the rest and confirms the prefix-cache reset."""

    def __init__(self, pusher: WeightPusher, rename: Any) -> None:
        self._pusher = pusher
        self._rename = rename
        pusher.begin()

    def write(self, name: str, tensor: Tensor) -> None:
        self._pusher.add(self._rename(name), tensor)

    def close(self) -> None:
        self._pusher.finish()
