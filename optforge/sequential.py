"""Sequential gates: judge a candidate on growing prefixes of its eval items and stop once the verdict is sure.

A fixed-n gate evaluates every item and computes one interval at the gate's confidence 1 - alpha. Looking at
the interval after each chunk and stopping at the first decided verdict would, with the same alpha at every
look, pass a model whose true drop sits on the threshold far more often than alpha / 2. Here each look gets
its own share of alpha from a spending function (Lan & DeMets 1983, "Discrete sequential boundaries for
clinical trials", Biometrika 70(3)), with the O'Brien-Fleming-type function

    alpha(t) = 2 - 2 * Phi(z_{1 - alpha/2} / sqrt(t)),   t = items seen / all items,

and look k uses confidence 1 - (alpha(t_k) - alpha(t_{k-1})). By the union bound, the chance that any look's
interval misses the true drop is at most sum_k (alpha(t_k) - alpha(t_{k-1})) = alpha, so a false pass (or a false
fail) over all looks stays within the fixed-n gate's rate, whatever the dependence between looks. The function
spends almost nothing early (a look at 1/8 of the items uses alpha ~ 1e-8 at alpha = 0.05), so only clear cases
stop early, and the last look keeps most of alpha (~0.042): close calls cost little more than a fixed-n gate.
`tests/test_sequential.py` checks the false-pass rate by simulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

# Fractions of the items after which a sequential gate looks: each look doubles the items (the last is all).
LOOK_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
# A look needs at least this many items (fewer give intervals too wide to decide anything).
MIN_LOOK_ITEMS = 25


def spent_alpha(t: float, alpha: float) -> float:
    """Alpha spent by information fraction `t` (0 < t <= 1): Lan-DeMets O'Brien-Fleming-type; alpha at t = 1."""
    if t <= 0:
        return 0.0
    z = NormalDist().inv_cdf(1.0 - alpha / 2.0)
    return min(alpha, 2.0 - 2.0 * NormalDist().cdf(z / math.sqrt(min(t, 1.0))))


@dataclass(frozen=True)
class Look:
    # Items the look judges (a prefix of the eval items), and the confidence of its interval.
    items: int
    confidence: float


def plan_looks(total: int, alpha: float, fractions: tuple[float, ...] = LOOK_FRACTIONS, min_items: int = MIN_LOOK_ITEMS) -> list[Look]:
    """The looks at `total` items: one per fraction (at least `min_items` items each, duplicates dropped), each
    with confidence 1 - its share of alpha. The last look is at all items; with a single look it is the fixed-n gate."""
    sizes = sorted({min(total, max(min_items, math.ceil(f * total))) for f in fractions} | {total})
    looks, spent = [], 0.0
    for n in sizes:
        now = spent_alpha(n / total, alpha)
        looks.append(Look(n, 1.0 - max(now - spent, 1e-15)))
        spent = now
    return looks
