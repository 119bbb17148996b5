"""Sequential gates (optforge/sequential.py): the alpha spending, and by simulation that repeated looks keep the
false-pass rate of a paired accuracy gate at or below the fixed-n gate's alpha / 2, while clear cases stop early."""

from __future__ import annotations

import numpy as np
import pytest

from optforge.evals import stats
from optforge.sequential import plan_looks, spent_alpha


def test_spending_is_increasing_ends_at_alpha_and_saves_alpha_for_the_last_look():
    ts = np.linspace(0.01, 1.0, 100)
    spent = [spent_alpha(t, 0.05) for t in ts]
    assert all(a <= b for a, b in zip(spent, spent[1:])) and spent[-1] == pytest.approx(0.05)
    looks = plan_looks(1000, 0.05)
    assert [look.items for look in looks] == [125, 250, 500, 1000]
    shares = [1 - look.confidence for look in looks]
    assert sum(shares) == pytest.approx(0.05) and shares[0] < 1e-6 and shares[-1] > 0.04
    assert [look.items for look in plan_looks(40, 0.05)] == [25, 40]  # a look needs 25 items
    assert plan_looks(10, 0.05)[0].items == 10 and len(plan_looks(10, 0.05)) == 1  # too few items: the fixed-n gate


def _paired(rng, n: int, p_base: float, drop: float, disagree: float) -> tuple[np.ndarray, np.ndarray]:
    """Paired 0/1 scores with P(base) = p_base and P(new) = p_base - drop, the two disagreeing on about
    `disagree` of the items."""
    base = rng.random(n) < p_base
    lose = rng.random(n) < (disagree + drop) / 2 / p_base  # right before, wrong now
    gain = rng.random(n) < (disagree - drop) / 2 / (1 - p_base)  # wrong before, right now
    new = np.where(base, ~lose, gain)
    return base.astype(int), new.astype(int)


def _sequential_verdict(base, new, max_drop_pts: float, alpha: float) -> tuple[str, int]:
    for look in plan_looks(len(base), alpha):
        b, m = base[: look.items], new[: look.items]
        iv = stats.paired_proportion_interval(b, m, confidence=look.confidence)
        v = stats.verdict(-100 * iv.diff, -100 * iv.high, -100 * iv.low, max_drop_pts, look.items).verdict
        if v != "undecided":
            return v, look.items
    return "undecided", len(base)


def _naive_verdict(base, new, max_drop_pts: float, alpha: float) -> str:
    """Every look at the full confidence: what the spending guards against."""
    for look in plan_looks(len(base), alpha):
        iv = stats.paired_proportion_interval(base[: look.items], new[: look.items], confidence=1 - alpha)
        v = stats.verdict(-100 * iv.diff, -100 * iv.high, -100 * iv.low, max_drop_pts, look.items).verdict
        if v != "undecided":
            return v
    return "undecided"


def test_repeated_looks_keep_the_false_pass_rate_within_alpha_over_two():
    rng = np.random.default_rng(7)
    alpha, max_drop, runs, n = 0.05, 2.0, 4000, 1000
    sequential = naive = 0
    for _ in range(runs):  # true drop exactly at the threshold: any pass is a false pass
        base, new = _paired(rng, n, 0.6, max_drop / 100, 0.15)
        sequential += _sequential_verdict(base, new, max_drop, alpha)[0] == "pass"
        naive += _naive_verdict(base, new, max_drop, alpha) == "pass"
    rate = sequential / runs
    assert rate <= alpha / 2 + 3 * np.sqrt(alpha / 2 * (1 - alpha / 2) / runs), rate  # 2.5% plus three Monte Carlo SEs
    assert naive > sequential  # looking four times at full confidence passes more often


def test_clear_cases_stop_early_with_the_fixed_n_verdict():
    rng = np.random.default_rng(11)
    used = {"pass": [], "fail": []}
    for true_drop, expected in ((0.0, "pass"), (0.15, "fail")):
        for _ in range(200):
            base, new = _paired(rng, 1000, 0.6, true_drop, 0.04 if expected == "pass" else 0.2)
            verdict, items = _sequential_verdict(base, new, 5.0, 0.05)
            assert verdict == expected
            used[expected].append(items)
    assert np.mean(used["pass"]) < 500 and np.mean(used["fail"]) < 500  # under half of the fixed-n gate's 1,000 items
