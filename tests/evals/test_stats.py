"""Paired statistics against known cases: identical models, known shifts, exact McNemar values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optforge.evals import stats


def test_identical_models_give_zero_difference_with_an_interval_around_zero():
    scores = np.random.default_rng(0).integers(0, 2, size=300)
    boot = stats.paired_bootstrap(scores, scores)
    assert boot.diff == 0.0 and boot.low == 0.0 and boot.high == 0.0
    prop = stats.paired_proportion_interval(scores, scores)
    assert prop.diff == 0.0
    assert prop.low < 0.0 < prop.high


def test_no_disagreement_on_few_items_is_not_treated_as_certainty():
    # 20 items, both models right on the same 12: the interval must still be several points wide.
    scores = [1] * 12 + [0] * 8
    prop = stats.paired_proportion_interval(scores, scores)
    assert prop.high - prop.low > 0.15


def test_known_shift_is_detected_at_the_right_confidence():
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 1.0, size=2000)
    new = base + 0.1 + rng.normal(0.0, 0.2, size=2000)  # paired noise sd 0.2 -> se of the mean ~0.0045
    boot = stats.paired_bootstrap(base, new, confidence=0.95)
    assert boot.low > 0.08 and boot.high < 0.12
    assert boot.low < 0.1 < boot.high


def test_bootstrap_is_reproducible_with_its_fixed_seed():
    rng = np.random.default_rng(2)
    base, new = rng.normal(size=100), rng.normal(size=100)
    assert stats.paired_bootstrap(base, new) == stats.paired_bootstrap(base, new)


def test_paired_proportion_interval_covers_a_known_accuracy_drop():
    # 1000 items: the new model loses 60 items the baseline had and gains 10 -> drop of 5 points.
    base = np.array([1] * 60 + [0] * 10 + [1] * 500 + [0] * 430)
    new = np.array([0] * 60 + [1] * 10 + [1] * 500 + [0] * 430)
    prop = stats.paired_proportion_interval(base, new)
    assert prop.diff == pytest.approx(-0.05)
    # se = sqrt(70 - 50^2/1000)/1000 ~ 0.0082, so the 95% interval is about -0.05 +- 0.016.
    assert -0.07 < prop.low < -0.06 and -0.04 < prop.high < -0.03


def test_mcnemar_exact_values():
    # 10 discordant pairs all one way: p = 2 * 0.5^10.
    base, new = [1] * 10 + [0] * 5, [0] * 10 + [0] * 5
    result = stats.mcnemar(base, new)
    assert (result.base_only, result.new_only) == (10, 0)
    assert result.p_value == pytest.approx(2 * 0.5**10)
    assert stats.mcnemar([1, 0, 1], [1, 0, 1]).p_value == 1.0
    # 3 vs 2 discordant: p = 2 * P(X <= 2 | n=5) = 2 * 16/32, capped at 1.
    assert stats.mcnemar([1, 1, 1, 0, 0], [0, 0, 0, 1, 1]).p_value == 1.0


def test_verdicts_and_needed_sample_size():
    assert stats.verdict(0.5, -1.0, 2.0, 3.0, 100).verdict == "pass"
    assert stats.verdict(8.0, 5.0, 11.0, 3.0, 100).verdict == "fail"
    undecided = stats.verdict(1.0, -3.0, 5.0, 3.0, 100)
    assert undecided.verdict == "undecided"
    # half-width 4 at n=100, margin 2 -> n * (4/2)^2 = 400
    assert undecided.needed_n == 400
    assert stats.verdict(3.0, 1.0, 5.0, 3.0, 100).needed_n is None  # on the line: no finite n decides


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="equal"):
        stats.paired_bootstrap([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="equal"):
        stats.paired_proportion_interval([1, 0], [1])
    assert math.isfinite(stats.paired_bootstrap([1.0], [2.0]).diff)
