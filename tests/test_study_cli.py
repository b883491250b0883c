"""The search CLI: bad configs exit 2 with one line; status of a stored study."""

import subprocess
import sys

import optuna
from typer.testing import CliRunner

from mergetune.cli.main import app

CLI = [sys.executable, "-m", "mergetune.cli.main"]


def test_bad_config_is_one_red_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: s\nmodels: {base: /b, experts: {x: /x}}\nevaluator: {kind: quick}\nsearch: {layer_group: 2}\n")
    result = subprocess.run([*CLI, "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.layer_group: unknown key" in lines[0] and "Traceback" not in result.stderr


def test_resume_of_a_missing_study_names_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = subprocess.run([*CLI, "resume", "--study", "nope", "--storage", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no study 'nope'" in result.stderr


def test_status_counts_trials_and_shows_the_best(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="st", storage=url, directions=["maximize", "minimize"])
    study.set_user_attr(
        "config",
        {"study": "st", "models": {"base": "/b", "experts": {"x": "/x"}}, "evaluator": {"kind": "quick", "zoo": "/zoo"}, "budget": {"n_trials": 10}},
    )
    study.set_user_attr("objectives", [{"name": "acc", "direction": "maximize"}, {"name": "loss", "direction": "minimize"}])
    for values in ([0.5, 2.0], [0.7, 3.0], [0.6, 1.0]):
        study.tell(study.ask(), values)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    study.ask()  # one left running
    result = CliRunner().invoke(app, ["status", "--study", "st", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "3/10 complete, 1 failed, 1 running" in result.output
    assert "0.7000" in result.output and "1.0000" in result.output and "ETA" in result.output
