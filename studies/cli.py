"""CLI commands that read studies: `front`, `export`, `report`."""

from __future__ import annotations

from pathlib import Path

import typer

from mergetune.core.errors import MergetuneError

STORAGE_HELP = "Optuna storage URL (SQLAlchemy or journal:///path); default sqlite:///studies/NAME.db"


def front(
    study: str = typer.Option(..., "--study", help="Study name."),
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    evaluate: str | None = typer.Option(None, "--evaluate", help="Re-merge the front and score it on this split (test)."),
    device: str = typer.Option("cpu", "--device", help="Torch device for re-merging and scoring."),
) -> None:
    """Show the Pareto-optimal trials; with --evaluate test, their held-out scores and the gap."""
    from rich.console import Console

    from mergetune.studies.front import best_vs_baselines, front_table, front_trials, score_trials_on_split
    from mergetune.studies.store import open_study

    if evaluate not in (None, "test"):
        raise MergetuneError(f"--evaluate {evaluate!r}: only the held-out split `test` can be re-scored")
    opened = open_study(study, storage)
    trials = front_trials(opened)
    if evaluate:
        score_trials_on_split(opened, trials, evaluate, device)
    console = Console()
    console.print(front_table(opened, trials))
    console.print(best_vs_baselines(opened), markup=False, highlight=False)


def export(
    study: str = typer.Option(..., "--study", help="Study name."),
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    trial: str = typer.Option("best", "--trial", help="`best` or a trial number."),
    pick: str | None = typer.Option(
        None, "--pick", help="How `best` chooses on the front: `weights` (configured), an objective, or NAME=W,..."
    ),
    out: Path = typer.Option(..., "--out", help="Output directory (atomic; an existing one needs --force)."),
    fmt: str = typer.Option("all", "--format", help="model | recipe | mergekit | all"),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the merge."),
) -> None:
    """Export one trial as our recipe, a mergekit config and/or the merged model with a model card."""
    from rich.console import Console

    from mergetune.core.fs import check_output_dir
    from mergetune.studies.export import export_trial
    from mergetune.studies.front import pick_trial, recipe_summary, trial_recipe
    from mergetune.studies.store import open_study

    if fmt not in ("model", "recipe", "mergekit", "all"):
        raise MergetuneError(f"--format {fmt!r}: choose model, recipe, mergekit or all")
    check_output_dir(out, force)
    opened = open_study(study, storage)
    chosen = pick_trial(opened, trial, pick)
    export_trial(opened, chosen, out, fmt=fmt, force=force, device=device)  # type: ignore[arg-type]
    Console().print(f"exported trial {chosen.number} ({recipe_summary(trial_recipe(chosen))}) to {out}", markup=False)


def report(
    study: str = typer.Option(..., "--study", help="Study name."),
    storage: str | None = typer.Option(None, "--storage", help=STORAGE_HELP),
    out: Path = typer.Option(..., "--out", help="Directory for report.html and the PNGs (atomic; an existing one needs --force)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report directory."),
) -> None:
    """Write an offline HTML report (plotly) and PNG plots (matplotlib) of a study."""
    from rich.console import Console

    from mergetune.core.fs import check_output_dir
    from mergetune.studies.report import write_report
    from mergetune.studies.store import open_study

    check_output_dir(out, force)
    files = write_report(open_study(study, storage), out, force=force)
    Console().print("wrote " + ", ".join(str(f) for f in files), markup=False)


def register(app: typer.Typer) -> None:
    app.command("front")(front)
    app.command("export")(export)
    app.command("report")(report)
