"""Samplers by name, and the M³ prior: a wrapper drawing mixing weights from Beta/Dirichlet(α).

M³ (Mixup Model Merge) draws the mixing coefficient of two models from Beta(α, α); for K
experts we draw the weight vector from Dirichlet(α,…,α) — Beta is its K = 2 case. The
prior is a sampler concern: `M3PriorSampler` wraps any Optuna sampler and, while the study
is young (trial number < n_startup) or whenever the wrapped sampler falls back to
independent sampling, serves a group's `<group>.weight.<expert>` params from ONE Dirichlet
draw per (trial, group), cached in the trial's system attrs so the K components are
jointly consistent; everything else is deferred to the wrapped sampler.

`sampler.target: weighted_mean` makes a multi-objective study's sampler learn from one number
per trial, the configured weighted mean that "best" is picked by (studies/front.py `scalarised`):
`WeightedMeanSampler` hands the wrapped sampler a single-objective in-memory copy of the
finished trials. The study itself keeps every objective, so the front and reports are unchanged.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from mergetune.core.errors import ConfigError
from mergetune.search.config import SamplerConfig
from mergetune.search.space import WEIGHT_PARAM

_DRAW_ATTR = "m3_prior:{group}"


class M3PriorSampler(BaseSampler):
    def __init__(self, wrapped: BaseSampler, experts: Sequence[str], alpha: float = 0.5, n_startup: int = 16, seed: int | None = None) -> None:
        self.wrapped = wrapped
        self.experts = list(experts)
        self.alpha = alpha
        self.n_startup = n_startup
        self._rng = np.random.default_rng(seed)

    def __str__(self) -> str:
        return f"M3PriorSampler({self.wrapped}, alpha={self.alpha}, n_startup={self.n_startup})"

    def _young(self, trial: FrozenTrial) -> bool:
        return trial.number < self.n_startup

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if self._young(trial):
            return {}
        return self.wrapped.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        return self.wrapped.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        found = WEIGHT_PARAM.match(param_name)
        if found is None or found["expert"] not in self.experts or not isinstance(param_distribution, FloatDistribution):
            return self.wrapped.sample_independent(study, trial, param_name, param_distribution)
        vector = self._group_draw(study, trial, found["group"])
        low, high = param_distribution.low, param_distribution.high
        return float(low + (high - low) * vector[self.experts.index(found["expert"])])

    def _group_draw(self, study: Study, trial: FrozenTrial, group: str) -> list[float]:
        """One Dirichlet(α,…,α) vector per (trial, group), drawn on first use and kept in the trial."""
        key = _DRAW_ATTR.format(group=group)
        stored = study._storage.get_trial_system_attrs(trial._trial_id).get(key)
        if stored is not None:
            return stored
        vector = [float(v) for v in self._rng.dirichlet([self.alpha] * len(self.experts))]
        study._storage.set_trial_system_attr(trial._trial_id, key, vector)
        return vector

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.wrapped.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self.wrapped.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._rng = np.random.default_rng()
        self.wrapped.reseed_rng()


class _WeightedMeanView:
    """A study as a single-objective sampler sees it: every read goes to `study`, except that trials carry one
    value each (their weighted mean, maximised). Writes (a sampler's trial system attrs) reach the real storage."""

    directions = [optuna.study.StudyDirection.MAXIMIZE]
    direction = optuna.study.StudyDirection.MAXIMIZE

    def __init__(self, study: Study, value_of) -> None:
        self._study = study
        self._value_of = value_of

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _is_multi_objective(self) -> bool:
        return False

    def _get_trials(self, deepcopy: bool = True, states: Sequence[TrialState] | None = None, use_cache: bool = False) -> list[FrozenTrial]:
        out = []
        for trial in self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache):
            trial = copy.copy(trial)
            if trial.values is not None:
                trial.values = [self._value_of(trial)]
            out.append(trial)
        return out

    def get_trials(self, deepcopy: bool = True, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy, states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()


class WeightedMeanSampler(BaseSampler):
    """Runs `wrapped` on a single-objective view of the study (`_WeightedMeanView`): each finished trial's value
    is its configured weighted mean, the number `best` is picked by."""

    def __init__(self, wrapped: BaseSampler) -> None:
        self.wrapped = wrapped
        self._means: dict[int, float] = {}  # trial number → weighted mean (a finished trial's values never change)

    def __str__(self) -> str:
        return f"WeightedMeanSampler({self.wrapped})"

    def _view(self, study: Study) -> Study:
        from mergetune.studies.front import configured_weights, scalarised

        weights: dict[str, float] | None = None  # read from the study once per view, when a new trial needs them

        def value_of(trial: FrozenTrial) -> float:
            nonlocal weights
            if trial.number not in self._means:
                weights = configured_weights(study) if weights is None else weights
                self._means[trial.number] = scalarised(study, trial, weights)
            return self._means[trial.number]

        return _WeightedMeanView(study, value_of)  # type: ignore[return-value]

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.wrapped.infer_relative_search_space(self._view(study), trial)

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.wrapped.sample_relative(self._view(study), trial, search_space)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self.wrapped.sample_independent(self._view(study), trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.wrapped.before_trial(self._view(study), trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        from mergetune.studies.front import configured_weights, scalarised

        mean = None if values is None else [scalarised(study, trial, configured_weights(study), list(values))]
        self.wrapped.after_trial(self._view(study), trial, state, mean)

    def reseed_rng(self) -> None:
        self.wrapped.reseed_rng()


def make_sampler(config: SamplerConfig, experts: Sequence[str], seed: int, n_objectives: int) -> BaseSampler:
    """The configured Optuna sampler, seeded, wrapped in the M³ prior unless it is turned off."""
    if config.name == "cmaes" and n_objectives > 1:
        raise ConfigError(f"sampler.name: cmaes optimises one objective, this study has {n_objectives}; use tpe, nsga2 or gp")
    n_startup = config.m3_prior.n_startup if config.m3_prior is not None else 10
    if config.name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler: BaseSampler = optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, n_startup_trials=n_startup
            )
    elif config.name == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=config.population_size)
    elif config.name == "cmaes":
        # Categorical method choices are outside CMA-ES; they fall back to the independent sampler.
        sampler = optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        )
    elif config.name == "gp":
        sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup, warn_independent_sampling=False)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    if config.target == "weighted_mean" and n_objectives > 1:
        sampler = WeightedMeanSampler(sampler)
    if config.m3_prior is None:
        return sampler
    return M3PriorSampler(sampler, experts, alpha=config.m3_prior.alpha, n_startup=config.m3_prior.n_startup, seed=seed)
