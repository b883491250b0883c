"""The memory plan of a study: its models, search space and evaluator on the workers' machines (`mergetune plan`).

`checked_config` is what `mergetune run` calls before any worker starts: it refuses a study
that cannot fit with one line naming the numbers and the setting to change, and otherwise
returns the config with the placement `auto` resolved and vLLM's `gpu_memory_utilization`
set when the config leaves it to the plan. Machine facts come from the flags, then the
config's `ray` section, then this machine (torch, psutil).
"""

from __future__ import annotations

import logging

import torch

from mergetune.core.errors import ConfigError, MergetuneError
from mergetune.merge.memory_plan import GiB, Engine, Machine, MemoryPlan, MethodUse, gib, plan_memory
from mergetune.search.config import StudyConfig, parse_study_config

log = logging.getLogger(__name__)


class MemoryPlanError(MergetuneError):
    """The study does not fit the workers' memory; the message names the numbers and what to change."""


def study_engine(config: StudyConfig) -> Engine:
    """The evaluator's backend as the plan sees it: vLLM with its model_args, or an HF live model."""
    from mergetune.evaluators.base import validate_evaluator_config
    from mergetune.evaluators.lmeval import LmEvalConfig

    evaluator = validate_evaluator_config(config.evaluator)
    if not (isinstance(evaluator, LmEvalConfig) and evaluator.backend == "vllm"):
        # A dataflow worker also holds the experts' layers (and, for `both`, the base's: the live model is the merge).
        space = config.search.space
        return Engine("hf", dataflow_models=0 if space == "parameter" else len(config.experts) + (space == "both"))
    args = evaluator.model_args
    dtype = args.get("dtype", "auto")
    return Engine(
        "vllm",
        dtype=getattr(torch, dtype) if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype) else None,
        gpu_memory_utilization=args.get("gpu_memory_utilization"),
        max_model_len=args.get("max_model_len"),
        max_num_batched_tokens=args.get("max_num_batched_tokens"),
        max_num_seqs=args.get("max_num_seqs"),
        tensor_parallel_size=int(args.get("tensor_parallel_size", 1)),
    )


def study_methods(config: StudyConfig) -> list[MethodUse]:
    """Every method the search space may choose, measured at both ends of its searched ranges."""
    from mergetune.search.space import SearchSpace

    space = SearchSpace(config)
    uses = []
    for method in space.methods:
        searched = space.searched_params(method)
        ends = [tuple((p, space.search.range_of(p)[side]) for p in searched) for side in (0, 1)]
        uses.append(MethodUse(method, tuple(dict.fromkeys(ends))))
    return uses


def study_orders(config: StudyConfig) -> tuple[str, ...]:
    """The order statistics the search space's methods read (`MethodSpec.orders`): a worker computes them at load."""
    from mergetune.merge.methods import get_method
    from mergetune.search.space import SearchSpace

    return tuple(sorted({kind for method in SearchSpace(config).methods for kind in get_method(method).orders}))


def study_machine(
    config: StudyConfig, gpu_memory_gib: float | None = None, host_memory_gib: float | None = None, workers_per_node: int | None = None
) -> Machine:
    from mergetune.search.workers import worker_device

    device = torch.device(worker_device(config)).type
    ray = config.ray
    gpu = gpu_memory_gib if gpu_memory_gib is not None else ray.gpu_memory_gb
    if gpu is None and device == "cuda" and torch.cuda.is_available():
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    else:
        gpu_bytes = int(gpu * GiB) if gpu is not None else None
    host = host_memory_gib if host_memory_gib is not None else ray.host_memory_gb
    if host is None:
        import psutil

        host_bytes = psutil.virtual_memory().total
    else:
        host_bytes = int(host * GiB)
    per_node = workers_per_node or ray.workers_per_node or _local_workers(config, device)
    return Machine(device, gpu_bytes, host_bytes, min(per_node, ray.workers))


def _local_workers(config: StudyConfig, device: str) -> int:
    """How many of the study's workers this machine would hold (all of them, when it cannot tell)."""
    ray = config.ray
    if ray.address:
        return ray.workers  # a cluster: plan for the fullest node
    if device == "cuda" and torch.cuda.is_available() and ray.gpus_per_worker > 0:
        return max(1, int(torch.cuda.device_count() // ray.gpus_per_worker))
    return ray.workers


def plan_study(
    config: StudyConfig, gpu_memory_gib: float | None = None, host_memory_gib: float | None = None, workers_per_node: int | None = None
) -> MemoryPlan:
    """The memory plan of `config` (headers only: no tensor is read, unless vocabularies are aligned); a vLLM
    engine that could not take the merges is refused first, in one line."""
    from mergetune.evaluators.vllm import vllm_models_problem
    from mergetune.search.workers import load_modelset

    methods = study_methods(config)
    modelset = load_modelset(config)
    engine = study_engine(config)
    problem = vllm_models_problem(modelset) if engine.kind == "vllm" else None
    if problem is not None:
        raise ConfigError(f"evaluator.backend: vllm: {problem}")
    return plan_memory(
        modelset,
        methods,
        engine,
        study_machine(config, gpu_memory_gib, host_memory_gib, workers_per_node),
        placement=config.ray.resident,
    )


def checked_config(config: StudyConfig) -> StudyConfig:
    """`config` with its placement and vLLM share decided by the plan; MemoryPlanError when it cannot fit."""
    plan = plan_study(config)
    if not plan.fits:
        raise MemoryPlanError(f"the study does not fit: {plan.reason} (see `mergetune plan CONFIG`)")
    log.info("memory plan: %s", plan.summary())
    data = config.model_dump(mode="json")
    data["ray"]["resident"] = plan.placement
    if plan.utilization_set_by_plan:
        data["evaluator"].setdefault("model_args", {})["gpu_memory_utilization"] = plan.gpu_memory_utilization
    return parse_study_config(data, "study config")


def resident_placement(config: StudyConfig) -> str:
    """Where a worker keeps its inputs: the config's placement, or the plan's for `auto` (on this machine)."""
    if config.ray.resident != "auto":
        return config.ray.resident
    return plan_study(config).placement


def check_device_room(config: StudyConfig, device: str) -> None:
    """Once the engine has started on a worker's GPU: is the rest free for the merge? Else a MemoryPlanError
    with the numbers (another process on the GPU, or an engine that took more than its share)."""
    if torch.device(device).type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    plan = plan_study(config)
    need = plan.device_bytes - plan.per_worker["engine"]
    if free < need:
        raise MemoryPlanError(
            f"with the evaluator's engine started, {gib(free)} of {device} is free but the merge needs {gib(need)} "
            f"(workspace {gib(plan.per_worker['workspace'])}, inputs {gib(plan.per_worker['resident_inputs'])}); "
            "lower evaluator.model_args.gpu_memory_utilization or free the GPU"
        )
