"""The data-flow search space and its config: valid paths, stable param names, warm starts, one-line errors."""

from __future__ import annotations

import optuna
import pytest
from architectures import tiny_structure

from mergetune.core.errors import ConfigError
from mergetune.merge.dataflow import DataflowPath, DataflowSlot
from mergetune.merge.recipe import Recipe
from mergetune.search.config import parse_study_config
from mergetune.search.space import SearchSpace
from mergetune.search.warmstart import baseline_params

EXPERTS = {"math": "/m", "code": "/c", "skip": "/s"}  # an expert may be called anything but base and merged


def data(space: str, **dataflow) -> dict:
    return {
        "study": "t",
        "models": {"base": "/nowhere/base", "experts": EXPERTS},
        "evaluator": {"kind": "quick", "zoo": "/zoo"},
        "search": {"layer_groups": 2, "methods": ["linear", "ties"], "space": space, "dataflow": dataflow},
    }


def space_of(space: str, num_layers: int = 4, **dataflow) -> SearchSpace:
    return SearchSpace(parse_study_config(data(space, **dataflow), "test"), structure=tiny_structure(num_layers=num_layers))


def test_dataflow_trials_are_valid_paths_with_stable_names_and_no_merge():
    space = space_of("dataflow", slots=6)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sources, lengths = set(), set()
    for _ in range(30):
        trial = study.ask()
        recipe = space.recipe(trial)
        assert recipe.rules == [] and recipe.dataflow is not None
        kept = [t for t in range(6) if not trial.params.get(f"dfs.s{t}.skip", False)]
        assert "dfs.s0.skip" not in trial.params and all(f"dfs.s{t}.source" not in trial.params for t in set(range(6)) - set(kept))
        assert [s.source for s in recipe.dataflow.slots] == [trial.params[f"dfs.s{t}.source"] for t in kept]
        assert [s.layer for s in recipe.dataflow.slots] == [trial.params[f"dfs.s{t}.layer"] for t in kept]
        assert all(0 <= s.layer < 4 and 0.5 <= s.scale <= 1.5 for s in recipe.dataflow.slots)
        assert set(trial.params) <= set(space.distributions())  # every name is declared (resume checks them)
        assert Recipe.from_dict(recipe.to_dict()) == recipe  # the JSON trip to the workers and the storage
        sources |= recipe.dataflow.sources
        lengths.add(len(recipe.dataflow.slots))
        study.tell(trial, 0.0)
    assert sources == {"base", "math", "code", "skip"} and len(lengths) > 1
    assert not any(name.startswith("g0.") for name in space.distributions())


def test_both_searches_the_recipe_and_a_path_that_may_use_the_merge():
    space = space_of("both", scale=[1.0, 1.0], skips=False)
    names = space.distributions()
    assert "g0.method" in names and "dfs.s3.source" in names and "dfs.s0.scale" not in names
    assert "dfs.s4.source" not in names  # T defaults to the base's layer count
    assert names["dfs.s0.source"].choices == ("merged", "base", "math", "code", "skip")
    assert not any(name.startswith("dfs.") and name.endswith(".skip") for name in names)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    recipe = space.recipe(trial)
    assert recipe.rules and len(recipe.dataflow.slots) == 4 and recipe.dataflow.unscaled


def test_warm_starts_are_each_models_own_path_and_in_both_each_classic_over_its_merge():
    dataflow = dict(baseline_params(space_of("dataflow", slots=5)))
    assert sorted(dataflow) == ["path_base", "path_code", "path_math", "path_skip"]
    study = optuna.create_study()
    study.enqueue_trial(dataflow["path_math"])
    recipe = space_of("dataflow", slots=5).recipe(study.ask())
    assert recipe.dataflow == DataflowPath.identity("math", 4)  # slot 4 is skipped
    both = dict(baseline_params(space_of("both")))
    assert "uniform_average" in both and "ties" in both
    study = optuna.create_study()
    study.enqueue_trial(both["ties"])
    recipe = space_of("both").recipe(study.ask())
    assert {r.method for r in recipe.rules} == {"ties"} and recipe.dataflow == DataflowPath.identity("merged", 4)


def test_warm_starts_the_space_cannot_express_are_skipped():
    assert baseline_params(space_of("dataflow", slots=3)) == []  # fewer slots than layers
    assert baseline_params(space_of("dataflow", slots=6, skips=False)) == []
    assert baseline_params(space_of("dataflow", scale=[1.1, 1.4])) == []


