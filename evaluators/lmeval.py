"""The lm-eval evaluator: any lm-eval task (or task YAML folder) scored on the backend's live model.

Tasks are built once (TaskManager + load) at construction; a call runs
`lm_eval.evaluator.evaluate` per task on the backend's lm-eval model (HFLM over the
live transformers model, or lm-eval's vLLM model), on a fixed seeded subset of items.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergetune.core.errors import ConfigError
from mergetune.evaluators.base import (
    SPLITS,
    EvaluationFailed,
    Objective,
    ScoreSummary,
    Split,
    read_zoo,
    run_guarded,
    subset_indices,
)
from mergetune.evaluators.config import Limit, LmEvalConfig, LmEvalTaskConfig
from mergetune.evaluators.stderr import standard_error

log = logging.getLogger(__name__)


@dataclass
class LoadedTask:
    """One objective's lm-eval task dict for one split, and how to read its score."""

    objective: str
    lm_eval_name: str
    task_dict: dict[str, Any]
    metric: str
    limit: Limit
    samples: dict[str, list[int]] | None


def zoo_tasks(zoo: Path, source: str) -> tuple[list[LmEvalTaskConfig], list[Path]]:
    """The lm-eval tasks of a zoo (zoo.json `tasks.<t>.lm_eval`) and their include paths."""
    manifest = read_zoo(zoo, source)
    tasks, paths = [], []
    for name, task in manifest["tasks"].items():
        spec = task["lm_eval"]
        tasks.append(LmEvalTaskConfig(name=name, search=spec["search"], test=spec["test"]))
        path = Path(zoo) / spec["include_path"]
        if path not in paths:
            paths.append(path)
    return tasks, paths


def load_task(manager: Any, name: str, num_fewshot: int | None, source: str) -> dict[str, Any]:
    """lm-eval's task dict for `name`, few-shot count applied as `simple_evaluate` does (a task's explicit 0
    wins; unset means 0), so scores match the CLI's."""
    try:
        task_dict = manager.load([name])
    except Exception as exc:
        raise ConfigError(
            f"{source}: tasks: lm-eval cannot load task {name!r} ({type(exc).__name__}: {exc}); "
            "check the name (`lm_eval ls tasks`) or include_path"
        ) from None
    for leaf in task_dict["tasks"].values():
        if num_fewshot is not None and leaf.get_config("num_fewshot") != 0:
            leaf.set_config(key="num_fewshot", value=num_fewshot)
        elif leaf.get_config("num_fewshot") is None:
            leaf.set_config(key="num_fewshot", value=0)
    return task_dict


def task_manager(include_path: list[Path], names: set[str]):
    """A TaskManager that finds `names`; lm-eval's ~15k built-in tasks are indexed only when needed (~7 s)."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path] or None
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if names <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths)


def metric_result_key(results: dict[str, Any], metric: str) -> str:
    """The key of `metric` (`name` or `name,filter`) in one task's lm-eval results."""
    if metric in results:
        return metric
    if f"{metric},none" in results:
        return f"{metric},none"
    for key in results:
        if key.split(",", 1)[0] == metric:
            return key
    available = sorted(k for k in results if "," in k and "_stderr" not in k)
    raise KeyError(f"lm-eval reported no metric {metric!r}; it reports {', '.join(available)}")


def leaf_metrics(task_dict: dict[str, Any], lm_eval_name: str) -> dict[str, bool]:
    """metric → higher_is_better of a loaded task (a group: its aggregate metrics, directions from its tasks)."""
    leaves = task_dict["tasks"]
    directions: dict[str, bool] = {}
    for leaf in leaves.values():
        for metric, higher in leaf.higher_is_better().items():
            directions.setdefault(metric, bool(higher))
    group = task_dict.get("groups", {}).get(lm_eval_name)
    aggregates = getattr(group, "aggregate_metric_list", None) or []
    if aggregates:
        names = [a["metric"] if isinstance(a, dict) else a.metric for a in aggregates]
        return {name: directions.get(name, True) for name in names}
    return directions


