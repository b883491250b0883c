"""benchmarks/search_quality.py: its pure helpers against hand-computed values, and an arm the tree cannot run."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from mergetune.core.errors import ConfigError

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its folder's _common
    try:
        spec = importlib.util.spec_from_file_location("search_quality", BENCHMARKS / "search_quality.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


def test_margin_in_standard_errors(quality):
    assert quality.margin_in_se(0.034, 0.017) == pytest.approx(2.0)
    assert quality.margin_in_se(-0.0085, 0.017) == pytest.approx(-0.5)
    assert quality.margin_in_se(0.01, 0.0) == math.inf
    assert quality.margin_in_se(0.0, 0.0) == 0.0


def test_normalised_score_divides_each_task_by_its_expert(quality):
    # (0.4 / 0.8 + 0.9 / 0.9) / 2
    assert quality.normalised_score({"a": 0.4, "b": 0.9}, {"a": 0.8, "b": 0.9, "c": 0.5}) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="'d'"):
        quality.normalised_score({"a": 0.4, "d": 0.3}, {"a": 0.8})


def test_single_model_means_weight_each_task(quality):
    accuracy = {
        "base": {"a": 0.2, "b": 0.4},
        "experts": {"a": {"a": 0.9, "b": 0.3}, "b": {"a": 0.1, "b": 0.7}},
    }
    means = quality.single_model_means(accuracy, {"a": 3.0, "b": 1.0})
    assert means == pytest.approx({"base": (0.6 + 0.4) / 4, "a": (2.7 + 0.3) / 4, "b": (0.3 + 0.7) / 4})


def test_mean_and_se_over_seeds(quality):
    mean, se = quality.mean_and_se([0.40, 0.42, 0.38])
    assert mean == pytest.approx(0.40)
    assert se == pytest.approx(0.02 / math.sqrt(3))  # sample stdev 0.02
    assert quality.mean_and_se([0.5]) == (0.5, None)


def test_weighted_test_mean_and_its_standard_error(quality):
    summary = {"a": {"score": 0.5, "se": 0.03, "items": 200}, "b": {"score": 0.3, "se": 0.04, "items": 200}}
    mean, se = quality.weighted_test(summary, {})
    assert mean == pytest.approx(0.4)
    assert se == pytest.approx(0.5 * math.hypot(0.03, 0.04))  # 0.025
    mean, se = quality.weighted_test(summary, {"a": 3.0, "b": 1.0})
    assert mean == pytest.approx(0.45)
    assert se == pytest.approx(math.hypot(0.75 * 0.03, 0.25 * 0.04))


def test_arm_summary_against_hand_computed_margins(quality):
    runs = [
        {"test_mean": 0.42, "test_se": 0.016, "normalised": 0.50, "wall_s": 100.0},
        {"test_mean": 0.40, "test_se": 0.018, "normalised": 0.45, "wall_s": 120.0},
        {"test_mean": 0.35, "test_se": 0.017, "normalised": 0.40, "wall_s": 110.0},
    ]
    summary = quality.arm_summary(runs, {"test_mean": 0.37})
    assert summary["margin"] == pytest.approx(0.02)  # (0.05 + 0.03 − 0.02) / 3
    assert summary["margin_min"] == pytest.approx(-0.02)
    assert summary["test_se_per_run"] == pytest.approx(0.017)
    assert summary["margin_in_se"] == pytest.approx(0.02 / 0.017)
    assert summary["wins"] == 2
    assert summary["normalised"] == pytest.approx(0.45)
    assert summary["test_se_over_seeds"] == pytest.approx(math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2) / math.sqrt(3))


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> Path:
    from rich.console import Console

    from mergetune.zoo.build import build_zoo

    out = tmp_path_factory.mktemp("zoo") / "tiny"
    build_zoo(out, "tiny", seed=0, console=Console(quiet=True))
    return out


def test_summarised_test_scores_match_the_merged_model_on_disk(tiny_zoo, tmp_path):
    """The benchmark's test scores (resident merge, `summarise_recipes_on_split`) against the same recipe merged
    to disk, reloaded and summarised by the evaluator: scores, SEs and item counts."""
    from mergetune.evaluators.base import HFBackend, build_evaluator
    from mergetune.merge.engine import merge_recipe_to_dir
    from mergetune.merge.recipe import Recipe
    from mergetune.search.config import parse_study_config
    from mergetune.studies.scoring import score_recipes_on_split, summarise_recipes_on_split

    evaluator = {"kind": "quick", "zoo": str(tiny_zoo), "limit": 8, "metrics": ["logprob"]}
    config = parse_study_config({"study": "q", "zoo": str(tiny_zoo), "evaluator": evaluator}, "test")
    models = {"base": config.models.base, **config.models.experts}
    recipe = Recipe(models=models, base="base", rules=[{"match": ["*"], "method": "task_arithmetic", "params": {"lambda": 0.7}}])
    (summary,) = summarise_recipes_on_split(config, [recipe], "test")
    merge_recipe_to_dir(recipe, tmp_path / "merged")
    reference = build_evaluator(config.evaluator).summarise(HFBackend.from_pretrained(tmp_path / "merged"), "test")
    assert set(summary) == set(reference) and len(summary) == len(config.experts)
    for name, expected in reference.items():
        assert summary[name]["items"] == expected["items"] == 8
        assert summary[name]["score"] == pytest.approx(expected["score"], abs=1e-4)
        assert summary[name]["se"] == pytest.approx(expected["se"], rel=1e-3) and expected["se"] > 0
    assert score_recipes_on_split(config, [recipe], "test") == [{n: pytest.approx(s["score"]) for n, s in summary.items()}]
