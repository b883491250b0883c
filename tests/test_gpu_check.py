"""benchmarks/gpu_check.py: what of it runs without a GPU or vLLM (its help, its recipes, prompts, checks and report)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_studies_fixtures import build_tiny_models

from mergetune.merge.modelset import MOMENTS_FILE, ModelSet
from mergetune.merge.ruleplan import tensor_schedule
from mergetune.merge.recipe import Recipe

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_runs_without_vllm_or_a_gpu():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "run this first on a GPU node" in result.stdout


def test_without_a_gpu_it_says_so_in_one_line(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err.strip() == "gpu_check: needs a CUDA GPU (torch.cuda.is_available() is False)"


def test_trial_recipes_cover_five_methods_and_fit_a_model_set(gpu_check, tmp_path):
    from safetensors.torch import load_file, save_file

    models = build_tiny_models(tmp_path)
    for name in ("math", "code"):
        state = load_file(Path(models[name]) / "model.safetensors")
        save_file({k: v.abs() * 1e-6 for k, v in state.items()}, Path(models[name]) / MOMENTS_FILE)
    recipes = gpu_check.trial_recipes(models, seed=0)
    assert len({method for method, _ in recipes}) >= 5
    modelset = ModelSet.from_recipe(Recipe.from_dict(recipes[0][1]))
    for method, recipe in recipes:
        schedule = tensor_schedule(modelset, Recipe.from_dict(recipe))  # raises if a method lacks its statistics
        assert {plan.spec.name for _, plan in schedule} == {method}
    assert recipes != gpu_check.trial_recipes(models, seed=1)
    # The memory the check predicts for its own process: every input on the GPU, the bucket, the HF model, a workspace.
    stored = sum(info.numel * info.dtype.itemsize for ckpt in (modelset.base, *modelset.experts.values()) for info in ckpt.infos.values())
    moments = sum(stats.nbytes() for stats in modelset.stats["moments"].values())
    planned = gpu_check.planned_peak_bytes(modelset, gpu_check.METHODS, "float32", 2**24, 80 * 2**30)
    base_bytes = sum(info.numel * 4 for info in modelset.base.infos.values())
    largest = max(info.numel for info in modelset.base.infos.values()) * 4
    assert stored + moments + 2**24 + base_bytes + 2 * largest < planned < stored + moments + 2**24 + 2 * 2**30


def test_cache_prompts_fill_two_kv_blocks_and_leave_room_to_answer(gpu_check):
    prompts = gpu_check.cache_prompts(16, seed=0, max_new_tokens=13, max_model_len=64)
    assert len(set(prompts)) == 16
    assert all(2 * gpu_check.BLOCK_TOKENS <= len(p) + 1 <= 64 - 13 for p in prompts)  # + BOS; one token per character
    with pytest.raises(AssertionError):
        gpu_check.cache_prompts(1, seed=0, max_new_tokens=13, max_model_len=32)


def test_dare_mask_check_compares_devices(gpu_check):
    """The check runs the methods as a worker does; on the CPU, eager and compiled kernels keep the same entries,
    about ρ of them (binomial: 0.3 of 131,841 entries, SE 0.0013)."""
    masks = gpu_check.dare_masks("cpu", compiled=False)
    assert all(abs(float(m.float().mean()) - 0.3) < 0.006 for m in masks)
    assert not torch.equal(masks[0], masks[1])  # DARE and DELLA draw differently
    assert gpu_check.dare_masks_match("cpu")


def test_score_mismatches(gpu_check):
    assert gpu_check.score_mismatches("ties", {"a": 0.5, "b": 0.25}, {"a": 0.5, "b": 0.25}) == []
    assert gpu_check.score_mismatches("ties", {"a": 0.5, "b": 0.25}, {"a": 0.5, "b": 0.265625}) == [
        "ties: b exact match vLLM 0.25 != HF 0.265625"
    ]
    assert gpu_check.score_mismatches("ties", {"a": 0.5}, {"a": 0.515625}, tolerance=1 / 64) == []
    assert gpu_check.score_mismatches("ties", {"a": 0.5}, {}) == ["ties: a exact match vLLM 0.5 != HF None"]


def test_report_prints_push_rate_memory_and_verdict(gpu_check):
    push = {"bytes": 2**29, "seconds": 0.25, "buckets": 3}
    results = {
        "trials": [
            {"method": "linear", "merge_s": 0.5, "push": push, "vllm": {"sort": 0.5}, "hf": {"sort": 0.5}},
            {"method": "ties", "merge_s": 0.7, "push": push, "vllm": {"sort": 0.25}, "hf": {"sort": 0.25}},
        ],
        "transport": "cuda_ipc",
        "memory": {"planned_bytes": 2 * 2**30, "max_allocated_bytes": 3 * 2**30, "hf_model_bytes": 2**30},
        "dare_masks_match": True,
        "mismatches": [],
    }
    lines = gpu_check.summary_lines(results)
    assert "push: 0.50 s/GiB over 1.000 GiB (cuda_ipc)" in lines
    assert any(line.startswith("memory: plan 2.00 GiB, torch.cuda.max_memory_allocated 3.00 GiB") for line in lines)
    assert lines[-1] == "gpu check: OK"
    results["mismatches"] = ["ties: stale KV: 3 prompts answered from the old weights"]
    lines = gpu_check.summary_lines(results)
    assert lines[-2:] == ["MISMATCH ties: stale KV: 3 prompts answered from the old weights", "gpu check: 1 mismatches"]
