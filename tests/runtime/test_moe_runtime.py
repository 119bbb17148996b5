"""The runtime on mixture-of-experts models: tiny random Qwen3-MoE (`qwen3_moe`; sparse and dense layers) and
Mixtral (`mixtral`), 8 experts with top-2 routing, fp32. Logits equal HF's full forward at every position; greedy
tokens equal HF `generate`, batched or one at a time, with and without prefix caching. The prompts route
tokens to every expert of each sparse layer, and routing with top-1 generates other tokens, so a routing bug
would show."""

import pytest
import torch

from optforge.runtime.decoder import Decoder
from optforge.runtime.llm import EngineConfig, LLM
from optforge.runtime.model_runner import ModelRunner
from optforge.runtime.sequence import SamplingParams

MODEL_TYPES = ("qwen3_moe", "mixtral")
NUM_EXPERTS, TOP_K = 8, 2
NUM_NEW = 32
# 20-36 tokens, a prompt sharing 28 tokens (7 blocks of 4) with the one before it, and a repeat (prefix caching)
PROMPTS = [[3 + (11 * i + 7 * j * j) % 500 for j in range(20 + 4 * i)] for i in range(5)]
PROMPTS += [PROMPTS[4][:28] + [400 + j for j in range(10)], PROMPTS[4]]


