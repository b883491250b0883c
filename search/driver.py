"""The study driver: an ask/tell loop over a pool of Ray actors, with no generation barrier.

As soon as one trial finishes, it is told to Optuna and the next is asked and dispatched
to the freed actor. The Optuna storage is the single source of truth: recipe, scores,
timings, node and versions of every trial live in its user attrs; the study config lives in
the study's user attrs, so `resume` needs only the study name and storage.

Failures: a trial whose merge/eval raises or scores NaN → FAIL with `fail_reason`; a worker
process that dies → its trial FAIL, the actor replaced, the params re-enqueued once
(`retry_of`); trials left RUNNING by a killed driver → FAIL and re-enqueued on the next
start; Ctrl-C → no new trials, in-flight ones finish (a second Ctrl-C marks them FAIL and
re-enqueues them); a storage that stops answering (database restart, network) → every
storage call is retried with backoff for `storage_retry_s`, then the driver stops with a
message to resume. The budget counts finished trials: COMPLETE, and PRUNED when two-stage
pruning is on (search/pruning.py: the driver keeps the actor between the stages and decides).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mergetune.core.errors import ConfigError, MergetuneError
from mergetune.search.config import ObjectiveConfig, StudyConfig, parse_study_config
from mergetune.search.pruning import beaten_beyond_noise, make_pruner
from mergetune.search.samplers import make_sampler
from mergetune.search.space import SearchSpace
from mergetune.search.warmstart import enqueue_baselines

log = logging.getLogger(__name__)


# --- storage ---
def open_storage(url: str) -> optuna.storages.BaseStorage | str:
    """`journal:///path` → a JournalStorage file; anything else is an SQLAlchemy URL."""
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return url
    # A database server may restart under a long study: test pooled connections before use.
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ImportError as exc:  # Optuna's wrapper of the missing database driver
        missing = getattr(exc.__cause__, "name", None) or "its database driver"
        extra = " (pip install 'mergetune[postgres]')" if url.startswith("postgresql") else ""
        raise ConfigError(f"storage: {url.split('://')[0]} URLs need the Python package {missing}{extra}") from None


class StorageUnavailable(MergetuneError):
    """The study storage did not answer within the retry window."""


def _storage_errors() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc

    # Optuna turns SQLAlchemy errors inside its sessions into StorageInternalError; the
    # engine's own connect errors come through as SQLAlchemy errors; journal files as OSError.
    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, OSError)


@dataclass
class StorageRetry:
    """Calls a storage operation, retrying with exponential backoff while the storage is unreachable."""

    window_s: float
    first_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def __call__(self, operation, *args, **kwargs):
        errors = _storage_errors()
        delay, deadline = self.first_delay_s, None
        while True:
            try:
                return operation(*args, **kwargs)
            except errors as exc:
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self.window_s
                reason = str(exc.__cause__ or exc).splitlines()[0]
                if now >= deadline:
                    raise StorageUnavailable(
                        f"the study storage has not answered for {self.window_s:.0f} s ({reason}); "
                        "finished trials are saved — run `mergetune resume` once it is back"
                    ) from None
                log.warning("storage unreachable (%s); retrying in %.1f s", reason, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_delay_s)


def load_study(name: str, storage_url: str) -> optuna.Study:
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage_url), sampler=optuna.samplers.RandomSampler())
    except KeyError:
        raise ConfigError(f"no study {name!r} in {storage_url}; check --study and --storage") from None


def stored_config(study: optuna.Study) -> StudyConfig:
    data = study.user_attrs.get("config")
    if data is None:
        raise ConfigError(f"study {study.study_name!r} was not created by mergetune (no config in its user attrs)")
    return parse_study_config(data, f"study {study.study_name} config")


def stored_objectives(study: optuna.Study) -> list[ObjectiveConfig]:
    return [ObjectiveConfig.model_validate(o) for o in study.user_attrs.get("objectives", [])]


def scalarised(values: list[float], objectives: list[ObjectiveConfig]) -> float:
    """The weighted view of a trial: Σ weight · value, minimised objectives counted negative."""
    return sum(o.weight * (v if o.direction == "maximize" else -v) for v, o in zip(values, objectives))


# --- Ray ---
def connect_ray(config: StudyConfig, workers: int) -> bool:
    """Join the configured cluster or start a local one; True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers * config.ray.cpus_per_worker, include_dashboard=False, log_to_driver=False)
    return True


