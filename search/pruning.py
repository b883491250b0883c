"""Two-stage scoring: a trial is scored on the head of each task's search subset first, and pruned if clearly worse.

Stage 1 merges the recipe and scores the first `pruning.first_share` of every task's fixed
search subset (rounded up to whole evaluator batches, so that stage 1 + stage 2 run exactly
the batches a one-stage evaluation runs and the full scores are bit-identical to it); stage 2
scores the rest on the already-merged live model. Between the stages the driver decides:

- one objective: Optuna's `PercentilePruner` (`keep_percentile`, 50 = the median rule) compares
  the first-stage score with the first-stage scores the COMPLETE trials reported at step 0;
- several objectives: there is no ranking to take a percentile of, and a trial that is worse
  on one task may be on the front for another. The rule is therefore dominance with a noise
  margin: prune iff some COMPLETE trial's full-fidelity scores beat the trial's first-stage
  scores by more than one first-stage standard error on EVERY objective. A first-stage score
  is a mean over few items, so it is noisy; one SE of slack keeps a trial whose head merely
  looked unlucky, while a trial beaten on every task by more than the noise cannot be on the
  front. The SE is evaluators/stderr.py's (floored at 1/n, so p = 0 or 1 gives no zero-width margin).

Neither rule prunes before `min_complete` COMPLETE trials exist, and warm-start baselines are
never pruned. A PRUNED trial counts toward `budget.n_trials`: it was a proposal, and the
budget bounds proposals; it carries its first-stage scores in `user_attrs["first_stage"]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import optuna

from mergetune.search.config import ObjectiveConfig, PruningConfig


def beaten_beyond_noise(
    first_stage: dict[str, dict[str, float]], complete: Sequence[Sequence[float]], objectives: Sequence[ObjectiveConfig]
) -> int | None:
    """Index of a COMPLETE trial (values in objective order) that beats the first-stage scores by more
    than their SE on every objective, or None."""
    for index, values in enumerate(complete):
        if all(
            (value - first_stage[o.name]["score"] if o.direction == "maximize" else first_stage[o.name]["score"] - value)
            > first_stage[o.name]["se"]
            for value, o in zip(values, objectives)
        ):
            return index
    return None


def make_pruner(config: PruningConfig) -> optuna.pruners.BasePruner:
    """The single-objective pruner; `n_startup_trials` counts COMPLETE trials, like `min_complete`."""
    return optuna.pruners.PercentilePruner(config.keep_percentile, n_startup_trials=config.min_complete, n_warmup_steps=0)
