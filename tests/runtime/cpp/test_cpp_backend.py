"""`--backend cpp`: the Python engine (scheduler, block manager, sampler) over the C++ model and KV cache.
Greedy tokens equal the torch backend's; prefix caching, copy-on-write and a tiny cache (preemption) keep them
so; sampling options and the CLI go through."""

from __future__ import annotations

import pytest

from optforge.runtime.llm import LLM
from optforge.runtime.sequence import SamplingParams

PROMPTS = [[5, 17, 42, 99, 7] * 4, [5, 17, 42, 99, 7] * 4 + [3, 3], [120, 4, 56, 78, 90, 11, 23, 250, 8, 9], [3, 3, 3]]


@pytest.fixture(scope="module")
def torch_tokens(tiny_model_dir):
    llm = LLM(tiny_model_dir, enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))]


@pytest.mark.parametrize("options", [
    {},  # prefix caching on: a warm-up run of prompt 0 leaves blocks that prompts 0 and 1 reuse
    {"enable_prefix_caching": False, "max_num_seqs": 1},
    {"num_blocks": 10, "block_size": 4, "max_num_batched_tokens": 8},  # chunked prefill, preemption by recompute
])
def test_greedy_tokens_equal_the_torch_backend(rt, tiny_artifact, torch_tokens, options):
    llm = LLM(tiny_artifact, backend="cpp", num_threads=2, **options)
    if not options:
        llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
    assert [o.token_ids for o in outs] == torch_tokens
    if not options:
        assert llm.engine.block_manager.num_prefix_hits > 0
    if options.get("num_blocks"):
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.runner.num_blocks  # nothing leaked


def test_sampling_is_seeded_and_stops(rt, tiny_artifact):
    llm = LLM(tiny_artifact, backend="cpp", num_threads=1)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)
    first, again = (llm.generate([PROMPTS[2]], params)[0] for _ in range(2))
    assert first.token_ids == again.token_ids and len(first.token_ids) == 12
    assert len(first.logprobs) == 12 and all(len(lp["top"]) == 2 for lp in first.logprobs)
    stop = first.token_ids[3]
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=7, stop_token_ids=(stop,), ignore_eos=True)
    stopped = llm.generate([PROMPTS[2]], params)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == first.token_ids[: first.token_ids.index(stop) + 1]  # same draws up to the stop token


def test_cpp_backend_refuses_cuda_and_bf16(rt, tiny_artifact):
    from optforge.errors import UserInputError

    with pytest.raises(UserInputError, match="CPU"):
        LLM(tiny_artifact, backend="cpp", device="cuda")
    with pytest.raises(UserInputError, match="float32"):
        LLM(tiny_artifact, backend="cpp", dtype="bfloat16")


def test_generate_cli_with_the_cpp_backend(rt, tiny_artifact, torch_tokens):
    from typer.testing import CliRunner

    from optforge.cli import app

    result = CliRunner().invoke(app, ["generate", str(tiny_artifact), "hello", "--backend", "cpp", "--threads", "1", "--max-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert '"completion_tokens": 8' in result.output or '"finish_reason": "stop"' in result.output