@dataclass
class WorkerPool:
    """`size` actors of `worker_cls`, each reserving the configured CPUs/GPUs; dead ones are replaced."""

    worker_cls: type
    config: StudyConfig
    size: int
    actors: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import ray

        self._remote = ray.remote(self.worker_cls).options(
            num_cpus=self.config.ray.cpus_per_worker,
            num_gpus=self.config.ray.gpus_per_worker,
            resources=self.config.ray.resources or None,
            max_restarts=0,
            max_concurrency=1,
        )
        self.actors = [self._start() for _ in range(self.size)]

    def _start(self):
        return self._remote.remote(self.config.model_dump_json())

    def replace(self, slot: int) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start()

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def resolve_objectives(config: StudyConfig, pool: WorkerPool) -> list[ObjectiveConfig]:
    """The configured objectives, checked against what the evaluator reports (or all of them)."""
    import ray

    try:
        reported = ray.get(pool.actors[0].objectives.remote())
    except ray.exceptions.RayActorError as exc:
        raise MergetuneError(f"the first worker failed to start: {exc}") from None
    if config.objectives is None:
        return [ObjectiveConfig(name=name, direction=direction) for name, direction in reported]
    names = [name for name, _ in reported]
    for objective in config.objectives:
        if objective.name not in names:
            raise ConfigError(f"objectives: the evaluator reports no {objective.name!r}; it reports {', '.join(names)}")
    return config.objectives


