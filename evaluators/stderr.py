"""Standard errors of per-item means: what a score's ± says, in every table and in selection.

A task's score is the mean of per-item scores over a fixed subset of n items, so its noise is
the standard error of that mean: pstdev(items)/√n — for exact match (0/1 items) √(p(1−p)/n),
floored at 1/n so that a subset scored all right or all wrong (p = 0 or 1) does not claim
zero noise (graded items, e.g. log-likelihoods, are not floored: their scale is not [0, 1]). Scores of different tasks come from different items, so the SE of a weighted mean
of them is √Σ(wᵢ/Σ|w|)²·seᵢ².
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence


def standard_error(items: Sequence[float]) -> float:
    """Standard error of the mean of per-item scores; for 0/1 items floored at 1/n."""
    n = len(items)
    se = statistics.pstdev(items) / math.sqrt(n)
    return max(se, 1.0 / n) if all(v in (0, 1) for v in items) else se


def item_summary(items: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Per objective: the mean of its per-item scores, its standard error and the item count."""
    return {
        name: {"score": sum(values) / len(values), "se": standard_error(values), "items": len(values)}
        for name, values in items.items()
    }


def weighted_standard_error(errors: Sequence[float | None], weights: Sequence[float]) -> float | None:
    """SE of Σwᵢxᵢ/Σ|wᵢ| for independent xᵢ with SEs `errors`; None when an objective with weight has none."""
    total = sum(abs(w) for w in weights) or 1.0
    if any(se is None for se, w in zip(errors, weights) if w):
        return None
    return math.sqrt(sum((w / total) ** 2 * se**2 for se, w in zip(errors, weights) if w))  # type: ignore[operator]
