"""Quality gates: compare a pass's per-example results with its baseline's, paired, and decide.

Evaluated by the core, never by a pass. A gate names a metric and the largest allowed drop; the drop's
interval (at the gate's confidence) comes from `optforge.evals.stats`:
- perplexity: paired bootstrap over passages of log(ppl_new / ppl_base), reported as percent increase;
- accuracy (`<task>.acc`, `<task>.acc_norm`, `<task>.exact_match`, `prompts.exact_match`): Agresti-Min interval on the paired difference in points, with
  McNemar's exact p-value alongside.
Verdict: pass when the whole interval is within the threshold, fail when all of it is beyond, else undecided
with the number of items that would likely decide; the recipe's `on_undecided` says what undecided does.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from optforge.errors import RecipeError
from optforge.recipe import GateSpec

# Metrics where lower is better (an increase is a regression).
LOWER_IS_BETTER = {"perplexity"}


@dataclass(frozen=True)
class GateOutcome:
    """What every gate result holds, quality or speed: the keys reports, JUnit and the CLI read."""

    metric: str
    baseline: float
    measured: float
    # The point value at the threshold (the largest perplexity or smallest accuracy a sure pass allows).
    threshold: float
    passed: bool
    # Human-readable rule, e.g. "perplexity increase <= 1.0% of baseline at 95% confidence".
    rule: str
    change_pct: float
    # "pass" | "fail" | "undecided"; `passed` also depends on the recipe's on_undecided.
    verdict: str
    # The drop (positive = worse; percent for perplexity, points for accuracy) and its interval.
    drop: float
    ci_low: float
    ci_high: float
    max_drop: float
    confidence: float
    n: int
    needed_n: int | None
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GateResult(GateOutcome):
    p_value: float | None = None

    def describe(self) -> str:
        unit = "%" if self.metric in LOWER_IS_BETTER else " pts"
        if self.method == "not finite":
            return f"{self.metric}: baseline {self.baseline:.4f}, measured {self.measured:.4f}: {self.rule}"
        text = (
            f"{self.metric}: baseline {self.baseline:.4f}, measured {self.measured:.4f}; drop {self.drop:+.2f}{unit} "
            f"[{self.ci_low:+.2f}, {self.ci_high:+.2f}] at {self.confidence:.0%} on n={self.n} vs allowed {self.max_drop:.2f}{unit}: {self.verdict}"
        )
        if self.verdict == "undecided":
            text += f" (about {self.needed_n} items would decide)" if self.needed_n else " (the drop sits on the threshold)"
        return text


def resolve_metric(name: str, available: dict) -> str:
    """`arc_easy` means `arc_easy.acc_norm` where the task has it, else `arc_easy.acc`; `triviaqa` means
    `triviaqa.exact_match`."""
    if name in available:
        return name
    for suffix in (".acc_norm", ".acc", ".exact_match"):
        if name + suffix in available:
            return name + suffix
    raise RecipeError(f"gate metric '{name}' is not computed by this recipe's evals (computed: {', '.join(sorted(available)) or 'none'}); enable it under data.eval")


def evaluate_gate(spec: GateSpec, baseline: dict[str, dict], measured: dict[str, dict]) -> GateResult:
    from optforge.evals import stats

    metric = resolve_metric(spec.metric, measured)
    if metric not in baseline:
        raise RecipeError(f"gate metric '{metric}' is missing from the baseline's evals")
    base, new = baseline[metric], measured[metric]
    base_value, new_value = float(base["value"]), float(new["value"])
    if not _all_finite(base) or not _all_finite(new):
        return _not_finite(spec, metric, base_value, new_value, n=int(new.get("n", 0)), baseline_bad=not _all_finite(base))
    if metric in LOWER_IS_BETTER:
        interval = _perplexity_interval(base["per_example"], new["per_example"], spec.confidence)
        drop, low, high = (100.0 * math.expm1(x) for x in (interval.diff, interval.low, interval.high))
        max_drop = float(spec.max_increase_pct)
        threshold = base_value * (1.0 + max_drop / 100.0)
        rule = f"{metric} increase <= {max_drop}% of baseline"
        p_value = None
    else:
        b, m = base["per_example"]["correct"], new["per_example"]["correct"]
        if len(b) != len(m):
            raise RecipeError(f"gate on '{metric}': baseline has {len(b)} items, measured {len(m)}; paired gates need the same items")
        interval = stats.paired_proportion_interval(b, m, confidence=spec.confidence)
        drop, low, high = -100.0 * interval.diff, -100.0 * interval.high, -100.0 * interval.low
        max_drop = float(spec.max_drop) if spec.max_drop is not None else float(spec.max_drop_pct) * base_value
        threshold = base_value - max_drop / 100.0
        rule = f"{metric} drop <= {max_drop:.2f} points" + (f" ({spec.max_drop_pct}% of baseline)" if spec.max_drop_pct is not None else "")
        p_value = stats.mcnemar(b, m).p_value
    decided = stats.verdict(drop, low, high, max_drop, interval.n)
    passed = decided.verdict == "pass" or (decided.verdict == "undecided" and spec.on_undecided == "pass")
    return GateResult(
        metric=metric,
        baseline=base_value,
        measured=new_value,
        threshold=threshold,
        passed=passed,
        rule=f"{rule} at {spec.confidence:.0%} confidence",
        change_pct=(new_value - base_value) / base_value * 100.0 if base_value else 0.0,
        verdict=decided.verdict,
        drop=drop,
        ci_low=low,
        ci_high=high,
        max_drop=max_drop,
        confidence=spec.confidence,
        n=interval.n,
        needed_n=decided.needed_n,
        method=interval.method,
        p_value=p_value,
    )


def _all_finite(result: dict) -> bool:
    """The value and every per-example number of a metric result are finite (a NaN loss is not a number to
    compare, and an interval over it is meaningless)."""
    import numpy as np

    per_example = result.get("per_example") or {}
    arrays = [np.asarray(v, dtype=float) for k, v in per_example.items() if k in ("nll", "correct")]
    return math.isfinite(float(result["value"])) and all(bool(np.isfinite(a).all()) for a in arrays)


def _not_finite(spec: GateSpec, metric: str, base_value: float, new_value: float, *, n: int, baseline_bad: bool) -> GateResult:
    """A failed gate for a model whose metric came out NaN or infinite: it cannot be judged, so it fails."""
    which = "the baseline's" if baseline_bad else "the measured"
    max_drop = float(spec.max_increase_pct if metric in LOWER_IS_BETTER else (spec.max_drop if spec.max_drop is not None else spec.max_drop_pct))
    return GateResult(
        metric=metric, baseline=base_value, measured=new_value, threshold=float("nan"), passed=False,
        rule=f"{metric}: {which} values are not finite (NaN or infinite), so the model cannot pass",
        change_pct=float("nan"), verdict="fail", drop=float("inf"), ci_low=float("inf"), ci_high=float("inf"),
        max_drop=max_drop, confidence=spec.confidence, n=n, needed_n=None, method="not finite",
    )


def _perplexity_interval(base: dict, new: dict, confidence: float):
    """Paired bootstrap of log(ppl_new) - log(ppl_base); ppl = exp(sum nll / sum tokens) over passages."""
    import numpy as np

    from optforge.evals import stats

    if base["tokens"] != new["tokens"]:
        raise RecipeError("gate on perplexity: baseline and measured scored different passages or token counts; paired gates need the same items")
    b = np.column_stack([base["nll"], base["tokens"]])
    m = np.column_stack([new["nll"], new["tokens"]])
    return stats.paired_bootstrap(b, m, statistic=lambda x: float(x[:, 0].sum() / max(x[:, 1].sum(), 1.0)), confidence=confidence)