# --- the study ---
def prepare_study(config: StudyConfig, objectives: list[ObjectiveConfig], sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    directions = [o.direction for o in objectives]
    study = optuna.create_study(
        study_name=config.study,
        storage=open_storage(config.storage_url),
        sampler=sampler,
        pruner=make_pruner(config.pruning),
        directions=directions,
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {config.study!r} exists with other objectives; choose another study name")
    study.set_user_attr("config", config.model_dump(mode="json"))
    study.set_user_attr("objectives", [o.model_dump() for o in objectives])
    # Optuna's own metric names: optuna-dashboard and plots label the objectives by task.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in objectives])
    return study


def recover_orphans(study: optuna.Study) -> int:
    """Trials left RUNNING by a driver that died → FAIL, their params re-enqueued; returns how many."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in orphans:
        study._storage.set_trial_user_attr(frozen._trial_id, "fail_reason", "left RUNNING by a driver that stopped")
        study.tell(frozen.number, state=TrialState.FAIL)
        requeue(study, frozen.params, frozen.user_attrs, frozen.number)
    if orphans:
        log.warning("marked %d trial(s) left RUNNING as FAIL and re-enqueued them", len(orphans))
    return len(orphans)


def requeue(study: optuna.Study, params: dict, user_attrs: dict, number: int) -> None:
    attrs = {"retry_of": number}
    if "baseline" in user_attrs:
        attrs["baseline"] = user_attrs["baseline"]
    study.enqueue_trial(params, user_attrs=attrs)


def count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def finished(study: optuna.Study) -> int:
    """Trials the budget counts: COMPLETE and PRUNED."""
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


@dataclass
class InFlight:
    trial: optuna.Trial
    slot: int
    stage: int = 0  # 0: a one-stage run; 1, 2: the stages of a two-stage run (pruning on)


@contextlib.contextmanager
def interrupt_flag() -> Iterator[threading.Event]:
    """First Ctrl-C sets the flag (finish in-flight trials); a second one raises KeyboardInterrupt."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum, frame):  # noqa: ARG001
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Driver:
    """Runs one study to its budget on a worker pool; see the module docstring for failure rules."""

    def __init__(self, study: optuna.Study, space: SearchSpace, pool: WorkerPool, objectives: list[ObjectiveConfig], config: StudyConfig, console: Console) -> None:
        self.study = study
        self.space = space
        self.pool = pool
        self.objectives = objectives
        self.config = config
        self.console = console
        self.in_flight: dict[object, InFlight] = {}
        self.consecutive_failures = 0
        self.last_failure = ""
        self.storage = StorageRetry(config.storage_retry_s)

    def _tell(self, trial: optuna.Trial, values: list[float] | None = None, state: TrialState | None = None) -> None:
        # skip_if_finished: a retried tell whose first attempt committed must not fail.
        self.storage(self.study.tell, trial, values, state=state, skip_if_finished=True)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        log.warning("trial %d failed: %s", trial.number, reason)
        self.storage(trial.set_user_attr, "fail_reason", reason)
        self._tell(trial, state=TrialState.FAIL)
        self.consecutive_failures += 1
        self.last_failure = reason

    def _retry_once(self, trial: optuna.Trial) -> None:
        if "retry_of" not in trial.user_attrs:
            self.storage(requeue, self.study, trial.params, trial.user_attrs, trial.number)

    def _dispatch(self, slot: int) -> bool:
        """Ask a trial and send it to the actor in `slot`; False if it failed before dispatch."""
        trial = self.storage(self.study.ask)
        try:
            # Re-running the space on the same trial after a storage error is safe: params
            # already stored come back unchanged, the rest are suggested again.
            recipe = self.storage(self.space.recipe, trial)
        except (MergetuneError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            if isinstance(exc, StorageUnavailable):
                raise
            self._fail(trial, f"invalid recipe: {exc}")
            return False
        self.storage(trial.set_user_attr, "recipe", recipe.to_dict())
        self.storage(trial.set_user_attr, "seed", recipe.seed)
        actor = self.pool.actors[slot]
        if self.config.pruning.enabled:
            ref, stage = actor.run_first_stage.remote(recipe.to_dict(), recipe.seed, self.config.pruning.first_share), 1
        else:
            ref, stage = actor.run.remote(recipe.to_dict(), recipe.seed), 0
        self.in_flight[ref] = InFlight(trial, slot, stage)
        return True

    def _finish(self, ref: object) -> int | None:
        """Tell the trial behind `ref` (COMPLETE, PRUNED or FAIL) and return the freed actor slot, or
        send the trial's second stage to the same actor and return None."""
        import ray

        job = self.in_flight.pop(ref)
        trial = job.trial
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.pool.replace(job.slot)
            self._fail(trial, f"worker died: {str(exc).splitlines()[0]}")
            self._retry_once(trial)
            return job.slot
        except ray.exceptions.RayTaskError as exc:
            self._fail(trial, f"worker error: {str(exc).splitlines()[0]}")
            return job.slot
        if job.stage == 2:  # the first stage's timings come first
            result["timings"] = {**trial.user_attrs.get("timings", {}), **result.get("timings", {})}
        # A first stage's `scores` are head means; they are kept in `first_stage` with their SE.
        for key in ("node_id", "gpu_ids", "pid", "versions", "timings", "first_stage" if job.stage == 1 else "scores"):
            if key in result:
                self.storage(trial.set_user_attr, key, result[key])
        self.storage(trial.set_user_attr, "worker", job.slot)
        if "error" in result:
            self._fail(trial, str(result["error"]))
            return job.slot
        if job.stage == 1:
            return self._after_first_stage(job, result["first_stage"])
        scores = result["scores"]
        missing = [o.name for o in self.objectives if o.name not in scores]
        if missing:
            self._fail(trial, f"the evaluator reported no score for {missing[0]}")
            return job.slot
        values = [float(scores[o.name]) for o in self.objectives]
        if not all(math.isfinite(v) for v in values):
            self._fail(trial, "non-finite score")
            return job.slot
        self._tell(trial, values)
        self.consecutive_failures = 0
        return job.slot

    def _after_first_stage(self, job: InFlight, first_stage: dict[str, dict[str, float]]) -> int | None:
        """Prune the trial (PRUNED, slot freed) or send its second stage to the same actor (None)."""
        trial = job.trial
        missing = [o.name for o in self.objectives if o.name not in first_stage]
        if missing:
            self._fail(trial, f"the evaluator reported no score for {missing[0]}")
            return job.slot
        if len(self.objectives) == 1:
            # Every staged trial reports, so COMPLETE ones give the pruner its step-0 scores.
            self.storage(trial.report, first_stage[self.objectives[0].name]["score"], 0)
        reason = None if "baseline" in trial.user_attrs else self._prune_reason(trial, first_stage)
        if reason is not None:
            self.storage(trial.set_user_attr, "prune_reason", reason)
            self._tell(trial, state=TrialState.PRUNED)
            self.consecutive_failures = 0
            return job.slot
        ref = self.pool.actors[job.slot].run_second_stage.remote(self.config.pruning.first_share)
        self.in_flight[ref] = InFlight(trial, job.slot, stage=2)
        return None

    def _prune_reason(self, trial: optuna.Trial, first_stage: dict[str, dict[str, float]]) -> str | None:
        """Why the trial should stop after its first stage, or None (search/pruning.py has the rules)."""
        if len(self.objectives) == 1:
            if self.storage(trial.should_prune):
                return f"first-stage score outside the top {self.config.pruning.keep_percentile:g}% of complete trials"
            return None
        complete = self.storage(self.study.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < self.config.pruning.min_complete:
            return None
        beaten_by = beaten_beyond_noise(first_stage, [t.values for t in complete], self.objectives)
        if beaten_by is None:
            return None
        return f"trial {complete[beaten_by].number} beats its first stage by more than one SE on every objective"

    def _abandon_in_flight(self) -> None:
        for job in self.in_flight.values():
            self._fail(job.trial, "interrupted")
            self.storage(requeue, self.study, job.trial.params, job.trial.user_attrs, job.trial.number)
        self.in_flight.clear()

    def _best_text(self) -> str:
        done = self.storage(self.study.get_trials, deepcopy=False, states=(TrialState.COMPLETE,))
        if not done:
            return "best: -"
        best = max(done, key=lambda t: scalarised(t.values, self.objectives))
        return f"best {scalarised(best.values, self.objectives):.4f} (#{best.number})"

    def run(self, n_trials: int | None, timeout: float | None) -> None:
        import ray

        free = list(range(self.pool.size))
        deadline = time.monotonic() + timeout if timeout else None
        limit = self.config.budget.max_consecutive_failures
        complete = self.storage(finished, self.study)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        with progress, interrupt_flag() as interrupted:
            task = progress.add_task(self.study.study_name, total=n_trials, completed=complete, status="")
            try:
                while True:
                    while free and not self._stop_dispatching(complete, n_trials, deadline, interrupted, limit):
                        slot = free.pop(0)
                        if not self._dispatch(slot):
                            free.append(slot)
                    if not self.in_flight:
                        break
                    ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=0.5)
                    for ref in ready:
                        slot = self._finish(ref)
                        if slot is not None:
                            free.append(slot)
                    complete = self.storage(finished, self.study)
                    status = f"failed {self.storage(count, self.study, TrialState.FAIL)}  {self._best_text()}"
                    if self.config.pruning.enabled:
                        status = f"pruned {self.storage(count, self.study, TrialState.PRUNED)}  {status}"
                    if interrupted.is_set():
                        status += f"  [yellow]stopping: {len(self.in_flight)} in flight (Ctrl-C again to abandon)"
                    progress.update(task, completed=complete, status=status)
            except KeyboardInterrupt:
                self._abandon_in_flight()
        if self.consecutive_failures >= limit:
            raise MergetuneError(
                f"stopped after {limit} failed trials in a row; last reason: {self.last_failure}"
            )

    def _stop_dispatching(self, complete: int, n_trials: int | None, deadline: float | None, interrupted: threading.Event, limit: int) -> bool:
        if interrupted.is_set() or self.consecutive_failures >= limit:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return True
        return n_trials is not None and complete + len(self.in_flight) >= n_trials


def run_study(
    config: StudyConfig,
    *,
    console: Console | None = None,
    worker_cls: type | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or continue the study `config.study` and run it to its budget; returns the study.

    `worker_cls` and `sampler` replace the TrialWorker and the configured sampler (tests, benchmarks)."""
    import ray

    from mergetune.search.plan import checked_config
    from mergetune.search.workers import TrialWorker

    console = console or Console()
    space = SearchSpace(config)
    worker_config = config
    if worker_cls is None:
        # Models, statistics and the memory plan are checked from headers before Ray or any worker starts.
        worker_config = checked_config(config)
        worker_cls = TrialWorker
    workers = config.ray.workers
    started_ray = connect_ray(config, workers)
    pool = None
    try:
        pool = WorkerPool(worker_cls, worker_config, workers)
        objectives = resolve_objectives(config, pool)
        sampler = sampler or make_sampler(config.sampler, config.experts, config.seed, len(objectives))
        retry = StorageRetry(config.storage_retry_s)
        study = retry(prepare_study, config, objectives, sampler)
        retry(recover_orphans, study)
        if config.warm_start:
            retry(enqueue_baselines, study, space)
        Driver(study, space, pool, objectives, config, console).run(config.budget.n_trials, config.budget.timeout)
        return study
    finally:
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()


def method_summary(methods: list[str]) -> str:
    """Methods of consecutive groups, runs collapsed: `ties×3 linear`."""
    runs: list[list] = []
    for method in methods:
        if runs and runs[-1][0] == method:
            runs[-1][1] += 1
        else:
            runs.append([method, 1])
    return " ".join(m if n == 1 else f"{m}×{n}" for m, n in runs)


def front_table(study: optuna.Study, objectives: list[ObjectiveConfig]) -> Table:
    """The Pareto-optimal trials: per-objective scores and the methods per layer group."""
    table = Table(title=f"Pareto front of {study.study_name}")
    table.add_column("trial", justify="right")
    table.add_column("baseline")
    for o in objectives:
        table.add_column(f"{o.name} ({'↑' if o.direction == 'maximize' else '↓'})", justify="right")
    table.add_column("methods per group")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return table
    for trial in sorted(study.best_trials, key=lambda t: -scalarised(t.values, objectives)):
        methods = [v for k, v in trial.params.items() if k.endswith(".method")]
        table.add_row(
            str(trial.number),
            str(trial.user_attrs.get("baseline", "")),
            *(f"{v:.4f}" for v in trial.values),
            method_summary(methods),
        )
    return table
