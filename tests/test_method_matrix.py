"""Every registered merge method through both engines: the disk merge and the resident merge into a live model agree.

The matrix is built from the registry, so a new method is covered as soon as it is registered
(and must get an entry in PARAMS, the non-default settings it is exercised with).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_studies_fixtures import build_tiny_models

from mergetune.merge.engine import merge_recipe_to_dir
from mergetune.merge.methods import get_method, method_names
from mergetune.merge.methods.m3 import mixing_weights
from mergetune.merge.modelset import MOMENTS_FILE, ModelSet
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.recipe import Recipe
from mergetune.merge.sinks import LiveModelSink

torch.set_num_threads(1)

# Non-default settings per method, so sparsifiers sparsify and random methods draw.
PARAMS: dict[str, dict[str, object]] = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.8},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.6},
    "dare_linear": {"density": 0.6, "lambda": 0.9},
    "della": {"density": 0.6, "epsilon": 0.1},
    "della_linear": {"density": 0.6, "epsilon": 0.1},
    "breadcrumbs": {"density": 0.7, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.7, "gamma": 0.05},
    "slerp": {"t": 0.3},
    "ota": {"density": 0.5, "power": 0.5},
    "fisher": {},
    "regmean": {"reduce_non_diagonal_ratio": 0.9},
    "m3": {"alpha": 0.5},
    "model_stock": {},
    "passthrough": {"scale": 0.9},
    "nuslerp": {"nuslerp_row_wise": True},
    "multislerp": {"normalize_weights": False},
    "karcher": {"max_iter": 5},
    "sce": {"select_topk": 0.5},
    "ram": {"epsilon": 1e-4},
    "ramplus_tl": {"r": 0.2, "alpha": 0.3},
    "nearswap": {"t": 0.01},
    "arcee_fusion": {},
}
# Global-scope variants: thresholds over all of an expert's tensors, computed by each engine its own way.
GLOBAL = {"ties": {"density": 0.5, "scope": "global"}, "ota": {"density": 0.5, "scope": "global"},
          "breadcrumbs_ties": {"density": 0.7, "gamma": 0.05, "scope": "global"}}
# Test modules register helper methods named `_test_*`; the matrix is the library's own.
METHODS = [name for name in method_names() if not name.startswith("_")]
CASES = [(name, PARAMS.get(name, {})) for name in METHODS] + [(f"{name}@global", params) for name, params in GLOBAL.items()]
TOLERANCE = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5}}


def _statistics(paths: dict[str, str], root: Path) -> dict[str, dict[str, str]]:
    """Second moments beside each expert, plus Fisher and Gram files (random, positive / SPD)."""
    stats: dict[str, dict[str, str]] = {"fisher": {}, "gram": {}}
    for i, expert in enumerate(("math", "code")):
        state = load_file(Path(paths[expert]) / "model.safetensors")
        gen = torch.Generator().manual_seed(10 + i)
        moments = {k: torch.rand(v.shape, generator=gen) * 1e-10 for k, v in state.items()}
        save_file(moments, Path(paths[expert]) / MOMENTS_FILE, metadata={"step": "10", "beta2": "0.999"})
        fisher = {k: torch.rand(v.shape, generator=gen) + 0.1 for k, v in state.items()}
        grams = {}
        for name, v in state.items():
            if name.endswith("proj.weight") or name == "lm_head.weight":
                x = torch.randn(64, v.shape[1], generator=gen)
                grams[name] = x.T @ x / 64
        stats["fisher"][expert] = str(root / f"{expert}.fisher.safetensors")
        stats["gram"][expert] = str(root / f"{expert}.gram.safetensors")
        save_file(fisher, stats["fisher"][expert])
        save_file(grams, stats["gram"][expert])
    return stats


def _bf16_copy(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def zoo(request, tmp_path_factory):
    """(models, statistics, resident model set, live model) for one input dtype."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("matrix")
    paths = build_tiny_models(root / "fp32")
    stats = _statistics(paths, root)
    if request.param == torch.bfloat16:
        paths = {name: _bf16_copy(path, root / "bf16" / name) for name, path in paths.items()}
    recipe = _recipe(paths, stats, "linear", {})
    resident = ResidentModelSet.load(ModelSet.from_recipe(recipe))
    live = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=request.param)
    return paths, stats, resident, live, request.param


def _recipe(paths: dict[str, str], stats: dict[str, dict[str, str]], method: str, params: dict[str, object], seed: int = 7) -> Recipe:
    spec = get_method(method)
    experts = ["math"] if spec.max_models == 1 else ["math", "code"]
    rule: dict[str, object] = {"method": method, "params": params, "models": experts}
    rule["weights"] = {"math": 0.7, "code": 0.4} if "code" in experts else {"math": 0.7}
    return Recipe.from_dict({"models": paths, "base": "base", "rules": [rule], "seed": seed, **stats})


@pytest.mark.parametrize(("case", "params"), CASES, ids=[case for case, _ in CASES])
def test_disk_and_resident_engines_agree(zoo, tmp_path, case, params):
    paths, stats, resident, live, dtype = zoo
    recipe = _recipe(paths, stats, case.split("@")[0], params)
    merge_recipe_to_dir(recipe, tmp_path / "out")
    disk = load_file(tmp_path / "out" / "model.safetensors")
    resident.merge_into(recipe, LiveModelSink(live), seed=recipe.seed)
    base = load_file(Path(paths["base"]) / "model.safetensors")
    changed = 0
    for name, tensor in live.state_dict().items():
        assert disk[name].dtype == dtype and torch.isfinite(disk[name].float()).all(), name
        torch.testing.assert_close(tensor, disk[name], **TOLERANCE[dtype], msg=lambda m: f"{case} {name}: {m}")
        changed += not torch.equal(disk[name], base[name])
    assert changed > len(base) // 2, f"{case} left most tensors at the base model"


def test_every_method_is_exercised_deliberately():
    """A newly registered method needs its entry in PARAMS (possibly {}), chosen to exercise it."""
    assert sorted(PARAMS) == sorted(METHODS)


def test_m3_draws_one_set_of_weights_per_merge_from_its_seed(tmp_path_factory):
    root = tmp_path_factory.mktemp("m3")
    paths = build_tiny_models(root)
    out = {}
    for seed in (3, 4):
        recipe = Recipe.from_dict({"models": paths, "base": "base", "seed": seed, "rules": [{"method": "m3", "params": {"alpha": 0.5}}]})
        merge_recipe_to_dir(recipe, root / f"out{seed}")
        out[seed] = load_file(root / f"out{seed}" / "model.safetensors")
    base, math, code = (load_file(Path(paths[n]) / "model.safetensors") for n in ("base", "math", "code"))
    w = mixing_weights(0.5, 2, 3)
    assert abs(sum(w) - 1) < 1e-9 and 0 < w[0] < 1
    for name in base:
        want = base[name] + w[0] * (math[name] - base[name]) + w[1] * (code[name] - base[name])
        torch.testing.assert_close(out[3][name], want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(out[3][n], out[4][n]) for n in base)  # another seed, another draw
