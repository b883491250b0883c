"""Read a study: objectives, the Pareto front, picking one trial, recipe summaries, held-out re-scoring.

Scores carry their noise: a trial's `score_se` user attr holds each search score's standard
error, and the trials the run's end re-scored on the larger confirmation subset
(search/confirm.py) have a confirmed record. Once any trial is confirmed, "best" is the
confirmed trial with the highest confirmed weighted mean: a search score that noise inflated
is not trusted over a re-score on more items.
"""

from __future__ import annotations

import logging
import math

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.table import Table

from mergetune.core.errors import MergetuneError
from mergetune.merge.recipe import Recipe

log = logging.getLogger(__name__)

# Finished trials are read-only in Optuna, so held-out scores live in one study user attr:
# {"<trial number>": {objective: score}}.
TEST_SCORES_ATTR = "test_scores"
# Confirmed scores live in one study user attr per trial, so drivers and a crash lose none:
# "confirmed:<trial number>" → {"scores": {objective: {"score", "se", "items"}}, "limit": confirm.limit,
# "timings": the worker's (merge_s, eval_s, ...)}.
CONFIRMED_ATTR_PREFIX = "confirmed:"


def objective_names(study: optuna.Study) -> list[str]:
    """Objective names in `trial.values` order: Optuna's metric names, else the objectives the driver stored."""
    names = study.metric_names
    if names:
        return list(names)
    # Studies made before the driver set metric names still carry its objectives as a user attr.
    stored = [o.get("name") for o in study.user_attrs.get("objectives") or [] if isinstance(o, dict)]
    if len(stored) == len(study.directions) and all(isinstance(n, str) for n in stored):
        return stored
    return [f"objective{i}" for i in range(len(study.directions))]


def configured_weights(study: optuna.Study) -> dict[str, float]:
    """Objective → weight of the scalarised view, from the study config (equal weights if absent)."""
    names = objective_names(study)
    # The driver stores the resolved objectives; a config may leave them to the evaluator (None).
    objectives = study.user_attrs.get("objectives") or (study.user_attrs.get("config") or {}).get("objectives") or []
    given = {o["name"]: float(o.get("weight", 1.0)) for o in objectives if isinstance(o, dict) and "name" in o}
    return {name: given.get(name, 1.0) for name in names}


def parse_weights(text: str, names: list[str]) -> dict[str, float]:
    """`name=w,name=w` → weights; unnamed objectives get 0."""
    weights = {name: 0.0 for name in names}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in weights:
            raise MergetuneError(f"--pick {text!r}: expected NAME=WEIGHT pairs over objectives {', '.join(names)}")
        try:
            weights[key] = float(value)
        except ValueError:
            raise MergetuneError(f"--pick {text!r}: weight of {key} is not a number") from None
    return weights


def confirmed_records(study: optuna.Study) -> dict[int, dict]:
    """Trial number → its confirmation record (see CONFIRMED_ATTR_PREFIX)."""
    return {
        int(key[len(CONFIRMED_ATTR_PREFIX):]): value
        for key, value in study.user_attrs.items()
        if key.startswith(CONFIRMED_ATTR_PREFIX)
    }


def confirmed_values(study: optuna.Study, record: dict) -> list[float]:
    """A confirmation record's scores in `trial.values` order."""
    return [float(record["scores"][name]["score"]) for name in objective_names(study)]


def search_errors(study: optuna.Study, trial: FrozenTrial) -> list[float | None]:
    """The standard error of each search score, in `trial.values` order (None where none was recorded)."""
    errors = trial.user_attrs.get("score_se") or {}
    return [errors.get(name) for name in objective_names(study)]


def with_error(value: float, se: float | None) -> str:
    return f"{value:.4f}" if se is None else f"{value:.4f} ± {se:.4f}"


def scalarised(study: optuna.Study, trial: FrozenTrial, weights: dict[str, float], values: list[float] | None = None) -> float:
    """Weighted mean of the trial's objective values (or of `values`, e.g. its confirmed scores), minimised
    objectives negated (higher is better)."""
    total = sum(abs(w) for w in weights.values()) or 1.0
    score = 0.0
    for name, value, direction in zip(objective_names(study), trial.values if values is None else values, study.directions):
        sign = -1.0 if direction == optuna.study.StudyDirection.MINIMIZE else 1.0
        score += weights.get(name, 0.0) * sign * value
    return score / total