class LmEvalEvaluator:
    """Scores each configured task's metric with lm-eval; objective directions come from lm-eval's higher_is_better."""

    def __init__(self, config: LmEvalConfig, source: str = "evaluator") -> None:
        self.config = config
        specs, include_path = list(config.tasks), list(config.include_path)
        if config.zoo is not None:
            zoo_specs, zoo_paths = zoo_tasks(config.zoo, source)
            specs = specs or zoo_specs
            include_path += [p for p in zoo_paths if p not in include_path]
        names = {spec.lm_eval_task(split) for spec in specs for split in SPLITS}
        manager = task_manager(include_path, names)
        # One task dict per (lm-eval task, few-shot count): tasks are stateful, so specs differing in
        # num_fewshot must not share one.
        loaded: dict[tuple[str, int | None], dict[str, Any]] = {}
        self.tasks: dict[Split, list[LoadedTask]] = {split: [] for split in SPLITS}
        self.objectives: list[Objective] = []
        for spec in specs:
            fewshot = spec.num_fewshot if spec.num_fewshot is not None else config.num_fewshot
            for split in SPLITS:
                name = spec.lm_eval_task(split)
                if (name, fewshot) not in loaded:
                    loaded[name, fewshot] = load_task(manager, name, fewshot, source)
            search_name = spec.lm_eval_task("search")
            directions = leaf_metrics(loaded[search_name, fewshot], search_name)
            metric = spec.metric or next(iter(directions), None)
            if metric is None:
                raise ConfigError(f"{source}: tasks.{spec.name}: lm-eval task {search_name!r} has no metric")
            if metric.split(",", 1)[0] not in directions:
                raise ConfigError(
                    f"{source}: tasks.{spec.name}.metric: {metric!r} is not a metric of {search_name!r}; "
                    f"it has {', '.join(directions)}"
                )
            higher = directions[metric.split(",", 1)[0]]
            self.objectives.append(Objective(spec.name, "maximize" if higher else "minimize"))
            limit = spec.limit if spec.limit is not None else config.limit
            for split in SPLITS:
                name = spec.lm_eval_task(split)
                task_dict = loaded[name, fewshot]
                self.tasks[split].append(LoadedTask(spec.name, name, task_dict, metric, limit, self._samples(task_dict, limit)))

    def _samples(self, task_dict: dict[str, Any], limit: Limit) -> dict[str, list[int]] | None:
        """The seeded item subset of each leaf task (None: lm-eval's own `limit`, i.e. the first items)."""
        if self.config.seed is None or limit is None:
            return None
        return {
            leaf_name: subset_indices(len(leaf.eval_docs), limit, self.config.seed, leaf_name)
            for leaf_name, leaf in task_dict["tasks"].items()
        }

    def evaluate(self, backend: Any, split: Split = "search") -> dict[str, float]:
        """Scores of the backend's current weights: one lm-eval run per task on its fixed `split` subset."""
        return {name: summary["score"] for name, summary in self.summarise(backend, split).items()}

    def summarise(self, backend: Any, split: Split = "search") -> dict[str, ScoreSummary]:
        """`evaluate`'s scores with the SE of the mean of their per-item values (None for a metric lm-eval
        does not aggregate by a mean) and item counts."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        if self.config.backend == "vllm":
            from mergetune.evaluators.vllm import VLLMBackend

            if not isinstance(backend, VLLMBackend):
                raise EvaluationFailed(
                    f"backend: vllm needs a VLLMBackend (evaluators.base.load_backend), got {type(backend).__name__}"
                )
        lm = backend.lm_eval_model(self.config.batch_size, self.config.model_args)
        return {
            task.objective: run_guarded(task.objective, backend, self.config.timeout_s, lambda: self._score(lm, task))
            for task in self.tasks[split]
        }

    def _score(self, lm: Any, task: LoadedTask) -> ScoreSummary:
        from lm_eval.evaluator import evaluate

        for leaf in task.task_dict["tasks"].values():
            leaf.set_fewshot_seed(seed=self.config.fewshot_seed)  # same few-shot examples every call
        output = evaluate(
            lm=lm,
            task_dict=task.task_dict,
            limit=task.limit if task.samples is None else None,
            samples=task.samples,
            bootstrap_iters=0,
            log_samples=True,  # the per-item values give the SE (bootstrap_iters=0 leaves lm-eval's stderr N/A)
            system_instruction=self.config.system_instruction,
            apply_chat_template=self.config.apply_chat_template,
            fewshot_as_multiturn=self.config.fewshot_as_multiturn,
            verbosity="ERROR",
        )
        results = output["results"][task.lm_eval_name]
        key = metric_result_key(results, task.metric)
        metric, _, filter_key = key.partition(",")
        items = [
            sample.get(metric)
            for leaf in task.task_dict["tasks"]
            for sample in (output.get("samples") or {}).get(leaf, [])
            if sample.get("filter", "none") == (filter_key or "none")
        ]
        # The SE of a mean of per-item values; other aggregations (perplexity, F1, BLEU) report none.
        means = all(getattr(leaf.aggregation().get(metric), "__name__", None) == "mean" for leaf in task.task_dict["tasks"].values())
        numeric = means and bool(items) and all(isinstance(v, int | float) for v in items)
        return {"score": float(results[key]), "se": standard_error(items) if numeric else None, "items": len(items)}
