"""Export a recipe's data-flow path: a plain transformers model directory, and a mergekit passthrough config.

The model has one decoder layer per path slot (`num_hidden_layers` = T'), renamed to its slot,
with the scales folded in (merge/dataflow.py: o_proj and down_proj of slot t divided by
C_t = s_0·…·s_t), so `AutoModelForCausalLM.from_pretrained` runs the path with no custom code.
Embeddings, final norm, head, config and tokenizer are the live model's: the base for a recipe
without rules (space `dataflow`), else the parameter-space merge of the recipe (merged first, into a
scratch directory), as on the worker. Mergekit's passthrough reads embeddings from the first slice's model and the head from
the last's, so its config is written only when every scale is 1 and both ends are that source.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from mergetune.core.errors import MergetuneError
from mergetune.merge.dataflow import MERGED
from mergetune.merge.recipe import Recipe, layer_index

# Llama's residual-branch outputs: what folding a slot's scale divides.
_BRANCH_OUTPUT = re.compile(r"\.(self_attn\.o_proj|mlp\.down_proj)\.(weight|bias)$")
_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


def live_source(recipe: Recipe) -> str:
    """The model whose embeddings, norm and head the path runs with: the merge when the recipe merges."""
    return MERGED if recipe.rules else (recipe.base or "base")


def _renamed(name: str, slot: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}layers.{slot}.", name, count=1)


def _read_checkpoint(directory: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Tensor name → safetensors file of a model directory, and the first file's metadata."""
    from safetensors import safe_open

    from mergetune.merge.modelset import Checkpoint

    checkpoint = Checkpoint.open(directory)
    first = next(iter(checkpoint.files.values()))
    with safe_open(str(first), "pt") as handle:
        metadata = handle.metadata() or {}
    return dict(checkpoint.files), metadata


def _tensor(files: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(files[name]), "pt") as handle:
        return handle.get_tensor(name)


def write_path_model(recipe: Recipe, out: Path, device: str = "cpu") -> None:
    """Write the recipe's path as a model directory into the (existing, empty) directory `out`."""
    from safetensors.torch import save_file

    path = recipe.dataflow
    if path is None:
        raise MergetuneError("this recipe has no dataflow path")
    with tempfile.TemporaryDirectory(prefix="mergetune-dfs-", dir=out.parent) as scratch:
        dirs = {name: Path(model) for name, model in recipe.models.items()}
        if recipe.rules:
            from mergetune.merge.engine import merge_recipe_to_dir

            dirs[MERGED] = Path(scratch) / "merged"
            merge_recipe_to_dir(recipe.model_copy(update={"dataflow": None}), dirs[MERGED], seed=recipe.seed, device=device)
        live = dirs[live_source(recipe)]
        files = {name: _read_checkpoint(d)[0] for name, d in dirs.items() if name in path.sources or d == live}
        live_files, metadata = _read_checkpoint(live)
        tensors: dict[str, torch.Tensor] = {}
        for name in live_files:
            if layer_index(name) is None:
                tensors[name] = _tensor(live_files, name)
        for t, (slot, divisor) in enumerate(zip(path.slots, path.folded_divisors(), strict=True)):
            source = files[slot.source]
            names = [n for n in source if layer_index(n) == slot.layer]
            if not names:
                raise MergetuneError(f"dataflow.slots.{t}: {slot.source} has no layer {slot.layer}")
            for name in names:
                value = _tensor(source, name)
                if divisor != 1.0 and _BRANCH_OUTPUT.search(name):
                    value = (value.float() / divisor).to(value.dtype)
                tensors[_renamed(name, t)] = value.contiguous()
        save_file(tensors, str(out / "model.safetensors"), metadata={**metadata, "format": "pt"})
        for item in live.iterdir():
            if item.is_file() and not item.name.endswith((".safetensors", ".safetensors.index.json")) and item.name != "README.md":
                shutil.copy2(item, out / item.name)
        config = json.loads((live / "config.json").read_text())
        config["num_hidden_layers"] = len(path.slots)
        for per_layer in ("layer_types",):  # per-layer lists follow the slots' source layers
            if isinstance(config.get(per_layer), list):
                config[per_layer] = [config[per_layer][slot.layer] for slot in path.slots]
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def passthrough_problem(recipe: Recipe) -> str | None:
    """Why mergekit's passthrough cannot express the recipe's path, or None."""
    path = recipe.dataflow
    assert path is not None
    if not path.unscaled:
        return "the path scales hidden states, which mergekit's passthrough cannot (the model directory folds them in)"
    runs, live = path.runs(), live_source(recipe)
    if runs[0][0] != live or runs[-1][0] != live:
        return (
            f"the path starts or ends in another model than {live}, and mergekit's passthrough takes the embeddings from the "
            "first slice's model and the head from the last's"
        )
    return None


def passthrough_config(recipe: Recipe, ps_config: dict | list[dict] | None, dtype: str) -> dict | list[dict]:
    """The path as mergekit `passthrough` slices; with `merged` slots, the last document of a mergekit-multi set
    whose earlier documents (`ps_config`, the recipe's mergekit config without the path) build `merged`."""
    path = recipe.dataflow
    assert path is not None
    problem = passthrough_problem(recipe)
    if problem is not None:
        raise MergetuneError(problem)

    def model(name: str) -> str:
        if name == MERGED:
            return MERGED
        where = recipe.models[name]
        return str(Path(where).absolute()) if Path(where).exists() else where

    doc = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": model(source), "layer_range": [start, stop]}]} for source, start, stop in path.runs()],
        "dtype": dtype,
    }
    if not recipe.rules:
        return doc
    if ps_config is None:
        raise MergetuneError("the parameter-space merge of this recipe has no mergekit config")
    docs = [dict(d) for d in ps_config] if isinstance(ps_config, list) else [dict(ps_config)]
    docs[-1] = {"name": MERGED, **{k: v for k, v in docs[-1].items() if k != "name"}}
    return [*docs, doc]
