"""Qwen3's q/k norms inside the batch-1 decode attention kernel (runtime/kernels/fused_decode.py): against a torch
reference of RMSNorm per head, rotary, the KV write and attention over the paged cache.

Runs on CUDA, or on the CPU under Triton's interpreter (`TRITON_INTERPRET=1` with Triton installed)."""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (torch.cuda.is_available() or INTERPRETED), reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_loop_bounds(monkeypatch):
    """Under Triton 3.6's interpreter a scalar is a one-element array, and a loop bound read from memory goes through
    int() of it, which NumPy 2.4 refuses: take its one element instead (the compiled kernel is untouched)."""
    if not INTERPRETED:
        return
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen3 RMSNorm: normalized in float32, rounded to x's dtype, then times the weight."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _reference(qkv, cos, sin, pos, slots, kc, vc, tables, lens, hq, scale, qn, kn, eps):
    batch, (_, bs, hkv, d) = qkv.shape[0], kc.shape
    q = _rms(qkv[:, : hq * d].reshape(batch, hq, d), qn, eps)
    k = _rms(qkv[:, hq * d : (hq + hkv) * d].reshape(batch, hkv, d), kn, eps)
    v = qkv[:, (hq + hkv) * d :].reshape(batch, hkv, d)
    c, s = (torch.cat([t, t], -1)[pos][:, None].float() for t in (cos, sin))

    def rope(x):
        rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return (x.float() * c + rotated.float() * s).to(x.dtype)

    q, k = rope(q), rope(k)
    kc.view(-1, hkv, d)[slots], vc.view(-1, hkv, d)[slots] = k, v
    out = []
    for b in range(batch):
        n = int(lens[b])
        blocks = tables[b, : -(-n // bs)].long()
        keys = kc[blocks].reshape(-1, hkv, d)[:n].float().repeat_interleave(hq // hkv, 1)  # (n, hq, d)
        values = vc[blocks].reshape(-1, hkv, d)[:n].float().repeat_interleave(hq // hkv, 1)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), keys) * scale, -1)
        out.append(torch.einsum("hn,nhd->hd", weights, values).reshape(-1))
    return torch.stack(out)


BF16 = pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(INTERPRETED and not torch.cuda.is_available(), reason="Triton 3.6's interpreter "
                    "computes this kernel wrongly in bfloat16 (with or without the norms); float32 checks the same code there"))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), BF16])
@pytest.mark.parametrize("splits", [1, 3])
def test_rope_paged_attention_applies_q_and_k_norms(dtype, tol, splits):
    from optforge.runtime.kernels.fused_decode import rope_paged_attention

    torch.manual_seed(0)
    hq, hkv, d, bs, blocks, width, eps = 8, 2, 32, 16, 40, 6, 1e-6
    ctx = [1, 17, 70]
    batch = len(ctx)
    tables = torch.randperm(blocks, device=DEVICE)[: batch * width].view(batch, width).to(torch.int32)
    lens = torch.tensor(ctx, dtype=torch.int32, device=DEVICE)
    pos = lens.long() - 1
    slots = tables.long().gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
    kc = torch.randn(blocks, bs, hkv, d, device=DEVICE).to(dtype)
    vc = torch.randn_like(kc)
    qkv = (torch.randn(batch, (hq + 2 * hkv) * d, device=DEVICE) * 3).to(dtype)  # far from unit RMS: the norm matters
    qn, kn = (torch.rand(d, device=DEVICE) + 0.5).to(dtype), (torch.rand(d, device=DEVICE) + 0.5).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=DEVICE).float() / d))
    angles = torch.arange(128, device=DEVICE).float()[:, None] * inv_freq[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    kc_ref, vc_ref = kc.clone(), vc.clone()
    expected = _reference(qkv, cos, sin, pos, slots, kc_ref, vc_ref, tables, lens, hq, d**-0.5, qn, kn, eps)
    got = rope_paged_attention(qkv, cos, sin, pos, slots, kc, vc, tables, lens, hq, d**-0.5, splits=splits, qk_norm=(qn, kn, eps))
    assert (kc.float() - kc_ref.float()).abs().max() <= tol * 4 and torch.equal(vc, vc_ref)
    assert (got.float() - expected.float()).abs().max() <= tol
    plain = rope_paged_attention(qkv, cos, sin, pos, slots, kc.clone(), vc.clone(), tables, lens, hq, d**-0.5, splits=splits)
    assert (plain.float() - expected.float()).abs().max() > 10 * tol  # without the norms the kernel computes something else


def test_fused_multi_token_forward_applies_qwen3_norms():
    """The fused forward (stacked q|k|v and gate|up, Triton norm, rotary and cache kernels) of a tiny random Qwen3
    gives the unfused forward's hidden states and cache: Qwen3 keeps the fused CUDA path."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from optforge.runtime.decoder import Decoder

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
    model = Qwen3ForCausalLM(cfg).to(DEVICE).eval()
    for layer in model.model.layers:  # q/k norm weights away from 1, so a skipped norm shows
        torch.nn.init.uniform_(layer.self_attn.q_norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(layer.self_attn.k_norm.weight, 0.5, 1.5)
    dec = Decoder(model)
    t, hkv, d = 7, 2, 16
    ids = torch.randint(0, 64, (t,), device=DEVICE)
    positions = torch.arange(t, device=DEVICE)
    slots = torch.arange(t, device=DEVICE)

    def attend_with(cache):
        def attend(i, q):  # causal attention of the step's tokens over the cache slots 0..t-1
            k = cache[i, 0].view(-1, hkv, d)[:t].repeat_interleave(2, 1)
            v = cache[i, 1].view(-1, hkv, d)[:t].repeat_interleave(2, 1)
            scores = torch.einsum("thd,shd->hts", q.float(), k.float()) * dec.scale
            scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
            return torch.einsum("hts,shd->thd", scores.softmax(-1), v.float()).to(q.dtype)
        return attend

    with torch.no_grad():
        cache = torch.zeros(2, 2, 4, 16, hkv, d, device=DEVICE)
        want = dec.forward(cache, ids, positions, slots, attend_with(cache))
        dec.fused = dec._fuse_weights()
        assert dec.fused is not None  # q/k norms no longer switch the fused forms off
        fused_cache = torch.zeros_like(cache)
        got = dec.forward(fused_cache, ids, positions, slots, attend_with(fused_cache))
    assert (got - want).abs().max() <= 1e-4 and (fused_cache - cache).abs().max() <= 1e-5
