"""Triton kernels for batch-1 decode with fewer launches: six per decoder layer instead of nine.

Why: a batch-1 decode step of a 1B Llama on an H100 is ~1.6 ms of GPU time against ~0.8 ms of weight reads
(benchmarks/RESULTS.md). Besides the matmuls, each layer launched RMSNorm twice, rotary+KV write, attention
and SiLU*up on their own, and cuBLAS's GEMVs do not reach the memory roofline on 2048-wide layers. Here the
small operations ride inside the kernels that read the weights:

- `gemv`: y = W x for one row, W (N, K) dense or int8 with one scale per row. The input can be built on
  the fly from what the previous kernel wrote: RMSNorm(x) * w_norm (each program sums the row's squares
  in the same pass: x is K values against N x K weights), or SiLU(gate) * up from a fused gate|up output. The result
  can be added into a residual row in place (y is then not returned).
- `rope_paged_attention`: one query token per sequence, GQA-aware (a program per sequence, KV head and
  split of the context): rotary on q and the new k, the new k and v written to their cache slot, attention
  over the cached positions plus the new token (taken from registers, so no barrier is needed between
  write and read); a second launch combines the splits (flash-decoding), since one program per KV head
  leaves most of the GPU idle at batch 1 while it walks a long context. (Combining in the last program to
  finish, with fences and an arrival counter, measured slower: 8.1 against 6.0 us per layer. Prefetching
  the next projections' weights into L2 during attention made the step slower, not faster: benchmarks/RESULTS.md.)

Numerics follow the unfused kernels (`triton_ops.add_rms_norm`, `silu_mul`, `rope_and_cache`): values are
rounded to the model dtype where those kernels store them, except the normed input of a projection, which
stays in fp32 (W (x * w_norm) is scaled by 1 / rms(x) after the sum, so x is read once).
"""

from __future__ import annotations

import torch
import triton
import triton.testing
import triton.language as tl

from optforge.runtime.kernels.decode_options import DecodeKernelOptions
from optforge.runtime.kernels.kv_codec import kv_decode, kv_encode

PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2
_DEFAULT_OPTIONS = DecodeKernelOptions()  # programmatic dependent launch where the GPU has it, early reads on
_PRO_RMSNORM, _PRO_SILU_MUL = tl.constexpr(1), tl.constexpr(2)

# The configs that won somewhere in a cold-weight sweep of the Llama-3.2-1B projections on an H100
# (benchmarks/decode_kernels_gpu.py), and their neighbours for wider layers: (BLOCK_N, BLOCK_K, warps, stages,
# reduce each tile).
_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "REDUCE_EACH": red}, num_warps=w, num_stages=st)
    for bn, bk, w, st, red in (
        (4, 1024, 4, 3, False), (8, 1024, 4, 3, False), (8, 512, 4, 3, False), (16, 512, 4, 3, False), (2, 2048, 4, 2, False),
        (4, 2048, 8, 2, False), (8, 2048, 8, 1, False), (4, 1024, 4, 3, True), (8, 512, 4, 3, True), (8, 1024, 8, 3, True),
        (16, 512, 8, 3, True), (16, 1024, 8, 2, True), (4, 2048, 8, 2, True), (16, 256, 4, 1, True),
    )
]
_FLUSH: dict[str, object] = {}


def _bench_in_graph(fn, quantiles=None):
    """Autotuning times each config inside a CUDA graph, as the decode step runs (plain launches would add
    microseconds of host overhead to kernels of 3-30 us), each call after a 96 MB read that evicts the weights
    from the 50 MB L2, since a decode step streams every weight from HBM; the read's own time is subtracted."""
    if "read" not in _FLUSH:
        with torch.inference_mode(False):  # normal tensors: tuning may run in and out of inference mode
            buf = torch.zeros(96 * 2**18, dtype=torch.float32, device="cuda")
            out = torch.empty((), dtype=torch.float32, device="cuda")
        _FLUSH["read"] = lambda: torch.sum(buf, dim=0, out=out)
        _FLUSH["alone"] = triton.testing.do_bench_cudagraph(_FLUSH["read"], rep=20, quantiles=[0.5, 0.2, 0.8])
    read = _FLUSH["read"]
    both = triton.testing.do_bench_cudagraph(lambda: (read(), fn()), rep=20, quantiles=[0.5, 0.2, 0.8])
    timed = [max(t - r, 0.0) for t, r in zip(both, _FLUSH["alone"])]
    return timed if quantiles is not None else timed[0]


