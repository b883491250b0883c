"""Exports end to end on a tiny zoo: the exported model scores as its trial did; mergekit's DARE merge scores within our seed noise.

Issue 6's acceptance. A real study (Ray, the real TrialWorker, warm start) records scores the way the
search does; `mergetune export` must produce a model that `AutoModelForCausalLM.from_pretrained` loads
and that scores exactly those values. For randomized methods mergekit's RNG cannot match ours bit for
bit, so its merge of an exported DARE recipe must score within the spread of ours over seeds — and a
clearly different recipe must not, so the band is narrow enough to mean something.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from rich.console import Console
from test_export_mergekit import _one_trial_study, run_printed_command

from mergetune.cli.main import main
from mergetune.merge.recipe import Recipe
from mergetune.search.config import StudyConfig, parse_study_config
from mergetune.studies.export import MERGEKIT_FILE, export_trial
from mergetune.studies.front import objective_names

optuna.logging.set_verbosity(optuna.logging.WARNING)

LOGPROB_TOL = 1e-5  # logprob is a float sum; thread counts differ between the Ray worker and this process


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Iterator[Path]:
    import torch

    from mergetune.zoo.build import build_zoo

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the search worker's count (cpus_per_worker 1); more only contends on 2 cores
    out = tmp_path_factory.mktemp("e2e") / "zoo"
    build_zoo(out, "tiny", seed=0, console=Console(quiet=True))
    yield out
    torch.set_num_threads(threads)


def evaluator_config(zoo: Path) -> dict:
    # logprob is continuous, so equal scores are not a trivial 0 == 0 of a weak tiny model's exact match.
    return {"kind": "quick", "zoo": str(zoo), "metrics": ["exact_match", "logprob"]}


def scores_of(model_dir: Path, config: StudyConfig) -> dict[str, float]:
    """Load an exported dir the way a user would (transformers Auto classes) and score it on the search split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergetune.evaluators.base import HFBackend, build_evaluator

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert config.evaluator is not None
    return build_evaluator(config.evaluator).evaluate(HFBackend(model, tokenizer), split="search")


def assert_same_scores(ours: dict[str, float], recorded: dict[str, float], what: str) -> None:
    assert set(ours) == set(recorded), what
    for name, value in recorded.items():
        if name.endswith(".logprob"):
            assert ours[name] == pytest.approx(value, abs=LOGPROB_TOL), f"{what}: {name}"
        else:
            assert ours[name] == value, f"{what}: {name}"


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


@pytest.mark.slow
def test_exported_model_loads_and_scores_as_the_trial_recorded(zoo, tmp_path, capsys):
    import ray
    from mergetune.search.driver import run_study

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    config = parse_study_config(
        {
            "study": "e2e",
            "zoo": str(zoo),
            "evaluator": evaluator_config(zoo),
            # Warm start enqueues task_arithmetic (λ 1 and 0.5) and dare_ties (density 0.5): the budget
            # runs exactly those, so a seeded random method goes through the export too.
            "search": {"layer_groups": 2, "methods": ["task_arithmetic", "dare_ties"]},
            "budget": {"n_trials": 3},
            "storage": url,
            "ray": {"workers": 1},
        },
        "test",
    )
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        study = run_study(config, console=Console(quiet=True))
    finally:
        if started:
            ray.shutdown()
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert [t.user_attrs["baseline"] for t in trials] == ["task_arithmetic", "task_arithmetic_tuned", "dare_ties"]
    assert any(t.user_attrs["recipe"]["rules"][0]["method"] == "dare_ties" for t in trials)

    capsys.readouterr()
    out = tmp_path / "best"
    assert run_cli(["export", "--study", "e2e", "--storage", url, "--trial", "best", "--out", str(out)]) == 0
    best = int(re.search(r"exported trial (\d+)", capsys.readouterr().out).group(1))
    trial = study.trials[best]
    assert (out / "README.md").is_file() and (out / "recipe.yaml").is_file()
    ours = scores_of(out, config)
    assert_same_scores(ours, trial.user_attrs["scores"], f"best (trial {best})")
    names = objective_names(study)  # the evaluator's names, in `trial.values` order
    assert [ours[n] for n in names] == pytest.approx(trial.values, abs=LOGPROB_TOL)
    assert "| reverse.logprob |" in (out / "README.md").read_text()  # the model card names the objectives

    # Every trial, including the randomized one, reproduces from its export.
    for other in trials:
        if other.number == best:
            continue
        out = tmp_path / f"t{other.number}"
        args = ["export", "--study", "e2e", "--storage", url, "--trial", str(other.number), "--format", "model"]
        assert run_cli([*args, "--out", str(out)]) == 0
        assert_same_scores(scores_of(out, config), other.user_attrs["scores"], f"trial {other.number}")
    # The scores differ between trials, so equality above is not the same number everywhere.
    logprobs = [t.values[names.index("reverse.logprob")] for t in trials]
    assert len({round(v, 6) for v in logprobs}) == len(trials)
    # --pick by an objective name of a real (driver-made) study.
    capsys.readouterr()
    out = tmp_path / "pick"
    args = ["export", "--study", "e2e", "--storage", url, "--pick", "reverse.logprob", "--format", "recipe"]
    assert run_cli([*args, "--out", str(out)]) == 0
    picked = int(re.search(r"exported trial (\d+)", capsys.readouterr().out).group(1))
    assert picked == trials[logprobs.index(max(logprobs))].number


