"""Gates on synthetic per-example results: all three verdicts, on_undecided, the perplexity gate's result keys."""

from __future__ import annotations

import numpy as np
import pytest

from optforge.errors import RecipeError
from optforge.gate import evaluate_gate
from optforge.recipe import GateSpec


def _acc(correct) -> dict:
    return {"arc_easy.acc": {"value": float(np.mean(correct)), "per_example": {"correct": list(map(int, correct))}}}


def _ppl(nll, tokens) -> dict:
    return {"perplexity": {"value": float(np.exp(np.sum(nll) / np.sum(tokens))), "per_example": {"nll": list(nll), "tokens": list(tokens)}}}


def test_perplexity_gate_result_has_the_manifest_keys_and_passes_a_tiny_change():
    rng = np.random.default_rng(0)
    tokens = [200] * 40
    nll = rng.uniform(500, 700, size=40)
    spec = GateSpec(metric="perplexity", max_increase_pct=1.0)
    result = evaluate_gate(spec, _ppl(nll, tokens), _ppl(nll * 1.0005 + rng.normal(0, 0.05, 40), tokens)).to_dict()
    # What every manifest's `gates` entries hold (cli.py and report.py read these keys directly).
    assert set(result) == {"metric", "baseline", "measured", "threshold", "passed", "rule", "change_pct", "verdict", "drop", "ci_low",
                           "ci_high", "max_drop", "confidence", "n", "needed_n", "method", "p_value"}
    assert result["verdict"] == "pass" and result["passed"]
    assert result["threshold"] == pytest.approx(result["baseline"] * 1.01)
    assert result["ci_low"] <= result["drop"] <= result["ci_high"] < 1.0


def test_perplexity_gate_fails_a_clear_increase():
    tokens = [100] * 30
    nll = np.linspace(250, 350, 30)
    result = evaluate_gate(GateSpec(metric="perplexity", max_increase_pct=1.0), _ppl(nll, tokens), _ppl(nll + 20, tokens))
    assert result.verdict == "fail" and not result.passed
    assert result.ci_low > 1.0


def test_accuracy_gate_pass_fail_undecided():
    base = np.array([1] * 600 + [0] * 400)
    same_but_two = base.copy()
    same_but_two[:2] = 0
    spec = GateSpec(metric="arc_easy.acc", max_drop=2.0)
    assert evaluate_gate(spec, _acc(base), _acc(same_but_two)).verdict == "pass"

    worse = base.copy()
    worse[:100] = 0  # 10-point drop
    failed = evaluate_gate(spec, _acc(base), _acc(worse))
    assert failed.verdict == "fail" and failed.p_value < 1e-6

    small = evaluate_gate(spec, _acc(base[:20]), _acc(base[:20]))
    assert small.verdict == "undecided" and not small.passed
    assert small.needed_n > 20
    lenient = evaluate_gate(spec.model_copy(update={"on_undecided": "pass"}), _acc(base[:20]), _acc(base[:20]))
    assert lenient.verdict == "undecided" and lenient.passed


def test_relative_drop_and_task_shorthand():
    base = np.array([1] * 500 + [0] * 500)
    worse = base.copy()
    worse[:40] = 0  # 4 points = 8% of 50
    spec = GateSpec(metric="arc_easy", max_drop_pct=2.0)  # 2% of 0.5 = 1 point
    result = evaluate_gate(spec, _acc(base), _acc(worse))
    assert result.metric == "arc_easy.acc" and result.max_drop == pytest.approx(1.0)
    assert result.verdict == "fail"


def test_gate_specs_validate_thresholds():
    with pytest.raises(ValueError, match="exactly one threshold"):
        GateSpec(metric="arc_easy.acc")
    with pytest.raises(ValueError, match="exactly one threshold"):
        GateSpec(metric="arc_easy.acc", max_drop=1.0, max_drop_pct=1.0)
    with pytest.raises(ValueError, match="max_increase_pct"):
        GateSpec(metric="perplexity", max_drop=1.0)
    with pytest.raises(ValueError, match="higher-is-better"):
        GateSpec(metric="arc_easy.acc", max_increase_pct=1.0)


def test_unknown_metric_names_what_is_computed():
    with pytest.raises(RecipeError, match="arc_easy.acc"):
        evaluate_gate(GateSpec(metric="hellaswag", max_drop=1.0), _acc([1, 0]), _acc([1, 0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_metric_fails_the_gate_instead_of_crashing(bad):
    tokens = [200] * 10
    nll = np.full(10, 600.0)
    spec = GateSpec(metric="perplexity", max_increase_pct=1.0)
    poisoned = nll.copy()
    poisoned[3] = bad
    result = evaluate_gate(spec, _ppl(nll, tokens), _ppl(poisoned, tokens))
    assert result.verdict == "fail" and not result.passed and "not finite" in result.describe()
    acc = evaluate_gate(GateSpec(metric="arc_easy.acc", max_drop=2.0), _acc([1, 0] * 10), {"arc_easy.acc": {"value": bad, "per_example": {"correct": [1, 0] * 10}}})
    assert acc.verdict == "fail" and not acc.passed
