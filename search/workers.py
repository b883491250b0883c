"""The trial worker: one long-lived Ray actor per GPU (or CPU slot) that merges and scores recipes.

It starts its evaluator's backend (the live model, or a vLLM engine) first, then holds the
model set's inputs as stored, on its device or mapped in host memory shared by the node
(`ray.resident`, decided by the memory plan), owns one evaluator, and per trial merges every tensor into the live
model in place, then scores it — in one call (`run`), or in two when pruning is on
(`run_first_stage` merges and scores the head of each task's subset, `run_second_stage`
scores the rest on the same live model). A scored result carries each score's standard error
(`score_se`). At the end of a run, `confirm` re-merges a top trial's recipe and scores it on the
larger confirmation subset of the search split (search/confirm.py). Errors of a trial come back
as a result with `error`, so only a dead process surfaces as an exception on the driver.
With `search.space: dataflow | both` it also holds the source models' decoder layers and runs each
recipe's data-flow path on the live model (evaluators/dataflow_model.py); `dataflow` merges nothing.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from mergetune.core.errors import ConfigError
from mergetune.core.versions import package_versions
from mergetune.search.config import StudyConfig

log = logging.getLogger(__name__)


def load_modelset(config: StudyConfig):
    """The study's ModelSet; validating it reads only headers, so the driver calls it before any worker starts."""
    from mergetune.merge.modelset import ModelSet

    models = config.models
    assert models is not None

    def paths(mapping: dict[str, str]) -> dict[str, Path] | None:
        return {name: Path(path) for name, path in mapping.items()} or None

    return ModelSet.from_dirs(
        Path(models.base),
        {name: Path(path) for name, path in models.experts.items()},
        moments=paths(models.moments),
        fisher=paths(models.fisher),
        gram=paths(models.gram),
        tokenizer=config.tokenizer,
    )


def worker_device(config: StudyConfig) -> str:
    if config.ray.device is not None:
        return config.ray.device
    return "cuda" if config.ray.gpus_per_worker > 0 else "cpu"


def check_worker_device(config: StudyConfig) -> None:
    """What the local workers need from this machine: CUDA for `ray.device: cuda`, a supported vLLM for
    `backend: vllm`; called by the driver before Ray starts (a cluster's workers run on other nodes,
    with their own installs, so `ray.address` skips the check)."""
    if config.ray.address:
        return
    if getattr(config.evaluator, "backend", None) == "vllm":
        from mergetune.evaluators.vllm import check_vllm_version, installed_vllm_version

        check_vllm_version(installed_vllm_version())
    if config.ray.device is None or not config.ray.device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"ray.device: {config.ray.device} asked for, but torch sees no CUDA device on this machine; "
            "use `ray.device: cpu`, or `ray.address` to join a cluster with GPUs"
        )


def placement() -> dict[str, object]:
    """Where this process runs: Ray node, assigned GPUs, pid."""
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "pid": os.getpid(),
    }


