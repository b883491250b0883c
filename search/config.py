"""The study config: one YAML file says which models, which search space, how to score and where to store.

    study: demo
    zoo: zoo-demo                # or `models:` + `evaluator:` spelled out
    tokenizer: {source: union}   # only for experts with added tokens (see merge/vocabulary.py)
    search: {layer_groups: 4, methods: [linear, task_arithmetic, ties, dare_ties, ota]}
    sampler: {name: tpe, m3_prior: {alpha: 0.5, n_startup: 16}, target: objectives}   # or weighted_mean
    budget: {n_trials: 60}
    pruning: {enabled: false, first_share: 0.25, min_complete: 8}
    confirm: {top_k: 4, limit: null}   # re-score the top trials on more search items before naming the best
    ray: {workers: 2, cpus_per_worker: 1}

Every section has sound defaults; unknown keys are rejected with the allowed ones named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergetune.core.config import keyed_error, load_yaml, validate_model
from mergetune.core.errors import ConfigError
from mergetune.evaluators.config import EvaluatorConfig, check_evaluator_kind, checked_limit
from mergetune.merge.dataflow import MERGED
from mergetune.merge.domains import param_domain
from mergetune.merge.vocabulary import TokenizerSpec
from mergetune.search.params import DEFAULT_RANGES, PER_EXPERT_PARAMS, WEIGHT, methods_searching, searched_names, split_qualified
from mergetune.studies.storage import STUDY_NAME_PATTERN, default_storage

# Optuna's samplers seed numpy, which takes 0 <= seed < 2**32.
MAX_SEED = 2**32 - 1


class _Strict(BaseModel):
    # inf/NaN would not survive the JSON trip to the workers (they become null).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelsConfig(_Strict):
    base: str = Field(description="base model directory (or hub id)")
    experts: dict[str, str] = Field(min_length=1, description="expert name → fine-tune directory (or hub id)")
    moments: dict[str, str] = Field(default_factory=dict, description="expert → Adam second-moment safetensors")
    fisher: dict[str, str] = Field(default_factory=dict, description="expert → diagonal Fisher safetensors")
    gram: dict[str, str] = Field(default_factory=dict, description="expert → RegMean Gram safetensors")

    @model_validator(mode="after")
    def _statistics_name_experts(self) -> ModelsConfig:
        if "base" in self.experts:
            raise ValueError("experts: 'base' names the base model; call the expert something else")
        for kind in ("moments", "fisher", "gram"):
            unknown = sorted(set(getattr(self, kind)) - set(self.experts))
            if unknown:
                raise ValueError(f"{kind}: {unknown[0]!r} is not an expert; experts: {', '.join(self.experts)}")
        return self


class DataflowConfig(_Strict):
    """The data-flow space (search/dataflow_space.py): a path of `slots` layer slots, each a layer of the base, an
    expert or (space `both`) the parameter-space merge, with a scale on the hidden state entering it."""

    slots: int | None = Field(default=None, ge=1, description="T: slots in the path (default: the base's layer count, at most 2×)")
    scale: tuple[float, float] = Field(default=(0.5, 1.5), description="[low, high] of each slot's scale (both > 0; [1, 1]: no scales)")
    skips: bool = Field(default=True, description="a slot may be skipped, so the path has fewer than T layers")

    @field_validator("scale")
    @classmethod
    def _positive_scale(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"[{low:g}, {high:g}]: give [low, high] with 0 < low <= high")
        return value


class SearchConfig(_Strict):
    layer_groups: int = Field(default=4, ge=1, description="G: consecutive transformer layers split into G groups")
    split_attention_mlp: bool = Field(default=False, description="attention and MLP of a group choose separately")
    separate_embeddings: bool = Field(
        default=True, description="embeddings, final norm and head form their own group (else they follow group 0)"
    )
    methods: list[str] | None = Field(
        default=None, description="merge methods a group may choose (default: the classics, plus ota with moments)"
    )
    ranges: dict[str, tuple[float, float]] = Field(
        default_factory=dict,
        description="param name (or method.param, which wins) → [low, high]; a method param is searched iff it has a range",
    )
    per_expert: list[str] = Field(
        default_factory=lambda: ["density"], description="per-model params searched with one value per expert"
    )
    shared: list[str] = Field(default_factory=list, description="params (or `weight`) shared by all groups")
    space: Literal["parameter", "dataflow", "both"] = Field(
        default="parameter",
        description="parameter: per-layer merge recipes; dataflow: layer paths through base and experts (Sakana's DFS); "
        "both: a merge recipe and a path that may also use its layers (PS+DFS)",
    )
    dataflow: DataflowConfig = Field(default_factory=DataflowConfig)

    @field_validator("ranges")
    @classmethod
    def _ranges_in_domain(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (low, high) in value.items():
            if name not in searched_names(qualified=True):
                raise ValueError(
                    f"{name!r} is not a searched parameter; ranges may name {', '.join(searched_names())} "
                    "(or METHOD.PARAM for one method's)"
                )
            problem = None
            if not low <= high:
                problem = "range must be [low, high] with low <= high"
            for method in methods_searching(name):
                domain = param_domain(method, split_qualified(name)[1])
                if problem is None and (low not in domain or high not in domain):
                    problem = f"[{low:g}, {high:g}] must lie in {domain}, the values '{method}' accepts"
            if name in (WEIGHT, "lambda") and low == high == 0:  # every merge would be the base (or zero)
                problem = f"[0, 0] makes every {name} 0; give a range with a non-zero end"
            if problem is not None:
                raise keyed_error(name, problem, [low, high])
        return value

    @field_validator("shared")
    @classmethod
    def _shared_are_searched(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_searched(name, "shared", searched_names())
        return value

    @field_validator("per_expert")
    @classmethod
    def _per_expert_are_searched(cls, value: list[str]) -> list[str]:
        for name in value:
            _check_searched(name, "per_expert", list(PER_EXPERT_PARAMS))
        return value

    def range_of(self, param: str, method: str | None = None) -> tuple[float, float] | None:
        """The search range of `param` (of `method`): `method.param` (given, then default), then `param`."""
        keys = [f"{method}.{param}", param] if method else [param]
        for key in keys:
            for table in (self.ranges, DEFAULT_RANGES):
                if key in table:
                    return table[key]
        return None


def _check_searched(name: str, field: str, allowed: list[str]) -> None:
    if name not in allowed:
        raise ValueError(f"{name!r} is not a searched parameter; {field} may name {', '.join(allowed)}")


class ObjectiveConfig(_Strict):
    name: str
    direction: Literal["maximize", "minimize"] = "maximize"
    weight: float = Field(default=1.0, description="weight in the scalarised view (best-so-far, single pick)")


class M3PriorConfig(_Strict):
    alpha: float = Field(default=0.5, gt=0, description="Beta(α,α) / Dirichlet(α,…,α) concentration")
    n_startup: int = Field(default=16, ge=0, description="trials (by number, warm start included) drawn from the prior")


class SamplerConfig(_Strict):
    name: Literal["tpe", "nsga2", "cmaes", "gp", "random"] = "tpe"
    m3_prior: M3PriorConfig | None = Field(default_factory=M3PriorConfig, description="null turns the prior off")
    population_size: int = Field(default=16, ge=2, description="NSGA-II population")
    target: Literal["objectives", "weighted_mean"] = Field(
        default="objectives",
        description="what the sampler learns from: every objective (multi-objective) or their configured weighted mean (what `best` picks)",
    )


class BudgetConfig(_Strict):
    n_trials: int | None = Field(default=None, ge=1, description="finished trials to reach (COMPLETE + PRUNED)")
    timeout: float | None = Field(default=None, gt=0, description="seconds of this run before no new trial starts")
    max_consecutive_failures: int = Field(default=10, ge=1, description="stop when this many trials in a row fail")

    @model_validator(mode="after")
    def _some_limit(self) -> BudgetConfig:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("give n_trials and/or timeout")
        return self


class PruningConfig(_Strict):
    """Two-stage scoring (see search/pruning.py); off until the search_efficiency benchmark shows it helps."""

    enabled: bool = False
    first_share: float = Field(
        default=0.25, gt=0, lt=1, description="share of each task's search subset scored first (whole evaluator batches)"
    )
    min_complete: int = Field(default=8, ge=1, description="COMPLETE trials before any trial is pruned")
    keep_percentile: float = Field(
        default=50.0, gt=0, lt=100,
        description="one objective: keep a trial whose first-stage score is in this top percentile (50 = median rule)",
    )


class ConfirmConfig(_Strict):
    """Noise-aware selection (search/confirm.py): the run's end re-scores its top trials on a larger subset."""

    top_k: int = Field(default=4, ge=0, description="trials re-scored at the end of a run (front first); 0 turns it off")
    limit: int | float | None = Field(
        default=None, description="items per task of the search split for the re-score: a count, a fraction < 1, or null for all"
    )

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | float | None) -> int | float | None:
        return checked_limit(value)


