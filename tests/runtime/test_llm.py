"""The engine on a tiny random Llama: greedy tokens equal HF generate, batching/caching on and off."""

import pytest
import torch

from optforge.runtime.llm import EngineConfig, LLM
from optforge.runtime.sequence import SamplingParams

PROMPTS = [[5 + (7 * i + j) % 250 for j in range(3 + 5 * i)] for i in range(6)] + [[5 + j % 250 for j in range(40)]] * 2


def hf_greedy(model, prompt, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


CONFIGS = {
    "batched+prefix": EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64),
    "one-at-a-time": EngineConfig(num_blocks=64, block_size=4, max_num_seqs=1, enable_prefix_caching=False),
    "chunked tiny budget": EngineConfig(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=7),
    "preempting tiny cache": EngineConfig(num_blocks=14, block_size=4, max_num_seqs=8, max_num_batched_tokens=32),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_matches_hf_generate(tiny_llama, byte_tokenizer, name):
    expected = [hf_greedy(tiny_llama, p, 12) for p in PROMPTS]
    llm = LLM.from_model(tiny_llama, byte_tokenizer, CONFIGS[name])
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    if name == "batched+prefix":
        assert outs[-1].num_cached_tokens >= 4  # the repeated 40-token prompt reused blocks of the first copy
    if name == "preempting tiny cache":
        assert llm.engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible_across_batches(tiny_llama, byte_tokenizer):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7, ignore_eos=True)
    alone = LLM.from_model(tiny_llama, byte_tokenizer, CONFIGS["one-at-a-time"]).generate([PROMPTS[2]], params)[0]
    batched = LLM.from_model(tiny_llama, byte_tokenizer, CONFIGS["batched+prefix"]).generate(PROMPTS[:4], params)[2]
    assert alone.token_ids == batched.token_ids


def test_stop_strings_tokens_and_logprobs(tiny_llama, byte_tokenizer):
    llm = LLM.from_model(tiny_llama, byte_tokenizer, CONFIGS["batched+prefix"])
    free_run = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop_tok = free_run.token_ids[3]
    out = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,), logprobs=2))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_tok
    assert len(out.token_ids) == free_run.token_ids.index(stop_tok) + 1
    assert len(out.logprobs) == len(out.token_ids) and all(lp["logprob"] <= 0 for lp in out.logprobs)
    text = free_run.text
    if len(text) >= 3:
        stop = text[2:3]
        cut = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=12, stop=(stop,), ignore_eos=True))[0]
        assert cut.finish_reason == "stop" and stop not in cut.text and text.startswith(cut.text)


def test_equal_length_prompts_prefill_in_one_batched_call(tiny_llama, byte_tokenizer):
    prompts = [[10 + i, 20 + i, 30 + i, 40, 50, 60, 70, 80, 90, 100, 110, 120 + i] for i in range(4)]
    expected = [hf_greedy(tiny_llama, p, 6) for p in prompts]
    llm = LLM.from_model(tiny_llama, byte_tokenizer, EngineConfig(num_blocks=64, block_size=4, enable_prefix_caching=False))
    assert [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))] == expected
    assert llm.engine.num_steps == 6  # one prefill step for all four, then five decode steps