def make_tiny_moe(model_type: str, top_k: int = TOP_K):
    """A random 3-layer Qwen3MoeForCausalLM (layer 1 a dense MLP through `mlp_only_layers`, layers 0 and 2 sparse)
    or MixtralForCausalLM (every layer sparse): hidden 64, 4 query / 2 KV heads of 16, vocab 512, 8 experts of
    width 32, top-`top_k` routing. Weights x4 (routers and experts too): sharper logits and routing, so greedy picks
    and expert choices are far from ties. No EOS, so HF `generate` runs every token, as `ignore_eos` does."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=None, bos_token_id=2, num_experts_per_tok=top_k)
    if model_type == "qwen3_moe":
        cfg = Qwen3MoeConfig(**common, num_experts=NUM_EXPERTS, moe_intermediate_size=32, intermediate_size=128, mlp_only_layers=[1], norm_topk_prob=True)
    else:
        cfg = MixtralConfig(**common, num_local_experts=NUM_EXPERTS, intermediate_size=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


def sparse_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def tokens_per_expert(model, prompts) -> dict[int, list[int]]:
    """{sparse layer: how many of the prompts' tokens its router sent to each expert} in HF's forward."""
    counts = {i: torch.zeros(NUM_EXPERTS, dtype=torch.long) for i in sparse_layers(model)}

    def count(i: int):
        def hook(module, args, out) -> None:  # the router returns (logits, top-k weights, top-k expert ids)
            counts[i] += torch.bincount(out[2].flatten(), minlength=NUM_EXPERTS)

        return hook

    hooks = [model.model.layers[i].mlp.gate.register_forward_hook(count(i)) for i in counts]
    try:
        with torch.inference_mode():
            for p in prompts:
                model(torch.tensor([p]))
    finally:
        for h in hooks:
            h.remove()
    return {i: c.tolist() for i, c in counts.items()}


@pytest.fixture(scope="module")
def moe_models():
    return {t: make_tiny_moe(t) for t in MODEL_TYPES}


@pytest.fixture(scope="module")
def moe_references(moe_models, hf_greedy):
    return {t: hf_greedy(m, PROMPTS, NUM_NEW)[0] for t, m in moe_models.items()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_prompts_route_tokens_to_every_expert(moe_models, model_type):
    model = moe_models[model_type]
    layers = sparse_layers(model)
    assert layers == ([0, 2] if model_type == "qwen3_moe" else [0, 1, 2])
    counts = tokens_per_expert(model, PROMPTS)
    assert all(sum(c) == TOP_K * sum(map(len, PROMPTS)) for c in counts.values())
    # measured: every expert of every sparse layer gets 10-129 of the 428 routed token slots (214 tokens x top-2)
    assert all(min(c) > 0 for c in counts.values()), counts


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_match_hf_at_every_position(moe_models, model_type, step_logits):
    model = moe_models[model_type]
    prompts = [p[:30] for p in PROMPTS[3:6]]  # 3 x 30 tokens: a prefill of 12, a chunk of 9 after it, 9 decodes
    with torch.inference_mode():
        expected = model(torch.tensor(prompts)).logits
    runner = ModelRunner(model, block_size=4, num_blocks=32, max_model_len=64)
    got = step_logits(runner, prompts, (12, 9) + (1,) * 9)
    # measured max |diff| 1.2e-6 (qwen3_moe) and 9.5e-7 (mixtral) on logits up to 2.9 (fp32, the same HF sparse
    # blocks on tokens of three sequences at once); the same weights routed top-1 instead of top-2: 0.87-0.94
    assert (got - expected).abs().max() < 2e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


CONFIGS = {
    "batched+prefix": EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=64),
    "batched, no prefix cache": EngineConfig(num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, enable_prefix_caching=False),
    "one-at-a-time+prefix": EngineConfig(num_blocks=128, block_size=4, max_num_seqs=1),
    "one-at-a-time, no prefix cache": EngineConfig(num_blocks=128, block_size=4, max_num_seqs=1, enable_prefix_caching=False),
    "chunked tiny budget": EngineConfig(num_blocks=128, block_size=4, max_num_seqs=4, max_num_batched_tokens=7),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_matches_hf_generate(moe_models, moe_references, byte_tokenizer, model_type, name):
    llm = LLM.from_model(moe_models[model_type], byte_tokenizer, CONFIGS[name])
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == moe_references[model_type]
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    if CONFIGS[name].enable_prefix_caching:
        assert outs[-1].num_cached_tokens >= 4  # the repeated prompt reused blocks of its first copy


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_routing_changes_what_hf_generates(moe_models, moe_references, model_type, hf_greedy):
    """The same weights routed top-1 generate other tokens: the experts and their mix decide the outputs."""
    top1 = make_tiny_moe(model_type, top_k=1)
    top1.load_state_dict(moe_models[model_type].state_dict())
    assert sum(a != b for a, b in zip(hf_greedy(top1, PROMPTS, NUM_NEW)[0], moe_references[model_type])) >= len(PROMPTS) // 2


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_moe_models_keep_the_unfused_forward(moe_models, model_type):
    """The fused forms and the batch-1 decode launches stack one dense gate|up per layer: none for a sparse block,
    so CUDA runs MoE layers as HF's modules, like the CPU (and without graphs: model_runner.py)."""
    decoder = Decoder(moe_models[model_type])
    assert decoder.arch.is_moe and decoder.arch.windows == (None,) * 3
    assert decoder._fuse_weights() is None
    decoder.fused = [{}] * 3  # even with fused forms present, no decode weights for a MoE model
    assert decoder._decode_weights(max_model_len=64) is None
    decoder.fuse(max_model_len=64)
    assert decoder.fused is None and decoder.decode_weights is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_experts_as_linears_serve_hf_tokens(moe_models, moe_references, byte_tokenizer, model_type, step_logits):
    """The loader's form of the experts (one Linear MLP per expert, formats/experts.py) in the runtime: HF's logits
    at every position and HF generate's greedy tokens, batched with prefix caching."""
    import copy

    from optforge.formats.experts import unfuse_experts

    model = copy.deepcopy(moe_models[model_type])
    assert unfuse_experts(model) == len(sparse_layers(model))
    prompts = [p[:30] for p in PROMPTS[3:6]]
    with torch.inference_mode():
        expected = moe_models[model_type](torch.tensor(prompts)).logits
    got = step_logits(ModelRunner(model, block_size=4, num_blocks=32, max_model_len=64), prompts, (12, 9) + (1,) * 9)
    assert (got - expected).abs().max() < 2e-5
    llm = LLM.from_model(model, byte_tokenizer, CONFIGS["batched+prefix"])
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NUM_NEW, ignore_eos=True))
    assert [o.token_ids for o in outs] == moe_references[model_type]
