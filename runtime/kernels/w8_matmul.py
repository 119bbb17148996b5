"""Triton matmul for 8-bit weights on CUDA: INT8 or FP8 (E4M3) weights, one scale per output channel.

    y = (a(x) @ w.T) * s_w [* s_x] (+ b)

a(x) is x itself (weight-only INT8/FP8), or x rounded to INT8 / E4M3 with a per-token scale computed in the
kernel (dynamic) or a per-tensor one from calibration (static): the W8A8 INT8 and FP8 schemes. Why a kernel of
ours: at decode sizes the stock paths lose to bf16 on an H100 (benchmarks/RESULTS.md): `_weight_int8pack_mm`
is ~13x slower, and `_scaled_mm` / `_int_mm` need 3-5 extra elementwise launches per Linear (amax, divide,
cast, rescale) that cost more than the halved weight reads save. Here the weights stay 8-bit in memory and
are widened in registers, and the activation rounding happens in the same launch (the per-token amax is a
first pass over the row block, which is cheap: x is M x K against N x K weights). A single row (batch-1
decode) takes a GEMV kernel without MMA tiles; two or more rows a tiled kernel on the tensor cores.

Numerics: with rounded activations the MMA runs in fp16: every INT8 and E4M3 value, and each product of two
of them, is exact in fp16 x fp16 -> fp32, so the result is the scheme's integer / FP8 arithmetic up to fp32
summation order, not an approximation of it. Weight-only layers multiply in x's dtype (bf16/fp16; fp32 as
IEEE fp32), into which every INT8 / E4M3 weight converts exactly. Rounding matches the CPU reference: INT8 round-half-even and
clamp to +-127; E4M3 round-to-nearest-even, saturated to +-448; x / scale is an IEEE division (`div_rn`, not
Triton's default approximate one), so a value on a rounding tie lands where torch puts it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Activation handling, a constexpr of the kernel (the kernel reads the tl.constexpr twins: Triton only lets
# a jitted function see module globals that are constexpr).
ACT_NONE, ACT_INT8_TOKEN, ACT_FP8_TOKEN, ACT_FP8_STATIC = 0, 1, 2, 3
_NONE, _INT8_TOKEN, _FP8_TOKEN, _FP8_STATIC = (tl.constexpr(v) for v in (0, 1, 2, 3))

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk, w, s in ((16, 256, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4), (64, 256, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3))
]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M", "ACT", "X_F32"])
@triton.jit
def _w8_matmul_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, X_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn

    if ACT == _INT8_TOKEN or ACT == _FP8_TOKEN:
        amax = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + rk < K
            x = tl.load(x_rows + (k0 + rk)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        if ACT == _INT8_TOKEN:
            x_scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)  # (BLOCK_M,)
        else:
            x_scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    else:
        x_scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if ACT == _FP8_STATIC:
        x_scale = x_scale * tl.load(x_scale_ptr)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + rk < K
        x = tl.load(x_rows + (k0 + rk)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BN, BK)
        if ACT == _INT8_TOKEN:
            xq = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(x.to(tl.float32), x_scale[:, None])), -127.0), 127.0).to(tl.float16)
            acc += tl.dot(xq, tl.trans(w.to(tl.float16)))
        elif ACT == _FP8_TOKEN or ACT == _FP8_STATIC:
            xs = tl.minimum(tl.maximum(tl.math.div_rn(x.to(tl.float32), x_scale[:, None]), -448.0), 448.0)
            xq = xs.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float16)
            acc += tl.dot(xq, tl.trans(w.to(tl.float16)))
        elif X_F32:
            acc += tl.dot(x, tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:  # bf16 / fp16 activations as they are
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))

    w_scale = tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    y = acc * w_scale[None, :]
    if ACT != _NONE:
        y = y * x_scale[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


_GEMV_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
    for bn, bk, w, st in ((4, 1024, 4, 3), (8, 512, 4, 3), (8, 1024, 4, 2), (16, 256, 4, 3), (16, 512, 4, 3), (32, 256, 4, 3), (32, 128, 4, 4))
]


@triton.autotune(configs=_GEMV_CONFIGS, key=["N", "K", "ACT", "X_F32"])
@triton.jit
def _w8_gemv_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, bias_ptr, y_ptr, N, K, stride_wn,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, X_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # X_F32 is unused here (products are fp32 either way); it keeps the launch arguments of both kernels alike
    """One row of x (batch-1 decode): no MMA tile to fill, each program streams BLOCK_N weight rows."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * stride_wn
    x_scale = 1.0
    if ACT == _INT8_TOKEN or ACT == _FP8_TOKEN:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)))
        if ACT == _INT8_TOKEN:
            x_scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), 127.0)
        else:
            x_scale = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-12), 448.0)
    if ACT == _FP8_STATIC:
        x_scale = tl.load(x_scale_ptr)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = k0 + rk < K
        x = tl.load(x_ptr + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)  # (BK,)
        if ACT == _INT8_TOKEN:
            x = tl.minimum(tl.maximum(libdevice.rint(tl.math.div_rn(x, x_scale)), -127.0), 127.0)
        elif ACT == _FP8_TOKEN or ACT == _FP8_STATIC:
            x = tl.minimum(tl.maximum(tl.math.div_rn(x, x_scale), -448.0), 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)
        w = tl.load(w_rows + (k0 + rk)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, 1) * tl.load(w_scale_ptr + rn, mask=n_mask, other=0.0)
    if ACT != _NONE:
        y = y * x_scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def w8_matmul(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *, act: int = ACT_NONE,
    input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K) float, rows contiguous; weight (N, K) int8 or float8_e4m3fn; weight_scale (N,) or (N, 1)
    float32; input_scale (1,) float32 for ACT_FP8_STATIC. Returns (M, N) in x's dtype."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_rows, k = x.shape
    n = weight.shape[0]
    if act == ACT_FP8_STATIC and input_scale is None:
        raise ValueError("ACT_FP8_STATIC needs input_scale")
    y = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    w_scale = weight_scale.reshape(-1)
    if num_rows == 1:
        _w8_gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
            x, weight, w_scale, input_scale if input_scale is not None else w_scale, bias if bias is not None else w_scale, y,
            n, k, weight.stride(0), ACT=act, HAS_BIAS=bias is not None, X_F32=x.dtype == torch.float32,
        )
        return y
    block_m = min(64, max(16, triton.next_power_of_2(num_rows)))
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(num_rows, block_m))  # noqa: E731
    _w8_matmul_kernel[grid](
        x, weight, w_scale, input_scale if input_scale is not None else w_scale, bias if bias is not None else w_scale, y,
        num_rows, n, k, x.stride(0), weight.stride(0), y.stride(0),
        ACT=act, HAS_BIAS=bias is not None, X_F32=x.dtype == torch.float32, BLOCK_M=block_m,
    )
    return y


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernel runs on CUDA with sm 8.9+ for FP8 weights (E4M3 conversions), sm 8.0+ otherwise."""
    if x.device.type != "cuda" or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    major, minor = torch.cuda.get_device_capability(x.device)
    return (major, minor) >= ((8, 9) if weight.dtype == torch.float8_e4m3fn else (8, 0))
