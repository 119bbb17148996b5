"""The batch-1 decode path with six launches per layer (runtime/kernels/fused_decode.py): each kernel against
the unfused kernels it replaces, and the whole runtime against HF generate."""

import copy

import pytest
import torch

from optforge.formats import quantize_in_memory
from optforge.runtime.kernels.decode_options import DecodeKernelOptions
from optforge.runtime.llm import EngineConfig, LLM
from optforge.runtime.sequence import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_prologues_and_residual_match_the_unfused_kernels(dtype):
    from optforge.runtime.kernels import fused_decode as F
    from optforge.runtime.kernels.triton_ops import add_rms_norm, silu_mul

    torch.manual_seed(0)
    n, k, eps = 1000, 2048, 1e-5  # n not a multiple of any BLOCK_N: masked tail
    w = (torch.randn(n, k, device="cuda") * 0.02).to(dtype)
    x = torch.randn(1, k, device="cuda").to(dtype)
    norm_w = (torch.rand(k, device="cuda") + 0.5).to(dtype)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4

    def close(got, ref):
        assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max(), (got, ref)

    close(F.gemv(x, w), x.float() @ w.float().T)
    close(F.gemv(x, w, prologue=F.PRO_RMSNORM, norm_weight=norm_w, eps=eps), add_rms_norm(x, norm_w, eps).float() @ w.float().T)
    gate_up = torch.randn(1, 2 * k, device="cuda").to(dtype)
    residual = torch.randn(1, n, device="cuda").to(dtype)
    expected = residual.float() + (silu_mul(gate_up).float() @ w.float().T)
    assert F.gemv(gate_up, w, prologue=F.PRO_SILU_MUL, residual=residual) is None
    close(residual, expected)
    wq = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
    scale = torch.rand(n, device="cuda") * 1e-3
    close(F.gemv(x, wq, scale), x.float() @ (wq.float() * scale[:, None]).T)


