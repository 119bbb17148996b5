"""The quantization passes on a mixture-of-experts model: a tiny random Qwen3-MoE (`qwen3_moe`; layers 0 and 2 sparse
blocks of 8 experts with top-2 routing, layer 1 a dense MLP) saved as HF saves it, and a tiny Mixtral. optforge's
loader splits HF's 3D expert tensors into one Linear MLP per expert (formats/experts.py), so every quantization pass
quantizes the experts like any other Linear, never the routers; calibration shows every expert every token; the
artifact stores the Hub's per-expert names, serves the tokens HF generates on it, and (int4, FP8) loads in plain
transformers. Experts an architecture keeps as 3D tensors optforge cannot split are left float, with a warning."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from optforge.formats.experts import LinearExperts, count_tokens, unfuse_experts
from optforge.model_io import load_model, save_model
from optforge.passes.quant.output import FLOAT_ROUTER
from optforge.passes.targets import expert_parameters, pass_targets, routers, select_linears

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A router sends each token to two of eight experts, and their outputs are mixed by its weights.",
    "Numbers like 12345 and 3.14159 appear in text too.",
]
SCHEMES = {
    "int8-weight-only": ([{"name": "quant.int8_weight_only"}], "int8 channel sym (rtn)"),
    "int4-rtn": ([{"name": "quant.rtn", "config": {"bits": 4, "group_size": 16}}], "int4 g16 sym (rtn)"),
    "int4-gptq": ([{"name": "quant.gptq", "config": {"bits": 4, "group_size": 16}}], "int4 g16 sym (gptq)"),
    "int4-awq": ([{"name": "quant.awq", "config": {"bits": 4, "group_size": 16}}], "int4 g16 sym (awq)"),
    "fp8": ([{"name": "quant.fp8"}], "fp8 e4m3 channel (dynamic activations)"),
    "smoothquant": ([{"name": "quant.smoothquant"}], "w8a8 int8 channel/token (smoothquant)"),
}
CALIBRATED = ("int4-gptq", "int4-awq", "smoothquant")
SPARSE, DENSE = (0, 2), 1
EXPERT_TENSORS = [f"model.layers.{i}.mlp.experts.{w}" for i in SPARSE for w in ("gate_up_proj", "down_proj")]
EXPERT_LINEARS = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in SPARSE for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]
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


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[3 + (11 * j + 7 * j * j) % 290 for j in range(40)]])


def test_the_loader_splits_experts_into_linears_with_hf_logits_and_hub_names(tiny_moe_dir, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_moe_dir).eval()
    ours, tokenizer = load_model(tiny_moe_dir)
    assert all(isinstance(ours.model.layers[i].mlp.experts, LinearExperts) for i in SPARSE) and not expert_parameters(ours)
    assert torch.equal(ours.get_submodule("model.layers.0.mlp.experts.3.up_proj").weight, hf.model.layers[0].mlp.experts.gate_up_proj[3, 32:])
    assert (_logits(ours, IDS) - _logits(hf, IDS)).abs().max() < 1e-5  # measured 7e-7: the same products, split
    save_model(ours, tokenizer, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"{n}.weight" for n in EXPERT_LINEARS} <= keys and not any("gate_up_proj" in k for k in keys)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # HF converts the per-expert names back
    assert torch.equal(_logits(again, IDS), _logits(hf, IDS))


def test_mixtral_files_use_block_sparse_moe_and_w1_w2_w3(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=300, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.load_state_dict(hf.state_dict())
    assert unfuse_experts(model) == 2
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    save_model(model, PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a"))), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in keys and "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    ids = IDS % 300
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids), _logits(hf, ids))
    assert (_logits(load_model(tmp_path)[0], ids) - _logits(hf, ids)).abs().max() < 1e-5


def test_routers_are_never_targets_and_experts_are_linears(tiny_moe_dir):
    model, _ = load_model(tiny_moe_dir)
    assert set(routers(model)) == set(ROUTERS) and not any(isinstance(m, nn.Linear) for m in routers(model).values())
    chosen = select_linears(model, (r".*",), ())
    assert set(EXPERT_LINEARS) <= set(chosen)
    assert len(chosen) == 3 * 4 + 3 + len(EXPERT_LINEARS) + 1  # q/k/v/o per layer, the dense MLP, the experts, lm_head
    # Older transformers and other MoE families hold an nn.Linear router: excluded by name, whatever include says
    model.model.layers[0].mlp.gate = nn.Linear(64, 8, bias=False)
    assert "model.layers.0.mlp.gate" not in select_linears(model, (r".*",), ())


def test_experts_kept_as_3d_tensors_are_warned_of_with_their_bytes(caplog):
    model = make_tiny_qwen3_moe()  # HF's own module: 3D experts, as for an architecture optforge cannot split
    assert set(expert_parameters(model)) == set(EXPERT_TENSORS)
    size = sum(p.numel() * 4 for p in expert_parameters(model).values())  # fp32
    assert size == 2 * 8 * (64 * 64 + 64 * 32) * 4
    with caplog.at_level(logging.WARNING, logger="optforge.passes.targets"):
        pass_targets("quant.rtn", model, (r".*",), (r"lm_head$",))
    (record,) = [r for r in caplog.records if "MoE expert" in r.getMessage()]
    message = record.getMessage()
    assert message.startswith(f"quant.rtn: 4 MoE expert weight tensors, {size} bytes")
    assert "model.layers.*.mlp.experts.gate_up_proj (2 layers)" in message and "model.layers.*.mlp.experts.down_proj (2 layers)" in message


def test_calibration_shows_every_expert_every_token(tiny_moe_dir):
    """The routers send this text's 40 tokens to some experts only (expert 2 of layer 0 gets none); during
    calibration every expert's Linears still see all 40, and the routed counts are kept for the report."""
    from optforge.passes.calibration import LayerAlgorithm, calibrate

    model, _ = load_model(tiny_moe_dir)
    with count_tokens(model) as routed:
        _logits(model, IDS)
    assert min(routed["model.layers.0.mlp.experts"].tolist()) == 0  # an expert the router never picks here
    seen: dict[str, int] = {}

    class Rows(LayerAlgorithm):
        propagate = "before"

        def watch(self, step):
            return step.targets

        def record(self, key, x):
            seen[key] = seen.get(key, 0) + x.shape[0]

    targets = select_linears(model, (r"experts",), ())
    calibrate(model, [IDS], Rows(), pass_name="test", targets=targets)
    assert seen == dict.fromkeys(EXPERT_LINEARS, IDS.numel())
    for i in SPARSE:
        name = f"model.layers.{i}.mlp.experts"
        assert torch.equal(model.get_submodule(name).calibration_routed, routed[name])
        assert int(routed[name].sum()) == 2 * IDS.numel()  # top-2


