"""The search worker's merge: inputs held as stored, each tensor rebuilt in float32 in a small workspace and merged.

`ResidentModelSet` keeps the base, the experts and their statistics in their stored dtypes
(bf16 stays bf16; rank-1 moments stay row and column sums) in a `placement`, and per trial
merges every tensor straight into a sink (usually the evaluator's live model). Only one
tensor at a time exists in float32: its base θ₀, task vectors τ_k = θ_k − θ₀ and statistics,
in reusable buffers (`Workspace`); the methods' own temporaries come and go with the tensor.
Sliceable rules (linear, task arithmetic, the TIES/DARE/DELLA/breadcrumbs family, OTA: the
registry's `sliceable`) run slice by slice, so their workspace stays small even for a
128256×4096 embedding; their per-tensor order statistics (`summaries.ModelSummaries`) are
computed once per worker. Every path makes the same float32 inputs and runs the same
functions as the disk engine (`ruleplan.py`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from mergetune.merge.kernels import kernels_for
from mergetune.merge.methods.registry import StoredSlice
from mergetune.merge.modelset import Checkpoint, ModelSet, rebuild_stat
from mergetune.merge.moments import rank1_slice
from mergetune.merge.placement import Key, Placement, ResidentInputs, Staged
from mergetune.merge.recipe import Recipe
from mergetune.merge.ruleplan import CHUNK_ELEMENTS, RulePlan, chunk_elements, complete_stats, merge_inputs, merge_sliced, tensor_schedule
from mergetune.merge.sinks import LiveModelSink, Sink
from mergetune.merge.summaries import ModelSummaries
from mergetune.merge.thresholds import SummaryThresholds

log = logging.getLogger(__name__)

__all__ = ["CHUNK_ELEMENTS", "ResidentModelSet", "Workspace", "chunk_elements", "largest_stat", "largest_tensor", "workspace_roles"]


def largest_tensor(modelset: ModelSet) -> tuple[str, int]:
    """(name, elements) of the model set's largest tensor: the size of every full workspace buffer."""
    name, info = max(modelset.reference.infos.items(), key=lambda item: item[1].numel)
    return name, info.numel


def largest_stat(modelset: ModelSet, kind: str) -> int:
    """Elements of the largest full statistic of `kind` (rank-1 moments count at their expanded size)."""
    return max((math.prod(stats.shape(key)) for stats in modelset.stats[kind].values() for key in stats.keys()), default=0)


def workspace_roles(
    sliced: bool, experts: int, stat_elements: dict[str, int], largest: int, chunk: int, staged: bool = False, live_model: bool = False
) -> dict[object, int]:
    """The float32 buffers (role → elements) a rule allocates in the workspace, kept for the worker's life.

    A method gets the base, each expert's input and each statistic at the largest tensor's size.
    A sliced rule gets its output at that size — unless it merges into a `live_model` (`LiveModelSink.place`:
    slices go straight into the model's storage) — and slices of `chunk` elements for its statistics —
    the method's own buffers when no tensor is larger than one slice; its base and experts are read
    as stored.
    """
    if sliced:
        # The base and experts reach the method as stored (views); only inputs streamed from the host to a
        # GPU (`staged`) are copied, slice by slice, into float32 buffers.
        prefix, size = ("chunk.", chunk) if chunk < largest else ("", None)
        roles: dict[object, int] = {} if live_model else {"out": largest}
        if staged:
            roles.update({prefix + "base": size or largest, **{(prefix + "input", k): size or largest for k in range(experts)}})
        for kind, elements in stat_elements.items():
            roles.update({(prefix + "stat", kind, k): size or elements for k in range(experts)})
        return roles
    roles = {"base": largest, **{("input", k): largest for k in range(experts)}}
    for kind, elements in stat_elements.items():
        roles.update({("stat", kind, k): elements for k in range(experts)})
    return roles


class Workspace:
    """Reusable float32 buffers on the device, one per role, each allocated once at the size it will ever need."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[object, Tensor] = {}

    def buffer(self, role: object, size: int, shape: tuple[int, ...] | None = None) -> Tensor:
        """The buffer of `role` (allocated with `size` elements on first use), as a view of `shape` (flat if None)."""
        if role not in self._buffers:
            self._buffers[role] = torch.empty(size, dtype=torch.float32, device=self.device)
        flat = self._buffers[role]
        n = math.prod(shape) if shape is not None else size
        return flat[:n].view(shape) if shape is not None else flat[:n]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    @property
    def sizes(self) -> dict[object, int]:
        """Elements of each role's buffer."""
        return {role: t.numel() for role, t in self._buffers.items()}


