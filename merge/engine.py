"""The streaming merge engine: read one tensor of every model, merge it by its recipe rule, hand it to a sink.

Disk to disk (`merge_recipe_to_dir`, the `mergetune merge` command) it holds one tensor per
model at a time, read lazily at the offsets of the safetensors headers (single-file or sharded
with an index json), and writes through `SafetensorsSink` into a temp dir renamed at the end. Tensors no rule matches
keep the base model's value. The search's in-memory variant is `resident.ResidentModelSet`; both
run each tensor through `ruleplan.merge_inputs` (sliceable rules: `ruleplan.merge_sliced`, in the
same slices) with the same float32 inputs, so an export reproduces its trial bit for bit.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mergetune.core.errors import ConfigError
from mergetune.core.fs import atomic_output_dir
from mergetune.core.versions import package_versions
from mergetune.merge.modelset import ModelSet
from mergetune.merge.reader import open_reader
from mergetune.merge.kernels import Kernels, kernels_for, task_vectors
from mergetune.merge.methods.registry import InputSummaries, StoredSlice
from mergetune.merge.ruleplan import chunk_elements, complete_stats, merge_inputs, merge_sliced, tensor_schedule
from mergetune.merge.thresholds import GlobalThresholds
from mergetune.merge.recipe import Recipe
from mergetune.merge.sinks import SafetensorsSink, Sink

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 1024**3


def check_device(device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu")


def output_layout(modelset: ModelSet, dtype: str | None) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Name → (dtype, shape) of the merged model: float tensors in `dtype` if given, else (mergekit's
    rule) in the widest float dtype among the inputs of that tensor (a bf16 base with fp32 experts
    gives fp32); other tensors in the reference model's dtype. The merge itself is float32."""
    target = getattr(torch, dtype) if dtype is not None else None
    models = [ckpt for ckpt in (modelset.base, *modelset.experts.values()) if ckpt is not None]
    layout = {}
    for name, info in modelset.reference.infos.items():
        out = info.dtype
        if info.dtype.is_floating_point:
            out = target
            if out is None:
                out = info.dtype
                for ckpt in models:
                    out = torch.promote_types(out, ckpt.infos[name].dtype)
        layout[name] = (out, info.shape)
    return layout


def merge_modelset(
    modelset: ModelSet,
    recipe: Recipe,
    sink: Sink,
    *,
    seed: int,
    device: str = "cpu",
    on_tensor: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Stream every tensor of the model set through the recipe into `sink` (closed at the end); returns timings."""
    check_device(device)
    schedule = tensor_schedule(modelset, recipe)
    has_base = modelset.base is not None
    read = compute = write = 0.0
    with open_reader(modelset, device) as reader:
        thresholds = GlobalThresholds(reader.scores)
        kernels = kernels_for(sum(info.numel for info in modelset.reference.infos.values()), "disk")
        for name, plan in schedule:
            started = time.perf_counter()
            if plan is None:
                out = reader.raw(modelset.reference, name)
                loaded = time.perf_counter()
            elif plan.sliceable:  # the inputs as stored, made float32 slice by slice in the method's kernels
                base = reader.stored(modelset.base, name) if has_base else None
                inputs = [reader.stored(modelset.experts[e], name) for e in plan.experts]
                stats = {kind: complete_stats([reader.stat(kind, e, name) for e in plan.experts]) for kind in plan.stats}
                loaded = time.perf_counter()
                out = _merge_sliced(plan, name, base, inputs, stats, seed, thresholds, plan.uses_deltas(has_base), kernels)
            else:
                base = reader.tensor(modelset.base, name) if has_base else None
                inputs = [reader.tensor(modelset.experts[e], name) for e in plan.experts]
                stats = {kind: complete_stats([reader.stat(kind, e, name) for e in plan.experts]) for kind in plan.stats}
                loaded = time.perf_counter()
                if plan.uses_deltas(has_base):
                    inputs = [m.sub_(base) for m in inputs]  # task vectors made in place from the fresh reads
                out = merge_inputs(plan, name, base, inputs, stats, seed, thresholds)
            computed = time.perf_counter()
            sink.write(name, out)
            read += loaded - started
            compute += computed - loaded
            write += time.perf_counter() - computed
            if on_tensor is not None:
                on_tensor(name)
    sink.close()
    return {"read_s": read, "compute_s": compute, "write_s": write}


def _merge_sliced(plan, name, base, models, stats, seed, thresholds, deltas: bool, kernels: Kernels) -> torch.Tensor:
    """A sliceable rule over slices of the whole stored tensors just read (views, no copies), as the resident merge runs it."""
    shape = tuple(models[0].shape)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1)

    def fetch(start: int, stop: int):
        sliced = {kind: None if ts is None else [flat(t)[start:stop] for t in ts] for kind, ts in stats.items()}
        return StoredSlice(None if base is None else flat(base)[start:stop], [flat(m)[start:stop] for m in models]), sliced

    summaries = InputSummaries(lambda: task_vectors(base, models, stored=True)[1], stats.get("moments")) if deltas else None
    out = torch.empty(models[0].numel(), dtype=torch.float32, device=models[0].device)
    chunk = chunk_elements(models[0].device.type, kernels.compiled)
    return merge_sliced(plan, name, shape, fetch, out, chunk, seed, thresholds, summaries, kernels)


def model_card(recipe: Recipe, seed: int) -> str:
    versions = package_versions()
    return "\n".join(
        [
            "---",
            "tags: [merge, mergetune]",
            "---",
            f"# Merge of {', '.join(recipe.experts)}" + (f" onto {recipe.base}" if recipe.base else ""),
            "",
            f"Made with mergetune {versions.get('mergetune', '')} (seed {seed}). Re-run with `mergetune merge recipe.yaml --out DIR --seed {seed}`:",
            "",
            "```yaml",
            recipe.to_yaml().rstrip(),
            "```",
            "",
        ]
    )


def merge_recipe_to_dir(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    seed: int | None = None,
    device: str = "cpu",
    force: bool = False,
    progress: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    strict: bool = False,
) -> dict[str, float]:
    """Merge `recipe` disk to disk into an HF model directory `out_dir` (atomic); returns timings.

    Validation (models, statistics, methods' needs, the output directory) happens before any
    tensor is read; on failure nothing is left in `out_dir`. `strict` refuses experts with
    tensors the base lacks (by default they are dropped with a warning, as mergekit does).
    """
    seed = recipe.seed if seed is None else seed
    check_device(device)
    modelset = ModelSet.from_recipe(recipe, strict=strict)
    tensor_schedule(modelset, recipe)
    layout = output_layout(modelset, recipe.dtype)
    started = time.perf_counter()
    with atomic_output_dir(out_dir, force=force) as tmp:
        card = model_card(recipe, seed)
        untie = bool(set(modelset.reference.tied_weights()) & set(layout))  # a tied base, merged with its experts' heads
        with SafetensorsSink(tmp, layout, modelset.template_dir, max_shard_bytes, card, untie=untie) as sink:
            if progress:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                columns = (TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
                with Progress(*columns) as bar:
                    task = bar.add_task("", total=len(layout))
                    timings = merge_modelset(
                        modelset, recipe, sink, seed=seed, device=device, on_tensor=lambda name: bar.update(task, advance=1, description=name)
                    )
            else:
                timings = merge_modelset(modelset, recipe, sink, seed=seed, device=device)
    timings["total_s"] = time.perf_counter() - started
    log.info("merged %d tensors into %s in %.1fs", len(layout), Path(out_dir), timings["total_s"])
    return timings
