"""Study bookkeeping for one driver among several: setting a study up once, claiming trials, the shared
budget, re-enqueueing failed trials exactly once, reclaiming orphans.

Storage calls that create something are made idempotent so a retry after a lost answer cannot
create a second one:
- `ask_trial` first claims an enqueued WAITING trial (a compare-and-set: Optuna's
  WAITING → RUNNING transition succeeds for one caller only); else it creates a RUNNING trial
  that carries a unique `ask_token`, and a retried attempt first looks that token up.
- `enqueue_once` gives every enqueued trial an identity (`baseline` name or `retry_of` number)
  and enqueues only if no trial has it. Only one driver enqueues a given identity: the study's
  creator enqueues the baselines, the driver whose FAIL transition of a trial succeeded
  enqueues its retry.

The budget is shared: COMPLETE + PRUNED trials of every driver plus every RUNNING trial, read
right before each trial is claimed. Claiming is not atomic with that read, so drivers that
claim at the same instant near the end may each run one trial more: with D drivers a study
ends with at most n_trials + D − 1 finished trials.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.distributions import distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from mergetune.core.errors import ConfigError
from mergetune.search.config import ObjectiveConfig, StudyConfig, parse_study_config
from mergetune.search.liveness import Heartbeat, Liveness, driver_records
from mergetune.search.space import SearchSpace
from mergetune.search.warmstart import baseline_params
from mergetune.studies.storage import StorageError, StorageRetry, is_permanent, reason, storage_errors

log = logging.getLogger(__name__)

SPACE_ATTR = "search_space"  # param name → distribution JSON, written when the study is created
WARM_START_ATTR = "warm_start"  # {"by": driver id, "state": "pending" | "done"}
SETUP_POLL_S = 0.2


# --- what a study stores about itself ---
def stored_config(study: optuna.Study) -> StudyConfig:
    data = study.user_attrs.get("config")
    if data is None:
        raise ConfigError(f"study {study.study_name!r} was not created by mergetune (no config in its user attrs)")
    return parse_study_config(data, f"study {study.study_name} config")


def stored_objectives(study: optuna.Study) -> list[ObjectiveConfig]:
    return [ObjectiveConfig.model_validate(o) for o in study.user_attrs.get("objectives", [])]


# --- the search space a study was created with ---
def space_attr(space: SearchSpace) -> dict[str, str]:
    return {name: distribution_to_json(d) for name, d in space.distributions().items()}


def space_change(stored: dict[str, optuna.distributions.BaseDistribution], new: dict[str, optuna.distributions.BaseDistribution]) -> str | None:
    """The first difference between two search spaces, as words; None if they are the same."""
    for name in sorted(set(stored) | set(new)):
        old, now = stored.get(name), new.get(name)
        if old == now:
            continue
        if now is None:
            return f"{name} is no longer searched"
        if old is None:
            return f"{name} is new"
        return f"{name} was {_describe(old)}, now {_describe(now)}"
    return None


def _describe(distribution: optuna.distributions.BaseDistribution) -> str:
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return "one of " + ", ".join(map(str, distribution.choices))
    if isinstance(distribution, optuna.distributions.FloatDistribution):
        return f"in [{distribution.low:g}, {distribution.high:g}]"
    return str(distribution)


def check_same_space(study: optuna.Study, space: SearchSpace) -> None:
    """A study keeps the search space it was created with; reads only."""
    new = space.distributions()
    stored_json = study.user_attrs.get(SPACE_ATTR)
    if stored_json is not None:
        change = space_change({k: json_to_distribution(v) for k, v in stored_json.items()}, new)
    else:
        # Studies from before the space was stored: the distributions their trials used must match.
        seen: dict[str, optuna.distributions.BaseDistribution] = {}
        for trial in study.get_trials(deepcopy=False):
            seen.update(trial.distributions)
        change = space_change(seen, {k: v for k, v in new.items() if k in seen}) if seen else None
    if change:
        raise ConfigError(
            f"study {study.study_name!r} was created with another search space ({change}); "
            "run this config under a new study name, or restore the study's search section"
        )


def check_same_directions(study: optuna.Study, objectives: list[ObjectiveConfig]) -> None:
    directions = [o.direction for o in objectives]
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"study {study.study_name!r} exists with other objectives; choose another study name")


def wait_for_creator(study: optuna.Study, timeout_s: float) -> None:
    """A study another driver has just created has no stored space yet: wait (bounded) until it has."""
    deadline = time.monotonic() + timeout_s
    while SPACE_ATTR not in study.user_attrs and not study.get_trials(deepcopy=False):
        if time.monotonic() >= deadline:
            return  # its creator stopped before writing it: this driver sets the study up
        time.sleep(SETUP_POLL_S)


def write_study_attrs(study: optuna.Study, config: StudyConfig, objectives: list[ObjectiveConfig], space: SearchSpace) -> None:
    """The config, objectives and (if missing) the search space; call after every check passed."""
    import warnings

    if SPACE_ATTR not in study.user_attrs:
        study.set_user_attr(SPACE_ATTR, space_attr(space))
    study.set_user_attr("config", config.model_dump(mode="json"))
    study.set_user_attr("objectives", [o.model_dump() for o in objectives])
    # Optuna's own metric names: optuna-dashboard and plots label the objectives by task.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([o.name for o in objectives])


# --- enqueueing exactly once ---
def _identity(user_attrs: dict) -> tuple[str, object]:
    if "retry_of" in user_attrs:
        return "retry_of", user_attrs["retry_of"]
    return "baseline", user_attrs["baseline"]


def _has_identity(trial: FrozenTrial, key: str, value: object) -> bool:
    if trial.user_attrs.get(key) != value:
        return False
    return key == "retry_of" or "retry_of" not in trial.user_attrs  # a baseline's retry is not the baseline


def enqueue_once(study: optuna.Study, storage: StorageRetry, params: dict, user_attrs: dict) -> bool:
    """Enqueue a WAITING trial unless one with the same identity exists; True if enqueued now."""
    key, value = _identity(user_attrs)

    def attempt() -> bool:
        if any(_has_identity(t, key, value) for t in study.get_trials(deepcopy=False)):
            return False
        study.enqueue_trial(params, user_attrs=user_attrs)
        return True

    return storage(attempt)  # idempotent: a retry sees the trial a lost answer created


def enqueue_retry(study: optuna.Study, storage: StorageRetry, trial: FrozenTrial | optuna.Trial) -> bool:
    """Re-enqueue a failed trial's params once (`retry_of` its number; a baseline stays labelled)."""
    attrs: dict[str, object] = {"retry_of": trial.number}
    if "baseline" in trial.user_attrs:
        attrs["baseline"] = trial.user_attrs["baseline"]
    return enqueue_once(study, storage, dict(trial.params), attrs)


