"""Standard errors of per-item means, against hand-computed values."""

import math

import pytest

from mergetune.evaluators.stderr import item_summary, standard_error, weighted_standard_error


def test_standard_error_of_known_item_scores():
    # 5 of 8 right: p = 5/8, SE = √(p(1−p)/n) = √(15/64 / 8)
    assert standard_error([1, 0, 0, 1, 1, 1, 0, 1]) == pytest.approx(math.sqrt(15 / 64 / 8))
    # graded items: mean 0.5, Σd² = 6·0.25 + 2·0.09 = 1.68, pstdev = √0.21, over the 1/n floor
    assert standard_error([0, 1, 0, 1, 0.2, 0.8, 0, 1]) == pytest.approx(math.sqrt(0.21) / math.sqrt(8))
    assert standard_error([1.0] * 10) == pytest.approx(0.1)  # all right: floored at 1/n, never 0
    # log-likelihoods −1, −2, −3: pstdev √(2/3), not floored (their scale is not [0, 1])
    assert standard_error([-1.0, -2.0, -3.0]) == pytest.approx(math.sqrt(2 / 3) / math.sqrt(3))
    summary = item_summary({"rev": [1, 0, 0, 1, 1, 1, 0, 1]})
    assert summary == {"rev": {"score": 0.625, "se": pytest.approx(0.171163, abs=1e-6), "items": 8}}


def test_weighted_standard_error_of_independent_task_means():
    # weights 2:1 → (2/3)²·0.03² + (1/3)²·0.04² = 0.0004 + 0.00017778
    assert weighted_standard_error([0.03, 0.04], [2.0, 1.0]) == pytest.approx(math.sqrt(0.00057778), rel=1e-4)
    assert weighted_standard_error([0.03, None], [1.0, 0.0]) == pytest.approx(0.03)
    assert weighted_standard_error([0.03, None], [1.0, 1.0]) is None
