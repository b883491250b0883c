"""The memory plan: from file headers alone, what each worker's device and each node's host memory hold, and whether it fits.

Per worker (its device — a GPU, or the host for CPU workers): the evaluator's engine (vLLM's
`gpu_memory_utilization` share of the card, or the HF live model), the merge's float32
workspace (buffers for one tensor's inputs — one slice of them for sliceable methods —, plus
the peak temporaries of the worst method in the search space, measured by `method_memory`),
the inputs themselves when they are placed on the device, staging buffers when they stream
from the host. Per node (host memory): one shared copy of the inputs when they are placed on
the host, the order statistics of the task vectors (`summaries`, mapped from one file set per
node), and each worker's processes and pinned buffers. The engine starts first and the merge
takes what is left, so when vLLM's share is not configured the plan sets it to what the merge
leaves.

Figures marked as estimates (process overheads, vLLM's activations, the order statistics'
4 bytes per entry) are round numbers, not measurements of the target machine; everything else
is exact bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergetune.merge.kernels import kernels_for
from mergetune.merge.method_memory import method_peak_buffers
from mergetune.merge.methods import get_method
from mergetune.merge.modelset import ModelSet
from mergetune.merge.recipe import layer_index
from mergetune.merge.placement import PIECE_BYTES, SLAB_BYTES, Placement, stored_entries
from mergetune.merge.resident import chunk_elements, largest_stat, largest_tensor, workspace_roles
from mergetune.merge.ruleplan import stat_kinds
from mergetune.merge.sparsify import row_length

GiB = 1024**3
DEVICE_HEADROOM = 0.05  # of each GPU kept free: allocator fragmentation, CUDA graphs, drivers
HOST_HEADROOM = 0.10  # of each node's memory kept free: the OS, page cache for everything else
AUTO_DEVICE_SHARE = 0.80  # `auto` puts the inputs on the device only when everything then uses at most this share
CUDA_CONTEXT_BYTES = GiB // 2  # the worker process's own CUDA context (estimate)
WORKER_PROCESS_BYTES = {"cpu": GiB // 2, "cuda": 2 * GiB}  # Python, torch, Ray core worker (+ CUDA libraries) (estimate)
VLLM_PROCESS_BYTES = 4 * GiB  # vLLM's engine-core process on the host (estimate)
VLLM_NON_TORCH_BYTES = 3 * GiB // 2  # vLLM's CUDA context, NCCL/cuBLAS workspaces, CUDA graphs (estimate)
VLLM_DEFAULT_BATCHED_TOKENS = 8192
VLLM_DEFAULT_SEQS = 256

def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Machine:
    """What one worker and one node have: `device` is the workers' torch device type ("cuda" or "cpu")."""

    device: str
    gpu_bytes: int | None  # memory of the GPU a worker merges on (None: unknown)
    host_bytes: int  # memory of one node
    workers_per_node: int


@dataclass(frozen=True)
class Engine:
    """The evaluator's backend, as far as memory goes."""

    kind: Literal["vllm", "hf"]
    dtype: torch.dtype | None = None  # None: the checkpoint's own
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    dataflow_models: int = 0  # models whose decoder layers a dataflow worker holds next to the live model (HF only)


@dataclass(frozen=True)
class MethodUse:
    """A method the search may pick, with the parameter sets to measure it at (e.g. both ends of searched ranges)."""

    name: str
    params: tuple[tuple[tuple[str, object], ...], ...] = ((),)


