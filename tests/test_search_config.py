"""Study configs: the shipped examples validate; mistakes are one-line errors naming the field."""

from pathlib import Path

import pytest

from mergetune.core.errors import ConfigError
from mergetune.search.config import load_study_config, parse_study_config

CONFIGS = Path(__file__).parent.parent / "configs"


def minimal(**extra):
    return {
        "study": "s",
        "models": {"base": "/b", "experts": {"x": "/x", "y": "/y"}},
        "evaluator": {"kind": "quick", "zoo": "/zoo"},
        **extra,
    }


def test_cluster_example_validates():
    config = load_study_config(CONFIGS / "llama3-8b-cluster.yaml")
    assert config.ray.gpus_per_worker == 1 and config.ray.address == "auto"
    assert config.storage_url.startswith("postgresql+psycopg://")
    assert [o.name for o in config.objectives] == ["gsm8k", "arc_challenge", "ifeval"]


def test_demo_example_validates_against_a_zoo_layout(tmp_path, monkeypatch):
    for expert in ("reverse", "sort"):
        (tmp_path / "zoo-demo" / "experts" / expert).mkdir(parents=True)
        (tmp_path / "zoo-demo" / "experts" / expert / "adam_second_moments.safetensors").touch()
    (tmp_path / "zoo-demo" / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_study_config(CONFIGS / "demo.yaml")
    assert config.models.experts == {"reverse": "zoo-demo/experts/reverse", "sort": "zoo-demo/experts/sort"}
    assert set(config.models.moments) == {"reverse", "sort"}
    assert config.ray.workers == 2 and config.storage_url == "sqlite:///studies/demo.db"


def test_defaults():
    config = parse_study_config(minimal(), "t")
    assert config.storage_url == "sqlite:///studies/s.db"
    assert config.sampler.name == "tpe" and config.sampler.m3_prior.alpha == 0.5
    assert config.sampler.target == "objectives"
    assert config.warm_start and config.budget.n_trials == 50


@pytest.mark.parametrize(
    "data, message",
    [
        (minimal(serach={}), "serach: unknown key; allowed here: study, zoo, models"),
        (minimal(search={"layer_group": 2}), "search.layer_group: unknown key; allowed here: layer_groups"),
        (minimal(sampler={"name": "bayes"}), "sampler.name: Input should be 'tpe', 'nsga2', 'cmaes', 'gp' or 'random'"),
        (minimal(sampler={"target": "mean"}), "sampler.target: Input should be 'objectives' or 'weighted_mean'"),
        (minimal(budget={"timeout": -1}), "budget.timeout"),
        (minimal(budget={}), "budget: give n_trials and/or timeout"),
        (
            minimal(sampler={"name": "cmaes"}, objectives=[{"name": "a"}, {"name": "b"}]),
            "cmaes optimises one objective",
        ),
        ({**minimal(), "models": {"base": "/b", "experts": {"x": "/x"}, "moments": {"z": "/z"}}}, "moments: 'z' is not an expert"),
        ({"study": "s", "evaluator": {"kind": "quick", "zoo": "/zoo"}}, "models: give `models:`"),
    ],
)
def test_mistakes_are_one_line_errors_naming_the_field(data, message):
    with pytest.raises(ConfigError) as caught:
        parse_study_config(data, "study.yaml")
    text = str(caught.value)
    assert message in text and "\n" not in text and text.startswith("study.yaml")


def test_zoo_shortcut_refuses_a_directory_that_is_not_a_zoo(tmp_path):
    with pytest.raises(ConfigError, match="is not a zoo"):
        parse_study_config({"study": "s", "zoo": str(tmp_path)}, "t")


def test_a_storage_url_without_its_database_driver_names_the_package():
    from mergetune.studies.storage import open_storage

    with pytest.raises(ConfigError, match="mysql\\+pymysql URLs need the Python package pymysql"):
        open_storage("mysql+pymysql://user@127.0.0.1/db", create=True)


def test_the_whole_study_config_validates_without_torch():
    """The driver checks the config (evaluator included) before importing torch or starting Ray."""
    import subprocess
    import sys

    code = (
        "import sys; from mergetune.search.config import parse_study_config; "
        "c = parse_study_config({'study': 's', 'models': {'base': '/b', 'experts': {'x': '/x'}}, "
        "'evaluator': {'kind': 'lm_eval', 'backend': 'vllm', 'tasks': ['gsm8k']}}, 't'); "
        "print(type(c.evaluator).__name__, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["LmEvalConfig", "False"], done.stderr


def test_the_per_expert_params_are_those_the_methods_take_per_expert():
    from mergetune.merge.methods import get_method
    from mergetune.search.params import PER_EXPERT_PARAMS, SEARCHED_PARAMS

    per_model = {p for m, params in SEARCHED_PARAMS.items() for p in params if get_method(m).params[p].per_model}
    assert sorted(per_model) == sorted(PER_EXPERT_PARAMS)
