"""The search worker's order statistics: per (expert, tensor) score orders and DELLA row ranks, computed once.

Task vectors never change within a study, so the sorts behind exact top-k, breadcrumbs bands,
FFG masks and global cuts (`order_stats.TensorOrder`) and DELLA's per-row |τ| ranks
(`order_stats.row_ranks`) are computed once per worker — at load for the kinds the study's
methods declare (`MethodSpec.orders`), otherwise on first use — and every trial reuses them.
Kinds are `registry.ORDER_KINDS`: "magnitude.desc" (TIES), "magnitude.asc" (breadcrumbs),
"saliency.desc" (OTA's FFG), "row_ranks" (DELLA).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from mergetune.merge.methods.registry import SliceNorms
from mergetune.merge.order_stats import TensorOrder, row_ranks
from mergetune.merge.sparsify import scores_of
from mergetune.merge.summary_files import SummaryDirectory, summary_key

log = logging.getLogger(__name__)

TaskVector = Callable[[str, str], Tensor]  # (expert, tensor) → τ in float32 (a fresh tensor)
Moments = Callable[[str, str], Tensor | None]  # (expert, tensor) → v in float32, None without one


class ModelSummaries:
    """Order statistics of a model set's task vectors, by (expert, tensor), kept for the worker's life."""

    def __init__(
        self,
        tensor_names: list[str],
        task_vector: TaskVector,
        moments: Moments,
        has_moments: Callable[[str, str], bool],
        sources: Callable[[str, str], list[Path]],
        ranks_device: torch.device,
    ) -> None:
        self.tensor_names = tensor_names
        self._task_vector, self._moments, self.has_moments = task_vector, moments, has_moments
        self._sources = sources  # (expert, kind) → the files its statistics are computed from
        self._ranks_device = ranks_device
        self._orders: dict[tuple[str, str, str], TensorOrder] = {}  # (score kind, expert, tensor)
        self._ranks: dict[tuple[str, str], Tensor] = {}
        self.slice_norms = SliceNorms()  # by ((expert, tensor), start, stop): a model set's kernels never change
        self.build_s = 0.0

    def order(self, kind: str, expert: str, name: str, direction: str) -> TensorOrder:
        """The `TensorOrder` of expert's scores of `kind` on tensor `name`, with `direction`'s tie order."""
        order = self._orders.get((kind, expert, name))
        if order is None or direction not in order.ties:
            order = self._build(kind, expert, name, (direction,))
        return order

    def _build(self, kind: str, expert: str, name: str, directions: tuple[str, ...]) -> TensorOrder:
        started = time.perf_counter()
        tau = self._task_vector(expert, name)
        scores = scores_of(kind, tau, self._moments(expert, name) if kind == "saliency" else None)
        del tau
        order = self._orders.get((kind, expert, name))
        if order is None:
            order = self._orders[(kind, expert, name)] = TensorOrder.build(scores, directions)
        else:
            for direction in directions:
                if direction not in order.ties:
                    order.add_direction(scores, direction)
        self.build_s += time.perf_counter() - started
        return order

    @property
    def built_kinds(self) -> list[str]:
        """The kinds (`registry.ORDER_KINDS`) built so far, for any expert and tensor."""
        kinds = {f"{kind}.{direction}" for (kind, _, _), order in self._orders.items() for direction in order.ties}
        return sorted(kinds | ({"row_ranks"} if self._ranks else set()))

    def row_ranks(self, expert: str, name: str) -> Tensor:
        key = (expert, name)
        if key not in self._ranks:
            started = time.perf_counter()
            self._ranks[key] = row_ranks(self._task_vector(expert, name)).to(self._ranks_device)
            self.build_s += time.perf_counter() - started
        return self._ranks[key]

    def precompute(self, kinds: Iterable[str], experts: Iterable[str], threads: int = 1, cache: Path | None = None) -> None:
        """Build every (kind, expert, tensor) now, in `threads` threads (torch's sorts release the GIL); one sort
        per direction of a score, one tie order each, sharing the values.

        With a `cache` directory they are built once per node and mapped (`summary_files`): this worker
        builds the (expert, kind)s no other worker is building, then maps everyone's.
        """
        started = time.perf_counter()
        groups: dict[str, tuple[str, ...]] = {}  # "magnitude.desc" + "magnitude.asc" → "magnitude.asc+desc"
        for kind in sorted(set(kinds)):
            score, _, direction = kind.partition(".")
            groups[score] = (*groups.get(score, ()), direction) if direction else ()
        jobs = [(score + ("." + "+".join(dirs) if dirs else ""), expert) for score, dirs in groups.items() for expert in experts]
        if cache is None:
            for kind, expert in jobs:
                with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                    list(pool.map(lambda name, k=kind, e=expert: self._install(k, e, name, self._arrays(k, e, name)), self._tensors(kind, expert)))
        else:
            directories = {(kind, expert): SummaryDirectory(cache, summary_key(kind, self._sources(expert, kind))) for kind, expert in jobs}
            waiting = []
            for (kind, expert), directory in directories.items():
                with directory.locked(wait=False) as held:
                    if not held:
                        waiting.append((kind, expert, directory))
                    elif not directory.exists:
                        directory.build(self._tensors(kind, expert), lambda name, k=kind, e=expert: self._arrays(k, e, name), threads)
            for kind, expert, directory in waiting:
                with directory.locked(wait=True):
                    if not directory.exists:  # its builder died
                        directory.build(self._tensors(kind, expert), lambda name, k=kind, e=expert: self._arrays(k, e, name), threads)
            for (kind, expert), directory in directories.items():
                for name, arrays in directory.load(self._tensors(kind, expert)).items():
                    self._install(kind, expert, name, arrays)
        if jobs:
            log.info("order statistics of %d (kind, expert)s in %.1fs (%.2f GB)", len(jobs), time.perf_counter() - started, self.nbytes / 1e9)

    def _tensors(self, kind: str, expert: str) -> list[str]:
        if kind.startswith("saliency"):
            return [name for name in self.tensor_names if self.has_moments(expert, name)]
        return list(self.tensor_names)

    def _arrays(self, kind: str, expert: str, name: str) -> dict[str, Tensor]:
        """One tensor's statistics of `kind` ("row_ranks", or a score with its directions: "magnitude.asc+desc"),
        computed afresh, as arrays on the CPU (for a cache file)."""
        tau = self._task_vector(expert, name)
        if kind == "row_ranks":
            return {"ranks": row_ranks(tau).cpu()}
        score, directions = kind.split(".")
        scores = scores_of(score, tau, self._moments(expert, name) if score == "saliency" else None)
        return TensorOrder.build(scores, tuple(directions.split("+"))).to_tensors()

    def _install(self, kind: str, expert: str, name: str, arrays: dict[str, Tensor]) -> None:
        if kind == "row_ranks":
            self._ranks[(expert, name)] = arrays["ranks"].to(self._ranks_device)
        else:
            self._orders[(kind.split(".")[0], expert, name)] = TensorOrder.from_tensors(arrays)

    def orders_of(self, kind: str, expert: str) -> Iterator[tuple[str, TensorOrder]]:
        """(tensor, order) over the model's tensors in order, for a global cut (saliency: tensors with moments)."""
        for name in self.tensor_names:
            if kind == "saliency" and not self.has_moments(expert, name):
                continue
            yield name, self.order(kind, expert, name, "desc")

    def for_tensor(self, name: str, experts: list[str]) -> TensorView:
        return TensorView(self, name, experts)

    @property
    def nbytes(self) -> int:
        ranks = sum(t.numel() * t.element_size() for t in self._ranks.values())
        return sum(o.nbytes for o in self._orders.values()) + ranks


class TensorView:
    """One tensor's statistics for one rule's experts (a `registry.TensorSummaries`: experts by index)."""

    def __init__(self, summaries: ModelSummaries, name: str, experts: list[str]) -> None:
        self._summaries, self._name, self._experts = summaries, name, experts

    def order(self, kind: str, model: int, direction: str) -> TensorOrder:
        return self._summaries.order(kind, self._experts[model], self._name, direction)

    def row_ranks(self, model: int) -> Tensor:
        return self._summaries.row_ranks(self._experts[model], self._name)

    def task_vector_l1(self, model: int, start: int, stop: int) -> Tensor | None:
        return self._summaries.slice_norms.task_vector_l1((self._experts[model], self._name), start, stop)

    def keep_task_vector_l1(self, model: int, start: int, stop: int, total: Tensor) -> None:
        self._summaries.slice_norms.keep_task_vector_l1((self._experts[model], self._name), start, stop, total)
