"""The search CLI: bad configs exit 2 with one line; status of a stored study."""

import subprocess
import sys

import optuna
from typer.testing import CliRunner

from mergetune.cli.main import app

CLI = [sys.executable, "-m", "mergetune.cli.main"]


def test_bad_config_is_one_red_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: s\nmodels: {base: /b, experts: {x: /x}}\nevaluator: {kind: quick, zoo: /zoo}\nsearch: {layer_group: 2}\n")
    result = subprocess.run([*CLI, "run", str(bad)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "search.layer_group: unknown key" in lines[0] and "Traceback" not in result.stderr


def test_resume_of_a_missing_study_names_it_and_creates_nothing(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = subprocess.run([*CLI, "resume", "--study", "nope", "--storage", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"no study storage at {url}" in result.stderr
    assert not (tmp_path / "x.db").exists()
    optuna.create_study(study_name="other", storage=url)
    result = subprocess.run([*CLI, "resume", "--study", "nope", "--storage", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no study named 'nope'" in result.stderr and "studies there: other" in result.stderr


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


def test_status_lists_the_live_drivers_and_the_best_trial(tmp_path):
    import time
    from dataclasses import asdict

    from mergetune.search.liveness import DriverRecord

    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="st", storage=url, directions=["maximize", "maximize"])
    study.set_user_attr(
        "config",
        {"study": "st", "models": {"base": "/b", "experts": {"x": "/x"}}, "evaluator": {"kind": "quick", "zoo": "/zoo"}, "budget": {"n_trials": 10}},
    )
    study.set_user_attr("objectives", [{"name": "a", "direction": "maximize"}, {"name": "b", "direction": "maximize"}])
    for values in ([0.5, 0.2], [0.3, 0.6]):
        study.tell(study.ask(), values)
    now = time.time()
    for host, pid, beat, stopped in (("node-a", 11, now - 2, None), ("node-b", 22, now - 900, None), ("node-c", 33, now - 5, now - 4)):
        record = DriverRecord(id=f"{host}-{pid}-x", host=host, pid=pid, started=now - 1000, beat=beat, beats=3,
                              in_flight=[2, 3], grace_s=60, give_up_s=300, stopped=stopped)
        study.set_user_attr(record.key, asdict(record))
    result = CliRunner().invoke(app, ["status", "--study", "st", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "driver node-a pid 11: live, 2 in flight, last beat 2 s ago" in result.output
    assert "driver node-b pid 22: silent" in result.output and "node-c" not in result.output
    assert "best trial #1: weighted mean 0.4500" in " ".join(result.output.split())


def test_status_shows_scores_with_their_se_and_the_confirmed_best(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="st", storage=url, directions=["maximize"])
    study.set_user_attr(
        "config",
        {"study": "st", "models": {"base": "/b", "experts": {"x": "/x"}}, "evaluator": {"kind": "quick", "zoo": "/zoo"}, "budget": {"n_trials": 3}},
    )
    study.set_user_attr("objectives", [{"name": "acc", "direction": "maximize"}])
    for value, se in ((0.8, 0.05), (0.7, 0.04), (0.6, 0.03)):
        trial = study.ask()
        trial.set_user_attr("score_se", {"acc": se})
        study.tell(trial, [value])
    # re-scored on more items: trial 0's 0.8 was noise, trial 1 holds
    study.set_user_attr("confirmed:0", {"scores": {"acc": {"score": 0.62, "se": 0.02, "items": 400}}, "limit": None})
    study.set_user_attr("confirmed:1", {"scores": {"acc": {"score": 0.69, "se": 0.02, "items": 400}}, "limit": None})
    result = CliRunner().invoke(app, ["status", "--study", "st", "--storage", url])
    assert result.exit_code == 0, result.output
    assert "0.8000 ± 0.0500" in result.output and "0.6200 ± 0.0200" in result.output
    text = " ".join(result.output.split())  # rich wraps the line at the terminal width
    assert "best trial #1: weighted mean 0.7000 ± 0.0400 on the search split, confirmed 0.6900 ± 0.0200 on 400 items per task" in text