def test_folding_scales_into_a_sparse_block_keeps_its_output(tiny_moe_dir):
    """AWQ's and SmoothQuant's fold: the norm divided by s, every expert's gate and up and the router multiplied
    by s (the router reads the same input), an expert's down by its up's s: the float layer computes the same."""
    from optforge.passes.quant.folding import FoldingLayers, model_folds

    model, _ = load_model(tiny_moe_dir)
    layer = model.model.layers[0]
    folds = dict(model_folds(model, "quant.awq")[3:5])  # the norm into the sparse block, expert 0's up into its down
    hidden = torch.randn(1, 40, 64)
    position = model.model.rotary_emb(hidden, torch.arange(40)[None])
    with torch.no_grad():
        before = layer(hidden, position_embeddings=position)[0]
        folding = FoldingLayers([], {}, 1, "quant.awq")
        for op, fed in folds.items():
            width = layer.get_submodule(fed[0]).in_features
            folding.fold(layer, op, fed, torch.rand(width) + 0.5)
        after = layer(hidden, position_embeddings=position)[0]
    assert (after - before).abs().max() < 1e-4 * before.abs().max()


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_pass_quantizes_the_experts_and_never_the_routers(build_moe, tiny_moe_dir, name):
    out = build_moe(name).output
    layout = json.loads((out / "optforge.json").read_text())
    label = SCHEMES[name][1]
    attention = {f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    dense_mlp = {f"model.layers.{DENSE}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    quantized = attention | dense_mlp | set(EXPERT_LINEARS)
    assert set(layout["modules"]) == quantized
    precision = layout["precision"]
    assert all(precision[n] == label for n in quantized)
    assert {n: precision[n] for n in ROUTERS} == dict.fromkeys(ROUTERS, FLOAT_ROUTER)
    assert precision["lm_head"] == "float" and "float_experts" not in layout["quantization"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    blocks = [f"model.layers.{i}.mlp.experts" for i in SPARSE]  # the name vLLM's fused MoE layer looks its scheme up by
    assert sorted(targets) == sorted(f"re:^{n.replace('.', chr(92) + '.')}$" for n in [*quantized, *blocks])
    assert qc["ignore"] == sorted(["lm_head", *ROUTERS])
    if name in CALIBRATED:  # the tokens each router chose, over the calibration set; every expert saw them all
        tokens = layout["quantization"]["expert_tokens"]
        assert tokens["observed"] == "every token by every expert" and set(tokens["routed"]) == {f"model.layers.{i}.mlp.experts" for i in SPARSE}
    base, _ = load_model(tiny_moe_dir)
    ours, _ = load_model(out)
    assert type(ours.get_submodule("model.layers.2.mlp.experts.7.down_proj")) is not nn.Linear  # quantized modules reloaded
    for router in ROUTERS:
        weight = ours.get_submodule(router).weight
        if name in ("int4-awq", "smoothquant"):  # scaled with the experts' inputs, never rounded
            assert not torch.equal(weight, base.get_submodule(router).weight)
        else:
            assert torch.equal(weight, base.get_submodule(router).weight)


@pytest.mark.parametrize("name", ["int4-gptq", "fp8"])
def test_the_checkpoint_loads_in_plain_transformers(build_moe, name):
    """transformers (with compressed-tensors) merges the per-expert tensors into its 3D experts. int4: the same
    logits as ours. FP8: the same dequantized expert weights (transformers leaves expert activations unrounded)."""
    pytest.importorskip("compressed_tensors", reason="compressed-tensors not installed")
    from transformers import AutoModelForCausalLM

    out = build_moe(name).output
    ours, _ = load_model(out)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if name == "fp8":
        merged = theirs.model.layers[2].mlp.experts.down_proj[5]
        mine = ours.get_submodule("model.layers.2.mlp.experts.5.down_proj")
        assert torch.allclose(merged, mine.weight.float() * mine.weight_scale, rtol=1e-6)
    else:
        assert (_logits(theirs, IDS) - _logits(ours, IDS)).abs().max() < 1e-4  # measured 3.6e-7


@pytest.mark.parametrize("name", list(SCHEMES))
def test_quantized_moe_serves_the_tokens_hf_generates(build_moe, name):
    """The runtime on the reloaded artifact (quantized experts, float routers) gives HF generate's greedy tokens on
    the same loaded model, batched, and from cached prefix blocks."""
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


def test_unstructured_pruning_reaches_the_experts_and_width_pruning_refuses(tiny_moe_dir, tmp_path, make_recipe):
    import optforge
    from optforge.errors import PassError

    def build(passes):
        recipe = make_recipe(tiny_moe_dir, tmp_path / passes[0]["name"], gate_pct=None, passes=passes)
        del recipe["data"]["eval"]
        return optforge.build(recipe, cache_dir=tmp_path / "cache").output

    pruned, _ = load_model(build([{"name": "prune.wanda", "config": {"sparsity": 0.5, "num_samples": 4}}]))
    zeros = [float((pruned.get_submodule(n).weight == 0).float().mean()) for n in EXPERT_LINEARS]
    assert min(zeros) >= 0.5
    with pytest.raises(PassError, match=r"layers \[0, 2\] are mixture-of-experts blocks"):
        build([{"name": "prune.mlp_width", "config": {"ratio": 0.25, "num_samples": 4}}])
