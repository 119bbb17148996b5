"""A runner failure tied to one request ends that request alone (finish_reason "error"); the others give the
tokens they give without it, in step-by-step and in overlapped decode, and no KV block leaks."""

import pytest

from optforge.runtime.llm import LLM, EngineConfig
from optforge.runtime.sequence import SamplingParams

PROMPTS = [[5 + (7 * i + j) % 250 for j in range(3 + 4 * i)] for i in range(4)]
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_poisoned_prompt_fails_alone(tiny_llama, byte_tokenizer, async_scheduling, poison):
    config = EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8, async_scheduling=async_scheduling)
    clean = LLM.from_model(tiny_llama, byte_tokenizer, config).generate(PROMPTS, PARAMS)
    llm = LLM.from_model(tiny_llama, byte_tokenizer, config)
    poison(llm.engine.runner, 299)
    outs = llm.generate(PROMPTS[:2] + [[10, 299, 11]] + PROMPTS[2:], PARAMS)
    assert [o.token_ids for o in outs[:2] + outs[3:]] == [o.token_ids for o in clean]
    assert outs[2].finish_reason == "error" and "RuntimeError" in outs[2].error and outs[2].token_ids == []
    assert [s.request_id for s in llm.engine.take_failed()] == [outs[2].request_id]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_a_token_generated_mid_decode_fails_its_request_alone(tiny_llama, byte_tokenizer, poison):
    """The fault comes with a generated token, inside overlapped decode steps (launched before they are read)."""
    config = EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8, async_scheduling=True)
    clean = LLM.from_model(tiny_llama, byte_tokenizer, config).generate(PROMPTS, PARAMS)
    victim = 1
    token = clean[victim].token_ids[4]
    others = [i for i, o in enumerate(clean) if i != victim and token not in o.token_ids and token not in PROMPTS[i]]
    assert len(others) >= 2, "pick another victim: the token is everywhere"
    assert token not in PROMPTS[victim] and token not in clean[victim].token_ids[:4]
    llm = LLM.from_model(tiny_llama, byte_tokenizer, config)
    poison(llm.engine.runner, token)
    outs = llm.generate(PROMPTS, PARAMS)
    assert outs[victim].finish_reason == "error" and outs[victim].token_ids == clean[victim].token_ids[:5]
    assert all(outs[i].token_ids == clean[i].token_ids for i in others)
    assert llm.engine.num_overlapped_steps > 0 and llm.engine.num_failed_steps >= 1
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_an_engine_error_is_not_swallowed(tiny_llama, byte_tokenizer, monkeypatch):
    """Only runner failures are isolated; a failure of the engine's own bookkeeping propagates (the server
    then marks itself dead rather than carry on with a broken state)."""
    llm = LLM.from_model(tiny_llama, byte_tokenizer, EngineConfig(num_blocks=64, block_size=4))
    monkeypatch.setattr(llm.engine.scheduler, "schedule", lambda: (_ for _ in ()).throw(RuntimeError("bookkeeping")))
    llm.engine.add_request("r", PROMPTS[0], PARAMS)
    with pytest.raises(RuntimeError, match="bookkeeping"):
        llm.engine.step()


def test_a_lost_device_stops_the_engine_instead_of_failing_requests_one_by_one(tiny_llama, byte_tokenizer, monkeypatch, poison):
    """A CUDA device-side assert poisons the context: every later call fails. The engine must then raise (the
    server reports itself dead, /health 503) rather than end each request with an error while looking healthy."""
    import types

    import torch

    from optforge.runtime.llm import DeviceLost

    llm = LLM.from_model(tiny_llama, byte_tokenizer, EngineConfig(num_blocks=64, block_size=4, async_scheduling=False))
    poison(llm.engine.runner, 299)
    monkeypatch.setattr(llm.engine.runner, "device", types.SimpleNamespace(type="cuda"))

    def poisoned_context(device=None):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(torch.cuda, "synchronize", poisoned_context)
    llm.engine.add_request("bad", [10, 299, 11], PARAMS)
    with pytest.raises(DeviceLost, match="restart the server"):
        while llm.engine.has_unfinished:
            llm.engine.step()
