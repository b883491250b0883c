"""The worker pool: joining or starting Ray, checking the workers' resources exist, the actors themselves.

A local Ray is sized to the workers and stopped by whoever started it (search/driver.py, on every
exit path). Resources are checked before any actor is made: on a local machine GPUs that are not
there are a one-line error before Ray starts; on a joined cluster the workers' resources are
reserved once with a placement group, so a request no node can meet stops after
`ray.placement_timeout_s` with the resources named, instead of waiting forever.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from mergetune.core.errors import ConfigError, MergetuneError
from mergetune.search.config import ObjectiveConfig, StudyConfig
from mergetune.search.ray_errors import worker_error_message


def visible_gpus() -> int:
    """CUDA devices this process can use, as torch (the workers' engine) counts them."""
    import torch

    return torch.cuda.device_count()


def check_local_gpus(config: StudyConfig, workers: int) -> None:
    """Before a local Ray starts: the GPUs the workers ask for must be visible here."""
    wanted = config.ray.gpus_per_worker * workers
    if config.ray.address or wanted <= 0:
        return
    seen = visible_gpus()
    if seen < wanted:
        raise ConfigError(
            f"ray.gpus_per_worker: {workers} worker(s) × {config.ray.gpus_per_worker:g} GPU need {wanted:g} GPU(s), "
            f"this machine shows {seen}; set ray.gpus_per_worker: 0 to run on CPU, or ray.address to join a cluster with GPUs"
        )


def connect_ray(config: StudyConfig, workers: int) -> bool:
    """Join the configured cluster or start a local one; True if this call started Ray (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    if config.ray.address:
        ray.init(address=config.ray.address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers * config.ray.cpus_per_worker, include_dashboard=False, log_to_driver=False)
    return True


def worker_resources(config: StudyConfig) -> dict[str, float]:
    """What one worker actor reserves."""
    bundle = {"CPU": float(config.ray.cpus_per_worker), **config.ray.resources}
    if config.ray.gpus_per_worker:
        bundle["GPU"] = config.ray.gpus_per_worker
    return bundle


def wait_for_resources(config: StudyConfig, workers: int, started_here: bool) -> None:
    """Return once the cluster can hold every worker; a request it cannot meet is a one-line error."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = worker_resources(config)
    total = ray.cluster_resources()
    asked = f"{workers} worker(s) × {_resources_text(bundle)}"
    has = _resources_text({k: v for k, v in total.items() if k in bundle or k in ("CPU", "GPU")})
    if started_here and any(total.get(k, 0) < v * workers for k, v in bundle.items()):
        # A local Ray never grows: what it lacks now it lacks forever.
        raise ConfigError(f"ray: {asked} do not fit the local Ray ({has}); lower ray.workers or the per-worker resources")
    group = placement_group([bundle] * workers)
    try:
        ready = group.wait(timeout_seconds=config.ray.placement_timeout_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise MergetuneError(
            f"ray: the cluster did not offer {asked} within {config.ray.placement_timeout_s:g} s (it has {has}); "
            "lower ray.workers or the per-worker resources, add nodes, or raise ray.placement_timeout_s"
        )


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


@dataclass
class WorkerPool:
    """`size` actors of `worker_cls`, each reserving the configured CPUs/GPUs; dead ones are replaced."""

    worker_cls: type
    config: StudyConfig
    size: int
    actors: list = field(default_factory=list)

    def __post_init__(self) -> None:
        import ray

        self._remote = ray.remote(self.worker_cls).options(
            num_cpus=self.config.ray.cpus_per_worker,
            num_gpus=self.config.ray.gpus_per_worker,
            resources=self.config.ray.resources or None,
            max_restarts=0,
            max_concurrency=1,
        )
        self.actors = [self._start() for _ in range(self.size)]

    def _start(self):
        return self._remote.remote(self.config.model_dump_json())

    def replace(self, slot: int) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._start()

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)


def resolve_objectives(config: StudyConfig, pool: WorkerPool) -> list[ObjectiveConfig]:
    """The configured objectives, checked against what the evaluator reports (or all of them)."""
    import ray

    try:
        reported = ray.get(pool.actors[0].objectives.remote())
    except ray.exceptions.RayActorError as exc:
        raise MergetuneError(f"the first worker failed to start: {worker_error_message(exc)}") from None
    if config.objectives is None:
        return [ObjectiveConfig(name=name, direction=direction) for name, direction in reported]
    names = [name for name, _ in reported]
    for objective in config.objectives:
        if objective.name not in names:
            raise ConfigError(f"objectives: the evaluator reports no {objective.name!r}; it reports {', '.join(names)}")
    return config.objectives
