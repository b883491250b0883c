"""The evaluator section of a study config as pydantic models (pydantic only: the driver validates it without torch).

`EvaluatorConfig` is the union the study config holds, told apart by `kind`; the classes that
score (evaluators/quick.py, evaluators/lmeval.py) take these models as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergetune.core.config import validate_model
from mergetune.core.errors import ConfigError

Limit = int | float | None
Metric = Literal["exact_match", "logprob"]
EVALUATOR_KINDS = ("quick", "lm_eval")


def checked_limit(value: Limit) -> Limit:
    """A count ≥ 1 or a fraction in (0, 1): lm-eval reads a float ≥ 1 as a count, so 1.0 would mean one item."""
    if value is not None and (value <= 0 or (isinstance(value, float) and value >= 1.0)):
        raise ValueError("give a count ≥ 1 or a fraction in (0, 1)")
    return value


class StrictConfig(BaseModel):
    # inf/NaN would not survive the JSON trip to the workers (they become null).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class LimitedConfig(StrictConfig):
    """Fields every evaluator shares."""

    limit: int | float | None = Field(
        default=None, description="items per task and split: a count, or a fraction < 1; default all"
    )
    seed: int = Field(default=0, description="seeds the fixed item subset")
    batch_size: int = Field(default=64, ge=1)
    timeout_s: float | None = Field(default=None, gt=0, description="per task; over it the trial fails")

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: Limit) -> Limit:
        return checked_limit(value)


# --- kind: quick ---
class QuickTaskConfig(StrictConfig):
    search: Path = Field(description="JSONL of {prompt, answer} records scored during the search")
    test: Path = Field(description="JSONL of held-out {prompt, answer} records")
    max_new_tokens: int = Field(ge=1)


class QuickConfig(LimitedConfig):
    kind: Literal["quick"]
    zoo: Path | None = Field(default=None, description="a zoo directory: all its tasks and splits")
    tasks: dict[str, QuickTaskConfig] | None = Field(default=None, description="tasks spelled out (instead of zoo)")
    metrics: list[Metric] = Field(default=["exact_match"], min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> QuickConfig:
        if (self.zoo is None) == (self.tasks is None):
            raise ValueError("give either `zoo:` or `tasks:`")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metrics: each metric once")
        return self


# --- kind: lm_eval ---
class LmEvalTaskConfig(StrictConfig):
    name: str = Field(description="the objective's name (and the lm-eval task, unless task/search/test say otherwise)")
    task: str | None = Field(default=None, description="lm-eval task or group for both splits")
    search: str | None = Field(default=None, description="lm-eval task scored during the search")
    test: str | None = Field(default=None, description="lm-eval task scored on held-out data")
    metric: str | None = Field(default=None, description="`metric` or `metric,filter`; default the task's first metric")
    limit: int | float | None = Field(default=None, description="overrides the evaluator's limit for this task")
    num_fewshot: int | None = Field(default=None, ge=0)

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: Limit) -> Limit:
        return checked_limit(value)

    def lm_eval_task(self, split: Literal["search", "test"]) -> str:
        return getattr(self, split) or self.task or self.name


# The weight push serves one engine with one worker; these engine arguments would make part of
# the engine miss every merge (a data-parallel replica is a fresh engine lm-eval starts per call).
VLLM_WORKER_EXTENSION = "mergetune.evaluators.vllm_worker.MergetuneWorkerExtension"
VLLM_SINGLE_ENGINE_ARGS = {
    "data_parallel_size": "each data-parallel replica is a separate engine that no push reaches, so it would score "
    "the unmerged checkpoint; use more trial workers (ray.workers, one GPU each) instead",
    "tensor_parallel_size": "the weight push serves one worker per engine; use one GPU per trial worker",
    "pipeline_parallel_size": "the weight push serves one worker per engine; use one GPU per trial worker",
}


def vllm_engine_args_problem(model_args: dict[str, Any]) -> str | None:
    """Why these lm-eval/vLLM model_args cannot take our weight push (one line), or None."""
    for key, why in VLLM_SINGLE_ENGINE_ARGS.items():
        value = model_args.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int):
            return f"model_args.{key}: give a whole number, not {value!r}"
        if value != 1:
            return f"model_args.{key}: {value} is not supported with backend: vllm; {why}"
    extension = model_args.get("worker_extension_cls", VLLM_WORKER_EXTENSION)
    if extension != VLLM_WORKER_EXTENSION:
        return f"model_args.worker_extension_cls: the vLLM backend installs its own ({VLLM_WORKER_EXTENSION}); remove {extension!r}"
    return None


class LmEvalConfig(LimitedConfig):
    kind: Literal["lm_eval"]
    backend: Literal["hf", "vllm"] = "hf"
    zoo: Path | None = Field(default=None, description="a zoo directory: its lm-eval tasks (search/test) and include path")
    tasks: list[LmEvalTaskConfig] = Field(
        default_factory=list, description="task names, {name: task}, {name: {search, test, metric, ...}} or a list of those"
    )
    include_path: list[Path] = Field(default_factory=list, description="folders of task YAML files")
    seed: int | None = Field(default=0, description="seeds the item subset; null = lm-eval's own first-`limit` items")
    num_fewshot: int | None = Field(default=None, ge=0)
    fewshot_seed: int = 1234
    apply_chat_template: bool | str = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = None
    batch_size: int | Literal["auto"] = 8
    model_args: dict[str, Any] = Field(default_factory=dict, description="passed to lm-eval's model class as is")
    weight_renames: list[tuple[str, str]] = Field(
        default_factory=list, description="vLLM only: regex → replacement on checkpoint names before vLLM's load_weights"
    )
    push_bucket_mib: int = Field(
        default=1024, ge=1, description="vLLM only: the weight push's staging bucket (MiB; a larger tensor gets its own)"
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_list(cls, value: Any) -> Any:
        """Every accepted spelling → a list of {name, ...} mappings."""
        if isinstance(value, str):
            value = [value]
        if isinstance(value, dict):
            value = [
                {"name": name, "task": spec} if isinstance(spec, str) else {"name": name, **(spec or {})}
                for name, spec in value.items()
            ]
        if isinstance(value, list):
            value = [{"name": spec} if isinstance(spec, str) else spec for spec in value]
        return value

    @field_validator("include_path", mode="before")
    @classmethod
    def _path_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value

    @model_validator(mode="after")
    def _has_tasks(self) -> LmEvalConfig:
        if self.zoo is None and not self.tasks:
            raise ValueError("give `tasks:` (lm-eval task names) or `zoo:`")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError("tasks: each objective name once")
        return self

    @model_validator(mode="after")
    def _one_vllm_engine(self) -> LmEvalConfig:
        problem = vllm_engine_args_problem(self.model_args) if self.backend == "vllm" else None
        if problem is not None:
            raise ValueError(problem)
        return self


EvaluatorConfig = Annotated[Union[QuickConfig, LmEvalConfig], Field(discriminator="kind")]


def check_evaluator_kind(config: object) -> None:
    """A mapping whose `kind` names an evaluator, else a ValueError saying what to write."""
    if not isinstance(config, dict):
        raise ValueError(f"a mapping with `kind: {'|'.join(EVALUATOR_KINDS)}` and its settings")
    kind = config.get("kind")
    if kind not in EVALUATOR_KINDS:
        raise ValueError(f"kind: {kind!r} is not an evaluator; use one of {', '.join(EVALUATOR_KINDS)}")


def validate_evaluator_config(config: object, source: str = "evaluator") -> QuickConfig | LmEvalConfig:
    """The evaluator section (a mapping, or an already validated model) as its model; problems are one-line ConfigErrors."""
    if isinstance(config, QuickConfig | LmEvalConfig):
        return config
    try:
        check_evaluator_kind(config)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    model = QuickConfig if config["kind"] == "quick" else LmEvalConfig  # type: ignore[index]
    return validate_model(model, config, source)