def scalarised_error(study: optuna.Study, errors: list[float | None], weights: dict[str, float]) -> float | None:
    """The standard error of `scalarised` for per-objective standard errors `errors`."""
    from mergetune.evaluators.stderr import weighted_standard_error

    return weighted_standard_error(errors, [weights.get(name, 0.0) for name in objective_names(study)])


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The Pareto-optimal COMPLETE trials (the best trial for a single objective), by trial number."""
    try:
        trials = study.best_trials
    except ValueError:
        trials = []
    if not trials:
        raise MergetuneError(f"study {study.study_name!r} has no COMPLETE trial yet; run or resume it first")
    return sorted(trials, key=lambda t: t.number)


def pick_trial(study: optuna.Study, trial: str, pick: str | None = None) -> FrozenTrial:
    """`trial` is `best` or a trial number; `pick` chooses among the front: `weights`, an objective, or NAME=W,...

    Once trials have confirmed scores, the default pick (`weights`, the configured ones) chooses among those
    trials by their confirmed weighted mean; an objective or NAME=W weights choose by search scores, since the
    confirmation re-scored the candidates of the configured weights only."""
    if trial != "best":
        try:
            number = int(trial)
        except ValueError:
            raise MergetuneError(f"--trial {trial!r}: give `best` or a trial number") from None
        found = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not found:
            raise MergetuneError(f"study {study.study_name!r} has no trial {number} (trials 0–{len(study.trials) - 1})")
        if found[0].state != TrialState.COMPLETE or "recipe" not in found[0].user_attrs:
            raise MergetuneError(f"trial {number} is {found[0].state.name}, not a COMPLETE trial with a recipe")
        return found[0]
    names = objective_names(study)
    records = confirmed_records(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    confirmed = {t.number: confirmed_values(study, records[t.number]) for t in complete if t.number in records}
    if pick in names:
        i = names.index(pick)
        if not complete:
            raise MergetuneError(f"study {study.study_name!r} has no COMPLETE trial yet")
        better = max if study.directions[i] == optuna.study.StudyDirection.MAXIMIZE else min
        return better(complete, key=lambda t: (t.values[i], -t.number))
    front = front_trials(study)
    if pick in (None, "weights"):
        weights = configured_weights(study)
    elif "=" in pick:
        weights = parse_weights(pick, names)
        confirmed = {}
    else:
        raise MergetuneError(f"--pick {pick!r}: give `weights`, an objective ({', '.join(names)}) or NAME=W pairs")
    if confirmed:
        pool = [t for t in complete if t.number in confirmed]
        return max(pool, key=lambda t: (scalarised(study, t, weights, confirmed[t.number]), -t.number))
    return max(front, key=lambda t: (scalarised(study, t, weights), -t.number))


def confirmation_candidates(study: optuna.Study, top_k: int) -> list[FrozenTrial]:
    """The trials the run's end re-scores: Pareto-front members by weighted search mean (the best by it
    first), then, if the front has fewer than `top_k`, the next COMPLETE trials by it; at most `top_k`."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete or top_k <= 0:
        return []
    weights = configured_weights(study)
    on_front = {t.number for t in front_trials(study)}
    ranked = sorted(complete, key=lambda t: (t.number not in on_front, -scalarised(study, t, weights), t.number))
    return ranked[:top_k]


