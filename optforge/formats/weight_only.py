"""Weight-only INT4/INT8 (`weight_only`): group-wise or per channel, symmetric or asymmetric.

The grid math is `optforge.formats.grid`, the int4 bit layout `optforge.formats.packing`; the kernels are the
runtime's (runtime/kernels/), imported when the module first runs.
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.formats.dispatch import triton_w8
from optforge.formats.grid import Grid, dequantize, qparams, quantize
from optforge.formats.packing import pack_int4, unpack_int4


class WeightOnlyLinear(nn.Module):
    """INT4/INT8 weight-only Linear, group-wise or per channel, symmetric or asymmetric.

    Buffers are the compressed-tensors tensors, so the saved state dict is a checkpoint `transformers` loads:
    int8 `weight` (out, in) or int4 `weight_packed` (out, in / 8) int32 + `weight_shape`; `weight_scale`
    (out, G) float32; asymmetric adds `weight_zero_point` (out, G) int8, packed (out / 8, G) for int4.
    Kernels (see runtime/kernels/): int4 runs PyTorch's packed int4 matmul where its shape limits allow; int8
    per channel runs our Triton kernel on CUDA (`aten._weight_int8pack_mm` without Triton) and a cast+matmul
    on CPU; everything else dequantizes then multiplies, and `kernel` says so.
    """

    scheme = "weight_only"

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: dict | None = None):
        super().__init__()
        spec = spec or {}
        self.in_features, self.out_features = in_features, out_features
        self.bits = int(spec.get("bits", 8))
        self.group_size = spec.get("group_size")
        self.symmetric = bool(spec.get("symmetric", True))
        groups = 1 if self.group_size is None else in_features // self.group_size
        if self.bits == 4:
            self.register_buffer("weight_packed", torch.empty(out_features, in_features // 8, dtype=torch.int32))
            self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=torch.float32))
        if not self.symmetric:
            zp_rows = out_features // 8 if self.bits == 4 else out_features
            self.register_buffer("weight_zero_point", torch.empty(zp_rows, groups, dtype=torch.int32 if self.bits == 4 else torch.int8))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: str | None = None
        self._prepared: dict | None = None

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        """Store q (out, in) int8, scale (out, G), zero (out, G) int8 or None in checkpoint form."""
        if self.bits == 4:
            self.weight_packed = pack_int4(q)
        else:
            self.weight = q.to(torch.int8).contiguous()
        self.weight_scale = scale.float().contiguous()
        if not self.symmetric:
            self.weight_zero_point = pack_int4(zero, dim=0) if self.bits == 4 else zero.to(torch.int8).contiguous()
        self._prepared = None

    def set_float(self, w: torch.Tensor) -> None:
        """Round float weights w (out, in) to this layer's grid (RTN); the passes make better grids (AWQ, GPTQ)."""
        grid = Grid(self.bits, self.group_size, self.symmetric)
        w = w.detach().float()
        scale, zero = qparams(w, grid)
        self.set_quantized(quantize(w, scale, zero, grid), scale, zero)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q (out, in) int8, scale (out, G) float32, zero (out, G) int8 or None)."""
        q = unpack_int4(self.weight_packed) if self.bits == 4 else self.weight
        zero = None
        if not self.symmetric:
            zero = unpack_int4(self.weight_zero_point, dim=0) if self.bits == 4 else self.weight_zero_point
        return q, self.weight_scale, zero

    def dequantized(self) -> torch.Tensor:
        return dequantize(*self.quantized())

    def _prepare(self, device: torch.device) -> dict:
        from optforge.runtime.kernels.int4 import prepare_int4, supports_int4

        if self._prepared is not None and self._prepared["device"] == device:
            return self._prepared
        q, scale, zero = self.quantized()
        state: dict = {"device": device}
        if self.bits == 4 and supports_int4(self.out_features, self.in_features, self.group_size, device):
            state.update(prepare_int4(q, scale, zero, device), kernel="int4pack_mm")
        elif self.bits == 8 and self.symmetric and self.group_size is None and device.type == "cuda":
            state.update(kernel="triton w8_matmul" if triton_w8(torch.empty(0, device=device), self.weight) else "aten._weight_int8pack_mm")
        elif self.bits == 8 and self.symmetric and self.group_size is None:
            state.update(kernel="int8 cast+matmul")
        else:
            # No kernel reads this layout here: keep a dense copy (memory saving lost for this layer).
            state.update(kernel="dequantize+matmul", dense=self.dequantized().to(device))
        self._prepared = state
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from optforge.runtime.kernels.int4 import int4_mm

        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        state = self._prepare(x.device)
        self.kernel = state["kernel"]
        if self.kernel == "int4pack_mm":
            y = int4_mm(x2, state, self.group_size)
        elif self.kernel == "triton w8_matmul" and triton_w8(x2, self.weight) is not None:
            from optforge.runtime.kernels.w8_matmul import w8_matmul

            y = w8_matmul(x2, self.weight, self.weight_scale)
        elif self.kernel == "aten._weight_int8pack_mm":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, self.weight_scale.reshape(-1).to(x.dtype))
        elif self.kernel in ("int8 cast+matmul", "triton w8_matmul"):  # the latter: fp32 rows past decode sizes
            self.kernel = "int8 cast+matmul"
            y = (x2 @ self.weight.T.to(x.dtype)) * self.weight_scale.reshape(-1).to(x.dtype)
        else:
            y = x2 @ state["dense"].T.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._prepared = None  # device or dtype moves invalidate the kernel layout
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}, kernel={self.kernel}"
