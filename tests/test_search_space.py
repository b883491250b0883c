"""The search space: conditional params, layer groups, and warm-start params that map through it."""

import optuna
import pytest

from architectures import tiny_structure

from mergetune.core.errors import ConfigError
from mergetune.search.config import parse_study_config
from mergetune.search.space import SearchSpace, layer_groups
from mergetune.search.bookkeeping import enqueue_once, space_change
from mergetune.search.warmstart import baseline_params
from mergetune.studies.storage import StorageRetry


def config(**search):
    return parse_study_config(
        {
            "study": "t",
            "models": {"base": "/nowhere/base", "experts": {"math": "/m", "code": "/c", "facts": "/f"}},
            "evaluator": {"kind": "quick", "zoo": "/zoo"},
            "search": {"layer_groups": 2, "methods": ["linear", "task_arithmetic", "ties", "dare_ties"], **search},
        },
        "test",
    )


def test_a_groups_method_params_exist_only_when_it_chose_that_method():
    space = SearchSpace(config(), structure=tiny_structure(num_layers=4))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        recipe = space.recipe(trial)
        for group, rule in zip(space.groups, recipe.rules):
            method = trial.params[f"{group.name}.method"]
            seen.add(method)
            assert rule.method == method
            own = {k for k in trial.params if k.startswith(f"{group.name}.") and k.split(".")[1] in space.methods}
            assert all(k.split(".")[1] == method for k in own), (method, own)
            has_density = any(k.startswith(f"{group.name}.ties.density.") for k in trial.params)
            assert has_density == (method == "ties")
            if method == "ties":
                assert set(rule.params["density"]) == {"math", "code", "facts"}
                assert f"{group.name}.ties.lambda" in trial.params
            assert bool(rule.weights) == (method != "slerp")
        study.tell(trial, 0.0)
    assert seen == {"linear", "task_arithmetic", "ties", "dare_ties"}


def test_groups_cover_every_layer_once_and_split_attention_from_mlp():
    groups = layer_groups(tiny_structure(num_layers=5), 2, split_attention_mlp=True, separate_embeddings=True)
    assert [g.name for g in groups] == ["g0a", "g0m", "g1a", "g1m", "emb"]
    spans = sorted({g.layers for g in groups if g.layers})
    assert spans[0][0] == 0 and spans[-1][1] == 5 and spans[0][1] == spans[1][0]
    assert layer_groups(tiny_structure(num_layers=2), 8, False, False)[-1].layers == (1, 2)  # G capped at the layer count


def test_recipe_rules_route_tensors_to_their_group():
    space = SearchSpace(config(split_attention_mlp=True), structure=tiny_structure(num_layers=4))
    recipe = space.recipe(optuna.trial.FixedTrial(baseline_params(space)[3][1]))
    assert recipe.rule_for("model.layers.3.mlp.up_proj.weight").layers == (2, 4)
    assert recipe.rule_for("model.layers.0.self_attn.q_proj.weight").match == ["model.layers.*.self_attn.*", "model.layers.*.input_layernorm.*"]
    assert recipe.rule_for("model.embed_tokens.weight").layers is None
    assert recipe.base == "base" and recipe.experts == ["math", "code", "facts"]


def test_shared_params_have_one_value_across_groups():
    space = SearchSpace(config(shared=["lambda"]), structure=tiny_structure(num_layers=4))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(20):
        trial = study.ask()
        recipe = space.recipe(trial)
        lambdas = {r.params["lambda"] for r in recipe.rules if r.method == "ties"}
        assert len(lambdas) <= 1
        study.tell(trial, 0.0)


def test_warm_start_trials_come_first_and_map_through_the_space():
    space = SearchSpace(config(), structure=tiny_structure(num_layers=4))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    retry = StorageRetry(window_s=0)
    names = [name for name, params in baseline_params(space) if enqueue_once(study, retry, params, {"baseline": name})]
    assert names == ["uniform_average", "task_arithmetic", "task_arithmetic_tuned", "ties", "dare_ties"]
    # a resumed study (or a second driver) does not queue them twice
    assert not [name for name, params in baseline_params(space) if enqueue_once(study, retry, params, {"baseline": name})]
    for number, name in enumerate(names):
        trial = study.ask()
        recipe = space.recipe(trial)
        assert trial.number == number and trial.user_attrs["baseline"] == name
        assert len({r.method for r in recipe.rules}) == 1
        if name == "ties":
            assert recipe.rules[0].params == {"density": {"math": 0.5, "code": 0.5, "facts": 0.5}, "lambda": 1.0}
        if name == "uniform_average":
            assert all(r.weights == {"math": 1.0, "code": 1.0, "facts": 1.0} for r in recipe.rules)
        study.tell(trial, 0.0)
    assert "baseline" not in study.ask().user_attrs