class RayConfig(_Strict):
    address: str | None = Field(default=None, description="join this cluster (e.g. 'auto', 'ray://head:10001')")
    workers: int = Field(default=1, ge=1, description="actors, i.e. trials in flight")
    cpus_per_worker: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0, ge=0, description="1 places one actor per GPU")
    device: str | None = Field(default=None, description="torch device of the workers: cpu or cuda (default: cuda with GPUs)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")
    placement_timeout_s: float = Field(
        default=600, gt=0, description="how long a joined cluster may take to offer every worker its resources"
    )
    resident: Literal["auto", "device", "host"] = Field(
        default="auto",
        description="where workers keep the inputs: on their device, in host memory shared per node (streamed "
        "to the device per tensor), or auto (device when the memory plan fits with headroom, else host)",
    )
    gpu_memory_gb: float | None = Field(default=None, gt=0, description="GiB of each worker's GPU, for the memory plan (default: this machine's)")
    host_memory_gb: float | None = Field(default=None, gt=0, description="GiB of each node's host memory, for the memory plan (default: this machine's)")
    workers_per_node: int | None = Field(default=None, ge=1, description="workers on the fullest node, for the memory plan (default: this machine's count)")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"cpu|cuda(:[0-9]+)?", value):
            raise ValueError(f"{value!r} is not a device the workers can use; give cpu or cuda (cuda:N)")
        return value


