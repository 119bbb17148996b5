"""A real CUDA device-side assert inside a step (an embedding index out of range, as an unchecked token id would
give) poisons the process's CUDA context. The engine must stop with DeviceLost (the server then answers /health
with 503) instead of failing every later request one by one while looking healthy. The assert makes the context
unusable, so the scenario runs in a subprocess of its own."""

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCENARIO = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig
    from optforge.runtime.llm import LLM, DeviceLost, EngineConfig
    from optforge.runtime.sequence import SamplingParams

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(cfg).cuda().eval()
    llm = LLM.from_model(model, None, EngineConfig(device="cuda", num_blocks=64, block_size=16, async_scheduling=False,
                                                  use_cuda_graphs=False))
    runner = llm.engine.runner
    forward = runner._forward_eager

    def out_of_range(batch, ids, *args):
        if 299 in ids:  # what an unchecked id would do inside the embedding lookup
            torch.nn.functional.embedding(torch.tensor([10**6], device="cuda"), model.model.embed_tokens.weight)
            torch.cuda.synchronize()
        return forward(batch, ids, *args)

    runner._forward_eager = out_of_range
    llm.engine.add_request("good", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    llm.engine.add_request("bad", [5, 299, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    try:
        while llm.engine.has_unfinished:
            llm.engine.step()
    except DeviceLost as exc:
        print("device lost:", exc)
        sys.exit(0)
    sys.exit("the engine went on after a device-side assert")
    """
)


def test_a_device_side_assert_stops_the_engine():
    done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "device lost" in done.stdout and "restart the server" in done.stdout