def test_methods_that_need_statistics_are_refused_without_them():
    with pytest.raises(ConfigError, match="ota.*moments"):
        SearchSpace(config(methods=["ota"]), structure=tiny_structure(num_layers=4))
    with pytest.raises(ConfigError, match="unknown merge method"):
        SearchSpace(config(methods=["tie"]), structure=tiny_structure(num_layers=4))
    with pytest.raises(ConfigError, match="slerp"):
        SearchSpace(config(methods=["slerp"]), structure=tiny_structure(num_layers=4))  # three experts


def test_ota_searches_its_curvature_power_and_its_baseline_keeps_the_default():
    moments = {e: f"/{e}.safetensors" for e in ("math", "code", "facts")}
    data = config(methods=["ota"]).model_dump(mode="json")
    data["models"]["moments"] = moments
    space = SearchSpace(parse_study_config(data, "test"), structure=tiny_structure(num_layers=4))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    powers = []
    for _ in range(20):
        trial = study.ask()
        recipe = space.recipe(trial)
        powers += [rule.params["power"] for rule in recipe.rules]
        study.tell(trial, 0.0)
    assert 0.25 <= min(powers) < max(powers) <= 2.0
    (name, params), = baseline_params(space)
    baseline = space.recipe(optuna.trial.FixedTrial(params))
    assert name == "ota" and all(rule.params["power"] == 0.5 for rule in baseline.rules)


def test_mergekits_newer_methods_are_searchable_with_their_own_ranges():
    methods = ["nuslerp", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "nearswap", "arcee_fusion"]
    cfg = parse_study_config(
        {
            "study": "t",
            "models": {"base": "/nowhere/base", "experts": {"math": "/m"}},
            "evaluator": {"kind": "quick", "zoo": "/zoo"},
            "search": {"layer_groups": 1, "methods": ["sce", "ramplus_tl", "nearswap", "arcee_fusion", "ram", "karcher"],
                       "ranges": {"t": [0.2, 0.3]}},
        },
        "test",
    )  # fmt: skip
    space = SearchSpace(cfg, structure=tiny_structure(num_layers=2))
    assert {m: space.searched_params(m) for m in methods} == {
        "nuslerp": [], "multislerp": [], "karcher": [], "sce": ["select_topk"], "ram": [],
        "ramplus_tl": ["r", "alpha"], "nearswap": ["t"], "arcee_fusion": [],
    }  # fmt: skip
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {}
    for _ in range(60):
        trial = study.ask()
        rule = space.recipe(trial).rules[0]
        seen.setdefault(rule.method, []).append(rule)
        study.tell(trial, 0.0)
    assert all(0 <= r.params["t"] <= 0.01 for r in seen["nearswap"])  # nearswap.t's range, not the plain t's
    assert all(0 <= r.params["r"] <= 0.5 and 0 <= r.params["alpha"] <= 1 for r in seen["ramplus_tl"])
    assert all(0.1 <= r.params["select_topk"] <= 1 for r in seen["sce"])
    assert all(not r.weights for m in ("sce", "ram", "nearswap", "arcee_fusion") for r in seen.get(m, []))
    assert all(r.weights for r in seen["karcher"])  # karcher's weights are its mean's coefficients


def test_the_space_names_every_distribution_a_trial_can_suggest():
    space = SearchSpace(config(shared=["lambda"]), structure=tiny_structure(num_layers=4))
    described = space.distributions()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = {}
    for _ in range(60):
        trial = study.ask()
        space.recipe(trial)
        study.tell(trial, 0.0)
        seen.update(study.trials[-1].distributions)
    assert seen == described  # every described parameter was drawn, with the same distribution


def test_a_space_change_names_the_first_parameter_that_changed():
    narrow = SearchSpace(config(methods=["linear", "ties"]), structure=tiny_structure(num_layers=4)).distributions()
    wide = SearchSpace(config(methods=["linear", "ties", "task_arithmetic"]), structure=tiny_structure(num_layers=4)).distributions()
    assert space_change(wide, wide) is None
    assert space_change(narrow, wide) == "emb.method was one of linear, ties, now one of linear, ties, task_arithmetic"
    ranged = SearchSpace(config(methods=["linear", "ties"], ranges={"lambda": [0.5, 1.0]}), structure=tiny_structure(num_layers=4)).distributions()
    assert space_change(narrow, ranged) == "emb.ties.lambda was in [0.2, 1.5], now in [0.5, 1]"
    assert space_change(wide, narrow).endswith("now one of linear, ties")
    fewer = {k: v for k, v in narrow.items() if not k.startswith("g1.")}
    assert space_change(narrow, fewer) == "g1.method is no longer searched"
