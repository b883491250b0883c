"""Where merged tensors go: a loaded model's parameters (in place) or files on disk."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from mergetune.merge.live_names import NameMap


class Sink(Protocol):
    """Receives each merged tensor once, by its name in the checkpoint; `close` ends the merge.

    The contract, which every merge loop and sink keeps:
    - A tensor handed to `write` is valid only during the call. The merge may hand over a
      view of a scratch buffer it reuses for the next tensor, or a resident input it owns.
      A sink that keeps data past `write` copies it (into its model, file or push bucket,
      in its own dtype) before returning; it never keeps a reference, and never writes
      into the tensor it was given.
    - `write` may be called for the tensors in any order; `close` is called once, after the
      last `write` of a successful merge (a failed merge may end without it).
    """

    def write(self, name: str, tensor: Tensor) -> None: ...

    def close(self) -> None: ...


class LiveModelSink:
    """Copies merged tensors into an already-loaded model's parameters and buffers, in place.

    Tensors arrive under their checkpoint names and land where transformers loads them (its
    renaming on load, e.g. GPT-NeoX `embed_out.weight` → `lm_head.weight`); a tensor transformers
    drops on load (stale buffers) is dropped here too. No reallocation: the model's storage (and
    anything holding a view of it) stays valid, so an evaluator can score the model right after
    the merge. The one exception: a merge that writes both of two tied tensors (a tied base merged
    with untied experts) unties the second once, as transformers does when it loads such a model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._names = NameMap(model)
        self._live: dict[str, str | None] = {}  # checkpoint name → live name (None: dropped), as met
        self._targets: dict[str, Tensor] = dict(model.state_dict(keep_vars=True))
        self._written: set[str] = set()
        storage: dict[int, list[str]] = {}
        for name, target in self._targets.items():
            storage.setdefault(target.data_ptr(), []).append(name)
        self._tied = {name: [o for o in names if o != name] for names in storage.values() if len(names) > 1 for name in names}

    def write(self, name: str, tensor: Tensor) -> None:
        live = self._live_name(name)
        if live is None:
            return
        target = self._targets.get(live)
        if target is None:
            raise KeyError(f"the live model has no tensor {name!r}" + (f" (nor {live!r}, its name once loaded)" if live != name else ""))
        with torch.no_grad():
            self._claim(live, target).copy_(tensor)

    def place(self, name: str, numel: int, device: torch.device) -> Tensor | None:
        """The flat storage on `device` that tensor `name` (`numel` entries) lands in, for a merge that writes it
        there slice by slice instead of calling `write` (it counts as written); None where it must go through
        `write` (dropped, elsewhere, another size: `write` says why)."""
        live = self._live_name(name)
        target = self._targets.get(live) if live is not None else None
        if target is None or target.numel() != numel or target.device != device or not target.is_contiguous():
            return None
        return self._claim(live, target).detach().view(-1)

    def _live_name(self, name: str) -> str | None:
        """Where checkpoint tensor `name` lives in the model (None: dropped on load), resolved once."""
        if name not in self._live:
            self._live[name] = None if self._names.dropped(name) else self._names.to_live(name)
        return self._live[name]

    def _claim(self, live: str, target: Tensor) -> Tensor:
        """`target` (untied first if its tied twin was written already), marked written."""
        if any(other in self._written for other in self._tied.get(live, ())):
            target = self._untie(live, target)
        self._written.add(live)
        return target

    def _untie(self, name: str, target: Tensor) -> Tensor:
        owner, _, attr = name.rpartition(".")
        untied = torch.nn.Parameter(target.detach().clone(), requires_grad=target.requires_grad)
        setattr(self._model.get_submodule(owner), attr, untied)
        for other in self._tied.pop(name, ()):
            self._tied[other] = [o for o in self._tied.get(other, ()) if o != name]
        self._targets[name] = untied
        return untied

    def close(self) -> None:
        self._written.clear()


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
# Weights, their indexes and the card are written fresh; everything else in the template
# directory (config, generation config, tokenizer files, chat template) is copied.
NOT_COPIED_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf"}
NOT_COPIED_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json", "README.md"}