@pytest.mark.parametrize("width,splits", [(4, 1), (9, 3), (48, 12), (48, None), (9, None)])  # None: attention_splits
def test_rope_paged_attention_matches_rope_and_cache_then_paged_attention(width, splits):
    from optforge.runtime.kernels.fused_decode import attention_splits, rope_paged_attention
    from optforge.runtime.kernels.triton_ops import paged_decode_attention, rope_and_cache

    torch.manual_seed(1)
    hq, hkv, d, bs, blocks, dtype = 32, 8, 64, 16, 200, torch.bfloat16
    assert 1 < attention_splits(1, hkv, width, torch.device("cuda")) <= min(width, 32)  # batch 1: the context is split
    assert attention_splits(64, hkv, width, torch.device("cuda")) == 1  # 512 programs fill the GPU already
    ctx = [1, 17, min(130, width * bs), 64]  # a lone first token, a page boundary + 1, several pages, a page multiple
    batch = len(ctx)
    tables = torch.randperm(blocks, device="cuda")[: batch * width].view(batch, width).to(torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32, device="cuda")
    pos = lens.long() - 1
    slots = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    kc = torch.randn(blocks, bs, hkv, d, device="cuda").to(dtype)
    vc = torch.randn_like(kc)
    qkv = torch.randn(batch, (hq + 2 * hkv) * d, device="cuda").to(dtype)
    inv_freq = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    angles = torch.arange(256, device="cuda").float()[:, None] * inv_freq[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (positions, d / 2)

    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = qkv[:, : hq * d].reshape(batch, hq, d).clone()
    k = qkv[:, hq * d : (hq + hkv) * d].reshape(batch, hkv, d).clone()
    v = qkv[:, (hq + hkv) * d :].reshape(batch, hkv, d).clone()
    full = lambda t: torch.cat([t, t], -1)[pos]  # noqa: E731  HF's (T, D) layout with equal halves
    rope_and_cache(q, k, v, full(cos), full(sin), slots, kc_ref, vc_ref)
    expected = paged_decode_attention(q, kc_ref, vc_ref, tables, lens, d**-0.5).reshape(batch, -1)

    got = rope_paged_attention(qkv, cos, sin, pos, slots, kc, vc, tables, lens, hq, d**-0.5, splits=splits)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert (got.float() - expected.float()).abs().max() <= 1e-2


@pytest.mark.parametrize("options", [DecodeKernelOptions(use_pdl=False), DecodeKernelOptions(kv_before_wait=False),
                                     DecodeKernelOptions(launch_dependents_early=False)])
def test_kernel_options_change_when_kernels_start_not_what_they_compute(options):
    from optforge.runtime.kernels.fused_decode import gemv, rope_paged_attention

    torch.manual_seed(2)
    hq, hkv, d, bs, blocks, dtype = 32, 8, 64, 16, 64, torch.bfloat16
    tables = torch.randperm(blocks, device="cuda")[:16].view(2, 8).to(torch.int32)
    lens = torch.tensor([37, 100], dtype=torch.int32, device="cuda")
    pos = lens.long() - 1
    slots = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    kc = torch.randn(blocks, bs, hkv, d, device="cuda").to(dtype)
    vc = torch.randn_like(kc)
    qkv = torch.randn(2, (hq + 2 * hkv) * d, device="cuda").to(dtype)
    cos, sin = torch.rand(256, d // 2, device="cuda").to(dtype), torch.rand(256, d // 2, device="cuda").to(dtype)
    runs = []
    for opts in (DecodeKernelOptions(), options):
        k, v = kc.clone(), vc.clone()
        runs.append((rope_paged_attention(qkv, cos, sin, pos, slots, k, v, tables, lens, hq, d**-0.5, options=opts), k, v))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    x, w = torch.randn(1, 2048, device="cuda").to(dtype), (torch.randn(1000, 2048, device="cuda") * 0.02).to(dtype)
    shipped, other = gemv(x, w), gemv(x, w, options=options)  # PDL on or off may autotune to another tile: same sums, other order
    assert (shipped.float() - other.float()).abs().max() <= 2e-2 * shipped.float().abs().max()


@pytest.mark.parametrize("scheme", [None, "int8"])
def test_batch1_fused_decode_matches_hf_generate(tiny_llama_factory, byte_tokenizer, scheme):
    """fp32 (dense) and per-channel int8 weights: batch-1 requests run the fused graph; greedy tokens equal HF."""
    model = tiny_llama_factory(hidden=128, intermediate=256, head_dim=32).cuda()
    if scheme:
        quantize_in_memory(model, {"scheme": "int8_weight_only"})
    prompts = [[5 + (7 * i + j) % 250 for j in range(3 + 11 * i)] for i in range(4)]
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                    for p in prompts]
    llm = LLM.from_model(copy.deepcopy(model), byte_tokenizer, EngineConfig(device="cuda", num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=256))
    assert llm.engine.runner.decoder.decode_weights is not None
    got = [llm.generate([p], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids for p in prompts]  # one at a time: batch 1
    assert got == expected


def test_qwen3_keeps_the_fused_paths_and_hf_tokens(byte_tokenizer):
    """Qwen3's q/k norms: the stacked multi-token forward and the batch-1 decode kernels apply them; greedy tokens
    equal HF generate's, batched and one request at a time."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=32, max_position_embeddings=512)
    model = Qwen3ForCausalLM(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4) if p.dim() > 1 else p.uniform_(0.5, 1.5)  # sharper logits; norm weights away from 1
    prompts = [[5 + (7 * i + j) % 250 for j in range(3 + 11 * i)] for i in range(4)]
    with torch.inference_mode():
        expected = [model.generate(torch.tensor([p], device="cuda"), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                    for p in prompts]
    llm = LLM.from_model(copy.deepcopy(model), byte_tokenizer, EngineConfig(device="cuda", num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=256))
    assert llm.engine.runner.decoder.fused is not None and llm.engine.runner.decoder.decode_weights is not None
    assert [llm.generate([p], SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids for p in prompts] == expected
    assert [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))] == expected