def best_scored(study: optuna.Study) -> tuple[FrozenTrial, float] | None:
    """The study's best trial — what `export --trial best` picks — and the weighted mean it was picked by
    (confirmed, once it has one); None before a COMPLETE trial. The progress bar, the run's last line,
    `status`, `front` and reports show this."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = pick_trial(study, "best")
    record = confirmed_records(study).get(best.number)
    values = None if record is None else confirmed_values(study, record)
    return best, scalarised(study, best, configured_weights(study), values)


def best_vs_baselines(study: optuna.Study) -> str | None:
    """One line: the best trial (`best_scored`) and, once one is COMPLETE, its gain over the best
    warm-start baseline, by the weighted mean of the search scores; None before a COMPLETE trial."""
    scored = best_scored(study)
    if scored is None:
        return None
    best, picked_score = scored
    weights = configured_weights(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    baselines = [(scalarised(study, t, weights), t) for t in complete if t.user_attrs.get("baseline")]
    search_score = scalarised(study, best, weights)
    line = f"best trial #{best.number}: weighted mean {with_error(search_score, scalarised_error(study, search_errors(study, best), weights))} on the search split"
    record = confirmed_records(study).get(best.number)
    if record is not None:
        errors = [record["scores"][name].get("se") for name in objective_names(study)]
        items = sorted({record["scores"][name].get("items") for name in objective_names(study)} - {None})
        line += f", confirmed {with_error(picked_score, scalarised_error(study, errors, weights))}"
        line += f" on {'/'.join(map(str, items))} items per task" if items else ""
    if baselines:
        top_score, top = max(baselines, key=lambda pair: (pair[0], -pair[1].number))
        line += f"; search mean {search_score - top_score:+.4f} over the best warm-start baseline ({top.user_attrs['baseline']}, #{top.number})"
    return line + f"; score it on test with `mergetune front --study {study.study_name} --evaluate test`"


def trial_recipe(trial: FrozenTrial) -> Recipe:
    data = trial.user_attrs.get("recipe")
    if data is None:
        raise MergetuneError(f"trial {trial.number} has no recipe user attr; it was not run by mergetune")
    return Recipe.from_dict(data, source=f"trial {trial.number} recipe")


def rule_parts(recipe: Recipe) -> list[str]:
    """`L0-1 ties`, `L2-3 linear`, `*embed* linear`: which method each rule (layer group) uses."""
    parts = []
    for rule in recipe.rules:
        where = []
        if rule.layers is not None:
            start, stop = rule.layers
            where.append(f"L{start}" if stop - start == 1 else f"L{start}-{stop - 1}")
        if rule.match != ["*"]:
            where.append(",".join(rule.match))
        parts.append(f"{' '.join(where) or 'rest'} {rule.method}")
    return parts


def recipe_summary(recipe: Recipe) -> str:
    """`L0-1 ties · L2-3 linear · *embed* linear`: the rules' methods, then the data-flow path in brief
    (`dfs: 6 slots, 4 from base, 2 from math`)."""
    parts = rule_parts(recipe)
    if recipe.dataflow is not None:
        parts.append(recipe.dataflow.summary())
    return " · ".join(parts)


def recorded_test_scores(study: optuna.Study) -> dict[int, dict[str, float]]:
    """Trial number → held-out scores recorded by `front --evaluate test`."""
    return {int(k): v for k, v in (study.user_attrs.get(TEST_SCORES_ATTR) or {}).items()}


def front_table(study: optuna.Study, trials: list[FrozenTrial]) -> Table:
    """Per-objective search scores ± SE (confirmed ones, and test scores with the gap, when recorded) plus
    the recipe summary."""
    names = objective_names(study)
    recorded = recorded_test_scores(study)
    confirmed = confirmed_records(study)
    with_test = any(t.number in recorded for t in trials)
    with_confirmed = any(t.number in confirmed for t in trials)
    table = Table(title=f"Pareto front of {study.study_name} ({len(trials)} trials)")
    table.add_column("trial", justify="right")
    for name in names:
        table.add_column(f"{name}\nsearch", justify="right")
        if with_confirmed:
            table.add_column(f"{name}\nconfirmed", justify="right")
        if with_test:
            table.add_column(f"{name}\ntest", justify="right")
            table.add_column("gap", justify="right")
    table.add_column("recipe")
    for trial in trials:
        row = [str(trial.number) + (f" ({trial.user_attrs['baseline']})" if trial.user_attrs.get("baseline") else "")]
        test = recorded.get(trial.number, {})
        again = (confirmed.get(trial.number) or {}).get("scores", {})
        for name, value, se in zip(names, trial.values, search_errors(study, trial)):
            row.append(with_error(value, se))
            if with_confirmed:
                row.append(with_error(again[name]["score"], again[name].get("se")) if name in again else "–")
            if with_test:
                test_value = test.get(name)
                row.append("–" if test_value is None else f"{test_value:.4f}")
                row.append("–" if test_value is None else f"{test_value - value:+.4f}")
        row.append(recipe_summary(trial_recipe(trial)) if "recipe" in trial.user_attrs else "?")
        table.add_row(*row)
    return table


def score_trials_on_split(study: optuna.Study, trials: list[FrozenTrial], split: str = "test", device: str = "cpu") -> None:
    """Re-merge each trial's recipe, score it on `split`, record the scores in the study's `test_scores` attr."""
    from mergetune.studies.scoring import score_recipes_on_split

    config = study.user_attrs.get("config")
    if not config:
        raise MergetuneError(f"study {study.study_name!r} has no config user attr; cannot build its evaluator")
    scores = score_recipes_on_split(config, [trial_recipe(t) for t in trials], split, device)
    recorded = {str(k): v for k, v in recorded_test_scores(study).items()}
    for trial, trial_scores in zip(trials, scores):
        bad = [k for k, v in trial_scores.items() if not math.isfinite(v)]
        if bad:
            log.warning("trial %d: non-finite %s score on %s", trial.number, bad[0], split)
        recorded[str(trial.number)] = trial_scores
    study.set_user_attr(TEST_SCORES_ATTR, recorded)