class SafetensorsSink:
    """Writes a Hugging Face model directory: safetensors shards (+ index), config and tokenizer, a card.

    The layout (names, dtypes, shapes) is known before the merge, so every shard's header is
    written first and each tensor goes straight to its offset: no shard is buffered in memory,
    and tensors may arrive in any order. Tensors are cast to the layout's dtype.
    Use inside `core.fs.atomic_output_dir` so a failed merge leaves nothing behind.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        layout: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        template_dir: str | os.PathLike | None = None,
        max_shard_bytes: int = 5 * 1024**3,
        model_card: str | None = None,
        untie: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.layout = layout
        self.template_dir = Path(template_dir) if template_dir is not None else None
        self.model_card = model_card
        self.untie = untie
        self._place: dict[str, tuple[int, int, int]] = {}  # name → (shard, byte offset in file, byte length)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (dtype, shape) in layout.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._fds: list[int] = []
        self._written: set[str] = set()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for i, names in enumerate(shards):
            self._fds.append(self._start_shard(self.out_dir / self.files[i], i, names))

    def _start_shard(self, path: Path, shard: int, names: list[str]) -> int:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        spans: dict[str, tuple[int, int]] = {}
        offset = 0
        for name in names:
            dtype, shape = self.layout[name]
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            spans[name] = (offset, nbytes)
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        data_start = 8 + len(raw)
        for name, (start, nbytes) in spans.items():
            self._place[name] = (shard, data_start + start, nbytes)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(fd, data_start + offset)
        return fd

    def write(self, name: str, tensor: Tensor) -> None:
        if name not in self.layout:
            raise KeyError(f"the output model has no tensor {name!r}")
        dtype, shape = self.layout[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: shape {list(tensor.shape)}, the output expects {list(shape)}")
        data = tensor.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy()
        shard, offset, nbytes = self._place[name]
        view = memoryview(data)
        done = 0
        while done < nbytes:  # pwrite may write less than asked for large buffers
            done += os.pwrite(self._fds[shard], view[done:], offset + done)
        self._written.add(name)

    def close(self) -> None:
        """Finish the directory: check every tensor arrived, write the index, copy config and tokenizer."""
        self._close_files()
        missing = next((name for name in self.layout if name not in self._written), None)
        if missing is not None:
            raise ValueError(f"merge ended with {len(self.layout) - len(self._written)} tensors unwritten, e.g. {missing!r}")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(nbytes for _, _, nbytes in self._place.values())},
                "weight_map": {name: self.files[shard] for name, (shard, _, _) in self._place.items()},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if self.template_dir is not None:
            self._copy_template()
        if self.model_card is not None:
            (self.out_dir / "README.md").write_text(self.model_card)

    def _copy_template(self) -> None:
        for src in sorted(self.template_dir.iterdir()):
            if src.is_file() and src.suffix not in NOT_COPIED_SUFFIXES and src.name not in NOT_COPIED_NAMES:
                shutil.copy2(src, self.out_dir / src.name)
        config = self.out_dir / "config.json"
        dtypes = {dtype for dtype, _ in self.layout.values() if dtype.is_floating_point}
        if config.is_file() and (len(dtypes) == 1 or self.untie):
            data = json.loads(config.read_text())
            if len(dtypes) == 1:
                (dtype,) = dtypes
                for key in ("dtype", "torch_dtype"):
                    if key in data:
                        data[key] = str(dtype).removeprefix("torch.")
            if self.untie:  # a head of its own: every loader (vLLM's too) must read it, not the embeddings
                for section in (data, data.get("text_config")):
                    if isinstance(section, dict) and section.get("tie_word_embeddings"):
                        section["tie_word_embeddings"] = False
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def _close_files(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> SafetensorsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_files()
