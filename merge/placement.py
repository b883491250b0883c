"""Where a search worker's inputs live, as stored (bf16 stays bf16): on its device, or mapped in host memory.

- `device`: every stored tensor copied once into the worker's device memory (fast; small models).
- `host`: the safetensors files memory-mapped. The OS page cache holds ONE copy per node, shared
  by every worker process that maps the same files — no loader process, no object store to size,
  nothing to lose when a worker dies. A CUDA worker streams each tensor to the device through
  pinned staging slabs on a side stream; the next tensor's inputs are copied while the current
  one is merged.

(Ray's object store would also share one copy per node, but its objects die with the process
that put them, its size must be configured to hold every input, and each node pulls the inputs
from the owner's node instead of reading its local files; see benchmarks/scale.py for the
measured comparison of the two on one node.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from mergetune.merge.modelset import ModelSet
from mergetune.merge.safetensors_io import MappedFile, TensorInfo

log = logging.getLogger(__name__)

Placement = Literal["device", "host"]
PLACEMENTS: tuple[str, ...] = ("device", "host")
Key = tuple[Path, str]  # (file, entry name): one stored tensor
SLAB_BYTES = 512 * 1024**2  # one tensor's inputs that fit are prefetched whole (Llama-3-8B: every layer tensor)
PIECE_BYTES = 64 * 1024**2  # larger inputs (embeddings, heads) stream in pieces of this size
ALIGN = 256


def stored_entries(modelset: ModelSet) -> dict[Key, TensorInfo]:
    """Every stored tensor a merge may read: the weights of the base and experts, and every statistics entry."""
    entries: dict[Key, TensorInfo] = {}
    for ckpt in ([modelset.base] if modelset.base is not None else []) + list(modelset.experts.values()):
        for name, info in ckpt.infos.items():
            entries[(ckpt.files[name], name)] = info
    for files in modelset.stats.values():
        for stats in files.values():
            for key, info in stats.infos.items():
                entries[(stats.path, key)] = info
    return entries


def _record(device: torch.device, stream: torch.cuda.Stream | None = None) -> torch.cuda.Event | None:
    """An event marking the work queued so far on `stream` (the current one by default); None off CUDA."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _stream_context(stream: torch.cuda.Stream | None):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class HostToDevice:
    """Copies memory-mapped host tensors to the device through pinned staging buffers.

    Two slabs of `slab_bytes` (pinned on the host, mirrored on the device) take whole tensors'
    inputs: `prefetch` fills the next slab from a background thread (page cache → pinned memory)
    and queues the DMA on a side stream, so it overlaps the merge of the current tensor.
    Inputs too large for a slab go through two smaller pieces in `fill`, alternating, so reading
    piece j+1 from the page cache overlaps the DMA and conversion of piece j. Off CUDA (tests) the
    same code runs with plain memory and no streams.
    """

    def __init__(self, device: torch.device, slab_bytes: int | None = None, piece_bytes: int | None = None) -> None:
        cuda = device.type == "cuda"
        slab_bytes = SLAB_BYTES if slab_bytes is None else slab_bytes
        piece_bytes = PIECE_BYTES if piece_bytes is None else piece_bytes
        self.device = device
        self.slab_bytes = slab_bytes
        self._host_slabs = [torch.empty(slab_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self._device_slabs = [torch.empty(slab_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self._host_pieces = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self._device_pieces = [torch.empty(piece_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self._slab_free: list[torch.cuda.Event | None] = [None, None]
        self._piece_free: list[torch.cuda.Event | None] = [None, None]
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="h2d")
        self._next_slab = 0
        self._next_piece = 0

    @staticmethod
    def fits(tensors: list[Tensor], slab_bytes: int) -> bool:
        return sum(-(-t.numel() * t.element_size() // ALIGN) * ALIGN for t in tensors) <= slab_bytes

    def prefetch(self, tensors: list[Tensor]) -> tuple[int, Future] | None:
        """Start copying `tensors` into the next slab; None when they do not fit in one (then use `fill`)."""
        if not self.fits(tensors, self.slab_bytes):
            return None
        slab, self._next_slab = self._next_slab, 1 - self._next_slab
        return slab, self._thread.submit(self._upload, slab, tensors)

    def _upload(self, slab: int, tensors: list[Tensor]) -> tuple[list[Tensor], torch.cuda.Event | None]:
        if self._slab_free[slab] is not None:
            self._slab_free[slab].synchronize()  # its last contents were converted: host and device side are free
        host, dev = self._host_slabs[slab], self._device_slabs[slab]
        views, offset = [], 0
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            for t in tensors:
                n = t.numel() * t.element_size()
                host_view = host[offset : offset + n].view(t.dtype)
                host_view.copy_(t.reshape(-1))  # page cache → pinned, off the main thread
                dev_view = dev[offset : offset + n].view(t.dtype)
                with _stream_context(self._stream):
                    dev_view.copy_(host_view, non_blocking=True)
                views.append(dev_view.view(t.shape))
                offset += -(-n // ALIGN) * ALIGN
            return views, _record(self.device, self._stream)

    def fetch(self, ticket: tuple[int, Future]) -> list[Tensor]:
        """The device copies of a prefetch (stored dtype), ordered before any later work on the current stream."""
        views, copied = ticket[1].result()
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        return views

    def release(self, ticket: tuple[int, Future]) -> None:
        """The current stream is done with this prefetch's slab once the work queued so far has run."""
        self._slab_free[ticket[0]] = _record(self.device)

    def fill(self, out: Tensor, src: Tensor) -> Tensor:
        """out (float32, on the device) ← src (a host tensor in its stored dtype), piece by piece; same shape, flat."""
        per_piece = self._host_pieces[0].numel() // src.element_size()
        flat_out, flat_src = out.view(-1), src.reshape(-1)
        for start in range(0, flat_src.numel(), per_piece):
            stop = min(start + per_piece, flat_src.numel())
            i, self._next_piece = self._next_piece, 1 - self._next_piece
            if self._piece_free[i] is not None:
                self._piece_free[i].synchronize()
            n = (stop - start) * src.element_size()
            host = self._host_pieces[i][:n].view(src.dtype)
            host.copy_(flat_src[start:stop])
            dev = self._device_pieces[i][:n].view(src.dtype)
            with _stream_context(self._stream):
                dev.copy_(host, non_blocking=True)
                copied = _record(self.device, self._stream)
            if copied is not None:
                torch.cuda.current_stream(self.device).wait_event(copied)
            flat_out[start:stop].copy_(dev)
            self._piece_free[i] = _record(self.device)
        return out

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class Staged:
    """One tensor's stored inputs during its merge: device copies when they were prefetched, else where they live."""

    def __init__(self, tensors: dict[Key, Tensor], stager: HostToDevice | None) -> None:
        self._tensors = tensors
        self._stager = stager  # None: the tensors are where a plain copy reaches them

    def tensor(self, key: Key) -> Tensor:
        return self._tensors[key]

    @property
    def streams(self) -> bool:
        """Whether the inputs still have to be copied to the device (`fill`), rather than read where they are (`flat`)."""
        return self._stager is not None

    def flat(self, key: Key) -> Tensor:
        """The stored tensor `key`, flattened, where it is (device memory, a prefetched slab, the host mapping)."""
        return self._tensors[key].reshape(-1)

    def fill(self, out: Tensor, key: Key, start: int | None = None, stop: int | None = None) -> Tensor:
        """out ← elements [start, stop) of the flattened stored tensor `key`, as float32 (exact: a widening copy)."""
        src = self._tensors[key]
        if start is not None:
            src = src.reshape(-1)[start:stop]
        if self._stager is None:
            return out.copy_(src.reshape(out.shape))
        return self._stager.fill(out, src.reshape(out.shape))


class ResidentInputs:
    """The stored tensors of a model set in one placement, handed out tensor by tensor (`staged`)."""

    def __init__(self, modelset: ModelSet, device: str | torch.device, placement: Placement, staged: bool | None = None) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
        self.device = torch.device(device)
        self.placement = placement
        entries = stored_entries(modelset)
        maps = {path: MappedFile(path) for path in sorted({path for path, _ in entries})}
        self._tensors: dict[Key, Tensor] = {}
        for (path, name), info in entries.items():
            view = maps[path].tensor(info)
            if placement == "device":
                view = view.to(self.device, copy=True)
            elif view.data_ptr() % max(info.dtype.itemsize, 1):
                view = view.clone()  # misaligned in its file: a private copy keeps kernels on aligned data
                log.warning("%s: tensor %s is not aligned in its file; this worker keeps a private copy", path, name)
            self._tensors[(path, name)] = view
        if placement == "host":
            self._maps = maps  # the views need the mappings alive
            for mapped in maps.values():
                mapped.prefetch()
        stage = placement == "host" and (self.device.type == "cuda" if staged is None else staged)
        self._stager = HostToDevice(self.device) if stage else None
        self._pending: dict[tuple[Key, ...], tuple[int, Future]] = {}

    @property
    def tensors(self) -> dict[Key, Tensor]:
        """Every stored tensor held, by (file, entry)."""
        return dict(self._tensors)

    def stored(self, key: Key) -> Tensor:
        """The stored tensor where it lives (device memory, or the host mapping)."""
        return self._tensors[key]

    @contextlib.contextmanager
    def staged(self, keys: list[Key], next_keys: list[Key] | None = None) -> Iterator[Staged]:
        """The inputs `keys` of one tensor for the duration of its merge; starts prefetching `next_keys`."""
        ticket = self._pending.pop(tuple(keys), None) if self._stager is not None else None
        if self._stager is not None and next_keys and tuple(next_keys) not in self._pending:
            next_ticket = self._stager.prefetch([self._tensors[k] for k in next_keys])
            if next_ticket is not None:
                self._pending[tuple(next_keys)] = next_ticket
        if ticket is None:
            yield Staged({k: self._tensors[k] for k in keys}, self._stager)
            return
        views = self._stager.fetch(ticket)
        try:
            yield Staged(dict(zip(keys, views)), None)
        finally:
            self._stager.release(ticket)

    def drop_prefetches(self) -> None:
        """Forget prefetches no merge will use (a merge that stopped early); waits for their copies."""
        for ticket in self._pending.values():
            ticket[1].result()
            self._stager.release(ticket)
        self._pending.clear()

    def close(self) -> None:
        if self._stager is not None:
            self.drop_prefetches()
            self._stager.close()
