"""Bit packing of int4 weights in the compressed-tensors "pack-quantized" layout.

Eight signed 4-bit values are offset by +8 and packed into one int32 along the packed dimension, value i at
bits [4i, 4i + 4). Weights pack along the input dimension (out, in) -> (out, in / 8); zero points pack
along the output dimension (out, G) -> (out / 8, G). Torch-only and exact; tested against compressed-tensors.
"""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # (8,)


def pack_int4(q: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """int8 values in [-8, 7] -> int32 with 8 values per word along `dim` (size must divide by 8)."""
    if dim == 0:
        return pack_int4(q.T, 1).T.contiguous()
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"int4 packing needs a multiple of 8 values along the packed dim, got {cols}")
    u = (q.to(torch.int32) + 8).reshape(rows, cols // 8, 8)
    return (u << _SHIFTS.to(q.device)).sum(dim=-1, dtype=torch.int32)


def unpack_int4(packed: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int4`: int32 words -> int8 values in [-8, 7]."""
    if dim == 0:
        return unpack_int4(packed.T, 1).T.contiguous()
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF  # (rows, words, 8)
    return (u.reshape(packed.shape[0], -1) - 8).to(torch.int8)
