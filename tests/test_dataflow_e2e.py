"""Data-flow search end to end on the tiny zoo: `space: dataflow` and `space: both` run with the real TrialWorker,
export, reload with plain transformers and score as their trials did."""

from __future__ import annotations

import optuna
import pytest
from rich.console import Console
from test_export_e2e import evaluator_config, run_cli, scores_of, zoo  # noqa: F401 (zoo is a fixture)

from mergetune.merge.recipe import Recipe
from mergetune.search.config import parse_study_config
from mergetune.studies.scoring import score_recipes_on_split

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOGPROB_TOL = 1e-4  # the export folds the scales: equal up to RMSNorm's eps and float rounding


def close_scores(ours: dict[str, float], recorded: dict[str, float], items: int, what: str = "") -> None:
    assert set(ours) == set(recorded)
    for name, value in recorded.items():
        tolerance = LOGPROB_TOL if name.endswith(".logprob") else 1.5 / items  # at most one item flips
        assert ours[name] == pytest.approx(value, abs=tolerance), f"{what}: {name}"


def run(zoo, tmp_path, space: str, n_trials: int, **search):
    import ray

    from mergetune.search.driver import run_study

    config = parse_study_config(
        {
            "study": space,
            "zoo": str(zoo),
            "evaluator": {**evaluator_config(zoo), "limit": 16},
            "search": {"layer_groups": 1, "methods": ["task_arithmetic"], "space": space, **search},
            "budget": {"n_trials": n_trials},
            "confirm": {"top_k": 0},
            "storage": f"sqlite:///{tmp_path / 'studies.db'}",
            "ray": {"workers": 1},
        },
        "test",
    )
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        study = run_study(config, console=Console(quiet=True), sampler=optuna.samplers.RandomSampler(seed=3))
    finally:
        if started:
            ray.shutdown()
    return config, study, study.get_trials(states=[optuna.trial.TrialState.COMPLETE])


def export_and_score(config, trial, tmp_path, space: str) -> dict[str, float]:
    out = tmp_path / f"{space}-{trial.number}"
    args = ["export", "--study", space, "--storage", config.storage, "--trial", str(trial.number), "--format", "all"]
    assert run_cli([*args, "--out", str(out)]) == 0
    assert "dfs:" in (out / "README.md").read_text()
    return scores_of(out, config)


@pytest.mark.slow
def test_dataflow_and_both_run_export_and_reload(zoo, tmp_path):
    config, study, trials = run(zoo, tmp_path, "dataflow", 7, dataflow={"slots": 3})
    experts = config.experts
    assert [t.user_attrs.get("baseline") for t in trials[: 1 + len(experts)]] == ["path_base", *[f"path_{e}" for e in experts]]
    base_path = trials[0]
    searched = [t for t in trials if "baseline" not in t.user_attrs]
    assert searched, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert all(Recipe.from_dict(t.user_attrs["recipe"]).dataflow is not None for t in trials)
    items = 16
    for trial in (base_path, *searched):
        close_scores(export_and_score(config, trial, tmp_path, "dataflow"), trial.user_attrs["scores"], items)
    # the path of the base alone scores as the base model does
    close_scores(scores_of(zoo / "base", config), base_path.user_attrs["scores"], items)
    # held-out scoring (`front --evaluate`) runs the same paths
    again = score_recipes_on_split(config, [Recipe.from_dict(t.user_attrs["recipe"]) for t in searched], "search")
    for trial, scores in zip(searched, again):
        close_scores(scores, trial.user_attrs["scores"], items)
    assert (tmp_path / f"dataflow-{base_path.number}" / "mergekit.yaml").is_file()

    config, study, trials = run(zoo, tmp_path, "both", 3, dataflow={"skips": False})
    first = trials[0]
    assert first.user_attrs["baseline"] == "task_arithmetic"
    recipe = Recipe.from_dict(first.user_attrs["recipe"])
    assert recipe.rules and recipe.dataflow is not None and recipe.dataflow.sources == {"merged"}
    for trial in trials:
        close_scores(export_and_score(config, trial, tmp_path, "both"), trial.user_attrs["scores"], items, f"trial {trial.number} {trial.user_attrs['recipe']}")
    text = (tmp_path / f"both-{first.number}" / "mergekit.yaml").read_text()
    assert "name: merged" in text and "merge_method: passthrough" in text
