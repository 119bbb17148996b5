"""Overlapped decode on CUDA graphs: a step's input tokens come from the previous replay's argmax on the device
(`ModelRunner.launch`), with the host reading tokens one step behind. Greedy tokens must equal HF's forward and
the step-by-step engine's, across shrinking batches (graph sizes change), stops and aborts, with no leaked blocks."""

from dataclasses import replace

import pytest
import torch

from optforge.runtime.llm import Engine, EngineConfig, LLM
from optforge.runtime.sequence import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONFIG = EngineConfig(device="cuda", num_blocks=128, block_size=16, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def model(tiny_llama_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    return tiny_llama_factory(hidden=128, intermediate=256, head_dim=32).cuda()


def hf_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device="cuda")).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_overlapped_graphs_match_hf_across_batch_sizes_and_stops(model, byte_tokenizer):
    prompts = [[5 + (7 * i + 3 * j) % 250 for j in range(4 + 9 * i)] for i in range(6)]
    lengths = [40, 3, 25, 17, 1, 33]  # the launched batch shrinks 6 -> 5 -> 4 -> ...: graphs of sizes 8, 4, 2, 1
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, lengths)]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    llm = LLM.from_model(model, byte_tokenizer, CONFIG)
    assert llm.engine.runner.graphs and llm.engine.runner.decoder.decode_weights is not None
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.num_overlapped_steps > 30
    sync = LLM.from_model(model, byte_tokenizer, replace(CONFIG, async_scheduling=False))
    assert [o.token_ids for o in sync.generate(prompts, params)] == expected and sync.engine.num_overlapped_steps == 0

    stop_tok = expected[0][10]
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=40, stop_token_ids=(stop_tok,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == expected[0][: expected[0].index(stop_tok) + 1]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and llm.engine._inflight is None


def test_overlapped_batch1_with_arrivals_and_aborts(model, byte_tokenizer):
    engine = Engine(model, byte_tokenizer, CONFIG)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    prompts = [[9 + (5 * i + 7 * j) % 240 for j in range(20 + i)] for i in range(3)]
    a = engine.add_request("a", prompts[0], params)
    for _ in range(10):  # batch 1: the fused decode graph, overlapped
        engine.step()
    assert engine._inflight is not None
    b = engine.add_request("b", prompts[1], params)
    c = engine.add_request("c", prompts[2], params)
    for _ in range(8):
        engine.step()
    engine.abort("b")
    kept = list(b.output_token_ids)
    while engine.has_unfinished:
        engine.step()
    assert a.output_token_ids == hf_greedy(model, prompts[0], 30)
    assert c.output_token_ids == hf_greedy(model, prompts[2], 30)
    assert b.finish_reason == "abort" and kept == hf_greedy(model, prompts[1], 30)[: len(kept)]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