# --- several drivers on one study (search/liveness.py) ---
class HeartbeatConfig(_Strict):
    interval_s: float = Field(default=10, gt=0, description="how often a driver records that it is alive")
    grace_s: float = Field(
        default=60, gt=0, description="a RUNNING trial no live driver has claimed for this long is an orphan: FAIL, retried"
    )

    @model_validator(mode="after")
    def _several_beats(self) -> HeartbeatConfig:
        if self.grace_s < 3 * self.interval_s:
            raise ValueError(f"grace_s must be at least 3 × interval_s ({3 * self.interval_s:g}), so one late beat is no death")
        return self


class StudyConfig(_Strict):
    study: str = Field(pattern=STUDY_NAME_PATTERN, description="study name (also the default storage file name)")
    zoo: str | None = Field(default=None, description="a zoo directory: fills models, moments and a quick evaluator")
    models: ModelsConfig | None = None
    tokenizer: TokenizerSpec | None = Field(
        default=None, description="experts with more tokens than the base merge by token: source base, union or an expert"
    )
    search: SearchConfig = Field(default_factory=SearchConfig)
    objectives: list[ObjectiveConfig] | None = Field(
        default=None, description="default: every objective the evaluator reports, maximized"
    )
    evaluator: EvaluatorConfig | None = Field(default=None, description="the evaluator config (`kind: quick|lm_eval`)")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(n_trials=50))
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    confirm: ConfirmConfig = Field(default_factory=ConfirmConfig)
    storage: str | None = Field(default=None, description="SQLAlchemy URL or journal:///path; default sqlite under studies/")
    storage_retry_s: float = Field(
        default=120, ge=0, description="how long an unreachable storage is retried (with backoff) before the run stops"
    )
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seeds the sampler; trial n's recipe gets seed + n")
    warm_start: bool = True

    @field_validator("evaluator", mode="before")
    @classmethod
    def _evaluator_kind(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, BaseModel):
            check_evaluator_kind(value)
        return value

    @model_validator(mode="after")
    def _complete(self) -> StudyConfig:
        if self.models is None:
            raise ValueError("models: give `models:` (base + experts) or `zoo:`")
        if self.evaluator is None:
            raise ValueError("evaluator: give `evaluator:` or `zoo:`")
        if self.tokenizer is not None and self.tokenizer.source not in ("base", "union", *self.models.experts):
            raise ValueError(
                f"tokenizer.source: {self.tokenizer.source!r} is not base, union or an expert ({', '.join(self.models.experts)})"
            )
        if self.sampler.name == "cmaes" and self.objectives is not None and len(self.objectives) > 1:
            raise ValueError("sampler.name: cmaes optimises one objective; use tpe, nsga2 or gp for several")
        if self.search.space != "parameter":
            if MERGED in self.models.experts:
                raise ValueError(f"experts: {MERGED!r} names the parameter-space merge in data-flow paths; call the expert something else")
            if getattr(self.evaluator, "backend", None) == "vllm":
                raise ValueError(
                    f"search.space: {self.search.space} changes the layer count per trial, which a running vLLM engine "
                    "cannot; use `evaluator.backend: hf`, or `search.space: parameter`"
                )
            if self.search.space == "dataflow" and self.tokenizer is not None:
                raise ValueError(
                    "tokenizer: a dataflow path keeps the base's embeddings and vocabulary; drop `tokenizer:`, or use "
                    "`search.space: both`, whose path takes the merge's"
                )
        if self.pruning.enabled and self.evaluator.kind != "quick":
            raise ValueError("pruning.enabled: two-stage scoring needs `evaluator.kind: quick`; set pruning.enabled: false")
        return self

    @property
    def storage_url(self) -> str:
        return self.storage or default_storage(self.study)

    @property
    def experts(self) -> list[str]:
        assert self.models is not None
        return list(self.models.experts)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)


