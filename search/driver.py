"""The study driver: an ask/tell loop over a pool of Ray actors, with no generation barrier.

As soon as one trial finishes, it is told to Optuna and the next is claimed and dispatched to
the freed actor. The Optuna storage is the single source of truth: recipe, scores, timings,
node and versions of every trial live in its user attrs; the study config lives in the study's
user attrs, so `resume` needs only the study name and storage.

Several drivers may run one study (more machines, or a restart while the first still lives):
they share the budget and the warm start, and reclaim only the trials of drivers that stopped
beating (search/liveness.py, search/bookkeeping.py). A driver whose budget is taken by other
drivers' live trials waits for them, so if one of those drivers dies its trials are retried.

Failures: a trial whose merge/eval raises or scores NaN → FAIL with `fail_reason`; a worker
process that dies → its trial FAIL, the actor replaced, the params re-enqueued once
(`retry_of`); trials of a driver that died → FAIL and re-enqueued once by whichever driver
notices, after `heartbeat.grace_s`; a storage that stops answering → idempotent calls retried
for `storage_retry_s` (studies/storage.py), then the driver stops with a message to resume.
Stopping: first Ctrl-C → no new trials, in-flight ones finish; a second Ctrl-C or a SIGTERM →
in-flight trials FAIL and are re-enqueued now; a third signal stops at once. Either way the
local Ray this driver started is stopped and the run exits 130 (Ctrl-C) or 143 (SIGTERM). The
budget counts finished trials: COMPLETE, and PRUNED when two-stage pruning is on
(search/pruning.py: the driver keeps the actor between the stages and decides). Once the budget is
reached, the top trials are re-scored on a larger search subset (search/confirm.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mergetune.core.errors import MergetuneError
from mergetune.search.bookkeeping import (
    Snapshot,
    ask_trial,
    check_same_directions,
    check_same_space,
    enqueue_retry,
    reclaim,
    set_up_study,
    snapshot,
)
from mergetune.search.config import ObjectiveConfig, StudyConfig
from mergetune.search.confirm import confirm_top_trials
from mergetune.search.liveness import Heartbeat, Liveness, driver_records
from mergetune.search.pool import WorkerPool, check_local_gpus, connect_ray, resolve_objectives, wait_for_resources
from mergetune.search.pruning import beaten_beyond_noise, make_pruner
from mergetune.search.ray_errors import worker_error_message
from mergetune.search.samplers import make_sampler
from mergetune.search.space import SearchSpace
from mergetune.search.stopping import RunInterrupted, StopSignals
from mergetune.studies.front import best_scored
from mergetune.studies.storage import StorageRetry, StorageUnavailable, storage_errors
from mergetune.studies.store import create_or_open_study, find_study

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.5


@dataclass
class InFlight:
    trial: optuna.Trial
    slot: int
    stage: int = 0  # 0: a one-stage run; 1, 2: the stages of a two-stage run (pruning on)


class Driver:
    """Runs one study to its budget on a worker pool; see the module docstring for the rules."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        pool: WorkerPool,
        objectives: list[ObjectiveConfig],
        config: StudyConfig,
        console: Console,
        heartbeat: Heartbeat,
        stop: StopSignals,
    ) -> None:
        self.study = study
        self.space = space
        self.pool = pool
        self.objectives = objectives
        self.config = config
        self.console = console
        self.heartbeat = heartbeat
        self.stop = stop
        self.storage = heartbeat.storage
        self.liveness = Liveness(heartbeat.id, config.heartbeat.grace_s)
        self.in_flight: dict[object, InFlight] = {}
        self.owned: set[int] = set()  # numbers of the RUNNING trials this driver has (asked, not yet told)
        self.asks = 0
        self.consecutive_failures = 0
        self.last_failure = ""
        self._last_check = float("-inf")
        self._outages_seen = 0

    # --- liveness: beat, and reclaim other drivers' orphans ---
    def _tick(self, force: bool = False) -> None:
        self.heartbeat.beat(self.owned, force=force)
        now = time.monotonic()
        if not force and now - self._last_check < self.config.heartbeat.interval_s:
            return
        self._last_check = now
        if self.storage.outages != self._outages_seen:
            self._outages_seen = self.storage.outages
            self.liveness.forget()  # the others' beats may have been missed during the outage
        running = self.storage(snapshot, self.study).running  # read before the records: see Liveness.orphans
        records = driver_records(self.storage(lambda: self.study.user_attrs))
        for orphan in self.liveness.orphans(running, records, self.owned):
            why = f"no live driver had it for {self.config.heartbeat.grace_s:g} s; reclaimed by {self.heartbeat.id}"
            if reclaim(self.study, self.storage, orphan, why):
                log.warning("trial %d was left RUNNING by a driver that stopped: FAIL, re-enqueued", orphan.number)

    # --- one trial ---
    def _tell(self, trial: optuna.Trial, values: list[float] | None = None, state: TrialState | None = None) -> None:
        # skip_if_finished: a retried tell whose first attempt committed must not fail.
        self.storage(self.study.tell, trial, values, state=state, skip_if_finished=True)
        self.owned.discard(trial.number)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        log.warning("trial %d failed: %s", trial.number, reason)
        self.storage(trial.set_user_attr, "fail_reason", reason)
        self._tell(trial, state=TrialState.FAIL)
        self.consecutive_failures += 1
        self.last_failure = reason

    def _dispatch(self, slot: int) -> bool:
        """Claim a trial and send it to the actor in `slot`; False if it failed before dispatch."""
        self.asks += 1
        token = f"{self.heartbeat.id}/{self.asks}"
        trial = ask_trial(self.study, self.storage, self.heartbeat.id, token, alone=lambda: not self.liveness.alive_others)
        self.owned.add(trial.number)
        try:
            recipe = self._recipe(trial)
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

    def _recipe(self, trial: optuna.Trial):
        """The trial's recipe; after a storage error the trial is re-read, so params a lost answer
        stored come back unchanged and only the missing ones are suggested again."""
        current = [trial]

        def suggest():
            try:
                return self.space.recipe(current[0])
            except storage_errors():
                current[0] = optuna.Trial(self.study, trial._trial_id)
                raise

        return self.storage(suggest)

    def _finish(self, ref: object) -> int | None:
        """Tell the trial behind `ref` (COMPLETE, PRUNED or FAIL) and return the freed actor slot, or
        send the trial's second stage to the same actor and return None."""
        job = self.in_flight.pop(ref)
        try:
            return self._record_result(job, ref)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another driver reclaimed it while this one could not beat (a long outage or stall).
            log.warning("trial %d was failed by another driver while it ran here; its result is dropped", job.trial.number)
            self.owned.discard(job.trial.number)
            return job.slot

    def _record_result(self, job: InFlight, ref: object) -> int | None:
        import ray

        trial = job.trial
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self.pool.replace(job.slot)
            self._fail(trial, f"worker died: {worker_error_message(exc)}")
            if "retry_of" not in trial.user_attrs:
                enqueue_retry(self.study, self.storage, trial)
            return job.slot
        except ray.exceptions.RayTaskError as exc:
            self._fail(trial, f"worker error: {worker_error_message(exc)}")
            return job.slot
        if job.stage == 2:  # the first stage's timings come first
            result["timings"] = {**trial.user_attrs.get("timings", {}), **result.get("timings", {})}
        # A first stage's `scores` are head means; they are kept in `first_stage` with their SE.
        stored = ("first_stage",) if job.stage == 1 else ("scores", "score_se")
        for key in ("node_id", "gpu_ids", "pid", "versions", "timings", *stored):
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
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                self._fail(job.trial, "interrupted")
                enqueue_retry(self.study, self.storage, job.trial)
        self.in_flight.clear()

    # --- the loop ---
    def _status(self, snap: Snapshot) -> str:
        scored = self.storage(best_scored, self.study)
        best = f"best {scored[1]:.4f} (#{scored[0].number})" if scored else "best: -"
        status = f"failed {snap.failed}  {best}"
        if self.config.pruning.enabled:
            status = f"pruned {snap.pruned}  {status}"
        others = len(snap.running) - len(self.owned)
        if others > 0:
            status += f"  {others} running elsewhere"
        if self.stop.level == 1:
            status += f"  [yellow]stopping: {len(self.in_flight)} in flight (Ctrl-C again to abandon)"
        return status

    def run(self, n_trials: int | None, timeout: float | None) -> None:
        import ray

        free = list(range(self.pool.size))
        deadline = time.monotonic() + timeout if timeout else None
        limit = self.config.budget.max_consecutive_failures
        snap = self.storage(snapshot, self.study)
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        with progress, self.stop.graceful():
            task = progress.add_task(self.study.study_name, total=n_trials, completed=snap.finished, status=self._status(snap))
            try:
                while True:
                    self._tick()
                    if self.stop.level >= 2:
                        self._abandon_in_flight()
                        break
                    while free and not self._stop_dispatching(n_trials, deadline, limit):
                        slot = free.pop(0)
                        if not self._dispatch(slot):
                            free.append(slot)
                        self._tick()
                    snap = self.storage(snapshot, self.study)
                    if not self.in_flight and self._done(snap, n_trials, deadline, limit):
                        break
                    if self.in_flight:
                        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=IDLE_WAIT_S)
                    else:  # the budget is held by other drivers' trials: wait for them to finish
                        ready = []
                        time.sleep(IDLE_WAIT_S)
                    for ref in ready:
                        slot = self._finish(ref)
                        if slot is not None:
                            free.append(slot)
                    if ready or self.stop.level or not self.in_flight:
                        snap = self.storage(snapshot, self.study)
                        progress.update(task, completed=snap.finished, status=self._status(snap))
            except KeyboardInterrupt:
                self._abandon_in_flight()
        if self.consecutive_failures >= limit:
            raise MergetuneError(f"stopped after {limit} failed trials in a row; last reason: {self.last_failure}")

    def _stop_dispatching(self, n_trials: int | None, deadline: float | None, limit: int) -> bool:
        if self.stop.level or self.consecutive_failures >= limit:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return True
        if n_trials is None:
            return False
        snap = self.storage(snapshot, self.study)  # every driver's finished and RUNNING trials, now
        return snap.finished + len(snap.running) >= n_trials

    def _done(self, snap: Snapshot, n_trials: int | None, deadline: float | None, limit: int) -> bool:
        """Nothing in flight here: stop, unless other drivers' live trials hold the rest of the budget."""
        if self.stop.level or self.consecutive_failures >= limit or n_trials is None:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return True
        return snap.finished >= n_trials or not snap.running


