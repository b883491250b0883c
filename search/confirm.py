"""Noise-aware selection: the end of a run re-scores its top trials on a larger subset of the search split.

A search score is a mean over the evaluator's fixed subset, so among many trials the one with
the highest search mean is partly the one the noise favoured most. Once the budget is reached,
the driver re-scores the candidates (studies/front.py `confirmation_candidates`: the front by
weighted mean, then the next best, `confirm.top_k` at most) on `confirm.limit` items per task of
the *search* split (all of it by default; the test split is never touched), on the same Ray
workers, and records each result as soon as it arrives (studies/front.py CONFIRMED_ATTR_PREFIX).
The one "best" then maximises the confirmed weighted mean.

Cost: top_k re-merges plus top_k × (confirmation items per task × tasks) evaluations. Resume-safe:
a trial confirmed at the same `confirm.limit` is not scored again, and a crash mid-way loses only
the confirmations in flight. Two drivers ending together may both confirm a trial (same scores).
"""

from __future__ import annotations

import logging

import optuna
from rich.console import Console

from mergetune.evaluators.config import LmEvalConfig, validate_evaluator_config
from mergetune.search.config import StudyConfig
from mergetune.search.pool import WorkerPool
from mergetune.search.ray_errors import worker_error_message
from mergetune.search.stopping import StopSignals
from mergetune.studies.front import CONFIRMED_ATTR_PREFIX, confirmation_candidates, confirmed_records, trial_recipe, with_error
from mergetune.studies.storage import StorageRetry

log = logging.getLogger(__name__)
WAIT_S = 0.5
_UNCONFIRMED = object()


def confirmation_evaluator(config: StudyConfig):
    """The search evaluator's config with `confirm.limit` items per task (a task's own limit included)."""
    assert config.evaluator is not None
    evaluator = validate_evaluator_config(config.evaluator)
    update: dict[str, object] = {"limit": config.confirm.limit}
    if isinstance(evaluator, LmEvalConfig):
        update["tasks"] = [task.model_copy(update={"limit": None}) for task in evaluator.tasks]
    return evaluator.model_copy(update=update)


def skip_reason(config: StudyConfig) -> str | None:
    """Why this run confirms nothing, or None."""
    if config.confirm.top_k == 0:
        return "confirm.top_k is 0"
    if confirmation_evaluator(config) == validate_evaluator_config(config.evaluator):
        return "the search already scores every item the confirmation would (set evaluator.limit below confirm.limit)"
    return None


def confirm_top_trials(
    study: optuna.Study, pool: WorkerPool, storage: StorageRetry, config: StudyConfig, console: Console, stop: StopSignals
) -> int:
    """Re-score the candidates not yet confirmed at `confirm.limit` on the pool's workers; returns how many
    were confirmed now. A failed re-score is logged and left unconfirmed (a resume tries it again)."""
    import ray

    reason = skip_reason(config)
    if reason is not None:
        log.info("no confirmation re-score: %s", reason)
        return 0
    limit = config.confirm.limit
    records = storage(confirmed_records, study)
    todo = [
        t for t in storage(confirmation_candidates, study, config.confirm.top_k)
        if "recipe" in t.user_attrs and records.get(t.number, {}).get("limit", _UNCONFIRMED) != limit
    ]  # fmt: skip
    if not todo:
        return 0
    console.print(
        f"confirming {len(todo)} top trial(s) on {'all' if limit is None else limit} search items per task",
        highlight=False, markup=False,
    )
    free, in_flight, confirmed = list(range(pool.size)), {}, 0
    with stop.graceful():
        while (todo or in_flight) and stop.level < 2:
            while free and todo and not stop.level:
                trial, slot = todo.pop(0), free.pop(0)
                recipe = trial_recipe(trial)
                ref = pool.actors[slot].confirm.remote(recipe.to_dict(), trial.user_attrs.get("seed", recipe.seed))
                in_flight[ref] = (trial, slot)
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                trial, slot = in_flight.pop(ref)
                free.append(slot)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    pool.replace(slot)
                    result = {"error": f"worker died: {worker_error_message(exc)}"}
                except ray.exceptions.RayTaskError as exc:
                    result = {"error": f"worker error: {worker_error_message(exc)}"}
                if "error" in result:
                    log.warning("trial %d was not confirmed: %s", trial.number, result["error"])
                    continue
                scores = result["confirmed"]
                record = {"scores": scores, "limit": limit, "timings": result.get("timings", {})}
                storage(study.set_user_attr, f"{CONFIRMED_ATTR_PREFIX}{trial.number}", record)
                confirmed += 1
                shown = ", ".join(f"{name} {with_error(s['score'], s['se'])}" for name, s in scores.items())
                console.print(f"trial {trial.number} confirmed: {shown}", highlight=False, markup=False)
    return confirmed
