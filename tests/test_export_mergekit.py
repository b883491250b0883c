"""Exported mergekit configs, run through mergekit in-process, reproduce our exported model."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from safetensors.torch import load_file
from test_studies_fixtures import build_tiny_models

from mergetune.core.errors import MergetuneError
from mergetune.merge.recipe import Recipe
from mergetune.studies.export import MERGEKIT_FILE, RECIPE_FILE, export_trial
from mergetune.studies.mergekit import MERGEKIT_METHODS, ModelLayout, recipe_to_mergekit, resolve_setting

pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def zoo3(tmp_path_factory) -> dict[str, str]:
    # Three layers: a gradient list then has an interior point, where interpolation could go wrong.
    return build_tiny_models(tmp_path_factory.mktemp("zoo3"), num_layers=3, seed=1)


def _recipe(models: dict[str, str], rules: list[dict], seed: int = 0) -> Recipe:
    return Recipe.from_dict({"models": models, "base": "base", "rules": rules, "seed": seed})


def _one_trial_study(recipe: Recipe) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="export", directions=["maximize"])
    trial = study.ask()
    trial.set_user_attr("recipe", recipe.to_dict())
    study.tell(trial, [0.5])
    return study, study.trials[0]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _run_mergekit(config_dir: Path, out: Path, seed: int) -> Path:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    text = (config_dir / MERGEKIT_FILE).read_text()
    docs = list(yaml.safe_load_all(text))
    if len(docs) == 1:
        run_merge(MergeConfiguration.model_validate(docs[0]), str(out), options=MergeOptions(random_seed=seed))
    else:
        from mergekit.scripts.multimerge import main as multimerge

        multimerge.main(
            [str(config_dir / MERGEKIT_FILE), "--intermediate-dir", str(out.parent / "inter"), "--out-path", str(out)],
            standalone_mode=False,
        )
    return out


def _assert_same_tensors(ours: Path, theirs: Path) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    for name in a:
        x, y = a[name].float(), b[name].float()
        rel = (x - y).abs().max() / x.abs().max().clamp_min(1e-12)
        assert rel <= 1e-5, f"{name}: relative difference {rel:.2e}"


W = {"math": 0.7, "code": 0.4}
CASES = {
    "linear_per_layer": [
        {"layers": [0, 1], "method": "linear", "weights": {"math": 0.2, "code": 0.8}},
        {"match": "*mlp*", "method": "linear", "weights": {"math": 0.6, "code": 0.5}},
        {"match": "*", "method": "linear", "weights": {"math": 0.9, "code": 0.3}},
    ],
    "task_arithmetic": [
        {"layers": [1, 2], "method": "task_arithmetic", "params": {"lambda": 0.6}, "weights": W},
        {"match": "*", "method": "task_arithmetic", "params": {"lambda": 1.1}, "weights": W},
    ],
    "ties": [
        {"layers": [0, 2], "method": "ties", "params": {"density": {"math": 0.3, "code": 0.6}}, "weights": W},
        {"match": "*", "method": "ties", "params": {"density": 0.5, "lambda": 0.9}, "weights": W},
    ],
    "slerp": [
        {"layers": [0, 1], "method": "slerp", "models": ["math"], "params": {"t": 0.3}},
        {"match": "*", "method": "slerp", "models": ["math"], "params": {"t": 0.6}},
    ],
    "dare_ties_density_1": [{"match": "*", "method": "dare_ties", "params": {"density": 1.0}, "weights": W}],
    "della_density_1": [{"match": "*", "method": "della", "params": {"density": 1.0, "epsilon": 0.0}, "weights": W}],
    "multi_by_layer": [
        {"layers": [0, 1], "method": "ties", "params": {"density": 0.5}, "weights": W},
        {"layers": [1, 3], "method": "task_arithmetic", "params": {"lambda": 0.8}, "weights": W},
        {"match": "*embed*", "method": "ties", "params": {"density": 0.7}, "weights": W},
        {"match": "*", "method": "task_arithmetic", "weights": W},
    ],
    "multi_attention_mlp": [
        {"match": "*mlp*", "method": "ties", "params": {"density": 0.4}, "weights": W},
        {"match": "*", "method": "linear", "weights": W},
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_export_reproduces_our_model(zoo3, tmp_path, case):
    rules = CASES[case]
    if case == "slerp":
        rules = [{k: v for k, v in r.items() if k != "models"} for r in rules]  # two models only: base + math
        models = {k: v for k, v in zoo3.items() if k != "code"}
    else:
        models = zoo3
    recipe = _recipe(models, rules, seed=3)
    study, trial = _one_trial_study(recipe)
    export_trial(study, trial, tmp_path / "ours", fmt="all")
    assert Recipe.from_yaml(tmp_path / "ours" / RECIPE_FILE) == recipe
    is_multi = (tmp_path / "ours" / MERGEKIT_FILE).read_text().count("\n---") > 0
    assert is_multi == case.startswith("multi")
    theirs = _run_mergekit(tmp_path / "ours", tmp_path / "theirs" / "out", seed=recipe.seed)
    _assert_same_tensors(tmp_path / "ours", theirs)


def test_method_table_matches_mergekit():
    import mergekit.merge_methods as mm
    from mergekit.merge_methods.base import MISSING, BasePolicy, ParameterScope

    for name, ours in MERGEKIT_METHODS.items():
        spec = mm.get(name).spec
        assert ours.uses_base == (spec.contract.base == BasePolicy.REQUIRED), name
        shared = {p.name: (None if p.default is MISSING else p.default) for p in spec.parameters if p.scope == ParameterScope.SHARED}
        per_model = {p.name: (None if p.default is MISSING else p.default) for p in spec.parameters if p.scope != ParameterScope.SHARED}
        assert ours.shared == shared and ours.per_model == per_model, name


def test_settings_resolve_like_mergekit():
    from mergekit.config import ConditionalParameter, evaluate_setting

    setting = [{"filter": "lm_head", "value": 0.1}, {"filter": ".mlp.", "value": [0.0, 0.5, 1.0]}, {"value": [1.0, 2.0]}]
    theirs_setting = [ConditionalParameter.model_validate(c) for c in setting]
    for name in ("lm_head.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.q_proj.weight"):
        for t in (0.0, 0.25, 0.5, 1.0):
            assert resolve_setting(setting, name, t) == pytest.approx(evaluate_setting(name, theirs_setting, t, validate=float))


def test_randomized_export_names_the_seed(zoo3):
    recipe = _recipe(zoo3, [{"match": "*", "method": "dare_ties", "params": {"density": 0.5}, "weights": W}], seed=42)
    from mergetune.studies.mergekit import mergekit_yaml

    text = mergekit_yaml(recipe, recipe_to_mergekit(recipe, ModelLayout.from_dir(zoo3["base"])))
    assert "--random-seed 42" in text.splitlines()[0]


def test_methods_mergekit_lacks_are_refused(zoo3):
    recipe = _recipe(zoo3, [{"match": "*", "method": "linear", "models": ["math"]}])
    with pytest.raises(MergetuneError, match="only the mergetune recipe format"):
        recipe_to_mergekit(recipe)
