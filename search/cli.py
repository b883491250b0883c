"""The search commands: `mergetune run`, `mergetune resume`, `mergetune status`, `mergetune plan`."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


def _finish(study, console: Console) -> None:
    """The run's last lines: trial counts, the Pareto front, the best trial (studies/front.py's one "best")."""
    from optuna.trial import TrialState

    from mergetune.studies.front import best_vs_baselines, front_table, front_trials

    counts = {state: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    console.print(
        f"{study.study_name}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed",
        highlight=False, markup=False,
    )
    if counts[TrialState.COMPLETE]:
        console.print(front_table(study, front_trials(study)))
    line = best_vs_baselines(study)
    if line:
        console.print(line, highlight=False, markup=False)


def _run_and_finish(cfg) -> None:
    from mergetune.search.driver import run_study
    from mergetune.search.stopping import RunInterrupted

    console = Console()
    try:
        study = run_study(cfg, console=console)
    except RunInterrupted as exc:
        if exc.study is not None:
            _finish(exc.study, console)
        raise
    _finish(study, console)


def run(
    config: Path = typer.Argument(..., help="study config YAML"),
    study: Optional[str] = typer.Option(None, "--study", help="study name (default: the config's `study`)"),
    n_trials: Optional[int] = typer.Option(None, "--n-trials", min=1, help="finished trials to reach (COMPLETE + PRUNED)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Ray actors (trials in flight)"),
) -> None:
    """Run a study (or continue the one of the same name, or join the drivers already running it) to its budget."""
    from mergetune.search.config import load_study_config, parse_study_config

    cfg = load_study_config(config)
    data = cfg.model_dump(mode="json")
    if study is not None:
        data["study"] = study
    if n_trials is not None:
        data["budget"]["n_trials"] = n_trials
    if workers is not None:
        data["ray"]["workers"] = workers
    _run_and_finish(parse_study_config(data, str(config)))


def plan(
    config: Path = typer.Argument(..., help="study config YAML"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", min=0.01, help="GiB of each worker's GPU (default: ray.gpu_memory_gb, else this machine's)"),
    host_memory: Optional[float] = typer.Option(None, "--host-memory", min=0.01, help="GiB of host memory per node (default: ray.host_memory_gb, else this machine's)"),
    workers_per_node: Optional[int] = typer.Option(None, "--workers-per-node", min=1, help="workers on the fullest node (default: ray.workers_per_node, else this machine's)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as one JSON object"),
) -> None:
    """Whether, where and how a study fits in memory, from file headers alone (exit 0: fits, 2: does not)."""
    from mergetune.search.config import load_study_config
    from mergetune.search.plan import MemoryPlanError, plan_study

    result = plan_study(load_study_config(config), gpu_memory, host_memory, workers_per_node)
    if as_json:
        print(result.dumps())
    else:
        Console().print("\n".join(result.lines()), highlight=False, markup=False)
    if not result.fits:
        raise MemoryPlanError(result.reason)  # the one-line reason on stderr (cli/main.py), after the plan


def resume(
    study: str = typer.Option(..., "--study", help="study name"),
    storage: Optional[str] = typer.Option(None, "--storage", help="storage URL (default sqlite:///studies/NAME.db)"),
) -> None:
    """Continue a study to its budget with the config stored in it (trials of stopped drivers are re-run)."""
    from mergetune.search.bookkeeping import stored_config
    from mergetune.studies.store import open_study

    opened = open_study(study, storage)  # never creates a storage or a study
    cfg = stored_config(opened)
    _run_and_finish(cfg.model_copy(update={"storage": storage}) if storage else cfg)


def status(
    study: str = typer.Option(..., "--study", help="study name"),
    storage: Optional[str] = typer.Option(None, "--storage", help="storage URL (default sqlite:///studies/NAME.db)"),
) -> None:
    """Trials done / failed / running, the live drivers, the best trial and per objective, an ETA to the budget."""
    import time

    from optuna.trial import TrialState

    from mergetune.search.bookkeeping import stored_config
    from mergetune.search.liveness import driver_records
    from mergetune.studies.front import best_vs_baselines, confirmed_records, objective_names, search_errors, trial_recipe, with_error
    from mergetune.studies.store import open_study

    loaded = open_study(study, storage)
    cfg = stored_config(loaded)
    names = objective_names(loaded)
    console = Console(highlight=False)
    trials = loaded.get_trials(deepcopy=False)
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    done, pruned = by_state[TrialState.COMPLETE], by_state[TrialState.PRUNED]
    budget = cfg.budget.n_trials
    finished = f"{len(done) + len(pruned)}{f'/{budget}' if budget else ''}"
    summary = f"{finished} finished ({len(done)} complete, {len(pruned)} pruned)" if pruned else f"{finished} complete"
    console.print(
        f"{study}: {summary}, {len(by_state[TrialState.FAIL])} failed, {len(by_state[TrialState.RUNNING])} running, "
        f"{len(by_state[TrialState.WAITING])} queued",
        markup=False,
    )
    now = time.time()
    for record in driver_records(loaded.user_attrs):
        if record.stopped is not None:
            continue
        age = now - record.beat
        state = "live" if age <= record.grace_s else "silent (stopped without notice? its trials are re-run by the next driver)"
        console.print(
            f"driver {record.host} pid {record.pid}: {state}, {len(record.in_flight)} in flight, last beat {age:.0f} s ago",
            markup=False,
        )
    confirmed = confirmed_records(loaded)
    table = Table(title="best per objective (search score ± SE)")
    paths = cfg.search.space != "parameter"
    for column in ("objective", "best", "trial", "baseline", *(["confirmed"] if confirmed else []), *(["path"] if paths else [])):
        table.add_column(column)
    for i, name in enumerate(names):
        if not done:
            break
        pick = max if loaded.directions[i].name == "MAXIMIZE" else min
        best = pick(done, key=lambda t: t.values[i])
        row = [name, with_error(best.values[i], search_errors(loaded, best)[i]), str(best.number), str(best.user_attrs.get("baseline", ""))]
        if confirmed:
            again = confirmed.get(best.number, {}).get("scores", {}).get(name)
            row.append("–" if again is None else with_error(again["score"], again.get("se")))
        if paths:
            path = trial_recipe(best).dataflow if "recipe" in best.user_attrs else None
            row.append(path.summary() if path is not None else "–")
        table.add_row(*row)
    console.print(table)
    line = best_vs_baselines(loaded)
    if line:
        console.print(line, markup=False)
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
