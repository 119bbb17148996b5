"""GPTQ's inner loop on CUDA: one Triton launch rounds every column of a lazy-update block.

Inside a block, GPTQ rounds column i of every row, then corrects that row's later columns of the block by the
rounding error times row i of the inverse-Hessian factor. Rows never read each other, so each program holds
`BLOCK_R` rows of the block in registers and walks its columns in order; the caller applies the block's
errors to the columns after it with one matmul, as the torch loop does. The torch loop spends ~18 launches
per column (8B-shaped layer on an H100: 26,624 columns, launch-bound); this is one per block.

Numerics are the torch loop's: IEEE division (`div_rn`), round-half-even, the same order of
operations. The compiler may fuse the update's multiply and subtract (one rounding instead of two), so on
the GPU a code can differ from the torch loop's where a value sits on a rounding boundary; under Triton's
CPU interpreter the results are identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optforge.formats.grid import Grid


_ROUNDER = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding and subtracting it rounds an fp32 of magnitude below 2^22 to an integer


@triton.jit
def _rint(x):
    """Round half to even, by the fp32 adder (libdevice's rint has no CPU-interpreter twin). Values are clamped to
    +-2^21 first, beyond every grid's range, so the trick stays exact; the callers clamp to the grid after."""
    x = tl.clamp(x, -2097152.0, 2097152.0)
    return (x + _ROUNDER) - _ROUNDER


@triton.jit
def _gptq_block_kernel(
    w_ptr, hinv_ptr, scale_ptr, zero_ptr, q_ptr, err_ptr, group_scale_ptr, group_zero_ptr,
    rows, stride_w, stride_q, stride_s, stride_gs, WIDTH: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, SYMMETRIC: tl.constexpr, FULL_RANGE: tl.constexpr,
    GROUPS_HERE: tl.constexpr, G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_mask, c_mask = r < rows, c < WIDTH
    tile_mask = r_mask[:, None] & c_mask[None, :]
    rr = r.to(tl.int64)[:, None]
    w = tl.load(w_ptr + rr * stride_w + c[None, :], mask=tile_mask, other=0.0)  # (BLOCK_R, BLOCK_C) float32
    s = tl.zeros([BLOCK_R], tl.float32)
    z = tl.zeros([BLOCK_R], tl.float32)
    for i in range(WIDTH):
        if GROUPS_HERE:
            if i % G == 0:  # a new group starts: its scale from the group's columns as they stand now
                in_group = ((c >= i) & (c < i + G))[None, :]
                if SYMMETRIC:
                    amax = tl.max(tl.where(in_group, tl.abs(w), 0.0), 1)
                    if FULL_RANGE:
                        s = tl.math.div_rn(amax, QMAX + 0.5)
                    else:
                        s = tl.math.div_rn(amax, QMAX * 1.0)
                    s = tl.where(amax > 0, s, 1.0)
                else:
                    lo = tl.min(tl.where(in_group, w, 0.0), 1)  # masked entries are 0: lo <= 0 <= hi
                    hi = tl.max(tl.where(in_group, w, 0.0), 1)
                    span = hi - lo
                    s = tl.where(span > 0, tl.math.div_rn(span, (QMAX - QMIN) * 1.0), 1.0)
                    z = tl.clamp(_rint(QMIN - tl.math.div_rn(lo, s)), QMIN * 1.0, QMAX * 1.0)
                    tl.store(group_zero_ptr + r.to(tl.int64) * stride_gs + i // G, z.to(tl.int8), mask=r_mask)
                tl.store(group_scale_ptr + r.to(tl.int64) * stride_gs + i // G, s, mask=r_mask)
        else:  # scales fixed up front, one per row and column
            s = tl.load(scale_ptr + r.to(tl.int64) * stride_s + i, mask=r_mask, other=1.0)
            if not SYMMETRIC:
                z = tl.load(zero_ptr + r.to(tl.int64) * stride_s + i, mask=r_mask, other=0.0)
        col = tl.sum(tl.where((c == i)[None, :], w, 0.0), 1)  # (BLOCK_R,)
        q = _rint(tl.math.div_rn(col, s))
        if not SYMMETRIC:
            q = q + z
        q = tl.clamp(q, QMIN * 1.0, QMAX * 1.0)
        if SYMMETRIC:
            dq = q * s
        else:
            dq = (q - z) * s
        d = tl.load(hinv_ptr + i * BLOCK_C + i)
        e = tl.math.div_rn(col - dq, d)
        h = tl.load(hinv_ptr + i * BLOCK_C + c, mask=c_mask, other=0.0)  # zero left of i: the factor is upper-triangular
        w = w - e[:, None] * h[None, :]
        tl.store(q_ptr + r.to(tl.int64) * stride_q + i, q.to(tl.int8), mask=r_mask)
        tl.store(err_ptr + r.to(tl.int64) * BLOCK_C + i, e, mask=r_mask)


def quantize_block(W: torch.Tensor, Hinv1: torch.Tensor, Q: torch.Tensor, grid: Grid, *, scale_cols: torch.Tensor | None = None,
                   zero_cols: torch.Tensor | None = None, group_scale: torch.Tensor | None = None, group_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Round the block W (rows, width) float32 (a column slice, rows of any stride) into Q (rows, width) int8
    (a slice likewise) and return the errors (rows, width) that the caller applies to the later columns.

    Either `scale_cols`/`zero_cols` (rows, width): each column's fixed scale and zero (zero None if symmetric);
    or `group_scale`/`group_zero` (rows, width / g): filled here with each group's parameters, computed when the
    group's first column comes up, from its columns as they stand (groups lie inside the block)."""
    rows, width = W.shape
    block_c = triton.next_power_of_2(width)
    hinv = torch.zeros(block_c, block_c, dtype=torch.float32, device=W.device)
    hinv[:width, :width] = Hinv1
    err = torch.empty(rows, block_c, dtype=torch.float32, device=W.device)
    groups_here = scale_cols is None
    dummy = err
    if groups_here:
        g = width // group_scale.shape[1]
        s_arg, z_arg, stride_s = dummy, dummy, 0
        gs, gz, stride_gs = group_scale, group_zero if group_zero is not None else dummy, group_scale.stride(0)
    else:
        g = width
        s_arg, stride_s = scale_cols.contiguous(), width
        z_arg = zero_cols.float().contiguous() if zero_cols is not None else dummy
        gs, gz, stride_gs = dummy, dummy, 0
    block_r = 16
    _gptq_block_kernel[(triton.cdiv(rows, block_r),)](
        W, hinv, s_arg, z_arg, Q, err, gs, gz, rows, W.stride(0), Q.stride(0), stride_s, stride_gs, WIDTH=width,
        QMIN=grid.qmin, QMAX=grid.qmax, SYMMETRIC=grid.symmetric, FULL_RANGE=grid.full_range,
        GROUPS_HERE=groups_here, G=g, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return err[:, :width]