class ResidentModelSet:
    """A model set's inputs in one placement, re-merged per trial (`merge_into`); global thresholds cached across trials."""

    def __init__(self, modelset: ModelSet, inputs: ResidentInputs) -> None:
        self.modelset = modelset
        self.inputs = inputs
        self.device = inputs.device
        self.placement: Placement = inputs.placement
        self.workspace = Workspace(self.device)
        self._largest = largest_tensor(modelset)[1]
        self._stat_sizes = {kind: largest_stat(modelset, kind) for kind in modelset.stats}
        ranks_device = self.device if self.placement == "device" else torch.device("cpu")
        self.kernels = kernels_for(sum(info.numel for info in modelset.reference.infos.values()), "resident")
        self.summaries = ModelSummaries(
            modelset.tensor_names,
            self._task_vector,
            self._moments,
            lambda e, n: self._stat_entries("moments", e, n) is not None,
            self._summary_sources,
            ranks_device,
        )
        self.thresholds = SummaryThresholds(self.summaries.orders_of)

    @classmethod
    def load(
        cls,
        modelset: ModelSet,
        device: str = "cpu",
        placement: Placement = "device",
        staged: bool | None = None,
        orders: tuple[str, ...] = (),
        threads: int | None = None,
        cache: Path | None = None,
    ) -> ResidentModelSet:
        """Hold `modelset`'s inputs on `device` or mapped in host memory (`placement`); `staged` forces (or
        forbids) the pinned host-to-device path, which is otherwise used for host placement on CUDA.
        `orders` (`registry.ORDER_KINDS`) are computed now for every expert and tensor, in `threads` threads
        (torch's thread count by default), once per node when a `cache` directory is given (`summary_files`);
        any other is computed in this worker when a merge first needs it."""
        started = time.perf_counter()
        inputs = ResidentInputs(modelset, device, placement, staged=staged)
        resident = cls(modelset, inputs)
        loaded = time.perf_counter()
        resident.summaries.precompute(orders, modelset.experts, threads or torch.get_num_threads(), cache)
        log.info(
            "model set resident (%s placement, device %s) in %.1fs, order statistics in %.1fs",
            placement, device, loaded - started, time.perf_counter() - loaded,
        )  # fmt: skip
        return resident

    # --- keys of stored tensors ---
    @staticmethod
    def _weight(ckpt: Checkpoint, name: str) -> Key:
        return (ckpt.files[name], name)

    def _stat_entries(self, kind: str, expert: str, name: str) -> tuple[tuple[int, ...], list[Key]] | None:
        """(full shape, stored entries) of an expert's statistic for tensor `name`, or None if it has none."""
        stats = self.modelset.stats[kind].get(expert)
        key = stats.key(name) if stats is not None else None
        return None if key is None else (stats.shape(key), [(stats.path, k) for k in stats.stored_keys(key)])

    def _keys(self, name: str, plan: RulePlan | None) -> list[Key]:
        """Every stored tensor the merge of `name` reads, in a fixed order."""
        ms = self.modelset
        if plan is None:
            return [self._weight(ms.reference, name)]
        keys = [self._weight(ms.base, name)] if ms.base is not None else []
        keys += [self._weight(ms.experts[e], name) for e in plan.experts]
        for kind in plan.stats:
            for e in plan.experts:
                found = self._stat_entries(kind, e, name)
                keys += found[1] if found is not None else []
        return keys

    # --- the per-trial merge ---
    def merge_into(self, recipe: Recipe, sink: Sink, seed: int) -> dict[str, float]:
        """Merge the recipe into `sink` tensor by tensor; returns timings (seconds).

        A tensor handed to `sink.write` may be a workspace view: valid only during the call. A sliceable rule's
        tensor goes straight into a live model's storage (`LiveModelSink.place`), each slice converted to its
        dtype there: no float32 copy of the whole tensor is written and read again.
        """
        schedule = tensor_schedule(self.modelset, recipe)
        keys = [self._keys(name, plan) for name, plan in schedule]
        compute = write = 0.0
        self.inputs.drop_prefetches()
        for i, (name, plan) in enumerate(schedule):
            started = time.perf_counter()
            placed = None
            if plan is not None and plan.sliceable and isinstance(sink, LiveModelSink):
                placed = sink.place(name, self.modelset.reference.infos[name].numel, self.device)
            with self.inputs.staged(keys[i], keys[i + 1] if i + 1 < len(keys) else None) as staged:
                out = self._merge_tensor(name, plan, staged, seed, placed)
                computed = time.perf_counter()
                if placed is None:
                    sink.write(name, out)
                del out  # before the next tensor's temporaries: one merged tensor alive at a time
            compute += computed - started
            write += time.perf_counter() - computed
        sink.close()
        return {"merge_compute_s": compute, "merge_write_s": write}

    def _merge_tensor(self, name: str, plan: RulePlan | None, staged: Staged, seed: int, placed: Tensor | None = None) -> Tensor:
        ms = self.modelset
        if plan is None:
            return staged.tensor(self._weight(ms.reference, name))
        if plan.sliceable:
            return self._merge_in_slices(name, plan, staged, seed, placed)
        shape = ms.reference.infos[name].shape
        has_base = ms.base is not None
        base = staged.fill(self.workspace.buffer("base", self._largest, shape), self._weight(ms.base, name)) if has_base else None
        inputs = []
        for k, expert in enumerate(plan.experts):
            t = staged.fill(self.workspace.buffer(("input", k), self._largest, shape), self._weight(ms.experts[expert], name))
            inputs.append(t.sub_(base) if plan.uses_deltas(has_base) else t)
        stats = {kind: complete_stats([self._stat(kind, k, e, name, staged) for k, e in enumerate(plan.experts)]) for kind in plan.stats}
        return merge_inputs(plan, name, base, inputs, stats, seed, self.thresholds)

    def _stat(self, kind: str, k: int, expert: str, name: str, staged: Staged) -> Tensor | None:
        found = self._stat_entries(kind, expert, name)
        if found is None:
            return None
        shape, entries = found
        out = self.workspace.buffer(("stat", kind, k), self._stat_sizes[kind], shape)
        if len(entries) == 1:
            return staged.fill(out, entries[0])
        row, col = (staged.tensor(key).to(self.device) for key in entries)  # rank-1: two small vectors
        return rebuild_stat([row, col], out=out)

    def _merge_in_slices(self, name: str, plan: RulePlan, staged: Staged, seed: int, placed: Tensor | None = None) -> Tensor:
        """A sliceable rule, slice by slice of the flattened tensors, into `placed` (the sink's storage) or the
        `out` buffer (same bytes as whole).

        The base and experts go to the method as stored (views of the staged inputs: no float32 copies); the
        statistics are filled in float32 slice buffers (rank-1 moments expanded for the slice only).
        """
        ms = self.modelset
        info = ms.reference.infos[name]
        stat_sizes = {kind: self._stat_sizes[kind] for kind in plan.stats}
        chunk = min(self._largest, chunk_elements(self.device.type, self.kernels.compiled))
        roles = workspace_roles(True, len(plan.experts), stat_sizes, self._largest, chunk, staged.streams)
        prefix = "chunk." if chunk < self._largest else ""
        base_key = self._weight(ms.base, name) if ms.base is not None else None
        expert_keys = [self._weight(ms.experts[e], name) for e in plan.experts]
        stats = {kind: [self._stat_entries(kind, e, name) for e in plan.experts] for kind in plan.stats}

        def stored(role: object, key: Key, start: int, stop: int) -> Tensor:
            if not staged.streams:
                return staged.flat(key)[start:stop]
            return staged.fill(self.workspace.buffer(role, roles[role])[: stop - start], key, start, stop)

        def fetch(start: int, stop: int):
            sliced_stats = {}
            for kind, entries in stats.items():
                tensors = []
                for k, found in enumerate(entries):
                    if found is None:
                        tensors.append(None)
                        continue
                    shape, keys = found
                    out = self.workspace.buffer((prefix + "stat", kind, k), roles[(prefix + "stat", kind, k)])[: stop - start]
                    if len(keys) == 1:
                        tensors.append(staged.fill(out, keys[0], start, stop))
                    else:  # rank-1: two small vectors, their factors for the slice (expanded in the kernel)
                        row, col = (staged.tensor(key).to(self.device, torch.float32) for key in keys)
                        tensors.append(rank1_slice(row, col, start, stop, out=out))
                sliced_stats[kind] = complete_stats(tensors)
            base = None if base_key is None else stored(prefix + "base", base_key, start, stop)
            models = [stored((prefix + "input", k), key, start, stop) for k, key in enumerate(expert_keys)]
            return StoredSlice(base, models), sliced_stats

        summaries = self.summaries.for_tensor(name, plan.experts) if plan.uses_deltas(ms.base is not None) else None
        out = placed if placed is not None else self.workspace.buffer("out", self._largest)

        def scratch(role: object) -> Tensor:
            return self.workspace.buffer(("scratch", role), chunk)

        return merge_sliced(plan, name, tuple(info.shape), fetch, out, chunk, seed, self.thresholds, summaries, self.kernels, scratch)

    # --- order statistics: the task vectors (and moments) of one expert's tensor, from the stored inputs ---
    def _task_vector(self, expert: str, name: str) -> Tensor:
        """τ of `expert` on tensor `name` in float32 (fresh, outside the workspace, which a merge may be using)."""
        ms = self.modelset
        if ms.base is None:
            raise ValueError("order statistics of task vectors need a base model")
        theta = self.inputs.stored(self._weight(ms.experts[expert], name)).to(self.device, torch.float32, copy=True)
        return theta.sub_(self.inputs.stored(self._weight(ms.base, name)).to(self.device, torch.float32))

    def _summary_sources(self, expert: str, kind: str) -> list[Path]:
        """The files an expert's statistics of `kind` are computed from: base and expert weights (and moments)."""
        ms = self.modelset
        files = [*ms.base.files.values(), *ms.experts[expert].files.values()]
        moments = ms.stats["moments"].get(expert) if kind.startswith("saliency") else None
        return files + ([moments.path] if moments is not None else [])

    def _moments(self, expert: str, name: str) -> Tensor | None:
        found = self._stat_entries("moments", expert, name)
        if found is None:
            return None
        return rebuild_stat([self.inputs.stored(key).to(self.device) for key in found[1]])

    def close(self) -> None:
        self.inputs.close()
