"""Overlapped decode (`EngineConfig.async_scheduling`): the next greedy decode step is launched before the
previous one's tokens are read. On the CPU `ModelRunner.launch` runs at once, so these tests pin down the
engine's bookkeeping (what is launched, committed, finished and freed); the GPU tests check the overlap itself."""

from dataclasses import replace

import torch

from optforge.runtime.llm import Engine, EngineConfig, LLM
from optforge.runtime.sequence import SamplingParams

PROMPTS = [[5 + (3 * i + 11 * j) % 250 for j in range(4 + 3 * i)] for i in range(5)]
BASE = EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)


def hf_greedy(model, prompt, n):
    """Argmax of the HF model's own forward, n times (generate's min_new_tokens would mask eos, which this
    random model sometimes picks)."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def run(model, tokenizer, config, prompts, params):
    llm = LLM.from_model(model, tokenizer, config)
    outs = llm.generate(prompts, params)
    return llm.engine, outs


def assert_no_leaks(engine: Engine):
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    assert all(block.ref_count == 0 for block in bm.blocks)
    assert engine._inflight is None and not engine.has_unfinished


def test_overlap_runs_and_matches_hf_and_the_step_by_step_engine(tiny_llama, byte_tokenizer):
    lengths = [3, 9, 14, 1, 6]  # requests end at different steps, so the launched batch shrinks
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    expected = [hf_greedy(tiny_llama, p, n) for p, n in zip(PROMPTS, lengths)]
    engine, outs = run(tiny_llama, byte_tokenizer, BASE, PROMPTS, params)
    assert [o.token_ids for o in outs] == expected
    assert [o.finish_reason for o in outs] == ["length"] * len(PROMPTS)
    assert engine.num_overlapped_steps > 0
    assert_no_leaks(engine)
    sync, sync_outs = run(tiny_llama, byte_tokenizer, replace(BASE, async_scheduling=False), PROMPTS, params)
    assert sync.num_overlapped_steps == 0 and [o.token_ids for o in sync_outs] == expected
    assert engine.num_steps == sync.num_steps  # the same steps, only launched earlier


def test_stop_token_and_stop_string_drop_the_launched_row(tiny_llama, byte_tokenizer):
    free = run(tiny_llama, byte_tokenizer, BASE, PROMPTS[:3], SamplingParams(max_tokens=12, ignore_eos=True))[1]
    stop_tok = free[1].token_ids[4]
    params = [SamplingParams(max_tokens=12, ignore_eos=True), SamplingParams(max_tokens=12, stop_token_ids=(stop_tok,)),
              SamplingParams(max_tokens=12, stop=(free[2].text[3:5],), ignore_eos=True)]
    engine, outs = run(tiny_llama, byte_tokenizer, BASE, PROMPTS[:3], params)
    assert outs[0].token_ids == free[0].token_ids
    assert outs[1].finish_reason == "stop" and outs[1].token_ids == free[1].token_ids[: free[1].token_ids.index(stop_tok) + 1]
    assert outs[2].finish_reason == "stop" and free[2].text.startswith(outs[2].text) and len(outs[2].token_ids) < 12
    assert engine.num_overlapped_steps > 0
    assert_no_leaks(engine)
    # the last request stops on a token while the next step is launched: that step is read and dropped
    engine, outs = run(tiny_llama, byte_tokenizer, BASE, [PROMPTS[1]], params[1])
    assert outs[0].token_ids == free[1].token_ids[: free[1].token_ids.index(stop_tok) + 1]
    assert_no_leaks(engine)


def test_prefix_cache_after_overlapped_steps_holds_the_real_tokens(tiny_llama, byte_tokenizer):
    prompt = [7 + (5 * j) % 200 for j in range(10)]
    params = SamplingParams(max_tokens=11, ignore_eos=True)
    llm = LLM.from_model(tiny_llama, byte_tokenizer, BASE)
    first = llm.generate([prompt], params)[0]
    assert llm.engine.num_overlapped_steps > 0 and first.token_ids == hf_greedy(tiny_llama, prompt, 11)
    bm = llm.engine.block_manager
    full = prompt + first.token_ids  # 21 tokens, 20 computed: blocks 0-4 are full and hashed
    for block in bm.blocks:
        if block.hash is not None:
            assert any(block.token_ids == tuple(full[i : i + 4]) for i in range(0, 20, 4))
    again = llm.generate([full[:18]], params)[0]  # reuses the blocks written during overlapped steps
    assert again.num_cached_tokens == 16
    assert again.token_ids == hf_greedy(tiny_llama, full[:18], 11)
    assert_no_leaks(llm.engine)


def test_arrivals_and_aborts_between_overlapped_steps(tiny_llama, byte_tokenizer):
    engine = Engine(tiny_llama, byte_tokenizer, BASE)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    a = engine.add_request("a", PROMPTS[0], params)
    b = engine.add_request("b", PROMPTS[1], params)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None  # a step is launched and not read yet
    c = engine.add_request("c", PROMPTS[2], params)  # a waiting request ends the overlap for one step
    engine.step()
    assert engine._inflight is None
    engine.step()  # c's prefill
    for _ in range(3):
        engine.step()
    engine.abort("b")  # its row in the launched step is dropped, its blocks freed now
    kept = list(b.output_token_ids)
    while engine.has_unfinished:
        engine.step()
    assert b.finish_reason == "abort" and b.output_token_ids == kept
    assert kept == hf_greedy(tiny_llama, PROMPTS[1], 10)[: len(kept)]
    assert a.output_token_ids == hf_greedy(tiny_llama, PROMPTS[0], 10)
    assert c.output_token_ids == hf_greedy(tiny_llama, PROMPTS[2], 10)
    assert_no_leaks(engine)
    engine.add_request("d", PROMPTS[3], params)
    for _ in range(3):
        engine.step()
    engine.abort("d")  # the only request goes away while its next step is launched
    assert_no_leaks(engine)


def test_sampling_penalties_and_logprobs_are_not_overlapped(tiny_llama, byte_tokenizer):
    for params in (SamplingParams(max_tokens=6, temperature=0.7, seed=3, ignore_eos=True),
                   SamplingParams(max_tokens=6, repetition_penalty=1.3, ignore_eos=True),
                   SamplingParams(max_tokens=6, logprobs=1, ignore_eos=True)):
        engine, outs = run(tiny_llama, byte_tokenizer, BASE, PROMPTS[:2], params)
        sync_outs = run(tiny_llama, byte_tokenizer, replace(BASE, async_scheduling=False), PROMPTS[:2], params)[1]
        assert engine.num_overlapped_steps == 0
        assert [o.token_ids for o in outs] == [o.token_ids for o in sync_outs]
        assert_no_leaks(engine)


def test_greedy_repetition_penalty_is_applied(tiny_llama, byte_tokenizer):
    """The sampler's argmax shortcut is only for the raw logits: a penalty changes greedy picks."""
    plain = run(tiny_llama, byte_tokenizer, BASE, [PROMPTS[3]], SamplingParams(max_tokens=12, ignore_eos=True))[1][0]
    penalized = run(tiny_llama, byte_tokenizer, BASE, [PROMPTS[3]], SamplingParams(max_tokens=12, repetition_penalty=5.0, ignore_eos=True))[1][0]
    assert plain.token_ids != penalized.token_ids
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))