def _expand_zoo(data: dict, source: str) -> dict:
    """`zoo: PATH` → models (base, experts, moments) and a quick evaluator over the zoo's tasks."""
    if not isinstance(data["zoo"], str):
        raise ConfigError(f"{source}: zoo: give the path of a zoo directory, not {data['zoo']!r}")
    zoo = Path(data["zoo"])
    if not (zoo / "base").is_dir() or not (zoo / "experts").is_dir():
        raise ConfigError(f"{source}: zoo: {zoo} is not a zoo (no base/ and experts/); build one with `mergetune zoo build`")
    data = dict(data)
    if "models" not in data:
        experts = {d.name: str(d) for d in sorted((zoo / "experts").iterdir()) if d.is_dir()}
        moments = {
            name: str(Path(path) / "adam_second_moments.safetensors")
            for name, path in experts.items()
            if (Path(path) / "adam_second_moments.safetensors").is_file()
        }
        data["models"] = {"base": str(zoo / "base"), "experts": experts, "moments": moments}
    if "evaluator" not in data:
        data["evaluator"] = {"kind": "quick", "zoo": str(zoo)}
    return data


def parse_study_config(data: object, source: str) -> StudyConfig:
    if isinstance(data, dict) and data.get("zoo") is not None:
        data = _expand_zoo(data, source)
    return validate_model(StudyConfig, data, source)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a study YAML; any problem is a one-line ConfigError naming the field."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a study config is a mapping (study:, models:, search:, ...)")
    return parse_study_config(data, str(path))
