"""Paired statistics for comparing a model with its baseline on the same eval items, and the gate verdict.

Both models answer the same items, so the comparison is per item (paired): the noise that items share (hard
vs easy questions) cancels, and the interval on the difference is far narrower than the two separate
standard errors would suggest.

- `paired_bootstrap`: resample item indices with a fixed seed, recompute the statistic on both models with
  the same indices, take percentiles of the difference. Works for any statistic (mean accuracy, perplexity as
  exp(sum nll / sum tokens), ...).
- `paired_proportion_interval`: for 0/1 scores, the Agresti-Min interval on the difference of paired
  proportions (0.5 added to each cell of the 2x2 table). Unlike the bootstrap it stays honest when the two
  models disagree on few or no items: 20 items with no disagreement give about +-9 points, not [0, 0].
- `mcnemar`: exact two-sided McNemar test (binomial on the discordant pairs).
- `verdict`: pass when the whole interval of the drop is within the allowed drop, fail when the whole
  interval is beyond it, otherwise undecided, with the number of items that would likely decide it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

DEFAULT_SEED = 20240531
DEFAULT_RESAMPLES = 2000


@dataclass(frozen=True)
class PairedInterval:
    # Point estimate of (new - base) and its two-sided interval at `confidence`.
    diff: float
    low: float
    high: float
    confidence: float
    n: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(base: Sequence | np.ndarray, new: Sequence | np.ndarray, *, statistic: Callable[[np.ndarray], float] | None = None, confidence: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> PairedInterval:
    """Percentile interval of statistic(new) - statistic(base) under paired resampling of items.

    `base`/`new` are per-item arrays of equal length (first axis = items; extra axes, e.g. (nll, tokens)
    columns, go to `statistic`). `statistic` defaults to the mean.
    """
    base, new = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if base.shape != new.shape or len(base) == 0:
        raise ValueError(f"paired samples need equal, non-empty shapes; found {base.shape} and {new.shape}")
    stat = statistic or (lambda x: float(np.mean(x, axis=0)))
    n = len(base)
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for k in range(resamples):
        idx = rng.integers(0, n, size=n)
        diffs[k] = stat(new[idx]) - stat(base[idx])
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(diffs, [alpha, 1.0 - alpha])
    return PairedInterval(float(stat(new) - stat(base)), float(low), float(high), confidence, n, "paired_bootstrap")


def paired_proportion_interval(base: Sequence[int], new: Sequence[int], *, confidence: float = 0.95) -> PairedInterval:
    """Agresti-Min (2005) interval for mean(new) - mean(base) of paired 0/1 scores."""
    base, new = np.asarray(base, dtype=int), np.asarray(new, dtype=int)
    if base.shape != new.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(f"paired 0/1 samples need equal, non-empty 1-D shapes; found {base.shape} and {new.shape}")
    n = len(base)
    gained = int(np.sum((new == 1) & (base == 0)))  # right now, wrong before
    lost = int(np.sum((new == 0) & (base == 1)))
    diff = (gained - lost) / n
    g, l, m = gained + 0.5, lost + 0.5, n + 2.0
    adjusted = (g - l) / m
    var = ((g + l) - (g - l) ** 2 / m) / m**2
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    half = z * math.sqrt(max(var, 0.0))
    return PairedInterval(diff, max(-1.0, adjusted - half), min(1.0, adjusted + half), confidence, n, "agresti_min")


@dataclass(frozen=True)
class McNemar:
    # Items only the baseline got right, items only the new model got right, exact two-sided p-value.
    base_only: int
    new_only: int
    p_value: float


def mcnemar(base: Sequence[int], new: Sequence[int]) -> McNemar:
    """Exact McNemar test: under H0 the discordant items split Binomial(b + c, 1/2)."""
    base, new = np.asarray(base, dtype=int), np.asarray(new, dtype=int)
    b = int(np.sum((base == 1) & (new == 0)))
    c = int(np.sum((base == 0) & (new == 1)))
    k, total = min(b, c), b + c
    if total == 0:
        return McNemar(b, c, 1.0)
    tail = sum(math.comb(total, i) for i in range(k + 1)) / 2.0**total
    return McNemar(b, c, min(1.0, 2.0 * tail))


# ---------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    # "pass" | "fail" | "undecided"
    verdict: str
    # Drop (positive = worse) and its interval, in the threshold's units.
    drop: float
    drop_low: float
    drop_high: float
    max_drop: float
    n: int
    # Items that would likely decide an undecided gate (None when decided, or when the drop sits on the line).
    needed_n: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(drop: float, drop_low: float, drop_high: float, max_drop: float, n: int) -> Verdict:
    """Decide from a drop's interval; the interval's half-width is assumed to shrink as 1/sqrt(n)."""
    if drop_high <= max_drop:
        return Verdict("pass", drop, drop_low, drop_high, max_drop, n, None)
    if drop_low > max_drop:
        return Verdict("fail", drop, drop_low, drop_high, max_drop, n, None)
    margin = abs(drop - max_drop)
    half = max(drop_high - drop, drop - drop_low)
    needed = None if margin <= 1e-12 * max(1.0, abs(max_drop)) else max(n + 1, math.ceil(n * (half / margin) ** 2))
    return Verdict("undecided", drop, drop_low, drop_high, max_drop, n, needed)


# ------------------------------------------------------------------------------------- paired log-ratios


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (no scipy): bisection on the CDF, which is Simpson's
    rule over the density from 0 (the density is smooth and unimodal, so 2000 panels give ~1e-9)."""
    if df <= 0:
        raise ValueError(f"t needs df >= 1, found {df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    xs = np.linspace(0.0, 1.0, 2001)

    def cdf(t: float) -> float:
        x = xs * abs(t)
        dens = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
        area = abs(t) / 6000.0 * (dens[0] + dens[-1] + 4 * dens[1:-1:2].sum() + 2 * dens[2:-1:2].sum())
        return 0.5 + math.copysign(area, t)

    low, high = -1e3, 1e3
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def paired_log_ratio_interval(base: Sequence[float], new: Sequence[float], *, confidence: float = 0.95) -> PairedInterval:
    """t-interval on the mean of per-round log(new / base), for timings measured in paired rounds (baseline and
    candidate run back to back each round, so slow drift of the machine cancels in each pair).

    Ratios of timings are closer to log-normal than normal, so the mean and interval are taken on the log scale
    (a geometric-mean ratio, as in Fleming & Wallace 1986 and Kalibera & Jones 2013, "Rigorous benchmarking in
    reasonable time"); the t quantile with n - 1 degrees of freedom keeps a handful of rounds honest, where a
    bootstrap over 5 rounds would give intervals far too narrow."""
    base, new = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if base.shape != new.shape or base.ndim != 1 or len(base) < 2:
        raise ValueError(f"paired rounds need equal 1-D shapes of at least 2; found {base.shape} and {new.shape}")
    if not (np.all(base > 0) and np.all(new > 0)):
        raise ValueError("log-ratios need positive measurements")
    d = np.log(new) - np.log(base)
    n = len(d)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return PairedInterval(mean, mean - half, mean + half, confidence, n, "paired_t_log_ratio")