@dataclass
class MemoryPlan:
    fits: bool
    placement: Placement
    requested: str
    reason: str | None
    per_worker: dict[str, int]  # device bytes by part
    per_node: dict[str, int]  # host bytes by part
    machine: Machine
    gpu_memory_utilization: float | None = None  # vLLM's share: as configured, or set by the plan
    utilization_set_by_plan: bool = False
    inputs: dict[str, object] = field(default_factory=dict)
    workspace: dict[str, int] = field(default_factory=dict)  # per method: bytes while it merges the largest tensor

    @property
    def device_bytes(self) -> int:
        return sum(self.per_worker.values())

    @property
    def host_bytes(self) -> int:
        return sum(self.per_node.values())

    def to_json(self) -> dict[str, object]:
        return {
            "fits": self.fits,
            "placement": self.placement,
            "requested_placement": self.requested,
            "reason": self.reason,
            "machine": {
                "device": self.machine.device,
                "gpu_bytes": self.machine.gpu_bytes,
                "host_bytes": self.machine.host_bytes,
                "workers_per_node": self.machine.workers_per_node,
            },
            "per_worker": {"device_bytes": self.device_bytes},
            "per_node": {"host_bytes": self.host_bytes},
            "breakdown": {"per_worker": dict(self.per_worker), "per_node": dict(self.per_node)},
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "gpu_memory_utilization_set_by_plan": self.utilization_set_by_plan,
            "inputs": self.inputs,
            "workspace_by_method": dict(self.workspace),
        }

    def summary(self) -> str:
        """One line: placement, per worker and per node against what they have, vLLM's share."""
        has = f" of {gib(self.machine.gpu_bytes)}" if self.machine.device == "cuda" and self.machine.gpu_bytes else ""
        line = (
            f"{self.placement} placement; per worker {gib(self.device_bytes)}{has}; per node "
            f"{gib(self.host_bytes)} of {gib(self.machine.host_bytes)} ({self.machine.workers_per_node} workers)"
        )
        if self.gpu_memory_utilization is not None:
            line += f"; vLLM gpu_memory_utilization {self.gpu_memory_utilization:.2f}"
        return line

    def lines(self) -> list[str]:
        """A short human-readable report."""
        where = "GPU" if self.machine.device == "cuda" else "worker"
        lines = [
            f"inputs: {self.inputs['models']} models, {gib(self.inputs['stored_bytes'])} as stored"
            + (f" + {gib(self.inputs['statistics_bytes'])} of statistics" if self.inputs["statistics_bytes"] else "")
            + f"; largest tensor {self.inputs['largest_tensor']} ({gib(self.inputs['largest_tensor_bytes_float32'])} in float32)",
            f"placement: {self.placement} (asked: {self.requested})",
            f"per worker ({where}): {gib(self.device_bytes)}"
            + (f" of {gib(self.machine.gpu_bytes)}" if self.machine.device == "cuda" and self.machine.gpu_bytes else ""),
        ]
        lines += [f"  {part:22s} {gib(n):>12s}" for part, n in self.per_worker.items() if n]
        lines.append(f"per node (host, {self.machine.workers_per_node} workers): {gib(self.host_bytes)} of {gib(self.machine.host_bytes)}")
        lines += [f"  {part:22s} {gib(n):>12s}" for part, n in self.per_node.items() if n]
        if self.gpu_memory_utilization is not None:
            how = "set by the plan" if self.utilization_set_by_plan else "as configured"
            lines.append(f"vLLM gpu_memory_utilization: {self.gpu_memory_utilization:.2f} ({how})")
        lines.append("fits" if self.fits else f"does not fit: {self.reason}")
        return lines

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)


@dataclass(frozen=True)
class _Inputs:
    """What the headers say about a model set, in bytes and elements."""

    models: int
    weights_bytes: int  # base + experts, as stored
    stats_bytes: int  # statistics entries, as stored (rank-1 files: row and column sums)
    base_elements: int
    base_bytes: int
    base_layer_bytes: int  # the base's decoder layers, as stored
    largest_name: str
    largest_elements: int
    largest_dtype: torch.dtype
    stat_elements: dict[str, int]
    config: dict

    @classmethod
    def of(cls, modelset: ModelSet) -> _Inputs:
        entries = stored_entries(modelset)
        stat_files = {stats.path for files in modelset.stats.values() for stats in files.values()}
        stats_bytes = sum(info.nbytes for (path, _), info in entries.items() if path in stat_files)
        ref = modelset.reference
        name, elements = largest_tensor(modelset)
        config_path = ref.path / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        return cls(
            models=(modelset.base is not None) + len(modelset.experts),
            weights_bytes=sum(info.nbytes for info in entries.values()) - stats_bytes,
            stats_bytes=stats_bytes,
            base_elements=sum(info.numel for info in ref.infos.values()),
            base_bytes=sum(info.nbytes for info in ref.infos.values()),
            base_layer_bytes=sum(info.nbytes for name, info in ref.infos.items() if layer_index(name) is not None),
            largest_name=name,
            largest_elements=elements,
            largest_dtype=ref.infos[name].dtype,
            stat_elements={kind: largest_stat(modelset, kind) for kind in modelset.stats},
            config=config,
        )


