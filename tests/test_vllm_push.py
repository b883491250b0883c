"""The weight push into vLLM, against the fake engine of tests/fake_vllm.py (vLLM's real msgpack rules, another process).

The value-level check: what arrives in the engine equals, tensor by tensor, what
`SafetensorsSink` writes for the same recipe, for every method of the default search space.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fake_vllm import FakeLLM, load_weights_into_model
from safetensors.torch import load_file, save_file
from test_studies_fixtures import build_tiny_models

from mergetune.evaluators.vllm import VLLMBackend
from mergetune.evaluators.vllm_push import PrefixCacheNotReset, rpc
from mergetune.merge.modelset import MOMENTS_FILE, Checkpoint, ModelSet
from mergetune.merge.resident import ResidentModelSet
from mergetune.merge.recipe import Recipe
from mergetune.merge.sinks import SafetensorsSink
from mergetune.search.space import DEFAULT_METHODS

METHODS = (*DEFAULT_METHODS, "ota")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    paths = build_tiny_models(tmp_path_factory.mktemp("push_zoo"))
    for i, name in enumerate(("math", "code")):
        state = load_file(Path(paths[name]) / "model.safetensors")
        generator = torch.Generator().manual_seed(i)
        moments = {k: torch.rand(v.shape, generator=generator) * 1e-12 for k, v in state.items()}
        save_file(moments, Path(paths[name]) / MOMENTS_FILE)
    return paths


@pytest.fixture(scope="module")
def resident(models) -> ResidentModelSet:
    return ResidentModelSet.load(ModelSet.from_recipe(recipe_for(models, "linear")))


@pytest.fixture(scope="module")
def layout(models) -> dict[str, list[int]]:
    return {name: list(info.shape) for name, info in Checkpoint.open(models["base"]).infos.items()}


def recipe_for(models: dict[str, str], method: str) -> Recipe:
    return Recipe.from_dict(
        {"models": models, "base": "base", "rules": [{"match": "*", "method": method, "weights": {"math": 0.6, "code": 0.7}}]}
    )


def engine(core, layout, dtype: str = "float32", bucket_bytes: int = 4096, **kwargs) -> tuple[VLLMBackend, FakeLLM]:
    """A backend over a fresh fake engine; 4 KiB buckets, so a push spans many and tensors straddle them."""
    llm = FakeLLM(core, layout, dtype, **kwargs)
    return VLLMBackend(SimpleNamespace(model=llm), bucket_bytes=bucket_bytes), llm


def reference(resident, recipe, layout, dtype, out: Path, seed: int) -> dict[str, torch.Tensor]:
    with SafetensorsSink(out, {name: (DTYPES[dtype], tuple(shape)) for name, shape in layout.items()}) as sink:
        resident.merge_into(recipe, sink, seed=seed)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_engine_receives_what_safetensors_sink_writes(vllm_engine_core, models, resident, layout, method, dtype, tmp_path):
    backend, llm = engine(vllm_engine_core, layout, dtype)
    recipe = recipe_for(models, method)
    resident.merge_into(recipe, backend.weight_sink(), seed=7)
    expected = reference(resident, recipe, layout, dtype, tmp_path / "ref", seed=7)
    pushed = llm.weights()
    assert set(pushed) == set(expected)
    wrong = [name for name in expected if pushed[name].dtype != expected[name].dtype or not torch.equal(pushed[name], expected[name])]
    assert wrong == []
    assert backend.last_push["tensors"] == len(expected) and backend.last_push["buckets"] > 1


def test_the_old_apply_model_push_is_refused_by_vllms_serializer(vllm_engine_core, layout):
    """What the backend did before: `LLM.apply_model(partial(load_weights_into_model, weights))`."""
    _, llm = engine(vllm_engine_core, layout)
    weights = [(name, torch.zeros(shape)) for name, shape in layout.items()]
    with pytest.raises(TypeError, match="functools.partial'> is not serializable"):
        llm.apply_model(functools.partial(load_weights_into_model, weights))
    assert llm.weights()["lm_head.weight"].abs().sum() == 0  # nothing reached the model


def test_control_messages_refuse_tensors_and_stay_small(vllm_engine_core, models, resident, layout):
    backend, llm = engine(vllm_engine_core, layout, bucket_bytes=1 << 20)
    with pytest.raises(TypeError, match="tensor"):
        llm.collective_rpc("mergetune_load_bucket", args=({"transport": "shm"}, [["x", "float32", [512], 0]], torch.zeros(512)))
    resident.merge_into(recipe_for(models, "ties"), backend.weight_sink(), seed=0)
    sizes = llm.control_messages()
    assert max(sizes) < 8192  # a bucket's message: names, dtypes, shapes, offsets; no data


def test_push_updates_parameters_in_place_and_buckets_stay_bounded(vllm_engine_core, models, resident, layout):
    backend, llm = engine(vllm_engine_core, layout, bucket_bytes=4096)
    (storage_before,) = rpc(llm, "mergetune_parameter_storage")
    resident.merge_into(recipe_for(models, "dare_ties"), backend.weight_sink(), seed=1)
    resident.merge_into(recipe_for(models, "linear"), backend.weight_sink(), seed=2)
    assert rpc(llm, "mergetune_parameter_storage") == [storage_before]
    largest = max(torch.Size(shape).numel() * 4 for shape in layout.values())
    assert largest > 4096 and backend.pusher.bucket.nbytes == largest  # only a larger tensor grows the bucket
    assert backend.last_push["bytes"] == sum(torch.Size(s).numel() * 4 for s in layout.values())


def test_a_push_resets_the_prefix_cache_so_scores_use_the_new_weights(vllm_engine_core, models, resident, layout, monkeypatch):
    import mergetune.evaluators.vllm_push as vllm_push

    backend, llm = engine(vllm_engine_core, layout)
    resident.merge_into(recipe_for(models, "linear"), backend.weight_sink(), seed=0)
    (before,) = llm.generate(["2+2="])
    # The engine serves cached KV across a weight change unless the cache is reset: a push without
    # the reset keeps the old answer.
    with monkeypatch.context() as patch:
        patch.setattr(vllm_push, "reset_prefix_cache_confirmed", lambda *args: 0)
        resident.merge_into(recipe_for(models, "ties"), backend.weight_sink(), seed=0)
    assert llm.generate(["2+2="]) == [before]
    resident.merge_into(recipe_for(models, "task_arithmetic"), backend.weight_sink(), seed=0)
    assert llm.calls[-1] == "reset_prefix_cache"
    (after,) = llm.generate(["2+2="])
    assert after != before
    backend.pusher.reset_first_wait_s = 0.001
    llm.refuse_resets(2)  # blocks still in use: vLLM returns False
    resident.merge_into(recipe_for(models, "ties"), backend.weight_sink(), seed=0)
    assert backend.last_push["reset_attempts"] == 3
    assert llm.generate(["2+2="]) != [after]


def test_a_prefix_cache_that_will_not_reset_fails_the_push_with_a_reason(vllm_engine_core, models, resident, layout):
    backend, llm = engine(vllm_engine_core, layout)
    backend.pusher.reset_first_wait_s = 0.001
    llm.refuse_resets(backend.pusher.reset_attempts)
    with pytest.raises(PrefixCacheNotReset, match=r"prefix cache could not be reset after the weight push \(5 attempts\)"):
        resident.merge_into(recipe_for(models, "linear"), backend.weight_sink(), seed=0)


def test_a_merge_that_failed_midway_leaves_the_next_push_whole(vllm_engine_core, models, resident, layout, tmp_path):
    backend, llm = engine(vllm_engine_core, layout, bucket_bytes=4096)
    sink = backend.weight_sink()
    for name, shape in list(layout.items())[:8]:  # half a merge reaches the engine, then the merge raises
        sink.write(name, torch.full(shape, 9.0))
    recipe = recipe_for(models, "della")
    resident.merge_into(recipe, backend.weight_sink(), seed=4)
    expected = reference(resident, recipe, layout, "float32", tmp_path / "ref", seed=4)
    pushed = llm.weights()
    assert all(torch.equal(pushed[name], expected[name]) for name in expected)
    assert llm.generate(["x"])  # the engine is out of its reload and serves requests