@triton.jit
def _pdl_start(USE_PDL: tl.constexpr, EARLY_LAUNCH: tl.constexpr):
    if USE_PDL and EARLY_LAUNCH:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _pdl_wait(USE_PDL: tl.constexpr, EARLY_LAUNCH: tl.constexpr):
    """Wait for the previous kernel of the step (its outputs are this kernel's inputs)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if not EARLY_LAUNCH:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gemv_input(x_ptr, norm_ptr, k0, rk, K, dtype, PROLOGUE: tl.constexpr):
    """x[k0 : k0 + BLOCK_K] as the projection sees it (fp32), and its squares for the RMSNorm prologue."""
    k_mask = k0 + rk < K
    if PROLOGUE == _PRO_SILU_MUL:  # x is [gate | up], each K wide, as silu_mul
        gate = tl.load(x_ptr + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
        return (gate / (1.0 + tl.exp(-gate)) * up).to(dtype).to(tl.float32), tl.zeros_like(gate)
    xv = tl.load(x_ptr + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
    if PROLOGUE == _PRO_RMSNORM:  # W (x * w_norm), scaled by 1 / rms(x) after the sum: one pass over x
        return xv * tl.load(norm_ptr + k0 + rk, mask=k_mask, other=0.0).to(tl.float32), xv * xv
    return xv, tl.zeros_like(xv)


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "PROLOGUE", "RESIDUAL", "HAS_SCALE", "USE_PDL"], restore_value=["res_ptr"], do_bench=_bench_in_graph)
@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, norm_ptr, res_ptr, y_ptr, N, K, stride_wn, eps,
    PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, USE_PDL: tl.constexpr, EARLY_LAUNCH: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_EACH: tl.constexpr,
):
    _pdl_start(USE_PDL, EARLY_LAUNCH)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    dtype = y_ptr.dtype.element_ty
    # the first weight tile is read before waiting on the previous kernel (weights are never written in a
    # step); with programmatic dependent launch that read overlaps the previous kernel's last programs
    w = tl.load(w_rows + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0).to(tl.float32)
    _pdl_wait(USE_PDL, EARLY_LAUNCH)  # x, the residual and the norm input are the previous kernels' outputs
    xv, sq = _gemv_input(x_ptr, norm_ptr, 0, rk, K, dtype, PROLOGUE)
    # REDUCE_EACH: sum each tile's products at once (a BLOCK_N accumulator: fewer registers, more programs
    # per SM, more loads in flight); else one (BLOCK_N, BLOCK_K) accumulator summed at the end
    if REDUCE_EACH:
        acc = tl.sum(w * xv[None, :], 1)
    else:
        acc = w * xv[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        xv, sq_k = _gemv_input(x_ptr, norm_ptr, k0, rk, K, dtype, PROLOGUE)
        sq += sq_k
        k_mask = k0 + rk < K
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        if REDUCE_EACH:
            acc += tl.sum(w * xv[None, :], 1)
        else:
            acc += w * xv[None, :]
    if REDUCE_EACH:
        y = acc
    else:
        y = tl.sum(acc, 1)
    if PROLOGUE == _PRO_RMSNORM:
        y = y * tl.rsqrt(tl.sum(sq, 0) / K + eps)
    if HAS_SCALE:
        y = y * tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    y = y.to(dtype)
    if RESIDUAL:  # as add_rms_norm's residual update: the sum in fp32, stored in the model dtype
        r = tl.load(res_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + rn, (r + y.to(tl.float32)).to(dtype), mask=n_mask)
    else:
        tl.store(y_ptr + rn, y, mask=n_mask)


def pdl_enabled(device: torch.device, options: DecodeKernelOptions = _DEFAULT_OPTIONS) -> bool:
    """Whether the kernels here launch with programmatic dependent launch on `device` (see `options.use_pdl`)."""
    if options.use_pdl is not None:
        return options.use_pdl
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def gemv(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None = None, *, prologue: int = PRO_NONE,
    norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
    options: DecodeKernelOptions = _DEFAULT_OPTIONS,
) -> torch.Tensor | None:
    """One row x (1, K), or (1, 2K) [gate | up] for PRO_SILU_MUL; weight (N, K), rows contiguous, in x's dtype
    or int8 with `weight_scale` (N,) float32. Returns y (1, N) in x's dtype, or None after adding y into
    `residual` (1, N) in place. `options`: how the kernel launches (kernels/decode_options.py)."""
    n, k = weight.shape
    if weight.stride(1) != 1 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError("gemv: one contiguous row of x and a weight with contiguous rows")
    if weight.dtype == torch.int8 and weight_scale is None:
        raise ValueError("gemv: int8 weights need weight_scale")
    if prologue == PRO_RMSNORM and norm_weight is None:
        raise ValueError("gemv: PRO_RMSNORM needs norm_weight")
    y = residual if residual is not None else torch.empty(1, n, dtype=x.dtype, device=x.device)
    dummy = weight_scale if weight_scale is not None else y
    pdl = pdl_enabled(x.device, options)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        x, weight, dummy, norm_weight if norm_weight is not None else y, y, y, n, k, weight.stride(0), eps,
        PROLOGUE=prologue, RESIDUAL=residual is not None, HAS_SCALE=weight_scale is not None, USE_PDL=pdl, EARLY_LAUNCH=options.launch_dependents_early,
        launch_pdl=pdl,
    )
    return None if residual is not None else y


@triton.jit
def _load_page(k_cache_ptr, v_cache_ptr, table_ptr, page, last, cached, kv_head, s, d, stride_cb, stride_cs, stride_ch, k_scale, v_scale,
               dtype: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_CODE: tl.constexpr):
    """One KV head's keys and values of one page of the context in `dtype`, as two halves of the head dimension
    (rotary's halves), and which of its rows are cached positions; nothing is read past `last` (a split without
    pages). FP8/INT8 caches are decoded with the layer's scales (kernels/kv_codec.py)."""
    block = tl.load(table_ptr + page, mask=page < last, other=0).to(tl.int64)
    s_mask = (page * BLOCK_SIZE + s < cached) & (page < last)
    offs = block * stride_cb + s[:, None] * stride_cs + kv_head * stride_ch + d[None, :]
    kc1 = kv_decode(tl.load(k_cache_ptr + offs, mask=s_mask[:, None], other=0.0), k_scale, dtype, KV_CODE)
    kc2 = kv_decode(tl.load(k_cache_ptr + HALF + offs, mask=s_mask[:, None], other=0.0), k_scale, dtype, KV_CODE)
    vc1 = kv_decode(tl.load(v_cache_ptr + offs, mask=s_mask[:, None], other=0.0), v_scale, dtype, KV_CODE)  # issued with k: one round trip per page
    vc2 = kv_decode(tl.load(v_cache_ptr + HALF + offs, mask=s_mask[:, None], other=0.0), v_scale, dtype, KV_CODE)
    return kc1, kc2, vc1, vc2, s_mask


