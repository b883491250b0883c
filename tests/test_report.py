"""`mergetune report` writes a self-contained HTML file and the PNG plots."""

from __future__ import annotations

import shutil
import subprocess

import optuna
import pytest
from test_studies_fixtures import EXPERTS, make_study

from mergetune.cli.main import main
from mergetune.studies.report import method_choices

MODELS = {"base": "/models/base", **{e: f"/models/{e}" for e in EXPERTS}}


def test_report_cli_writes_offline_html_and_pngs(tmp_path, capsys):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/s.db"
    study = make_study(url, MODELS)
    with pytest.raises(SystemExit) as done:
        main(["report", "--study", "synthetic", "--storage", url, "--out", str(tmp_path / "r")])
    assert done.value.code == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert '<script src="http' not in html and "plotly.js v" in html  # plotly.js is inline, not from a CDN
    assert html.count("Plotly.newPlot") >= 4  # pareto, 2 histories, method choices
    assert "warm-start baselines" in html and "Pareto front" in html
    for png in ("pareto.png", "history.png", "methods.png"):
        data = (tmp_path / "r" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert {(n, g, m) for n, g, m in method_choices(study.trials[:1])} == {(0, "L0", "linear"), (0, "rest", "linear")}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium_without_console_errors(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = make_study(f"sqlite:///{tmp_path}/s.db", MODELS)
    from mergetune.studies.report import write_report

    write_report(study, tmp_path / "r")
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", "--dump-dom", (tmp_path / "r" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert done.stdout.count('class="main-svg"') >= 8  # plotly drew every figure


def test_report_of_more_than_three_objectives_plots_every_pair(tmp_path):
    """Optuna's Pareto plot stops at 3 objectives; a study over 4 tasks (the demo) still gets its report."""
    from test_studies_fixtures import linear_recipe

    from mergetune.studies.report import write_report

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize"] * 4)
    for i in range(8):
        trial = study.ask()
        w = trial.suggest_float("g0.weight", 0.0, 1.0)
        trial.set_user_attr("recipe", linear_recipe(MODELS, w).to_dict())
        if i == 0:
            trial.set_user_attr("baseline", "uniform")
        study.tell(trial, [w, 1 - w, w * w, (i % 3) / 3])
    written = write_report(study, tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text()
    assert "every pair of objectives" in html and '"type":"splom"' in html.replace(" ", "")
    assert html.count('"type":"splom"') == 3  # trials, front, baselines
    assert {p.name for p in written} >= {"report.html", "pareto.png", "history.png", "methods.png"}


def test_report_table_shows_search_scores_with_se_and_confirmed_scores(tmp_path):
    from mergetune.studies.front import CONFIRMED_ATTR_PREFIX, front_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{tmp_path}/s.db"
    study = make_study(url, MODELS, se=0.0321)
    first = front_trials(study)[0]
    scores = {n: {"score": 0.5, "se": 0.0123, "items": 64} for n in ("arith", "code")}
    study.set_user_attr(f"{CONFIRMED_ATTR_PREFIX}{first.number}", {"scores": scores, "limit": None})
    with pytest.raises(SystemExit) as done:
        main(["report", "--study", "synthetic", "--storage", url, "--out", str(tmp_path / "r")])
    assert done.value.code == 0
    html = (tmp_path / "r" / "report.html").read_text()
    assert f"<td>{first.values[0]:.4f} ± 0.0321</td>" in html and "<th>arith (confirmed)</th>" in html
    assert "<td>0.5000 ± 0.0123</td>" in html and "confirmed 0.5000 ± " in html
