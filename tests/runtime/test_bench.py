"""The runtime benchmark warms up before it measures and reports decode-only throughput beside end to end."""

from __future__ import annotations

import pytest


def test_bench_warms_up_and_times_decode_steps_apart(tiny_model_dir):
    from optforge.runtime.bench import Workload, bench_runtime
    from optforge.runtime.llm import LLM

    llm = LLM(tiny_model_dir, max_num_seqs=4, max_model_len=64)
    workload = Workload(input_len=16, output_len=12, num_requests=6, concurrency=3)
    result = bench_runtime(llm.engine, workload)
    assert result["warmup_s"] > 0 and result["steps"] > 0
    # the warm-up's requests are not in the measured run's counts
    assert result["output_tok_s"] == pytest.approx(6 * 12 / result["seconds"])
    assert result["decode_tok_s"] > 0
    cold = bench_runtime(llm.engine, workload, warmup=False)
    assert cold["warmup_s"] < result["warmup_s"]


def test_a_step_that_runs_prompt_tokens_is_marked(tiny_model_dir):
    from optforge.runtime.llm import LLM
    from optforge.runtime.sequence import SamplingParams

    llm = LLM(tiny_model_dir, max_model_len=64)
    llm.engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=3, ignore_eos=True))
    llm.engine.step()
    assert llm.engine.last_step_prefilled
    llm.engine.step()
    assert not llm.engine.last_step_prefilled
