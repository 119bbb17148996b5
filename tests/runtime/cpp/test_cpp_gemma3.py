"""Gemma-3 (gemma3_text) in the C++ runtime, on a tiny random Gemma3ForCausalLM (fp32): 4 layers (sliding,
sliding, full, sliding), sliding window 8, rotary base 100 on the sliding layers and 10000 on the full one, norm
weights random (Gemma's x * (1 + w)), prompts of 20-38 tokens, so windows end inside KV blocks and cross their
borders. Logits equal HF's within LOGIT_TOL; greedy tokens equal HF `generate` through the Python engine with
`--backend cpp` (batched with prefix caching, one at a time, chunked prefill with preemption) and through the
C++ engine; an int8 weight-only artifact built by optforge gives the torch runtime's tokens (int4: its
dequantized logits); configs the C++
forward cannot compute are refused with the key that says why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from optforge.errors import ArtifactError
from optforge.model_io import load_model
from optforge.runtime.llm import LLM
from optforge.runtime.sequence import SamplingParams

WINDOW = 8
NUM_NEW = 32
# Prompts of 20-36 tokens below the tokenizer's 300 ids; one shares 28 tokens (7 blocks of 4) with the one before
# it, and one repeats: prefix caching hands over blocks whose keys lie outside the window of the first new token.
PROMPTS = [[3 + (11 * i + 7 * j * j) % 290 for j in range(20 + 4 * i)] for i in range(5)]
PROMPTS += [PROMPTS[4][:28] + [200 + j for j in range(10)], PROMPTS[4]]
# Max |C++ logits - HF logits| (logits up to ~2.5 here): measured 3.4e-6 (fp32 summation order); 10x that.
LOGIT_TOL = 3e-5
# Weight-only int8 / int4 vs the torch runtime's model of the same artifact (int4: its dequantized fp32 matmuls):
# measured 2.6e-6 (fp32 summation order); 10x that.
WEIGHT_ONLY_TOL = 3e-5


def make_tiny_gemma3(build, path: Path, tokenizer_dir: Path, **overrides) -> Path:
    """`build` (the tiny_gemma3_model fixture) with the tiny Llama's 300-token BPE tokenizer, saved with save_pretrained."""
    model = build(sliding_window=WINDOW, vocab_size=300, **overrides)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def hf_generate(path: Path, prompts, n: int = NUM_NEW) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dir, tmp_path_factory, tiny_gemma3_model) -> Path:
    return make_tiny_gemma3(tiny_gemma3_model, tmp_path_factory.mktemp("gemma3") / "tiny-gemma3", tiny_model_dir)


@pytest.fixture(scope="module")
def hf_tokens(gemma_dir):
    return hf_generate(gemma_dir, PROMPTS)


@pytest.mark.parametrize("overrides", [
    {},
    # a logit cap, and linear rope scaling on the full layer (HF 5.x: rope_parameters per layer type)
    {"final_logit_softcapping": 2.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
], ids=["base", "softcap-linear-rope"])
def test_logits_equal_hf(rt, tiny_model_dir, tmp_path, overrides, tiny_gemma3_model):
    from transformers import AutoModelForCausalLM

    path = make_tiny_gemma3(tiny_gemma3_model, tmp_path / "gemma", tiny_model_dir, **overrides)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = rt.Engine(str(path), num_threads=2)
    for ids in PROMPTS:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(engine.last_logits(ids) - ref).max() < LOGIT_TOL


@pytest.mark.parametrize("options", [
    {},  # prefix caching on: a warm-up run of prompt 4 leaves blocks that prompts 4, 5 and 6 reuse
    {"enable_prefix_caching": False, "max_num_seqs": 1},
    {"num_blocks": 24, "block_size": 4, "max_num_batched_tokens": 8},  # chunked prefill, preemption by recompute
], ids=["batched-prefix-cache", "one-at-a-time", "chunked-preempted"])
def test_greedy_tokens_equal_hf_generate(rt, gemma_dir, hf_tokens, options):
    llm = LLM(gemma_dir, backend="cpp", num_threads=2, **{"block_size": 4, **options})
    if not options:
        llm.generate(PROMPTS[4:5], SamplingParams(max_tokens=2, ignore_eos=True))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == hf_tokens
    if not options:
        assert llm.engine.block_manager.num_prefix_hits > 0
    if options.get("num_blocks"):
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.runner.num_blocks  # nothing leaked


def test_cpp_engine_greedy_equals_hf_generate(rt, gemma_dir, hf_tokens):
    engine = rt.Engine(str(gemma_dir), num_threads=2, block_size=4)
    tokens, _ = engine.generate(PROMPTS, NUM_NEW, ignore_eos=True)
    assert tokens == hf_tokens


def build_gemma(gemma_dir, root: Path, make_recipe, passes: list) -> Path:
    import optforge

    recipe = make_recipe(gemma_dir, root / "out", gate_pct=None, passes=passes)
    recipe["name"] = "tiny-gemma3-quantized"
    return optforge.build(recipe, cache_dir=root / "cache").output


def test_int8_weight_only_equals_the_torch_runtime(rt, gemma_dir, tmp_path, make_recipe, matches_torch):
    path = build_gemma(gemma_dir, tmp_path, make_recipe, [{"name": "quant.int8_weight_only"}])
    matches_torch(rt, path, PROMPTS, WEIGHT_ONLY_TOL, NUM_NEW)


def test_int4_weight_only_computes_its_dequantized_weights(rt, gemma_dir, tmp_path, make_recipe):
    """int4 groups of 32: the logits of the torch model whose Linears multiply q * scale in fp32 (the torch int4
    CPU kernel rounds activations and scales to bf16, so its own logits are further off)."""
    path = build_gemma(gemma_dir, tmp_path, make_recipe, [{"name": "quant.rtn", "config": {"bits": 4, "group_size": 32}}])
    engine = rt.Engine(str(path), num_threads=2)
    assert (engine.weight_format, engine.activations) == ("int4", "fp32")
    model, _ = load_model(path, dtype="float32", device="cpu")
    for module in model.modules():
        if hasattr(module, "dequantized"):
            module.forward = lambda x, m=module: torch.nn.functional.linear(x, m.dequantized(), m.bias)
    for ids in PROMPTS[:3]:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(engine.last_logits(ids) - ref).max() < WEIGHT_ONLY_TOL


@pytest.mark.parametrize("key,value,message", [
    ("attn_logit_softcapping", 50.0, "'attn_logit_softcapping' 50"),
    ("hidden_activation", "gelu", "'hidden_activation' \"gelu\""),
    ("rope_parameters", {"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 1e6}},
     "rope_type 'yarn'"),
])
def test_what_it_cannot_run_is_refused(rt, gemma_dir, tmp_path, key, value, message):
    path = shutil.copytree(gemma_dir, tmp_path / "gemma")
    cfg = json.loads((path / "config.json").read_text())
    cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="cannot load it") as info:
        LLM(path, backend="cpp", num_threads=1)
    assert message in str(info.value) and "not supported by the C++ runtime" in str(info.value)
