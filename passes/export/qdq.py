"""INT8 weight-only layers as ONNX QDQ: DequantizeLinear(int8 W^T (K, N), scale (N,), axis=1) -> MatMul.

Traced as is, `Int8WeightOnlyLinear` becomes Cast(int8 -> float) -> MatMul, and the exporter's constant
folding turns the cast weight into a float initializer: the graph silently loses its compression. So before
export each such layer is swapped for `QdqLinear`, whose dequantization is a custom op translated to ONNX
DequantizeLinear (which the folding keeps, as QDQ consumers need it). The math is the same: with s per output
channel, (x @ q^T) * s == x @ (q^T * s).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.library.custom_op("optforge::dequantize_int8_columns", mutates_args=())
def dequantize_int8_columns(q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (K, N) * float scale (N,) -> float (K, N)."""
    return q_t.to(scale.dtype) * scale


@dequantize_int8_columns.register_fake
def _(q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty(q_t.shape, dtype=scale.dtype, device=q_t.device)


def _dequantize_int8_columns_onnx(q_t, scale):
    from onnxscript import opset18 as op

    return op.DequantizeLinear(q_t, scale, axis=1)


def translation_table() -> dict:
    """custom_translation_table for torch.onnx.export."""
    return {torch.ops.optforge.dequantize_int8_columns.default: _dequantize_int8_columns_onnx}


class QdqLinear(nn.Module):
    """Export-time stand-in for Int8WeightOnlyLinear: stores q^T (K, N) so the ONNX needs no Transpose."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight_t", weight.T.contiguous())  # (K, N) int8
        self.register_buffer("weight_scale", scale.reshape(-1).to(dtype))  # (N,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ dequantize_int8_columns(self.weight_t, self.weight_scale)
        return y if self.bias is None else y + self.bias


def swap_int8_for_qdq(model: nn.Module) -> int:
    """Replace every Int8WeightOnlyLinear in `model` (in place) with QdqLinear; return how many."""
    from optforge.formats.int8 import Int8WeightOnlyLinear

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Int8WeightOnlyLinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QdqLinear(module.weight, module.weight_scale, module.bias, dtype))
            swapped += 1
    return swapped
