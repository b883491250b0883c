"""The trial worker: one long-lived Ray actor per GPU (or CPU slot) that merges and scores recipes.

It loads the model set once (base + task vectors + statistics resident on its device),
owns one live model and one evaluator, and per trial merges every tensor into the live
model in place, then scores it. Errors of a trial come back as a result with `error`,
so only a dead process surfaces as an exception on the driver.
"""

from __future__ import annotations

import logging
import math
import os
import time
import traceback
from pathlib import Path

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
    )


def worker_device(config: StudyConfig) -> str:
    if config.ray.device is not None:
        return config.ray.device
    return "cuda" if config.ray.gpus_per_worker > 0 else "cpu"


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

        from mergetune.evaluators.base import HFBackend, build_evaluator
        from mergetune.merge.modelset import ResidentModelSet

        config = StudyConfig.model_validate_json(config_json)
        torch.set_num_threads(config.ray.cpus_per_worker)
        device = worker_device(config)
        started = time.perf_counter()
        self.resident = ResidentModelSet.load(load_modelset(config), device=device)
        assert config.models is not None
        self.backend = HFBackend.from_pretrained(config.models.base, device)
        self.evaluator = build_evaluator(config.evaluator)
        self.versions = package_versions()
        log.info("worker ready in %.1fs on %s", time.perf_counter() - started, device)

    def objectives(self) -> list[tuple[str, str]]:
        return [(o.name, o.direction) for o in self.evaluator.objectives]

    def describe(self) -> dict[str, object]:
        return placement()

    def run(self, recipe: dict, seed: int) -> dict[str, object]:
        from mergetune.evaluators.base import EvaluationFailed
        from mergetune.merge.recipe import Recipe

        result: dict[str, object] = {**placement(), "versions": self.versions}
        try:
            started = time.perf_counter()
            timings = dict(self.resident.merge_into(Recipe.from_dict(recipe), self.backend.weight_sink(), seed=seed))
            merged = time.perf_counter()
            scores = self.evaluator.evaluate(self.backend, split="search")
            timings.update(merge_s=merged - started, eval_s=time.perf_counter() - merged)
        except EvaluationFailed as exc:
            return {**result, "error": f"evaluation failed: {exc}"}
        except Exception as exc:  # a trial's failure must never take the worker down
            log.warning("trial failed:\n%s", traceback.format_exc())
            return {**result, "error": f"{type(exc).__name__}: {exc}"}
        bad = sorted(name for name, value in scores.items() if not math.isfinite(value))
        if bad:
            return {**result, "error": f"non-finite score for {bad[0]}", "scores": scores}
        return {**result, "scores": scores, "timings": timings}