def test_objective_names_of_a_driver_made_study_come_from_its_stored_objectives():
    # The search driver stores `objectives` as a study user attr and sets no Optuna metric names.
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("objectives", [{"name": "sort", "direction": "maximize"}, {"name": "loss", "direction": "minimize"}])
    assert objective_names(study) == ["sort", "loss"]
    study.set_user_attr("objectives", [{"name": "sort", "direction": "maximize"}])  # does not match: placeholders
    assert objective_names(study) == ["objective0", "objective1"]


def mean_logprob(scores: dict[str, float]) -> float:
    values = [v for name, v in scores.items() if name.endswith(".logprob")]
    return sum(values) / len(values)


@pytest.mark.slow
def test_mergekit_dare_merge_scores_within_our_seed_noise(zoo, tmp_path):
    from mergetune.studies.scoring import score_recipes_on_split

    config = parse_study_config({"study": "dare", "zoo": str(zoo), "evaluator": evaluator_config(zoo)}, "test")
    assert config.models is not None
    models = {"base": config.models.base, **config.models.experts}

    def dare(seed: int, weight: float = 1.0) -> Recipe:
        weights = {name: weight for name in config.models.experts}
        rule = {"match": "*", "method": "dare_ties", "params": {"density": 0.5}, "weights": weights}
        return Recipe.from_dict({"models": models, "base": "base", "rules": [rule], "seed": seed})

    seeds = [0, 1, 2, 3]
    # Ours, scored the way the search worker scores (resident model set merged into one live model).
    ours = [mean_logprob(s) for s in score_recipes_on_split(config, [dare(s) for s in seeds] + [dare(0, 0.5)], "search")]
    ours, halved = ours[:-1], ours[-1]
    spread = max(ours) - min(ours)
    low, high = min(ours) - spread, max(ours) + spread
    assert spread > 0  # the masks differ by seed

    study, trial = _one_trial_study(dare(seeds[-1]))
    export_trial(study, trial, tmp_path / "export", fmt="all")
    assert f"--random-seed {seeds[-1]}" in (tmp_path / "export" / MERGEKIT_FILE).read_text()
    theirs_dir = run_printed_command(tmp_path / "export", tmp_path / "mergekit")
    theirs = mean_logprob(scores_of(theirs_dir, config))
    report = f"ours {[round(v, 5) for v in ours]}, band [{low:.5f}, {high:.5f}], mergekit {theirs:.5f}, halved {halved:.5f}"
    assert low <= theirs <= high, report
    # The negative control: the same DARE recipe with every weight halved is outside the band.
    assert not low <= halved <= high, report
