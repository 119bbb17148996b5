"""The quantization passes on a mixture-of-experts model: a tiny random Qwen3-MoE (`qwen3_moe`; layers 0 and 2 sparse
blocks of 8 experts with top-2 routing, layer 1 a dense MLP) saved as HF saves it. The passes quantize the
attention and dense-MLP Linears, never the routers, and leave the experts (3D parameters, not Linears) float:
they warn with their names and bytes, and the layout's precision table lists them. The artifact serves the tokens
HF generates on it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from optforge.model_io import load_model
from optforge.passes.quant.output import FLOAT_EXPERTS, FLOAT_ROUTER
from optforge.passes.targets import expert_parameters, pass_targets, routers, select_linears

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A router sends each token to two of eight experts, and their outputs are mixed by its weights.",
    "Numbers like 12345 and 3.14159 appear in text too.",
]
SCHEMES = {
    "int8-weight-only": ([{"name": "quant.int8_weight_only"}], "int8 channel sym (rtn)"),
    "int4-rtn": ([{"name": "quant.rtn", "config": {"bits": 4, "group_size": 16}}], "int4 g16 sym (rtn)"),
}
SPARSE, DENSE = (0, 2), 1
EXPERT_TENSORS = [f"model.layers.{i}.mlp.experts.{w}" for i in SPARSE for w in ("gate_up_proj", "down_proj")]
ROUTERS = [f"model.layers.{i}.mlp.gate" for i in SPARSE]


def make_tiny_qwen3_moe(path: Path | None = None, seed: int = 0):
    """A 3-layer random Qwen3MoeForCausalLM (hidden 64, GQA 4/2 of 16, 8 experts of width 32, top-2; layer 1 dense
    through `mlp_only_layers`), weights x4 for sharper logits and routing. With `path`: written there by HF's
    `save_pretrained` with a trained BPE tokenizer, and the path returned; else the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                         num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[DENSE], num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    if path is None:
        return model
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen3_moe(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-moe")


@pytest.fixture
def build_moe(tiny_moe_dir, tmp_path_factory, make_recipe):
    """build_moe(name) -> BuildResult of the tiny Qwen3-MoE through SCHEMES[name], one cache per session."""
    import optforge

    root = tmp_path_factory.getbasetemp() / "qwen3-moe"

    def run(name: str):
        recipe = make_recipe(tiny_moe_dir, root / name, gate_pct=None, passes=SCHEMES[name][0])
        recipe["name"] = f"tiny-qwen3-moe-{name}"
        del recipe["data"]["eval"]  # the checks below are the layout, the weights and the served tokens
        return optforge.build(recipe, cache_dir=root / "cache")

    return run


def test_routers_are_never_targets_and_experts_are_named():
    model = make_tiny_qwen3_moe()
    assert set(expert_parameters(model)) == set(EXPERT_TENSORS) and set(routers(model)) == set(ROUTERS)
    assert not any(isinstance(m, nn.Linear) for m in routers(model).values())  # transformers 5.x: a router module with a weight
    # Older transformers and other MoE families hold an nn.Linear router: excluded by name, whatever include says
    model.model.layers[0].mlp.gate = nn.Linear(64, 8, bias=False)
    chosen = select_linears(model, (r".*",), ())
    assert "model.layers.0.mlp.gate" not in chosen
    assert {f"model.layers.{DENSE}.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")} <= set(chosen)
    assert not any(".experts" in name for name in chosen)
    assert len(chosen) == 3 * 4 + 3 + 1  # q/k/v/o per layer, the dense MLP, lm_head


def test_pass_targets_warns_of_the_float_experts_and_their_bytes(caplog):
    model = make_tiny_qwen3_moe()
    size = sum(p.numel() * 4 for p in expert_parameters(model).values())  # fp32
    assert size == 2 * 8 * (64 * 64 + 64 * 32) * 4
    with caplog.at_level(logging.WARNING, logger="optforge.passes.targets"):
        pass_targets("quant.rtn", model, (r".*",), (r"lm_head$",))
    (record,) = [r for r in caplog.records if "MoE expert" in r.getMessage()]
    message = record.getMessage()
    assert message.startswith(f"quant.rtn: 4 MoE expert weight tensors, {size} bytes")
    assert "model.layers.*.mlp.experts.gate_up_proj (2 layers)" in message and "model.layers.*.mlp.experts.down_proj (2 layers)" in message


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantized_moe_keeps_router_and_experts_float_and_says_so(build_moe, tiny_moe_dir, name):
    out = build_moe(name).output
    layout = json.loads((out / "optforge.json").read_text())
    label = SCHEMES[name][1]
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    dense_mlp = {f"model.layers.{DENSE}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(layout["modules"]) == attention | dense_mlp
    precision = layout["precision"]
    assert all(precision[n] == label for n in attention | dense_mlp)
    assert {n: precision[n] for n in EXPERT_TENSORS} == dict.fromkeys(EXPERT_TENSORS, FLOAT_EXPERTS)
    assert {n: precision[n] for n in ROUTERS} == dict.fromkeys(ROUTERS, FLOAT_ROUTER)
    assert precision["lm_head"] == "float"
    assert layout["quantization"]["float_experts"] == {"tensors": 4, "bytes": 2 * 8 * (64 * 64 + 64 * 32) * 4}
    # the compressed-tensors block targets exactly the quantized Linears
    targets = [t for g in json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(f"re:^{n.replace('.', chr(92) + '.')}$" for n in attention | dense_mlp)
    base, _ = load_model(tiny_moe_dir)
    ours, _ = load_model(out)
    for tensor in EXPERT_TENSORS + [f"{r}.weight" for r in ROUTERS]:
        got, want = ours.get_parameter(tensor), base.get_parameter(tensor)
        assert got.dtype == torch.float32 and torch.equal(got, want), tensor
    assert type(ours.model.layers[0].self_attn.q_proj) is not nn.Linear  # quantized modules reloaded


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantized_moe_serves_the_tokens_hf_generates(build_moe, name):
    """The runtime on the reloaded artifact (quantized Linears, float experts and routers) gives HF generate's greedy
    tokens on the same loaded model, batched, and from cached prefix blocks."""
    from optforge.runtime.llm import EngineConfig, LLM
    from optforge.runtime.sequence import SamplingParams

    model, tokenizer = load_model(build_moe(name).output)
    prompts = [[3 + (11 * i + 7 * j * j) % 290 for j in range(20 + 4 * i)] for i in range(4)]
    prompts.append(prompts[3][:24] + [100 + j for j in range(8)])  # shares 6 blocks of 4 with the one before
    model.generation_config.eos_token_id = None  # HF runs every token, as `ignore_eos` does (EOS not banned, not stopping)
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert all(len(e) == 24 for e in expected)
    llm = LLM.from_model(model, tokenizer, EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=64))
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts[:4], params) + llm.generate(prompts[4:], params)  # the last one after its prefix is cached
    assert [o.token_ids for o in outs] == expected
    assert outs[-1].num_cached_tokens == 24