def set_up_study(
    study: optuna.Study,
    created: bool,
    config: StudyConfig,
    objectives: list[ObjectiveConfig],
    space: SearchSpace,
    heartbeat: Heartbeat,
    liveness: Liveness,
) -> None:
    """Check a study this driver did not create against its config, then record the config and
    this driver, and enqueue the warm start once.

    The creator writes its driver record and the warm-start marker before the search space, so a
    driver that waited for the space (`wait_for_creator`) also sees who is enqueueing baselines."""
    storage = heartbeat.storage
    if created:
        heartbeat.beat([], force=True)
        if config.warm_start:
            storage(study.set_user_attr, WARM_START_ATTR, {"by": heartbeat.id, "state": "pending"})
    else:
        storage(wait_for_creator, study, config.heartbeat.grace_s)
        storage(check_same_space, study, space)
        storage(check_same_directions, study, objectives)
        heartbeat.beat([], force=True)
    storage(write_study_attrs, study, config, objectives, space)
    if config.warm_start:
        _set_up_warm_start(study, space, created, heartbeat, liveness)


def _set_up_warm_start(study: optuna.Study, space: SearchSpace, created: bool, heartbeat: Heartbeat, liveness: Liveness) -> None:
    """Enqueue the baselines once per study: the creator does it; a later driver only takes over
    from a creator that stopped before it finished (marker `warm_start`)."""
    me, storage = heartbeat.id, heartbeat.storage
    if not created:
        first_seen = time.monotonic()
        while True:
            marker = storage(lambda: study.user_attrs.get(WARM_START_ATTR))
            if marker is None or marker.get("state") == "done" or marker.get("by") == me:
                break
            liveness.look(driver_records(storage(lambda: study.user_attrs)))
            if not liveness.is_alive(marker["by"]) and time.monotonic() - first_seen >= liveness.grace_s:
                log.warning("the driver setting up the warm start stopped; this one takes over")
                break
            heartbeat.beat([])
            time.sleep(SETUP_POLL_S)
        if marker is not None and marker.get("state") == "done":
            return
        storage(study.set_user_attr, WARM_START_ATTR, {"by": me, "state": "pending"})
    names = []
    for name, params in baseline_params(space):
        enqueue_once(study, storage, params, {"baseline": name})
        names.append(name)
    storage(study.set_user_attr, WARM_START_ATTR, {"by": me, "state": "done", "baselines": names})