@pytest.mark.parametrize(
    ("space", "dataflow", "message"),
    [
        ("dfs", {}, "search.space: Input should be 'parameter', 'dataflow' or 'both'"),
        ("dataflow", {"scale": [0, 1]}, "search.dataflow.scale: [0, 1]: give [low, high] with 0 < low <= high"),
        ("dataflow", {"scale": [1.5, 0.5]}, "0 < low <= high"),
        ("dataflow", {"slots": 0}, "search.dataflow.slots: Input should be greater than or equal to 1"),
        ("dataflow", {"slot": 4}, "search.dataflow.slot: unknown key"),
    ],
)
def test_config_mistakes_are_one_line(space, dataflow, message):
    with pytest.raises(ConfigError) as caught:
        parse_study_config(data(space, **dataflow), "study.yaml")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_too_many_slots_and_other_architectures_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"search.dataflow.slots: 9 is more than twice the base's 4 layers; give at most 8"):
        space_of("dataflow", slots=9)
    config = parse_study_config(data("dataflow"), "test")
    with pytest.raises(ConfigError, match="data-flow paths support Llama decoders .* not GPTNeoXForCausalLM"):
        SearchSpace(config, structure=tiny_structure("gpt_neox"))


def test_an_expert_called_merged_is_refused_for_data_flow_spaces():
    named = data("both") | {"models": {"base": "/b", "experts": {"merged": "/m", "code": "/c"}}}
    with pytest.raises(ConfigError, match="experts: 'merged' names the parameter-space merge"):
        parse_study_config(named, "study.yaml")
    parse_study_config(named | {"search": {"space": "parameter"}}, "study.yaml")


def test_vllm_and_a_merged_vocabulary_are_refused_at_config_time():
    vllm = data("both") | {"evaluator": {"kind": "lm_eval", "tasks": ["arc_easy"], "backend": "vllm"}}
    with pytest.raises(ConfigError, match="search.space: both changes the layer count per trial, which a running vLLM engine cannot"):
        parse_study_config(vllm, "study.yaml")
    with pytest.raises(ConfigError, match="tokenizer: a dataflow path keeps the base's embeddings"):
        parse_study_config(data("dataflow") | {"tokenizer": {"source": "union"}}, "study.yaml")
    parse_study_config(data("both") | {"tokenizer": {"source": "union"}}, "study.yaml")


def test_recipe_paths_name_known_sources_and_need_rules_for_merged():
    slot = DataflowSlot(source="merged", layer=0)
    with pytest.raises(ConfigError, match="rules: give at least one rule"):
        Recipe.from_dict({"models": {"base": "/b", "math": "/m"}, "base": "base", "rules": [], "dataflow": {"slots": [slot.model_dump()]}})
    with pytest.raises(ConfigError, match="dataflow: source 'chem' is not one of models"):
        Recipe.from_dict({"models": {"base": "/b", "math": "/m"}, "base": "base", "rules": [], "dataflow": {"slots": [{"source": "chem", "layer": 0}]}})
    with pytest.raises(ConfigError, match=r"dataflow.slots.0.scale: Input should be greater than 0"):
        Recipe.from_dict({"models": {"base": "/b"}, "base": "base", "rules": [], "dataflow": {"slots": [{"source": "base", "layer": 0, "scale": 0}]}})


def test_path_summary_and_folded_divisors():
    path = DataflowPath(slots=[DataflowSlot(source="base", layer=0, scale=2.0), DataflowSlot(source="math", layer=1, scale=0.25),
                               DataflowSlot(source="base", layer=1)])
    assert path.summary() == "dfs: 3 slots, 2 from base, 1 from math, scales 0.25–2.00"
    assert path.folded_divisors() == [2.0, 0.5, 0.5]
    assert path.runs() == [("base", 0, 1), ("math", 1, 2), ("base", 1, 2)]


def test_summaries_show_the_path_and_the_method_chart_only_the_rules():
    from mergetune.studies.front import recipe_summary, rule_parts

    path = DataflowPath(slots=[DataflowSlot(source="base", layer=0), DataflowSlot(source="sort", layer=1), DataflowSlot(source="sort", layer=1)])
    models = {"base": "/b", "sort": "/s"}
    assert recipe_summary(Recipe(models=models, base="base", rules=[], dataflow=path)) == "dfs: 3 slots, 2 from sort, 1 from base"
    both = Recipe(models=models, base="base", rules=[{"method": "linear"}], dataflow=path)
    assert recipe_summary(both) == "rest linear · dfs: 3 slots, 2 from sort, 1 from base"
    assert rule_parts(both) == ["rest linear"]
