"""Exported mergekit configs, run exactly as their header prints them, reproduce our exported model.

The header's command (`mergekit-yaml ...` or `mergekit-multi ...`) is run as printed: as a
subprocess of the real console scripts for the single/multi × fp32/bf16 matrix, in-process
through the same click entry points with the same arguments for the rest (every case as a
bf16 subprocess is `slow`).
Every tensor and the output dtype are compared (tests/parity.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from parity import assert_parity, load_tensors
from test_studies_fixtures import build_tiny_models

from mergetune.core.errors import MergetuneError
from mergetune.merge.mergekit_config import MERGEKIT_METHODS
from mergetune.merge.recipe import Recipe
from mergetune.studies.export import MERGEKIT_FILE, RECIPE_FILE, export_trial
from mergetune.studies.mergekit import ModelLayout, mergekit_yaml, recipe_to_mergekit, resolve_setting


@pytest.fixture(scope="module")
def zoos(tmp_path_factory) -> dict[str, dict[str, str]]:
    # Three layers: a gradient list then has an interior point, where interpolation could go wrong.
    return {
        dtype: build_tiny_models(tmp_path_factory.mktemp(f"zoo3_{dtype}"), num_layers=3, seed=1, dtype=dtype)
        for dtype in ("float32", "bfloat16")
    }


@pytest.fixture(scope="module")
def zoo3(zoos) -> dict[str, str]:
    return zoos["float32"]


def _recipe(models: dict[str, str], rules: list[dict], seed: int = 0) -> Recipe:
    return Recipe.from_dict({"models": models, "base": "base", "rules": rules, "seed": seed})


def _one_trial_study(recipe: Recipe) -> tuple[optuna.Study, optuna.trial.FrozenTrial]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="export", directions=["maximize"])
    trial = study.ask()
    trial.set_user_attr("recipe", recipe.to_dict())
    study.tell(trial, [0.5])
    return study, study.trials[0]


def printed_command(export_dir: Path) -> list[str]:
    """The command the exported mergekit.yaml's header says to run."""
    header = (export_dir / MERGEKIT_FILE).read_text().splitlines()[0]
    assert header.startswith("# Run with: "), header
    return shlex.split(header.removeprefix("# Run with: "))