# --- claiming a trial ---
def _running_template(attrs: dict) -> FrozenTrial:
    return FrozenTrial(
        number=-1, state=TrialState.RUNNING, value=None, values=None, datetime_start=datetime.datetime.now(),
        datetime_complete=None, params={}, distributions={}, user_attrs=attrs, system_attrs={},
        intermediate_values={}, trial_id=-1,
    )


def ask_trial(study: optuna.Study, storage: StorageRetry, driver: str, token: str, alone: Callable[[], bool]) -> optuna.Trial:
    """A RUNNING trial owned by `driver`: an enqueued one if any (oldest first), else a new one.

    `token` must be unique per call; `alone()` says whether no other driver is alive (then a
    trial whose claim lost its answer is certainly this driver's)."""
    backend, study_id = study._storage, study._study_id
    trial_id = None
    for waiting in storage(backend.get_all_trials, study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            claimed = backend.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        except storage_errors() as exc:
            if is_permanent(exc):
                raise StorageError(f"the study storage refused a call: {reason(exc)}") from None
            # The claim may have committed before the answer was lost.
            log.warning("storage error while claiming trial %d (%s); checking whether the claim committed", waiting.number, reason(exc))
            now = storage(backend.get_trial, waiting._trial_id)
            claimed = now.state == TrialState.RUNNING and alone()
        if claimed:
            trial_id = waiting._trial_id
            storage(backend.set_trial_user_attr, trial_id, "driver", driver)
            break
    if trial_id is None:
        template = _running_template({"driver": driver, "ask_token": token})
        attempts = 0

        def create() -> int:
            nonlocal attempts
            attempts += 1
            if attempts > 1:  # a lost answer may hide a created trial: look for its token first
                for trial in backend.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                    if trial.user_attrs.get("ask_token") == token:
                        return trial._trial_id
            return backend.create_new_trial(study_id, template_trial=template)

        trial_id = storage(create)
    study._thread_local.cached_all_trials = None  # as Study.ask does: samplers read fresh trials
    return storage(optuna.Trial, study, trial_id)


# --- the shared budget ---
@dataclass
class Snapshot:
    """The study's trials at one read, as the budget and the progress bar count them."""

    complete: int
    pruned: int
    failed: int
    running: list[FrozenTrial]

    @property
    def finished(self) -> int:
        return self.complete + self.pruned


def snapshot(study: optuna.Study) -> Snapshot:
    counts = {TrialState.COMPLETE: 0, TrialState.PRUNED: 0, TrialState.FAIL: 0}
    running = []
    for trial in study._storage.get_all_trials(study._study_id, deepcopy=False):
        if trial.state == TrialState.RUNNING:
            running.append(trial)
        elif trial.state in counts:
            counts[trial.state] += 1
    return Snapshot(counts[TrialState.COMPLETE], counts[TrialState.PRUNED], counts[TrialState.FAIL], running)


# --- orphans ---
def reclaim(study: optuna.Study, storage: StorageRetry, trial: FrozenTrial, why: str) -> bool:
    """FAIL a trial no live driver has and enqueue its retry; False if another driver got there first."""
    backend = study._storage
    text = f"left RUNNING by a driver that stopped ({why})"
    try:
        storage(backend.set_trial_user_attr, trial._trial_id, "fail_reason", text)
        storage(backend.set_trial_state_values, trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another driver finished it first — unless it was this driver's own retried call.
        now = storage(backend.get_trial, trial._trial_id)
        if now.state != TrialState.FAIL or now.user_attrs.get("fail_reason") != text:
            return False
    enqueue_retry(study, storage, trial)
    return True