def run_study(
    config: StudyConfig,
    *,
    console: Console | None = None,
    worker_cls: type | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> optuna.Study:
    """Create or continue the study `config.study` and run it to its budget; returns the study.

    Raises RunInterrupted after Ctrl-C / SIGTERM (the study is consistent). `worker_cls` and
    `sampler` replace the TrialWorker and the configured sampler (tests, benchmarks)."""
    import ray

    from mergetune.search.plan import checked_config
    from mergetune.search.workers import TrialWorker, check_worker_device

    check_worker_device(config)  # what the config model cannot check alone, before Ray starts
    console = console or Console()
    space = SearchSpace(config)
    workers = config.ray.workers
    # Before Ray starts, and writing nothing: the storage, an existing study against this config,
    # the models, the GPUs.
    existing = find_study(config.study, config.storage_url)
    if existing is not None:
        check_same_space(existing, space)
        if config.objectives is not None:
            check_same_directions(existing, config.objectives)
    worker_config = config
    if worker_cls is None:
        # Models, statistics and the memory plan are checked from headers before Ray or any worker starts.
        worker_config = checked_config(config)
        worker_cls = TrialWorker
    check_local_gpus(config, workers)
    storage = StorageRetry(config.storage_retry_s)
    started_ray = interrupted = False
    pool = heartbeat = study = None
    stop = StopSignals()
    try:
        with stop:
            started_ray = connect_ray(config, workers)
            stop.reinstall()
            wait_for_resources(config, workers, started_ray)
            pool = WorkerPool(worker_cls, worker_config, workers)
            objectives = resolve_objectives(config, pool)
            sampler = sampler or make_sampler(config.sampler, config.experts, config.seed, len(objectives))
            study, created = create_or_open_study(
                config.study, config.storage_url, [o.direction for o in objectives],
                sampler=sampler, pruner=make_pruner(config.pruning),
            )
            heartbeat = Heartbeat(study, config, storage)
            driver = Driver(study, space, pool, objectives, config, console, heartbeat, stop)
            set_up_study(study, created, config, objectives, space, heartbeat, driver.liveness)
            driver.run(config.budget.n_trials, config.budget.timeout)
            if not stop.signals:
                confirm_top_trials(study, pool, storage, config, console, stop)
    except KeyboardInterrupt:
        interrupted = True  # reported below, after the cleanup
    finally:
        if heartbeat is not None and heartbeat.record.beats:
            with contextlib.suppress(MergetuneError):
                heartbeat.stop()
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
    if interrupted or stop.signals:
        raise RunInterrupted(
            f"interrupted; the study is consistent — continue it with `mergetune resume --study {config.study}`"
            + (f" --storage {config.storage}" if config.storage else ""),
            stop.exit_code,
            study,
        )
    assert study is not None
    return study
