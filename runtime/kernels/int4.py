"""INT4 weight-only matmul through PyTorch's packed int4 kernels (tinygemm on CUDA, the CPU port on CPU).

Both kernels compute y = x @ ((u - 8) * s + z).T with u in [0, 15] packed by `_convert_weight_to_int4pack*`
and `scales_and_zeros` (K / group, N, 2). Our grid is w = (q - zero_point) * s with q = u - 8, so
z = -zero_point * s, exact. Limits (checked by `supports_int4`): group in {32, 64, 128, 256}, K a multiple
of the group and N a multiple of 16 on CPU. Measured on the 2-core dev CPU (benchmarks/quant_speed.py): the
CPU kernel is fast only with bf16 activations (fp32 activations take a ~30x slower path), so x is cast
to bf16 and the result back to x's dtype.
"""

from __future__ import annotations

import torch

GROUP_SIZES = (32, 64, 128, 256)


def supports_int4(n: int, k: int, group_size: int | None, device: torch.device) -> bool:
    if group_size not in GROUP_SIZES or k % group_size:
        return False
    if device.type == "cuda":
        return n % 8 == 0 and k % 128 == 0  # innerKTiles 8 x 16
    return device.type == "cpu" and n % 16 == 0  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(N, G) scale and zero point -> (G, N, 2) in the kernel's (scale, additive zero) form."""
    z = torch.zeros_like(scale) if zero is None else -zero.float() * scale
    return torch.stack([scale, z], dim=-1).transpose(0, 1).contiguous().to(dtype)


def prepare_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, device: torch.device) -> dict:
    """q (N, K) int8 in [-8, 7] -> the packed weight and scales the kernel on `device` reads."""
    u = (q.to(torch.int32) + 8).to(device)  # (N, K) in [0, 15]
    if device.type == "cuda":
        u8 = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)  # (N, K / 2), even column in the high nibble
        packed = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), 8)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    return {"packed": packed, "scales_and_zeros": _scales_and_zeros(scale.float(), zero, torch.bfloat16).to(device)}


def int4_mm(x: torch.Tensor, state: dict, group_size: int) -> torch.Tensor:
    """x (M, K) any float dtype -> (M, N) in x's dtype."""
    xb = x.to(torch.bfloat16).contiguous()
    if x.device.type == "cuda":
        y = torch.ops.aten._weight_int4pack_mm(xb, state["packed"], group_size, state["scales_and_zeros"])
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, state["packed"], group_size, state["scales_and_zeros"])
    return y.to(x.dtype)
