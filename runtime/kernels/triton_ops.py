"""Triton kernels for the CUDA decode path. Importing this module needs triton (present on CUDA machines).

- `paged_decode_attention`: one query token per sequence against its paged KV, GQA-aware: one program per
  (sequence, KV head) loads each KV page once and serves every query head of its group (online softmax).
- `add_rms_norm`: residual add and RMSNorm in one pass over the row (the residual is updated in place).
- `rope_and_cache`: rotary embedding of q and k in place, and k, v written to their cache slots, in one launch.
Caches are in the model dtype or FP8/INT8 with per-layer scales (`kv_code`, `kv_scales`; kernels/kv_codec.py).
- `silu_mul`: SiLU(gate) * up for a fused gate_up projection.
All are plain launches on fixed shapes, so they can be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optforge.runtime.kernels.kv_codec import kv_decode, kv_encode


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale, k_scale, v_scale,
    stride_qb, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_CODE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    q_offs = seq * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None], other=0.0)  # (G, D)
    dtype = q.dtype
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    num_pages = tl.cdiv(context_len, BLOCK_SIZE)
    for page in range(0, num_pages):
        block = tl.load(block_tables_ptr + seq * stride_bt + page).to(tl.int64)
        s_mask = page * BLOCK_SIZE + s < context_len
        kv_offs = block * stride_cb + s[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
        k = kv_decode(tl.load(k_cache_ptr + kv_offs, mask=s_mask[:, None], other=0.0), k_scale, dtype, KV_CODE)  # (S, D)
        v = kv_decode(tl.load(v_cache_ptr + kv_offs, mask=s_mask[:, None], other=0.0), v_scale, dtype, KV_CODE)  # (S, D)
        scores = tl.dot(q, tl.trans(k)) * scale  # (G, S)
        scores = tl.where(s_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    o_offs = seq * stride_ob + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale: float, *, kv_scales: tuple[float, float] = (1.0, 1.0),
                           kv_code: int = 0) -> torch.Tensor:
    """q (B, Hq, D); caches (num_blocks, block_size, Hkv, D); block_tables (B, max_blocks) int32;
    context_lens (B,) int32 (the new token's KV already written); `kv_code`/`kv_scales`: how the caches store
    K/V (kernels/kv_codec.py). Returns (B, Hq, D)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale, kv_scales[0], kv_scales[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size, KV_CODE=kv_code,
        num_warps=4,
    )
    return out


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, n_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(residual_ptr + row * n_cols + cols, x.to(residual_ptr.dtype.element_ty), mask=mask)
    variance = tl.sum(x * x, 0) / n_cols
    y = (x * tl.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, y * w, mask=mask)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x + residual) * weight for contiguous (T, H) x; with `residual`, it becomes x + residual."""
    out = torch.empty_like(x)
    _add_rms_norm_kernel[(x.shape[0],)](
        x, residual if residual is not None else x, weight, out, x.shape[1], eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=4,
    )
    return out


@triton.jit
def _rope_cache_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, k_scale, v_scale,
    stride_qt, stride_kt, stride_vt, stride_cos, stride_slot, NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr, KV_CODE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + token * stride_cos + offs).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_cos + offs).to(tl.float32)
    if head < NUM_Q_HEADS:
        ptr = q_ptr + token * stride_qt + head * 2 * HALF
    else:
        ptr = k_ptr + token * stride_kt + (head - NUM_Q_HEADS) * 2 * HALF
    x1 = tl.load(ptr + offs).to(tl.float32)
    x2 = tl.load(ptr + HALF + offs).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
    if head < NUM_Q_HEADS:
        tl.store(ptr + offs, y1)
        tl.store(ptr + HALF + offs, y2)
    else:
        kv_head = head - NUM_Q_HEADS
        slot = tl.load(slot_ptr + token * stride_slot).to(tl.int64)
        dst = slot * NUM_KV_HEADS * 2 * HALF + kv_head * 2 * HALF
        tl.store(k_cache_ptr + dst + offs, kv_encode(y1, k_scale, KV_CODE))
        tl.store(k_cache_ptr + dst + HALF + offs, kv_encode(y2, k_scale, KV_CODE))
        v_src = v_ptr + token * stride_vt + kv_head * 2 * HALF
        tl.store(v_cache_ptr + dst + offs, kv_encode(tl.load(v_src + offs), v_scale, KV_CODE))
        tl.store(v_cache_ptr + dst + HALF + offs, kv_encode(tl.load(v_src + HALF + offs), v_scale, KV_CODE))


def rope_and_cache(q, k, v, cos, sin, slot_mapping, k_cache, v_cache, *, kv_scales: tuple[float, float] = (1.0, 1.0), kv_code: int = 0) -> None:
    """Rotate q (T, Hq, D) in place; write rotated k and v (T, Hkv, D) to the cache slots `slot_mapping` (T,),
    encoded as `kv_code` says (kernels/kv_codec.py). cos/sin (T, D) as HF's rotary module returns them (the two
    halves are equal). Last dims contiguous."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _rope_cache_kernel[(num_tokens, num_q_heads + num_kv_heads)](
        q, k, v, cos, sin, slot_mapping, k_cache, v_cache, kv_scales[0], kv_scales[1],
        q.stride(0), k.stride(0), v.stride(0), cos.stride(0), slot_mapping.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, KV_CODE=kv_code, num_warps=1,
    )


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) contiguous [gate | up] -> (T, I) SiLU(gate) * up."""
    num_tokens, width = gate_up.shape
    out = torch.empty(num_tokens, width // 2, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(num_tokens, triton.cdiv(width // 2, block))](gate_up, out, width // 2, BLOCK=block, num_warps=4)
    return out
