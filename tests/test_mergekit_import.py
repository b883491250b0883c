"""Gradient lists in recipes, and plain mergekit configs read as recipes (`mergetune merge` / `mergetune import`)."""

from __future__ import annotations

import pytest
import yaml
from mergekit.config import evaluate_setting
from test_studies_fixtures import build_tiny_models

from mergetune.cli.main import main
from mergetune.core.errors import ConfigError
from mergetune.merge.mergekit_config import load_recipe, recipe_from_mergekit
from mergetune.merge.recipe import Recipe, gradient_value, layer_position


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, str]:
    return build_tiny_models(tmp_path_factory.mktemp("import_zoo"), num_layers=3)


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


@pytest.mark.parametrize("knots", [[0.0, 0.5, 1.0], [1.0, 0.2], [0.3], [0.0, 1.0, 0.0, 2.0, 0.5]])
def test_gradients_interpolate_as_mergekit(knots):
    for x in (0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 1.0):
        assert gradient_value(knots, x) == pytest.approx(evaluate_setting("w", knots, x, validate=float))


def test_layer_positions_are_mergekits():
    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_position("lm_head.weight", 5) == 0.0 and layer_position("model.layers.0.x", 1) == 1.0


def _recipe(rule: dict) -> Recipe:
    return Recipe.from_dict({"models": {"base": "b", "math": "m", "code": "c"}, "base": "base", "rules": [rule]})


def test_recipes_take_gradients_for_numeric_params_and_weights():
    recipe = _recipe({"method": "ties", "params": {"density": {"math": [0.2, 0.6], "code": 0.5}, "lambda": [1.0, 0.5]},
                      "weights": {"math": [0.0, 1.0, 0.0]}})  # fmt: skip
    rule = recipe.rules[0].at(0.5)
    assert rule.method_kwargs(recipe.experts) == {"density": [0.4, 0.5], "lambda": 0.75}
    assert rule.weight_list(recipe.experts) == [1.0, 1.0]
    assert recipe.rules[0].at(0.25).weight_list(recipe.experts) == [0.5, 1.0]
    assert Recipe.from_dict(recipe.to_dict()) == recipe  # gradients round-trip


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"method": "ties", "params": {"normalize": [True, False]}}, r"rules\.0\.params\.normalize: a gradient \(list\) needs a numeric parameter"),
        ({"method": "karcher", "params": {"max_iter": [5, 10]}}, r"needs a numeric parameter"),
        ({"method": "ties", "params": {"density": []}}, r"density: a gradient needs at least one value"),
        ({"method": "ties", "params": {"rescale": "l2"}}, r"rescale: 'l2' is not one of true, false, inverse_keep"),
        ({"method": "ties", "params": {"scope": "layer"}}, r"scope: 'layer' is not one of tensor, global"),
    ],
)
def test_bad_gradients_are_one_line_errors(rule, message):
    with pytest.raises(ConfigError, match=message) as info:
        _recipe(rule)
    assert "\n" not in str(info.value)


def test_a_mergekit_config_becomes_an_equivalent_recipe(zoo):
    config = {
        "merge_method": "ties",
        "base_model": zoo["base"],
        "models": [
            {"model": zoo["base"]},  # the base listed among the models is still the base
            {"model": zoo["math"], "parameters": {"weight": [1.0, 0.5], "density": "5e-1"}},  # YAML reads 5e-1 as a string
            {"model": zoo["code"], "parameters": {"weight": 0.5}},
        ],
        "parameters": {"density": 0.3, "int8_mask": True, "lambda": [0.9, 1.1]},
        "dtype": "bfloat16",
    }
    recipe = recipe_from_mergekit(config)
    assert recipe.base == "base" and recipe.experts == ["math", "code"] and recipe.dtype == "bfloat16"
    (rule,) = recipe.rules
    assert rule.params == {"density": {"math": 0.5, "code": 0.3}, "lambda": [0.9, 1.1]}
    assert rule.weights == {"math": [1.0, 0.5], "code": 0.5}