def workspace_bytes(
    modelset: ModelSet, methods: list[MethodUse], device: str = "cuda", inputs: _Inputs | None = None, live_model: bool = True
) -> tuple[int, int, dict[str, int]]:
    """(persistent, peak transient, per-method total) bytes of the resident merge's float32 workspace, merging into
    a `live_model` (the HF backend's) or pushing each tensor (vLLM: a sliced rule's output is a tensor-sized buffer).

    Persistent: the reusable buffers every method of the space allocates at the largest
    tensor's size (base, one per expert, statistics; or a sliced rule's output and slices),
    kept for the worker's life. Transient: the worst method's own temporaries on the largest tensor (on one
    slice for a sliced rule).
    """
    inputs = inputs or _Inputs.of(modelset)
    k = len(modelset.experts)
    largest = inputs.largest_elements * 4
    roles: dict[object, int] = {}
    transient, per_method = 0, {}
    for use in methods:
        spec = get_method(use.name)
        sliced = spec.sliceable
        available = {kind: set(files) for kind, files in modelset.stats.items()}
        stats = stat_kinds(spec, list(modelset.experts), available)
        elements = {kind: inputs.stat_elements.get(kind, 0) for kind in stats}
        compiled = kernels_for(inputs.base_elements, "resident").compiled
        chunk = chunk_elements(device, compiled)
        roles_here = workspace_roles(sliced, k, elements, inputs.largest_elements, chunk, device == "cuda", live_model)
        needs = {role: n * 4 for role, n in roles_here.items()}
        # A sliced rule runs its method on one slice at a time: its temporaries are slice-sized, but for
        # the tie marks of its selections (one or two bytes per entry and expert, kept while the tensor merges).
        per_call = min(inputs.largest_elements, chunk) * 4 if sliced else largest
        stored = str(inputs.largest_dtype).removeprefix("torch.")
        peak = max(math.ceil(method_peak_buffers(use.name, k, stats, params, stored) * per_call) for params in use.params)
        peak += tie_mask_bytes(spec, k, inputs.largest_elements, device, compiled) + rank_buffer_bytes(spec, k, per_call // 4, device) + SCALAR_BYTES
        roles.update(needs)
        transient = max(transient, peak)
        per_method[use.name] = sum(needs.values()) + peak
    return sum(roles.values()), transient, per_method


ORDER_BYTES_PER_ENTRY = 4  # values or tie order per sort direction: `TensorOrder.nbytes` measures 4.0-4.1 on fp32 and bf16 task vectors


def order_statistics_bytes(modelset: ModelSet, methods: list[MethodUse]) -> dict[str, int]:
    """Bytes of the order statistics a worker precomputes for the search space's methods, over every expert
    (an estimate: `ORDER_BYTES_PER_ENTRY` per entry and sort direction; row ranks exactly, int16 or int32)."""
    kinds = {kind for use in methods for kind in get_method(use.name).orders}
    ref = modelset.reference.infos
    entries = sum(info.numel for info in ref.values()) * len(modelset.experts)
    out = {}
    for kind in sorted(kinds):
        if kind == "row_ranks":
            out[kind] = sum(info.numel * (2 if row_length(info.shape) < (1 << 15) else 4) for info in ref.values()) * len(modelset.experts)
        else:
            out[kind] = ORDER_BYTES_PER_ENTRY * entries
    return out


SCALAR_BYTES = 4096  # a method's scalar temporaries (weights, float64 sums): negligible, but counted


def tie_mask_bytes(spec, experts: int, largest: int, device: str, compiled: bool) -> int:
    """The tie marks a sliced selection keeps per expert for the tensor being merged (`order_stats.Selection.tied`):
    a byte each, two in compiled CPU kernels (`Kernels.mark_dtype`). A CPU merge patches an expert's listed entries
    instead where they are at most 1/256 of the slice (`boundary.PATCH_MAX_SHARE`): its index lists, gathers and eager
    merge take ~80 bytes per patched entry, so at most ~0.3 per slice entry and expert: within this bound."""
    selects = spec.sliceable and any(kind != "row_ranks" for kind in spec.orders)
    return experts * largest * (2 if device == "cpu" and compiled else 1) if selects else 0


def rank_buffer_bytes(spec, experts: int, per_call: int, device: str) -> int:
    """The int32 copy of one slice's int16 row ranks a sliced CPU merge keeps per expert (`kernels.ranks_carrier`)."""
    return experts * per_call * 4 if spec.sliceable and "row_ranks" in spec.orders and device == "cpu" else 0


def _vllm_minimum(inputs: _Inputs, engine: Engine, itemsize: int) -> int:
    """Bytes vLLM needs on each GPU to start: its weights, activations of one batch, one max-length sequence of KV cache."""
    c = inputs.config
    layers = int(c.get("num_hidden_layers", 0))
    hidden = int(c.get("hidden_size", 0))
    heads = int(c.get("num_attention_heads", 1) or 1)
    kv_heads = int(c.get("num_key_value_heads", heads) or heads)
    head_dim = int(c.get("head_dim") or (hidden // heads if heads else 0))
    intermediate = int(c.get("intermediate_size", 4 * hidden))
    vocab = int(c.get("vocab_size", 0))
    max_len = engine.max_model_len or int(c.get("max_position_embeddings", 4096))
    tokens = engine.max_num_batched_tokens or max(VLLM_DEFAULT_BATCHED_TOKENS, max_len)
    seqs = engine.max_num_seqs or VLLM_DEFAULT_SEQS
    tp = max(engine.tensor_parallel_size, 1)
    weights = inputs.base_elements * itemsize // tp
    kv_one_sequence = 2 * layers * kv_heads * head_dim * itemsize * max_len // tp
    activations = tokens * (4 * hidden + 2 * intermediate // tp) * itemsize + seqs * vocab * 8  # estimate
    return weights + kv_one_sequence + activations + VLLM_NON_TORCH_BYTES


def plan_memory(
    modelset: ModelSet,
    methods: list[MethodUse],
    engine: Engine,
    machine: Machine,
    placement: str = "auto",
) -> MemoryPlan:
    """The plan for `placement` ("auto": device when that fits with headroom, else host); see the module docstring."""
    inputs = _Inputs.of(modelset)
    persistent, transient, per_method = workspace_bytes(modelset, methods, machine.device, inputs, engine.kind == "hf")
    context = _Context(modelset, inputs, engine, machine, persistent + transient, per_method, order_statistics_bytes(modelset, methods))
    if placement != "auto":
        return context.plan(placement, placement)
    on_device = context.plan("device", "auto")
    if on_device.fits and context.share(on_device) <= AUTO_DEVICE_SHARE:
        return on_device
    return context.plan("host", "auto")


@dataclass
class _Context:
    modelset: ModelSet
    inputs: _Inputs
    engine: Engine
    machine: Machine
    workspace: int
    per_method: dict[str, int]
    statistics: dict[str, int]  # order kind → bytes over every expert (estimate)

    def device_statistics(self, placement: Placement) -> int:
        """DELLA's row ranks, which a device-placed worker keeps on its device (read whole by every trial)."""
        return self.statistics.get("row_ranks", 0) if placement == "device" else 0

    def statistics_advice(self, held: int, excess: float) -> str:
        """When the node's order statistics are what does not fit: which methods hold them (fewer workers barely helps)."""
        if held < excess:
            return ""
        readers = sorted(name for name in self.per_method if get_method(name).orders)
        return f", or search fewer of the methods whose order statistics it holds ({', '.join(readers)}; {gib(held)})"

    def host_statistics(self, placement: Placement) -> int:
        """The order statistics on the host: mapped from one file set per node (`summary_files`)."""
        return sum(self.statistics.values()) - self.device_statistics(placement)

    @property
    def engine_itemsize(self) -> int | None:
        return self.engine.dtype.itemsize if self.engine.dtype is not None else None

    def engine_weights(self) -> int:
        size = self.engine_itemsize
        return self.inputs.base_bytes if size is None else self.inputs.base_elements * size

    def engine_minimum(self) -> int:
        """The engine's own need on the worker's device (vLLM: to start; HF: the live model and a batch's activations)."""
        if self.engine.kind == "vllm":
            itemsize = self.engine_itemsize or max(1, self.inputs.base_bytes // max(self.inputs.base_elements, 1))
            return _vllm_minimum(self.inputs, self.engine, itemsize)
        return self.engine_weights() + self.hf_activations()

    def dataflow_layers(self) -> int:
        """The decoder layers of a dataflow study's source models, resident next to the live model."""
        size = self.engine_itemsize
        per_model = self.inputs.base_layer_bytes
        if size is not None:
            per_model = per_model * size // max(self.inputs.base_bytes // max(self.inputs.base_elements, 1), 1)
        return self.engine.dataflow_models * per_model

    def hf_activations(self) -> int:
        """Activations of one HF scoring batch next to the live model (estimate)."""
        return self.engine_weights() // 10 + GiB // 4

    def share(self, plan: MemoryPlan) -> float:
        """What the plan uses of the worker's device (CPU workers: of the node), with vLLM at its minimum."""
        if self.machine.device == "cuda":
            used = plan.device_bytes
            if self.engine.kind == "vllm" and plan.utilization_set_by_plan:
                used += self.engine_minimum() - plan.per_worker["engine"]
            return used / self.machine.gpu_bytes
        return plan.host_bytes / self.machine.host_bytes

    def plan(self, placement: Placement, requested: str) -> MemoryPlan:
        if self.machine.device == "cuda":
            return self._gpu_plan(placement, requested)
        return self._cpu_plan(placement, requested)

    def _common(self) -> dict[str, object]:
        i = self.inputs
        return {
            "models": i.models,
            "stored_bytes": i.weights_bytes,
            "statistics_bytes": i.stats_bytes,
            "largest_tensor": i.largest_name,
            "largest_tensor_elements": i.largest_elements,
            "largest_tensor_bytes_float32": i.largest_elements * 4,
            "engine_weights_bytes": self.engine_weights(),
            "engine_minimum_bytes": self.engine_minimum(),
        }

    def _worst_method(self) -> str:
        return max(self.per_method, key=self.per_method.get) if self.per_method else "none"

    def _cpu_plan(self, placement: Placement, requested: str) -> MemoryPlan:
        m, i = self.machine, self.inputs
        all_inputs = i.weights_bytes + i.stats_bytes
        worker = {
            "process": WORKER_PROCESS_BYTES["cpu"],
            "engine": self.engine_weights(),
            "eval_activations": self.hf_activations(),
            "dataflow_layers": self.dataflow_layers(),
            "resident_inputs": all_inputs if placement == "device" else 0,
            "workspace": self.workspace,
            "row_ranks": self.device_statistics(placement),
        }
        node = {
            "shared_inputs": all_inputs if placement == "host" else 0,
            "order_statistics": self.host_statistics(placement),
            "workers": m.workers_per_node * sum(worker.values()),
        }
        plan = MemoryPlan(True, placement, requested, None, worker, node, m, inputs=self._common(), workspace=self.per_method)
        limit = m.host_bytes * (1 - HOST_HEADROOM)
        if plan.host_bytes > limit:
            plan.fits = False
            plan.reason = (
                f"each node needs {gib(plan.host_bytes)} of host memory ({m.workers_per_node} workers × {gib(sum(worker.values()))}"
                + (f" + {gib(node['shared_inputs'])} of shared inputs" if node["shared_inputs"] else f", each holding {gib(all_inputs)} of inputs")
                + f") but {gib(limit)} is usable"
                + ("; set ray.resident: host (one shared copy per node)" if placement == "device" else "; run fewer workers per node (ray.workers)")
            )
        return plan

    def _gpu_plan(self, placement: Placement, requested: str) -> MemoryPlan:
        m, i, e = self.machine, self.inputs, self.engine
        all_inputs = i.weights_bytes + i.stats_bytes
        ours = {
            "cuda_context": CUDA_CONTEXT_BYTES,
            "resident_inputs": all_inputs if placement == "device" else 0,
            "staging": 2 * (SLAB_BYTES + PIECE_BYTES) if placement == "host" else 0,
            "workspace": self.workspace,
            "weight_transfer": i.largest_elements * (self.engine_itemsize or 4) if e.kind == "vllm" else 0,
            "row_ranks": self.device_statistics(placement),
        }
        processes = WORKER_PROCESS_BYTES["cuda"] + (VLLM_PROCESS_BYTES if e.kind == "vllm" else 0)
        node = {
            "shared_inputs": all_inputs if placement == "host" else 0,
            "pinned_staging": m.workers_per_node * 2 * (SLAB_BYTES + PIECE_BYTES) if placement == "host" else 0,
            "order_statistics": self.host_statistics(placement),
            "worker_processes": m.workers_per_node * processes,
        }
        gpu, minimum, our_total = m.gpu_bytes, self.engine_minimum(), sum(ours.values())
        if gpu is None:
            plan = MemoryPlan(False, placement, requested, None, {"engine": minimum, **ours}, node, m, inputs=self._common(), workspace=self.per_method)
            plan.reason = "the memory of the workers' GPUs is unknown here (no GPU); pass --gpu-memory GiB or set ray.gpu_memory_gb"
            return plan
        usable = gpu * (1 - DEVICE_HEADROOM)
        utilization, set_by_plan = None, False
        if e.kind == "vllm":
            # vLLM takes its share first; the merge lives in the rest (see `engine` vs the other parts).
            utilization = e.gpu_memory_utilization
            if utilization is None:
                utilization, set_by_plan = max(0.0, math.floor((usable - our_total) / gpu * 100) / 100), True
            engine = max(int(utilization * gpu), minimum)  # below its minimum vLLM cannot start: count what it needs
            worker = {"engine": engine, **ours}
        else:
            worker = {"engine": self.engine_weights(), "eval_activations": self.hf_activations(), "dataflow_layers": self.dataflow_layers(), **ours}
        plan = MemoryPlan(
            True, placement, requested, None, worker, node, m, utilization, set_by_plan, inputs=self._common(), workspace=self.per_method
        )
        merge_needs = f"the merge {gib(our_total)}: {self._worst_method()} workspace {gib(self.workspace)}" + (
            f", inputs {gib(all_inputs)}" if placement == "device" else ""
        )
        if e.kind == "vllm" and utilization * gpu < minimum:
            plan.fits = False
            plan.gpu_memory_utilization = None if set_by_plan else utilization  # no share lets vLLM start
            share = f"gpu_memory_utilization {utilization:.2f} gives it {gib(utilization * gpu)}"
            plan.reason = (
                f"vLLM needs {gib(minimum)} per GPU to start ({gib(self.engine_weights() // max(e.tensor_parallel_size, 1))} of weights, "
                f"a {e.max_model_len or i.config.get('max_position_embeddings', '?')}-token sequence of KV cache, activations) "
                f"but {'the merge leaves it ' + gib(max(usable - our_total, 0)) if set_by_plan else share} of a {gib(gpu)} GPU "
                f"({merge_needs}); "
                + ("set ray.resident: host (inputs streamed from one shared copy per node)" if placement == "device"
                   else f"each worker needs a GPU of ≥ {gib((minimum + our_total) / (1 - DEVICE_HEADROOM))}")
            )
        elif plan.device_bytes > usable:
            plan.fits = False
            biggest = ", ".join(f"{part} {gib(n)}" for part, n in sorted(worker.items(), key=lambda kv: -kv[1])[:3] if n)
            plan.reason = f"each worker's GPU needs {gib(plan.device_bytes)} ({biggest}) but {gib(usable)} of its {gib(gpu)} is usable"
            best = math.floor((usable - our_total) / gpu * 100) / 100
            if e.kind == "vllm" and best * gpu >= minimum:
                plan.reason += f"; lower evaluator.model_args.gpu_memory_utilization to {best:.2f} (or remove it: the plan then sets it)"
            elif placement == "device":
                plan.reason += "; set ray.resident: host (inputs streamed from one shared copy per node)"
        elif plan.host_bytes > m.host_bytes * (1 - HOST_HEADROOM):
            plan.fits = False
            plan.reason = (
                f"each node needs {gib(plan.host_bytes)} of host memory ("
                + ", ".join(f"{part} {gib(n)}" for part, n in node.items() if n)
                + f") but {gib(m.host_bytes * (1 - HOST_HEADROOM))} is usable; run fewer workers per node"
                + self.statistics_advice(node["order_statistics"], plan.host_bytes - m.host_bytes * (1 - HOST_HEADROOM))
            )
        return plan
