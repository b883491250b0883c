"""`mergetune export`: user errors are one line and exit code 2; recipe/mergekit exports need no merge."""

from __future__ import annotations

import optuna
import pytest
import yaml
from test_studies_fixtures import make_study, tiny_models  # noqa: F401 (fixture)

from mergetune.cli.main import main
from mergetune.merge.recipe import Recipe


@pytest.fixture()
def stored(tmp_path, tiny_models):  # noqa: F811
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/s.db"
    make_study(url, tiny_models)
    return url


def _run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return done.value.code


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--trial", "99"], "no trial 99"),
        (["--trial", "12"], "is FAIL"),
        (["--pick", "speed"], "--pick"),
        (["--format", "onnx"], "--format"),
    ],
)
def test_export_user_errors_are_one_line_exit_2(tmp_path, stored, capsys, extra, message):
    code = _run(["export", "--study", "synthetic", "--storage", stored, "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_existing_dir_needs_force(tmp_path, stored, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["export", "--study", "synthetic", "--storage", stored, "--out", str(out), "--format", "recipe"]
    assert _run(args) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert (out / "keep.txt").exists()
    assert _run([*args, "--force"]) == 0
    assert not (out / "keep.txt").exists()
    recipe = Recipe.from_yaml(out / "recipe.yaml")
    assert recipe.rules[0].method == "linear"


def test_missing_study_is_one_line(tmp_path, stored, capsys):
    assert _run(["export", "--study", "nope", "--storage", stored, "--out", str(tmp_path / "o")]) == 2
    assert "studies there: synthetic" in capsys.readouterr().err


def test_recipe_and_mergekit_formats_of_the_picked_trial(tmp_path, stored):
    out = tmp_path / "mk"
    assert _run(["export", "--study", "synthetic", "--storage", stored, "--out", str(out), "--format", "mergekit", "--pick", "code"]) == 0
    config = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert config["merge_method"] == "linear" and [m["model"].rsplit("/", 1)[1] for m in config["models"]] == ["math", "code"]
    assert not (out / "recipe.yaml").exists()


def test_export_best_is_the_trial_the_confirmation_picks_and_its_card_shows_both_scores(tmp_path, tiny_models):  # noqa: F811
    from mergetune.studies.export import model_card
    from mergetune.studies.front import CONFIRMED_ATTR_PREFIX, confirmation_candidates, pick_trial, trial_recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/s.db"
    study = make_study(url, tiny_models, se=0.02)
    inflated, runner_up = confirmation_candidates(study, 2)
    for trial, shift in ((inflated, -0.3), (runner_up, 0.0)):
        scores = {n: {"score": v + shift, "se": 0.01, "items": 64} for n, v in zip(["arith", "code"], trial.values)}
        study.set_user_attr(f"{CONFIRMED_ATTR_PREFIX}{trial.number}", {"scores": scores, "limit": None})
    out = tmp_path / "best"
    assert _run(["export", "--study", "synthetic", "--storage", url, "--out", str(out), "--format", "recipe"]) == 0
    assert Recipe.from_yaml(out / "recipe.yaml") == trial_recipe(runner_up)
    assert pick_trial(study, "best").number == runner_up.number != inflated.number
    card = model_card(study, runner_up, trial_recipe(runner_up))
    assert f"| arith | {runner_up.values[0]:.4f} ± 0.0200 | {runner_up.values[0]:.4f} ± 0.0100 (64 items) | not scored |" in card
