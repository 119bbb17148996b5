"""The runtime loads an artifact built by `optforge build` (INT8 weight-only layers) and serves it:
the quantized modules run inside our forward, and greedy tokens equal HF generate on the same artifact."""

import optforge
from optforge.formats.int8 import Int8WeightOnlyLinear
from optforge.model_io import load_model
from optforge.runtime.llm import LLM, EngineConfig
from optforge.runtime.sequence import SamplingParams


def test_int8_artifact_generates_like_hf(tiny_model_dir, tmp_path, cache_dir, make_recipe, hf_greedy):
    out = tmp_path / "artifact"
    optforge.build(make_recipe(tiny_model_dir, out, gate_pct=None), cache_dir=cache_dir)
    model, tok = load_model(out)
    prompts = ["def add(a, b):", "The river"]
    expected, _ = hf_greedy(model, [tok.encode(p) for p in prompts], 10)
    llm = LLM(out, EngineConfig(num_blocks=64, block_size=4))
    layer = llm.engine.runner.decoder.layers[0].self_attn.q_proj
    assert isinstance(layer, Int8WeightOnlyLinear)
    outs = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert layer.kernel == "dequantize+matmul"  # the quantized module ran inside the runtime's forward