@triton.jit
def _attend_page(q1, q2, kc1, kc2, vc1, vc2, s_mask, m, l, acc1, acc2, scale, dtype, PRECISION: tl.constexpr):
    """One online-softmax step of a query group (G, D) over one page (S, D) of keys and values."""
    scores = (tl.dot(q1, tl.trans(kc1), input_precision=PRECISION) + tl.dot(q2, tl.trans(kc2), input_precision=PRECISION)) * scale
    scores = tl.where(s_mask[None, :], scores, float("-inf"))  # (G, S)
    m_new = tl.maximum(m, tl.max(scores, 1))
    p = tl.exp(scores - m_new[:, None])
    alpha = tl.exp(m - m_new)
    l = l * alpha + tl.sum(p, 1)
    acc1 = acc1 * alpha[:, None] + tl.dot(p.to(dtype), vc1, input_precision=PRECISION)
    acc2 = acc2 * alpha[:, None] + tl.dot(p.to(dtype), vc2, input_precision=PRECISION)
    return m_new, l, acc1, acc2


@triton.jit
def _head_rms_norm(x1, x2, w_ptr, d, eps, dtype, HALF: tl.constexpr):
    """Rows of one head each, as halves x1, x2 (rows, HALF) fp32 -> w * (x / rms(x)), rounded as HF's RMSNorm rounds
    it (the normalized value to the model dtype, then the product with the weight)."""
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    w1 = tl.load(w_ptr + d).to(tl.float32)
    w2 = tl.load(w_ptr + HALF + d).to(tl.float32)
    y1 = (w1[None, :] * (x1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    y2 = (w2[None, :] * (x2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _rope_paged_attention_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    m_ptr, l_ptr, acc_ptr, q_norm_ptr, k_norm_ptr, norm_eps, scale, k_scale, v_scale, stride_qkv, stride_cos, stride_cb, stride_cs, stride_ch,
    stride_bt, stride_ob, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP_PAD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr, EARLY_KV: tl.constexpr,
    EARLY_LAUNCH: tl.constexpr, KV_CODE: tl.constexpr, QK_NORM: tl.constexpr,
):
    _pdl_start(USE_PDL, EARLY_LAUNCH)
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    GROUP: tl.constexpr = NUM_HEADS // NUM_KV_HEADS
    dtype = out_ptr.dtype.element_ty
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HALF)
    s = tl.arange(0, BLOCK_SIZE)
    g_mask = g < GROUP
    # Everything but q, k, v is read before waiting on the previous kernel: the positions, lengths and block
    # tables come from the host before the step, and the cached positions of this layer were written by earlier
    # steps (this step's new token goes to a slot past them). So the first page of this split's context is
    # already in registers when q arrives; under programmatic dependent launch that read overlaps the q|k|v GEMV.
    pos = tl.load(pos_ptr + seq).to(tl.int64)
    cos = tl.load(cos_ptr + pos * stride_cos + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + d).to(tl.float32)
    cached = tl.load(context_lens_ptr + seq) - 1  # all but the new token
    num_pages = tl.cdiv(cached, BLOCK_SIZE)
    per_split = tl.cdiv(num_pages, SPLITS)  # the context of this step, not the table's width, is split
    first = split * per_split
    last = tl.minimum(first + per_split, num_pages)
    table = block_tables_ptr + seq * stride_bt  # this sequence's block table row
    if EARLY_KV:
        kc1, kc2, vc1, vc2, s_mask = _load_page(k_cache_ptr, v_cache_ptr, table, first, last, cached,
                                                kv_head, s, d, stride_cb, stride_cs, stride_ch, k_scale, v_scale,
                                                dtype, HALF, BLOCK_SIZE, KV_CODE)
    _pdl_wait(USE_PDL, EARLY_LAUNCH)  # q, k, v come from the previous kernel
    if not EARLY_KV:
        kc1, kc2, vc1, vc2, s_mask = _load_page(k_cache_ptr, v_cache_ptr, table, first, last, cached,
                                                kv_head, s, d, stride_cb, stride_cs, stride_ch, k_scale, v_scale,
                                                dtype, HALF, BLOCK_SIZE, KV_CODE)
    row = qkv_ptr + seq * stride_qkv

    # rotary on the group's query heads (every split) and on the new key, rounded like rope_and_cache
    q_offs = (kv_head * GROUP + g)[:, None] * (2 * HALF) + d[None, :]
    q1 = tl.load(row + q_offs, mask=g_mask[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(row + HALF + q_offs, mask=g_mask[:, None], other=0.0).to(tl.float32)
    if QK_NORM:  # Qwen3: an RMSNorm over each head before the rotary
        q1, q2 = _head_rms_norm(q1, q2, q_norm_ptr, d, norm_eps, dtype, HALF)
    q1, q2 = (q1 * cos - q2 * sin).to(dtype), (q2 * cos + q1 * sin).to(dtype)

    # online softmax over this split's share of the cached positions ...
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc1 = tl.zeros([GROUP_PAD, HALF], tl.float32)
    acc2 = tl.zeros([GROUP_PAD, HALF], tl.float32)
    if first < last:
        m, l, acc1, acc2 = _attend_page(q1, q2, kc1, kc2, vc1, vc2, s_mask, m, l, acc1, acc2, scale, dtype, PRECISION)
    for page in range(first + 1, last):
        kc1, kc2, vc1, vc2, s_mask = _load_page(k_cache_ptr, v_cache_ptr, table, page, last, cached,
                                                kv_head, s, d, stride_cb, stride_cs, stride_ch, k_scale, v_scale,
                                                dtype, HALF, BLOCK_SIZE, KV_CODE)
        m, l, acc1, acc2 = _attend_page(q1, q2, kc1, kc2, vc1, vc2, s_mask, m, l, acc1, acc2, scale, dtype, PRECISION)
    # ... and split 0 writes the new k, v to their slot and adds the new token, from registers
    if split == 0:
        k_row = row + NUM_HEADS * 2 * HALF + kv_head * 2 * HALF
        v_row = row + (NUM_HEADS + NUM_KV_HEADS) * 2 * HALF + kv_head * 2 * HALF
        k1 = tl.load(k_row + d).to(tl.float32)
        k2 = tl.load(k_row + HALF + d).to(tl.float32)
        if QK_NORM:
            k1, k2 = _head_rms_norm(k1[None, :], k2[None, :], k_norm_ptr, d, norm_eps, dtype, HALF)
            k1, k2 = tl.reshape(k1, (HALF,)), tl.reshape(k2, (HALF,))
        k1, k2 = (k1 * cos - k2 * sin).to(dtype), (k2 * cos + k1 * sin).to(dtype)
        v1 = tl.load(v_row + d)
        v2 = tl.load(v_row + HALF + d)
        sk1, sk2 = kv_encode(k1, k_scale, KV_CODE), kv_encode(k2, k_scale, KV_CODE)
        sv1, sv2 = kv_encode(v1, v_scale, KV_CODE), kv_encode(v2, v_scale, KV_CODE)
        dst = tl.load(slot_ptr + seq).to(tl.int64) * stride_cs + kv_head * stride_ch
        tl.store(k_cache_ptr + dst + d, sk1)
        tl.store(k_cache_ptr + dst + HALF + d, sk2)
        tl.store(v_cache_ptr + dst + d, sv1)
        tl.store(v_cache_ptr + dst + HALF + d, sv2)
        if KV_CODE != 0:  # the new token attends to its K/V as the cache holds them, as every later step will
            k1, k2 = kv_decode(sk1, k_scale, dtype, KV_CODE), kv_decode(sk2, k_scale, dtype, KV_CODE)
            v1, v2 = kv_decode(sv1, v_scale, dtype, KV_CODE), kv_decode(sv2, v_scale, dtype, KV_CODE)
        score = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], 1) + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], 1)) * scale
        m_new = tl.maximum(m, score)
        p = tl.exp(score - m_new)
        alpha = tl.exp(m - m_new)
        l = l * alpha + p
        acc1 = acc1 * alpha[:, None] + p[:, None] * v1.to(tl.float32)[None, :]
        acc2 = acc2 * alpha[:, None] + p[:, None] * v2.to(tl.float32)[None, :]
        m = m_new
    heads = kv_head * GROUP + g
    if SPLITS == 1:
        o_offs = seq * stride_ob + heads[:, None] * (2 * HALF) + d[None, :]
        tl.store(out_ptr + o_offs, (acc1 / l[:, None]).to(dtype), mask=g_mask[:, None])
        tl.store(out_ptr + HALF + o_offs, (acc2 / l[:, None]).to(dtype), mask=g_mask[:, None])
    else:  # partial results, (B, SPLITS, Hq) and (B, SPLITS, Hq, D) in fp32, for _combine_kernel
        part = (seq * SPLITS + split) * NUM_HEADS + heads
        tl.store(m_ptr + part, m, mask=g_mask)
        tl.store(l_ptr + part, l, mask=g_mask)
        tl.store(acc_ptr + part[:, None] * (2 * HALF) + d[None, :], acc1, mask=g_mask[:, None])
        tl.store(acc_ptr + part[:, None] * (2 * HALF) + HALF + d[None, :], acc2, mask=g_mask[:, None])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_ob, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr, EARLY_LAUNCH: tl.constexpr):
    """Flash-decoding's combination of one head's splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
    Splits that got no pages hold m = -inf, l = 0, acc = 0; split 0 always holds the new token."""
    _pdl_start(USE_PDL, EARLY_LAUNCH)
    _pdl_wait(USE_PDL, EARLY_LAUNCH)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    part = (seq * SPLITS + sp) * NUM_HEADS + head
    sp_mask = sp < SPLITS
    m = tl.load(m_ptr + part, mask=sp_mask, other=float("-inf"))
    weight = tl.exp(m - tl.max(m, 0))  # split 0 always holds the new token, so the max is finite
    l = tl.sum(tl.load(l_ptr + part, mask=sp_mask, other=0.0) * weight, 0)
    acc = tl.load(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=sp_mask[:, None], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / l
    tl.store(out_ptr + seq * stride_ob + head * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def attention_splits(batch: int, num_kv_heads: int, max_pages: int, device: torch.device) -> int:
    """Context splits per (sequence, KV head) program row: about two programs per SM in all, at most 32
    splits and at most one per page of the widest block table. The kernel divides each sequence's actual
    pages among the splits, so a short context leaves the last splits empty (the combine skips them)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return max(1, min(32, max_pages, -(-2 * sms // (batch * num_kv_heads))))


def rope_paged_attention(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
    num_heads: int, scale: float, splits: int | None = None, options: DecodeKernelOptions = _DEFAULT_OPTIONS,
    kv_scales: tuple[float, float] = (1.0, 1.0), kv_code: int = 0, qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """qkv (B, (Hq + 2 Hkv) D) one new token per sequence, unrotated; cos/sin (max_positions, D / 2) (the first
    half of HF's rotary output); positions, slots (B,) int64; caches (num_blocks, block_size, Hkv, D);
    block_tables (B, max_blocks) int32; context_lens (B,) int32 including the new token. Writes the new
    k, v into the caches and returns the attention output (B, Hq * D). Each sequence's context is divided
    among `splits` programs per KV head (default: `attention_splits`), combined by a second launch. `options`:
    how the kernels launch and when the first page is read (kernels/decode_options.py). `kv_code`/`kv_scales`:
    how the caches store K/V (kernels/kv_codec.py). `qk_norm`: (q weight (D,), k weight (D,), eps) of an RMSNorm over
    each query and key head before the rotary (Qwen3's q_norm / k_norm)."""
    batch = qkv.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    splits = splits or attention_splits(batch, num_kv_heads, block_tables.shape[1], qkv.device)
    out = torch.empty(batch, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    m = torch.empty(batch, splits, num_heads, dtype=torch.float32, device=qkv.device) if splits > 1 else out
    l = torch.empty_like(m) if splits > 1 else out
    acc = torch.empty(batch, splits, num_heads, head_dim, dtype=torch.float32, device=qkv.device) if splits > 1 else out
    pdl = pdl_enabled(qkv.device, options)
    q_norm, k_norm, norm_eps = qk_norm if qk_norm is not None else (out, out, 0.0)
    _rope_paged_attention_kernel[(batch, num_kv_heads, splits)](
        qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens, out, m, l, acc, q_norm, k_norm, norm_eps,
        scale, kv_scales[0], kv_scales[1],
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        GROUP_PAD=max(16, triton.next_power_of_2(num_heads // num_kv_heads)), HALF=head_dim // 2, BLOCK_SIZE=block_size,
        SPLITS=splits, PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32", USE_PDL=pdl, EARLY_KV=options.kv_before_wait,
        EARLY_LAUNCH=options.launch_dependents_early, KV_CODE=kv_code, QK_NORM=qk_norm is not None, num_warps=4,
        launch_pdl=pdl,
    )
    if splits > 1:
        _combine_kernel[(batch, num_heads)](m, l, acc, out, out.stride(0), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
                                             SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), USE_PDL=pdl,
                                             EARLY_LAUNCH=options.launch_dependents_early, num_warps=1,
                                             launch_pdl=pdl)
    return out
