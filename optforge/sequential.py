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


# ---- evaluating in looks: each look adds the next chunk of every eval's items ------------------------------


def item_counts(baseline: dict[str, dict]) -> dict[str, int]:
    """Items per eval in the baseline's full results: {"perplexity": passages, "<task>": documents}. Prompt
    agreement is not split (its reference outputs are one cached set), so it is absent."""
    counts = {}
    for name, result in baseline.items():
        head = name.split(".")[0]
        if head == "prompts":
            continue
        counts[head] = int(result["n"])
    return counts


def chunk_spec(spec, counts: dict[str, int], lo: float, hi: float):
    """The EvalSpec that scores items [lo * n, hi * n) of every split eval (rows relative to each eval's own
    selection); prompts only in the first chunk (lo == 0), whole."""
    def span(n: int) -> tuple[int, int]:
        return math.ceil(lo * n), math.ceil(hi * n)

    update: dict = {"prompts": spec.prompts if lo == 0 else None}
    ppl = spec.perplexity
    if ppl is not None:
        a, b = span(counts["perplexity"])
        update["perplexity"] = ppl.model_copy(update={"rows": (ppl.rows[0] + a, ppl.rows[0] + b)}) if b > a else None
    tasks = []
    for task in spec.tasks:
        a, b = span(counts[task.name])
        first = task.rows[0] if task.rows else 0
        if b > a:
            tasks.append(task.model_copy(update={"rows": (first + a, first + b), "limit": None}))
    update["tasks"] = tasks
    return spec.model_copy(update=update)


def _value(name: str, per_example: dict) -> float:
    if name == "perplexity":
        return math.exp(sum(per_example["nll"]) / max(sum(per_example["tokens"]), 1))
    values = next(iter(per_example.values()))
    return sum(values) / len(values) if values else float("nan")


def merge(parts: list[dict[str, dict]]) -> dict[str, dict]:
    """Metrics of consecutive chunks as one result per metric: per-example lists joined in order, value and n
    recomputed (seconds summed)."""
    merged: dict[str, dict] = {}
    for part in parts:
        for name, result in part.items():
            if name not in merged:
                merged[name] = {**result, "per_example": {k: list(v) for k, v in result["per_example"].items()}}
                continue
            into = merged[name]
            for k, v in result["per_example"].items():
                into["per_example"][k].extend(v)
            into["seconds"] = into.get("seconds", 0.0) + result.get("seconds", 0.0)
    for name, result in merged.items():
        result["n"] = len(next(iter(result["per_example"].values())))
        result["value"] = _value(name, result["per_example"])
    return merged


def prefix(baseline: dict[str, dict], measured: dict[str, dict]) -> dict[str, dict]:
    """The baseline's results on the items `measured` covers (the first n of each), values recomputed."""
    out = {}
    for name, result in baseline.items():
        if name not in measured:
            continue
        n = measured[name]["n"]
        per_example = {k: list(v[:n]) for k, v in result["per_example"].items()}
        out[name] = {**result, "per_example": per_example, "n": n, "value": _value(name, per_example)}
    return out


@dataclass(frozen=True)
class SequentialOutcome:
    results: list  # the gates' results at the look that decided (or the last look)
    metrics: dict[str, dict]  # the candidate's metrics on the items scored
    looks: int  # looks taken
    items: dict[str, int]  # items scored per eval
    total_items: dict[str, int]  # items a fixed-n gate scores per eval


def judge_in_looks(gates: list, baselines: list[dict[str, dict]], measure_chunk, judge) -> SequentialOutcome:
    """Judge `gates` (each against its baseline's full results) on growing prefixes of the eval items, stopping
    at the first look where every gate passes or any gate fails.

    `measure_chunk(lo, hi)` returns the candidate's metrics on items [lo * n, hi * n) of each eval (`chunk_spec`); `judge(gate, baseline, measured, confidence)` returns a gate result with `.verdict`. Every gate
    at look k uses confidence 1 - (alpha(t_k) - alpha(t_{k-1})), alpha = 1 - the gates' lowest confidence."""
    alpha = 1.0 - min(g.confidence for g in gates)
    counts: dict[str, int] = {}
    for baseline in baselines:
        counts.update(item_counts(baseline))
    total = max(counts.values(), default=1)
    looks = plan_looks(total, alpha)
    parts, lo, results, merged = [], 0.0, [], {}
    for k, look in enumerate(looks, start=1):
        hi = look.items / total
        parts.append(measure_chunk(lo, hi))
        merged = merge(parts)
        results = [judge(g, prefix(b, merged), merged, look.confidence) for g, b in zip(gates, baselines)]
        lo = hi
        if all(r.verdict == "pass" for r in results) or any(r.verdict == "fail" for r in results):
            break
    items = {name.split(".")[0]: r["n"] for name, r in merged.items()}
    return SequentialOutcome(results, merged, k, items, {**counts, **{n: v for n, v in items.items() if n not in counts}})
