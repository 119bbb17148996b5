"""Qwen3, Qwen3-MoE and Mixtral in the C++ runtime, on tiny random models (fp32) saved as HF saves them (the Hub's
per-expert tensor names; Mixtral's `block_sparse_moe`): 3 layers, 8 experts of width 32 with top-2 routing
(Qwen3-MoE: layer 1 a dense MLP; Mixtral: every layer sparse; Qwen3: q/k norms, no experts). Logits equal HF's;
greedy tokens equal HF `generate` through the Python engine with `--backend cpp` (batched, prefix caching) and the
C++ engine; an INT8 weight-only Qwen3-MoE artifact built by optforge (its experts quantized) gives the torch
runtime's tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from optforge.runtime.llm import LLM
from optforge.runtime.sequence import SamplingParams

NUM_NEW = 24
PROMPTS = [[3 + (11 * i + 7 * j * j) % 290 for j in range(20 + 4 * i)] for i in range(4)]
PROMPTS += [PROMPTS[3][:24] + [200 + j for j in range(8)]]
LOGIT_TOL = 3e-5  # fp32 summation order; measured below 1e-5


def make_model(model_type: str, path: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, tie_word_embeddings=False)
    if model_type == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=128, mlp_only_layers=[1],
                             norm_topk_prob=True)
    elif model_type == "mixtral":
        cfg = MixtralConfig(**common, num_local_experts=8, num_experts_per_tok=2, intermediate_size=32)
    else:
        cfg = Qwen3Config(**common, intermediate_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4.0) if p.dim() > 1 else p.copy_(1.0 + 0.2 * torch.randn_like(p))  # sharp routing; random norm weights
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "qwen3"])
def model_dir(request, tiny_model_dir, tmp_path_factory) -> Path:
    return make_model(request.param, tmp_path_factory.mktemp(request.param) / "model", tiny_model_dir)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_logits_equal_hf(rt, model_dir, hf_model):
    engine = rt.Engine(str(model_dir), num_threads=2)
    for ids in PROMPTS:
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(engine.last_logits(ids) - ref).max() < LOGIT_TOL


def test_greedy_tokens_equal_hf_generate(rt, model_dir, hf_model):
    with torch.inference_mode():
        expected = [hf_model.generate(torch.tensor([p]), max_new_tokens=NUM_NEW, do_sample=False, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
                    for p in PROMPTS]
    llm = LLM(model_dir, backend="cpp", num_threads=2, block_size=4)
    params = SamplingParams(max_tokens=NUM_NEW, ignore_eos=True)
    outs = llm.generate(PROMPTS[:4], params) + llm.generate(PROMPTS[4:], params)  # the last one after its prefix is cached
    assert [o.token_ids for o in outs] == expected
    assert outs[-1].num_cached_tokens >= 4
    tokens, _ = rt.Engine(str(model_dir), num_threads=2, block_size=4).generate(PROMPTS, NUM_NEW, ignore_eos=True)
    assert tokens == expected


def test_int8_experts_equal_the_torch_runtime(rt, model_dir, tmp_path, make_recipe, matches_torch):
    import optforge

    recipe = make_recipe(model_dir, tmp_path / "out", gate_pct=None, passes=[{"name": "quant.int8_weight_only"}])
    del recipe["data"]["eval"]
    matches_torch(rt, optforge.build(recipe, cache_dir=tmp_path / "cache").output, PROMPTS, LOGIT_TOL, NUM_NEW)


def test_what_it_cannot_run_is_refused(rt, model_dir, tmp_path):
    import json

    from optforge.errors import ArtifactError

    path = shutil.copytree(model_dir, tmp_path / "model")
    cfg = json.loads((path / "config.json").read_text())
    cfg["attention_bias"] = True
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="cannot load it") as info:
        LLM(path, backend="cpp", num_threads=1)
    assert "attention_bias: true is not supported by the C++ runtime for " + cfg["model_type"] in str(info.value)