def test_overlap_under_a_tiny_cache_falls_back_without_leaks(tiny_llama, byte_tokenizer):
    config = replace(BASE, num_blocks=10, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    engine, outs = run(tiny_llama, byte_tokenizer, config, PROMPTS, params)
    assert [o.token_ids for o in outs] == [hf_greedy(tiny_llama, p, 12) for p in PROMPTS]
    assert engine.scheduler.num_preemptions > 0 and engine.num_overlapped_steps > 0
    assert_no_leaks(engine)


def test_no_overlap_while_the_token_budget_leaves_running_requests_out(tiny_llama, byte_tokenizer):
    """With 3 tokens per step and 5 running requests, each decode step runs a different subset: overlapping
    would repeat one subset and starve the others, so those steps run one by one."""
    config = replace(BASE, max_num_batched_tokens=3)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    llm = LLM.from_model(tiny_llama, byte_tokenizer, config)
    seqs = [llm.engine.add_request(str(i), p, params) for i, p in enumerate(PROMPTS)]
    while llm.engine.has_unfinished:
        llm.engine.step()
        assert llm.engine._inflight is None or len(llm.engine.scheduler.running) <= 3
    assert [s.output_token_ids for s in seqs] == [hf_greedy(tiny_llama, p, 6) for p in PROMPTS]
    assert_no_leaks(llm.engine)
