"""The search commands: `mergetune run`, `mergetune resume`, `mergetune status`, `mergetune plan`."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def _finish(study, console: Console) -> None:
    from optuna.trial import TrialState

    from mergetune.search.driver import count, front_table, stored_objectives
    from mergetune.studies.front import best_vs_baselines

    objectives = stored_objectives(study)
    console.print(
        f"{study.study_name}: {count(study, TrialState.COMPLETE)} complete, {count(study, TrialState.PRUNED)} pruned, "
        f"{count(study, TrialState.FAIL)} failed"
    )
    console.print(front_table(study, objectives))
    line = best_vs_baselines(study)
    if line:
        console.print(line)


def run(
    config: Path = typer.Argument(..., help="study config YAML"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: the config's `study`)"),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", min=1, help="finished trials to reach (COMPLETE + PRUNED)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray actors (trials in flight)"),
) -> None:
    """Run a study (or continue the one of the same name) to its budget; print the Pareto front."""
    from mergetune.search.config import load_study_config, parse_study_config
    from mergetune.search.driver import run_study

    cfg = load_study_config(config)
    data = cfg.model_dump(mode="json")
    if study is not None:
        data["study"] = study
    if n_trials is not None:
        data["budget"]["n_trials"] = n_trials
    if workers is not None:
        data["ray"]["workers"] = workers
    cfg = parse_study_config(data, str(config))
    console = Console()
    _finish(run_study(cfg, console=console), console)


def plan(
    config: Path = typer.Argument(..., help="study config YAML"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=0.01, help="GiB of each worker's GPU (default: ray.gpu_memory_gb, else this machine's)"),
    host_memory: Optional[float] = typer.Option(None, "--host-memory", min=0.01, help="GiB of host memory per node (default: ray.host_memory_gb, else this machine's)"),
    workers_per_node: Optional[int] = typer.Option(None, "--workers-per-node", min=1, help="workers on the fullest node (default: ray.workers_per_node, else this machine's)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as one JSON object"),
) -> None:
    """Whether, where and how a study fits in memory, from file headers alone (exit 0: fits, 2: does not)."""
    import sys

    from mergetune.search.config import load_study_config
    from mergetune.search.plan import MemoryPlanError, plan_study

    result = plan_study(load_study_config(config), gpu_memory, host_memory, workers_per_node)
    if as_json:
        print(result.dumps())
    else:
        Console().print("\n".join(result.lines()), highlight=False)
    if not result.fits:
        if as_json:  # the reason still goes to stderr as the one line of a refusal
            Console(stderr=True).print(f"[bold red]error:[/] {result.reason}", highlight=False, soft_wrap=True)
            sys.exit(MemoryPlanError.exit_code)
        raise MemoryPlanError(result.reason)


def _storage_url(study: str, storage: Optional[str]) -> str:
    from mergetune.search.config import default_storage

    return storage or default_storage(study)


def resume(
    study: str = typer.Option(..., "--study", help="study name"),
    storage: Optional[str] = typer.Option(None, "--storage", help="storage URL (default sqlite:///studies/NAME.db)"),
) -> None:
    """Continue a study to its budget with the config stored in it (orphaned trials are re-run)."""
    from mergetune.search.driver import load_study, run_study, stored_config

    url = _storage_url(study, storage)
    cfg = stored_config(load_study(study, url))
    cfg = cfg.model_copy(update={"storage": url})
    console = Console()
    _finish(run_study(cfg, console=console), console)


def status(
    study: str = typer.Option(..., "--study", help="study name"),
    storage: Optional[str] = typer.Option(None, "--storage", help="storage URL (default sqlite:///studies/NAME.db)"),
) -> None:
    """Trials done / failed / running, the best per objective, and an ETA to the budget."""
    from optuna.trial import TrialState

    from mergetune.search.driver import count, load_study, stored_config, stored_objectives

    loaded = load_study(study, _storage_url(study, storage))
    cfg = stored_config(loaded)
    objectives = stored_objectives(loaded)
    console = Console()
    done = loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = loaded.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    budget = cfg.budget.n_trials
    finished = f"{len(done) + len(pruned)}{f'/{budget}' if budget else ''}"
    summary = f"{finished} finished ({len(done)} complete, {len(pruned)} pruned)" if pruned else f"{finished} complete"
    console.print(
        f"{study}: {summary}, "
        f"{count(loaded, TrialState.FAIL)} failed, {count(loaded, TrialState.RUNNING)} running, "
        f"{count(loaded, TrialState.WAITING)} queued"
    )
    table = Table(title="best per objective")
    for column in ("objective", "best", "trial", "baseline"):
        table.add_column(column)
    for i, objective in enumerate(objectives):
        if not done:
            break
        pick = max if objective.direction == "maximize" else min
        best = pick(done, key=lambda t: t.values[i])
        table.add_row(objective.name, f"{best.values[i]:.4f}", str(best.number), str(best.user_attrs.get("baseline", "")))
    console.print(table)
    eta = _eta(done + pruned, budget)  # the budget counts PRUNED trials too
    if eta is not None:
        console.print(f"ETA to {budget} complete trials at the recent rate: {eta}")


def _eta(done: list, budget: int | None) -> datetime.timedelta | None:
    if not budget or len(done) < 2 or len(done) >= budget:
        return None
    starts = min(t.datetime_start for t in done)
    ends = max(t.datetime_complete for t in done)
    per_trial = (ends - starts) / len(done)
    return datetime.timedelta(seconds=round((per_trial * (budget - len(done))).total_seconds()))


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("resume")(resume)
    app.command("status")(status)
    app.command("plan")(plan)