def test_mergekit_filters_become_rules_over_the_tensors_they_pick(zoo):
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.8}, {"value": 0.5}]
    recipe = recipe_from_mergekit({"merge_method": "slerp", "base_model": zoo["base"],
                                   "models": [{"model": zoo["math"]}], "parameters": {"t": t}})  # fmt: skip
    assert recipe.rule_for("model.layers.2.self_attn.q_proj.weight").params == {"t": [0.0, 1.0]}
    assert recipe.rule_for("model.layers.0.mlp.up_proj.weight").params == {"t": 0.8}
    assert recipe.rule_for("model.norm.weight").params == {"t": 0.5}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slices": [{"sources": []}]}, r"does not support mergekit's slices"),
        ({"tokenizer": {"source": "union"}, "chat_template": "chatml"}, r"does not support mergekit's chat_template"),
        ({"merge_method": "frankenmerge"}, r"merge_method 'frankenmerge' is not a mergekit method"),
        ({"parameters": {"density": 0.5, "quantum": 1}}, r"parameter 'quantum' of ties has no mergetune equivalent"),
        ({"models": [{"model": "org/model+org/lora"}]}, r"LoRA references"),
        ({"base_model": None}, r"ties needs base_model"),
        ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "base"}}}}, r"tokenizer: mergetune reads source and pad"),
        ({"tokenizer_source": "/elsewhere/model"}, r"tokenizer.source '/elsewhere/model' is none of the merged models"),
    ],
)
def test_unsupported_mergekit_keys_are_one_line(zoo, change, message):
    config = {"merge_method": "ties", "base_model": zoo["base"], "models": [{"model": zoo["math"], "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=message) as info:
        recipe_from_mergekit({**config, **change})
    assert "\n" not in str(info.value)


def test_mergekits_tokenizer_options_become_our_tokenizer_option(zoo):
    config = {"merge_method": "ties", "base_model": zoo["base"], "models": [{"model": zoo["math"], "parameters": {"weight": 1.0}}]}
    assert recipe_from_mergekit(config).tokenizer is None
    assert recipe_from_mergekit({**config, "tokenizer_source": "union"}).tokenizer.source == "union"
    block = recipe_from_mergekit({**config, "tokenizer": {"source": zoo["math"], "pad_to_multiple_of": 8}}).tokenizer
    assert (block.source, block.pad_to_multiple_of) == ("math", 8)
    assert recipe_from_mergekit({**config, "tokenizer": {}}).tokenizer.source == "union"  # mergekit's default


def test_required_mergekit_params_stay_required(zoo):
    with pytest.raises(ConfigError, match=r"slerp needs parameter 't'"):
        recipe_from_mergekit({"merge_method": "slerp", "base_model": zoo["base"], "models": [{"model": zoo["math"]}]})
    with pytest.raises(ConfigError, match=r"model 'code' has no weight"):
        recipe_from_mergekit({"merge_method": "ties", "base_model": zoo["base"],
                              "models": [{"model": zoo["math"], "parameters": {"weight": 1}}, {"model": zoo["code"]}]})  # fmt: skip


def test_import_command_and_multi_document_refusal(zoo, tmp_path, capsys):
    config = {"merge_method": "linear", "models": [{"model": zoo["math"], "parameters": {"weight": 0.3}},
                                                   {"model": zoo["code"], "parameters": {"weight": 0.7}}]}  # fmt: skip
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    assert _run(["import", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "recipe.yaml")]) == 0
    recipe = Recipe.from_yaml(tmp_path / "recipe.yaml")
    assert recipe == load_recipe(tmp_path / "mk.yaml") and recipe.rules[0].weights == {"math": 0.3, "code": 0.7}
    (tmp_path / "multi.yaml").write_text(yaml.safe_dump_all([{"name": "a", **config}, config]))
    assert _run(["merge", str(tmp_path / "multi.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "2 YAML documents (a mergekit-multi config)" in err and len(err.strip().splitlines()) == 1
