"""Modules that run quantized weights. They hold the stored tensors as buffers and pick a real kernel.

Quantized weights are made by the passes (`optforge.passes.quant`), stored by the artifact and swapped in here
by the loader (`optforge.runtime.loader`): make the state dict, swap modules, load with `assign=True`.
"""

from __future__ import annotations

import torch
from torch import nn

# Scheme name (as written in optforge.json) -> module class.
SCHEMES: dict[str, type[nn.Module]] = {}


def scheme(name: str):
    def deco(cls):
        SCHEMES[name] = cls
        cls.scheme = name
        return cls

    return deco


@scheme("int8_weight_only")
class Int8WeightOnlyLinear(nn.Module):
    """y = (x @ q.T) * s + b with q int8 (out, in) and s one scale per output channel.

    Kernel choice, measured (benchmarks/): on CUDA `aten._weight_int8pack_mm` reads the int8 weights directly.
    On CPU that op costs ~0.5 ms per row for a 576x1536 weight (slower than fp32 at any batch), so the CPU
    path casts q to the activation dtype per call and applies s after the matmul; the weights stay int8 in
    memory, the compute is dense. `kernel` names the path that ran.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: dict | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        scale = self.weight_scale.reshape(-1).to(x.dtype)  # (N,)
        if x.device.type == "cuda":
            self.kernel = "aten._weight_int8pack_mm"
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, scale)
        else:
            self.kernel = "dequantize+matmul"
            y = (x2 @ self.weight.T.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


def swap_linear(model: nn.Module, name: str, spec: dict) -> nn.Module:
    """Replace the Linear at `name` with the quantized module for `spec['scheme']` (empty buffers)."""
    cls = SCHEMES.get(spec["scheme"])
    if cls is None:
        raise ValueError(f"module '{name}': unknown quantization scheme '{spec['scheme']}' (known: {sorted(SCHEMES)})")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"module '{name}' is {type(old).__name__}, expected nn.Linear to quantize")
    new = cls(old.in_features, old.out_features, old.bias is not None, spec)
    setattr(parent, child, new)
    return new
