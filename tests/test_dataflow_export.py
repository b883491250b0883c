"""A data-flow path exports as a plain transformers model (scales folded) that computes what the path computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_dataflow_model import path, tiny_llama

from mergetune.core.errors import MergetuneError
from mergetune.evaluators.dataflow_model import PathModel, decoder_layers
from mergetune.merge.dataflow import DataflowPath
from mergetune.merge.recipe import Recipe
from mergetune.studies.dataflow_export import passthrough_config, write_path_model
from mergetune.studies.export import _mergekit_text


def save(model, where: Path) -> str:
    model.save_pretrained(where)
    return str(where)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfs-models")
    return {"base": save(tiny_llama(0), root / "base"), "math": save(tiny_llama(1), root / "math")}


def path_logits(models: dict[str, str], dataflow: DataflowPath, ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    live = AutoModelForCausalLM.from_pretrained(models["base"], dtype=dtype)
    expert = AutoModelForCausalLM.from_pretrained(models["math"], dtype=dtype)
    paths = PathModel(live, {"base": list(decoder_layers(live)), "math": list(decoder_layers(expert))})
    paths.apply(dataflow)
    with torch.no_grad():
        return live(input_ids=ids).logits


SCALED = path(("base", 0, 1.4), ("math", 1, 0.6), ("math", 1, 1.25), ("base", 2, 0.9), ("math", 2, 1.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_exported_model_reloads_and_matches_the_path(model_dirs, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 64, (2, 9))
    recipe = Recipe(models=model_dirs, base="base", rules=[], dataflow=SCALED)
    out = tmp_path / "out"
    out.mkdir()
    write_path_model(recipe, out)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert reloaded.config.num_hidden_layers == 5
    with torch.no_grad():
        exported = reloaded(input_ids=ids).logits
    expected = path_logits(model_dirs, SCALED, ids, dtype)
    # RMSNorm's eps is the only inexactness of the fold (fp32); bf16 adds its rounding of the divided weights
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.1, "rtol": 0.05}
    torch.testing.assert_close(exported.float(), expected.float(), **tolerance)
    unfolded = path_logits(model_dirs, DataflowPath(slots=[s.model_copy(update={"scale": 1.0}) for s in SCALED.slots]), ids, dtype)
    assert not torch.allclose(exported.float(), unfolded.float(), atol=1e-2)  # the scales matter


def test_a_both_path_exports_over_the_merge(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    rules = [{"match": "*", "method": "linear", "weights": {"math": 1.0}}]  # the merge is the expert itself
    both = path(("merged", 0, 1.0), ("base", 1, 1.0), ("merged", 2, 1.0))
    out = tmp_path / "both"
    out.mkdir()
    write_path_model(Recipe(models=model_dirs, base="base", rules=rules, dataflow=both), out)
    expected = path(("math", 0, 1.0), ("base", 1, 1.0), ("math", 2, 1.0))
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
    live = AutoModelForCausalLM.from_pretrained(model_dirs["math"])  # embeddings and head of the merge (= math)
    base = AutoModelForCausalLM.from_pretrained(model_dirs["base"])
    paths = PathModel(live, {"math": list(decoder_layers(live)), "base": list(decoder_layers(base))})
    paths.apply(expected)
    with torch.no_grad():
        torch.testing.assert_close(exported, live(input_ids=ids).logits)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".json") == ["config.json", "generation_config.json"]


def test_passthrough_slices_group_consecutive_layers(model_dirs):
    unscaled = path(("base", 0, 1.0), ("base", 1, 1.0), ("math", 1, 1.0), ("math", 2, 1.0), ("base", 1, 1.0), ("base", 2, 1.0))
    recipe = Recipe(models=model_dirs, base="base", rules=[], dataflow=unscaled)
    config = passthrough_config(recipe, None, "float32")
    assert config["merge_method"] == "passthrough"
    assert [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in config["slices"]] == [
        (model_dirs["base"], [0, 2]), (model_dirs["math"], [1, 3]), (model_dirs["base"], [1, 3])
    ]
    with pytest.raises(MergetuneError, match="scales hidden states"):
        _mergekit_text(recipe.model_copy(update={"dataflow": SCALED}))
    with pytest.raises(MergetuneError, match="first slice's model"):
        _mergekit_text(recipe.model_copy(update={"dataflow": path(("math", 0, 1.0), ("base", 1, 1.0))}))


def test_mergekit_passthrough_builds_the_exported_model(model_dirs, tmp_path):
    """mergekit 0.1.5's own passthrough merge of our config gives the tensors of our export."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file

    unscaled = path(("base", 0, 1.0), ("math", 1, 1.0), ("math", 1, 1.0), ("base", 2, 1.0))
    recipe = Recipe(models=model_dirs, base="base", rules=[], dataflow=unscaled)
    text = _mergekit_text(recipe)
    ours = tmp_path / "ours"
    ours.mkdir()
    write_path_model(recipe, ours)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"), options=MergeOptions(copy_tokenizer=False))
    theirs = {}
    for file in (tmp_path / "mk").glob("*.safetensors"):
        theirs.update(load_file(file))
    mine = load_file(ours / "model.safetensors")
    assert set(theirs) == set(mine)
    for name, value in mine.items():
        assert torch.equal(theirs[name], value), name


def test_mergetune_merge_of_an_exported_recipe_writes_the_path_model(model_dirs, tmp_path):
    from safetensors.torch import load_file

    from mergetune.cli.main import main

    recipe = Recipe(models=model_dirs, base="base", rules=[], dataflow=SCALED)
    (tmp_path / "recipe.yaml").write_text(recipe.to_yaml())
    direct = tmp_path / "direct"
    direct.mkdir()
    write_path_model(recipe, direct)
    with pytest.raises(SystemExit) as done:
        main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "cli")])
        raise SystemExit(0)
    assert done.value.code == 0
    ours, cli = load_file(direct / "model.safetensors"), load_file(tmp_path / "cli" / "model.safetensors")
    assert set(ours) == set(cli) and all(torch.equal(ours[n], cli[n]) for n in ours)
    assert len({n for n in cli if ".layers." in n and n.endswith("o_proj.weight")}) == len(SCALED.slots)


def test_mergekit_multi_builds_a_both_path_over_its_merge(model_dirs, tmp_path):
    """In `both`, mergekit.yaml is a mergekit-multi set: the PS merge named `merged`, then the passthrough slices."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    rules = [{"match": "*", "method": "linear", "weights": {"math": 1.0}}]
    unscaled = path(("merged", 0, 1.0), ("base", 1, 1.0), ("merged", 1, 1.0), ("merged", 2, 1.0))
    recipe = Recipe(models=model_dirs, base="base", rules=rules, dtype="float32", dataflow=unscaled)
    (tmp_path / "mergekit.yaml").write_text(_mergekit_text(recipe))
    ours = tmp_path / "ours"
    ours.mkdir()
    write_path_model(recipe, ours)
    multi = Path(sys.executable).parent / "mergekit-multi"
    subprocess.run([str(multi), "mergekit.yaml", "--intermediate-dir", "./intermediate", "--out-path", "./merged"], cwd=tmp_path, check=True, capture_output=True)
    theirs = {}
    for file in (tmp_path / "merged").glob("*.safetensors"):
        theirs.update(load_file(file))
    mine = load_file(ours / "model.safetensors")
    assert set(theirs) == set(mine)
    for name, value in mine.items():
        torch.testing.assert_close(theirs[name], value, msg=name)