class TrialWorker:
    """Serves `run(recipe, seed)` calls; created by the driver as a Ray actor."""

    def __init__(self, config_json: str) -> None:
        import torch

        from mergetune.evaluators.base import build_evaluator, load_backend
        from mergetune.merge.resident import ResidentModelSet
        from mergetune.merge.summary_files import cache_root
        from mergetune.search.plan import check_device_room, resident_placement, study_orders

        config = StudyConfig.model_validate_json(config_json)
        torch.set_num_threads(config.ray.cpus_per_worker)
        device = worker_device(config)
        started = time.perf_counter()
        assert config.models is not None
        # Headers first (and the vocabulary alignment, which writes files only): the live model takes its shape.
        # The engine starts next (vLLM checks that its share of the GPU is free); the inputs take what is left.
        # The evaluator decides the backend: lm_eval with `backend: vllm` gets a vLLM engine, else transformers.
        modelset = load_modelset(config)
        self.backend = load_backend(config.evaluator, config.models.base, device, modelset.vocabulary)
        check_device_room(config, device)
        self.paths = load_path_model(config, self.backend)
        # The dataflow space never merges: its live model stays the base, so no merge inputs are held.
        self.resident = None if config.search.space == "dataflow" else ResidentModelSet.load(
            modelset, device=device, placement=resident_placement(config), orders=study_orders(config), cache=cache_root()
        )
        self.evaluator = build_evaluator(config.evaluator)
        self.config = config
        self._confirm_evaluator = None  # built on the first `confirm` call
        self.versions = package_versions()
        self._head: dict[str, list[float]] = {}  # per-item scores of the first stage, kept for the second
        self._summary: dict[str, dict] = {}  # the last scoring's mean, SE and items per objective
        log.info("worker ready in %.1fs on %s", time.perf_counter() - started, device)

    def objectives(self) -> list[tuple[str, str]]:
        return [(o.name, o.direction) for o in self.evaluator.objectives]

    def describe(self) -> dict[str, object]:
        return placement()

    def run(self, recipe: dict, seed: int) -> dict[str, object]:
        """Merge `recipe` into the live model and score every task's whole search subset."""

        return self._attempt(self._merge_and_summarise(recipe, seed, self.evaluator))

    def confirm(self, recipe: dict, seed: int) -> dict[str, object]:
        """Merge `recipe` and score it on the confirmation subset of the search split; `confirmed` holds
        mean, SE and items per objective."""
        from mergetune.evaluators.base import build_evaluator
        from mergetune.search.confirm import confirmation_evaluator

        if self._confirm_evaluator is None:
            self._confirm_evaluator = build_evaluator(confirmation_evaluator(self.config))
        result = self._attempt(self._merge_and_summarise(recipe, seed, self._confirm_evaluator))
        if "error" not in result:
            result["confirmed"] = self._summary
        return result

    def _merge_and_summarise(self, recipe: dict, seed: int, evaluator) -> Callable[[dict[str, float]], dict[str, float]]:
        def merge_and_score(timings: dict[str, float]) -> dict[str, float]:
            self._merge(recipe, seed, timings)
            self._summary = timed(timings, "eval_s", lambda: evaluator.summarise(self.backend, split="search"))
            return {name: summary["score"] for name, summary in self._summary.items()}

        return merge_and_score

    def run_first_stage(self, recipe: dict, seed: int, first_share: float) -> dict[str, object]:
        """Merge `recipe` and score the head of each task's search subset; `first_stage` holds mean, SE and items."""
        from mergetune.evaluators.quick import mean_scores
        from mergetune.evaluators.stderr import item_summary

        def merge_and_score_head(timings: dict[str, float]) -> dict[str, float]:
            self._merge(recipe, seed, timings)
            self._head = timed(
                timings, "eval_s", lambda: self.evaluator.score_items(self.backend, "search", "head", first_share)
            )
            return mean_scores(self._head)

        result = self._attempt(merge_and_score_head)
        if "error" not in result:
            result["first_stage"] = item_summary(self._head)
        return result

    def run_second_stage(self, first_share: float) -> dict[str, object]:
        """Score the rest of each subset on the model `run_first_stage` merged; `scores` cover the whole subset."""
        from mergetune.evaluators.stderr import item_summary

        def score_rest(timings: dict[str, float]) -> dict[str, float]:
            rest = timed(
                timings, "eval_rest_s", lambda: self.evaluator.score_items(self.backend, "search", "rest", first_share)
            )
            self._summary = item_summary({name: self._head[name] + rest[name] for name in rest})
            return {name: summary["score"] for name, summary in self._summary.items()}

        return self._attempt(score_rest)

    def _merge(self, recipe: dict, seed: int, timings: dict[str, float]) -> None:
        from mergetune.merge.recipe import Recipe

        apply_recipe(Recipe.from_dict(recipe), self.backend, self.resident, self.paths, seed, timings)

    def _attempt(self, score: Callable[[dict[str, float]], dict[str, float]]) -> dict[str, object]:
        """`score(timings)` as a result dict: scores and timings, or `error` for a failure or a non-finite score."""
        from mergetune.evaluators.base import EvaluationFailed

        result: dict[str, object] = {**placement(), "versions": self.versions}
        timings: dict[str, float] = {}
        self._summary = {}
        try:
            scores = score(timings)
        except EvaluationFailed as exc:
            return {**result, "error": f"evaluation failed: {exc}"}
        except Exception as exc:  # a trial's failure must never take the worker down
            log.warning("trial failed:\n%s", traceback.format_exc())
            return {**result, "error": f"{type(exc).__name__}: {exc}"}
        bad = sorted(name for name, value in scores.items() if not math.isfinite(value))
        if bad:
            return {**result, "error": f"non-finite score for {bad[0]}", "scores": scores}
        if self._summary:
            result["score_se"] = {name: summary["se"] for name, summary in self._summary.items()}
        return {**result, "scores": scores, "timings": timings}


def apply_recipe(recipe, backend, resident, paths, seed: int, timings: dict[str, float] | None = None) -> None:
    """Make the backend's live model `recipe`'s: its merge (timed as `merge_s`), then its data-flow path."""
    if paths is not None:
        paths.restore()  # the merge writes into the live model's own layers
    if recipe.rules:
        assert resident is not None
        merged = lambda: resident.merge_into(recipe, backend.weight_sink(), seed=seed)  # noqa: E731
        if timings is None:
            merged()
        else:
            timings.update(timed(timings, "merge_s", merged))
    if recipe.dataflow is not None:
        if paths is None:
            raise ConfigError("this recipe has a dataflow path; run it in a study with `search.space: dataflow` or `both`")
        paths.apply(recipe.dataflow)


def load_path_model(config: StudyConfig, backend: object):
    """The PathModel over the backend's live model for a dataflow study (None for `search.space: parameter`)."""
    if config.search.space == "parameter":
        return None
    from mergetune.evaluators.dataflow_model import PathModel

    assert config.models is not None
    sources = {"base": config.models.base, **config.models.experts}
    live = "base" if config.search.space == "dataflow" else None
    return PathModel.load(backend.model, sources, live_source=live)


def timed(timings: dict[str, float], key: str, call: Callable[[], dict]) -> dict:
    """`call()`, its wall time stored in `timings[key]`."""
    started = time.perf_counter()
    result = call()
    timings[key] = time.perf_counter() - started
    return result
