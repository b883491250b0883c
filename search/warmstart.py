"""Warm start: the classic merge recipes enqueued as a study's first trials.

The front then starts at least at the baselines, and reports can show the gain over them
(each such trial carries `user_attrs["baseline"]`). They are enqueued once per study, by the
driver that created it (search/bookkeeping.py), so neither a resume nor a second driver runs
them twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mergetune.merge.dataflow import MERGED
from mergetune.search.space import SearchSpace

log = logging.getLogger(__name__)

# (baseline name, method used by every group, params overriding the method's defaults)
CLASSIC_RECIPES: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("uniform_average", "linear", {}),
    ("task_arithmetic", "task_arithmetic", {"lambda": 1.0}),
    ("task_arithmetic_tuned", "task_arithmetic", {"lambda": 0.5}),
    ("ties", "ties", {"density": 0.5, "lambda": 1.0}),
    ("dare_ties", "dare_ties", {"density": 0.5, "lambda": 1.0}),
    ("ota", "ota", {}),
)


def baseline_params(space: SearchSpace) -> list[tuple[str, dict[str, object]]]:
    """The classic recipes the space can express exactly (method allowed, values in the searched ranges), as
    trial params; one outside the ranges is skipped with a warning, never run as another recipe under its name.

    Space `dataflow`: each model's own path (`path_base`, `path_<expert>`). Space `both`: each classic recipe with
    the identity path over its merge, so PS+DFS starts where PS does."""
    if space.dataflow is not None and space.search.space == "dataflow":
        return _expressible([(f"path_{source}", lambda s=source: space.dataflow.identity_params(s)) for source in space.dataflow.sources])
    out = []
    for name, method, overrides in CLASSIC_RECIPES:
        if method not in space.methods:
            continue

        def params(method: str = method, overrides: dict[str, float] = overrides) -> dict[str, object]:
            found = space.uniform_params(method, overrides)
            if space.dataflow is not None:
                found.update(space.dataflow.identity_params(MERGED))
            return found

        out += _expressible([(name, params)])
    return out


def _expressible(candidates: list[tuple[str, Callable[[], dict[str, object]]]]) -> list[tuple[str, dict[str, object]]]:
    out = []
    for name, params in candidates:
        try:
            out.append((name, params()))
        except ValueError as exc:
            log.warning("warm start: baseline %s skipped: %s; widen the range to run it", name, exc)
    return out
