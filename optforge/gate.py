"""Quality gates: compare a pass's metrics with its baseline's and decide. Evaluated by the core, not by passes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from optforge.recipe import GateSpec

# Metrics where lower is better (an increase is a regression).
LOWER_IS_BETTER = {"perplexity"}


@dataclass(frozen=True)
class GateResult:
    metric: str
    baseline: float
    measured: float
    # The largest measured value that still passes, in the metric's units.
    threshold: float
    passed: bool
    # Human-readable rule, e.g. "perplexity increase <= 1.0% of baseline".
    rule: str
    change_pct: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"{self.metric}: baseline {self.baseline:.4f}, measured {self.measured:.4f} "
            f"({self.change_pct:+.2f}%), threshold {self.threshold:.4f} ({self.rule})"
        )


def evaluate_gate(spec: GateSpec, baseline: dict[str, dict], measured: dict[str, dict]) -> GateResult:
    if spec.metric not in measured or spec.metric not in baseline:
        from optforge.errors import RecipeError

        raise RecipeError(f"gate metric '{spec.metric}' is not computed by this recipe's evals (computed: {', '.join(sorted(measured)) or 'none'}); enable it under data.eval")
    base = float(baseline[spec.metric]["value"])
    value = float(measured[spec.metric]["value"])
    change_pct = (value - base) / base * 100.0
    if spec.metric not in LOWER_IS_BETTER:
        raise NotImplementedError(f"gate on '{spec.metric}': only lower-is-better metrics take max_increase_pct")
    threshold = base * (1.0 + spec.max_increase_pct / 100.0)
    return GateResult(
        metric=spec.metric,
        baseline=base,
        measured=value,
        threshold=threshold,
        passed=value <= threshold,
        rule=f"{spec.metric} increase <= {spec.max_increase_pct}% of baseline",
        change_pct=change_pct,
    )