def run_printed_command(export_dir: Path, workdir: Path, *, subprocess_: bool = True) -> Path:
    """Run the header's command in `workdir` (holding a copy of mergekit.yaml); returns its ./merged."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(export_dir / MERGEKIT_FILE, workdir / MERGEKIT_FILE)
    argv = printed_command(export_dir)
    if subprocess_:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        from mergekit.io.tasks import LoaderCache
        from mergekit.scripts import multimerge, run_yaml

        entry = {"mergekit-yaml": run_yaml.main, "mergekit-multi": multimerge.main}[argv[0]]
        LoaderCache.loaders.clear()  # keyed by path: ./intermediate/* of an earlier test would be reused
        with contextlib.chdir(workdir):
            entry.main(argv[1:], standalone_mode=False)
    return workdir / "merged"


def _assert_same_model(ours: Path, theirs: Path) -> None:
    assert_parity(load_tensors(ours), load_tensors(theirs))
    dtype = json.loads((ours / "config.json").read_text()).get("dtype")
    assert json.loads((theirs / "config.json").read_text()).get("dtype") == dtype


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
    "dare_linear_density_1": [{"match": "*", "method": "dare_linear", "params": {"density": 1.0, "lambda": 0.7}, "weights": W}],
    "della_density_1": [{"match": "*", "method": "della", "params": {"density": 1.0, "epsilon": 0.0}, "weights": W}],
    "della_linear_density_1": [{"match": "*", "method": "della_linear", "params": {"density": 1.0}, "weights": W}],
    "ties_rescaled_gradient": [
        {"match": "*", "method": "ties", "params": {"density": [0.3, 0.7], "rescale": True, "normalize": False}, "weights": {"math": [1.0, 0.4], "code": 0.6}},
    ],
    "breadcrumbs_ties": [{"match": "*", "method": "breadcrumbs_ties", "params": {"density": 0.8, "gamma": {"math": 0.05, "code": 0.1}}, "weights": W}],
    "nuslerp": [{"match": "*", "method": "nuslerp", "params": {"nuslerp_flatten": False}, "weights": {"math": 0.3, "code": 0.9}}],
    "multislerp": [{"match": "*", "method": "multislerp", "weights": W}],
    "karcher": [{"match": "*", "method": "karcher", "params": {"max_iter": 20}}],
    "sce": [{"match": "*", "method": "sce", "params": {"select_topk": [0.3, 0.8]}}],
    "ramplus_tl": [{"match": "*", "method": "ramplus_tl", "params": {"epsilon": 0.01, "r": 0.3}}],
    "ram": [{"match": "*", "method": "ram", "params": {"epsilon": 0.01}}],
    "nearswap": [{"match": "*", "method": "nearswap", "models": ["math"], "params": {"t": 0.01}}],
    "arcee_fusion": [{"match": "*", "method": "arcee_fusion", "models": ["math"]}],
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


ONE_EXPERT = {"slerp", "nearswap", "arcee_fusion"}


def _export(zoo: dict[str, str], case: str, tmp_path: Path) -> Path:
    rules = CASES[case]
    models = zoo
    if case in ONE_EXPERT:
        rules = [{k: v for k, v in r.items() if k != "models"} for r in rules]  # base + math only
        models = {k: v for k, v in zoo.items() if k != "code"}
    recipe = _recipe(models, rules, seed=3)
    study, trial = _one_trial_study(recipe)
    export_trial(study, trial, tmp_path / "ours", fmt="all")
    assert Recipe.from_yaml(tmp_path / "ours" / RECIPE_FILE) == recipe
    is_multi = (tmp_path / "ours" / MERGEKIT_FILE).read_text().count("\n---") > 0
    assert is_multi == case.startswith("multi_")
    return tmp_path / "ours"


CLI_MATRIX = [("ties", "float32"), ("ties", "bfloat16"), ("multi_by_layer", "float32"), ("multi_attention_mlp", "bfloat16")]


@pytest.mark.parametrize(("case", "dtype"), CLI_MATRIX)
def test_the_printed_command_reproduces_our_model(zoos, tmp_path, case, dtype):
    ours = _export(zoos[dtype], case, tmp_path)
    assert printed_command(ours)[0] == ("mergekit-multi" if case.startswith("multi_") else "mergekit-yaml")
    _assert_same_model(ours, run_printed_command(ours, tmp_path / "run"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_exported_case_reproduces_our_model(zoos, tmp_path, case, dtype):
    ours = _export(zoos[dtype], case, tmp_path)
    _assert_same_model(ours, run_printed_command(ours, tmp_path / "run", subprocess_=False))


@pytest.mark.slow  # ~10 s a case (a console script starts mergekit afresh); bf16, as real checkpoints are
@pytest.mark.parametrize("case", list(CASES))
def test_every_exported_case_through_the_console_scripts(zoos, tmp_path, case):
    ours = _export(zoos["bfloat16"], case, tmp_path)
    _assert_same_model(ours, run_printed_command(ours, tmp_path / "run"))


def test_method_table_matches_mergekit():
    import mergekit.merge_methods as mm
    from mergekit.merge_methods.base import MISSING, ParameterScope

    from mergekit.merge_methods.registry import registered_methods

    assert set(MERGEKIT_METHODS) == {m.spec.name for m in registered_methods()}
    for name, ours in MERGEKIT_METHODS.items():
        spec = mm.get(name).spec
        assert ours.base == spec.contract.base.value, name
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


def test_randomized_export_names_the_seed_and_keeps_the_dtype(zoos):
    recipe = _recipe(zoos["bfloat16"], [{"match": "*", "method": "dare_linear", "params": {"density": 0.5}, "weights": W}], seed=42)
    config = recipe_to_mergekit(recipe)
    text = mergekit_yaml(recipe, config, ModelLayout.from_recipe(recipe))
    assert text.splitlines()[0] == "# Run with: mergekit-yaml mergekit.yaml ./merged --random-seed 42"
    assert "in distribution" in text and (config["dtype"], config["out_dtype"]) == ("float32", "bfloat16")


def test_our_inverse_keep_rescale_is_refused_in_one_line(zoo3):
    recipe = _recipe(zoo3, [{"match": "*", "method": "dare_ties", "params": {"density": 0.5, "rescale": "inverse_keep"}}])
    with pytest.raises(MergetuneError, match=r"rescale: inverse_keep .* no mergekit equivalent") as info:
        recipe_to_mergekit(recipe)
    assert "\n" not in str(info.value)


def test_methods_mergekit_lacks_are_refused(zoo3):
    recipe = _recipe(zoo3, [{"match": "*", "method": "linear", "models": ["math"]}])
    with pytest.raises(MergetuneError, match="only the mergetune recipe format"):
        recipe_to_mergekit(recipe)
