"""INT8 per-output-channel weights: weight-only (`int8_weight_only`) and with INT8 activations (`w8a8_int8`).

Both store what compressed-tensors' "int-quantized" channel-wise checkpoints hold: weight int8 (out, in) and
weight_scale float32 (out, 1). `quantize_rows_int8` is the one int8 row rounding: the passes' weights, the
modules' `set_float` and the W8A8 activations at run time all go through it.
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.formats.dispatch import ROWS_PER_GEMM, TRITON_MAX_ROWS, triton_w8


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 RTN: x (M, K) float -> (q (M, K) int8, scale (M, 1) float32).

    scale = max|x[m, :]| / 127 and q = clamp(round(x / scale), -127, 127). An all-zero row gets scale 1 (never 0
    or NaN); its q is 0 whatever the scale, so every product with it is exactly 0.
    """
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    # a tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal (1 ulp off the CPU)
    scale = torch.where(amax > 0, amax / amax.new_tensor(127.0), torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale


class ChannelInt8Linear(nn.Module):
    """Buffers shared by the int8 schemes: weight int8 (out, in), weight_scale float32 (out, 1), optional bias."""

    scheme: str

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: dict | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.empty(out_features, 1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: str | None = None

    def set_float(self, w: torch.Tensor) -> None:
        """Round float weights w (out, in) to int8 with one symmetric scale per output channel (RTN)."""
        q, scale = quantize_rows_int8(w.detach())
        self.weight, self.weight_scale = q.contiguous(), scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class Int8WeightOnlyLinear(ChannelInt8Linear):
    """y = (x @ q.T) * s + b with q int8 (out, in) and s one scale per output channel.

    Kernel choice, measured (benchmarks/): on CUDA our Triton kernel (runtime/kernels/w8_matmul.py) reads the
    int8 weights and widens them in registers; `aten._weight_int8pack_mm` (13x slower than bf16 on an H100 at
    decode sizes) is the fallback where Triton is missing. On CPU that op costs ~0.5 ms per row for a
    576x1536 weight (slower than fp32 at any batch), so the CPU path casts q to the activation dtype per call
    and applies s after the matmul; the weights stay int8 in memory, the compute is dense. `kernel` names
    the path that ran.
    """

    scheme = "int8_weight_only"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = triton_w8(x2, self.weight)
        if kernel is not None:
            self.kernel = "triton w8_matmul"
            y = kernel.w8_matmul(x2, self.weight, self.weight_scale, bias=self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        scale = self.weight_scale.reshape(-1).to(x.dtype)  # (N,)
        if x.device.type == "cuda" and x.dtype != torch.float32:  # no Triton here
            self.kernel = "aten._weight_int8pack_mm"
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight, scale)
        else:  # CPU, or fp32 beyond decode sizes on CUDA
            self.kernel = "dequantize+matmul"
            y = (x2 @ self.weight.T.to(x.dtype)) * scale
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)


class W8A8Linear(ChannelInt8Linear):
    """INT8 weights (one scale per output channel) x INT8 activations (one dynamic scale per token).

    y = (q_x @ q_w.T) * s_x * s_w with an int32 accumulator: `torch._int_mm` on CPU and on CUDA (where it
    needs M > 16, so small batches are padded to 17 rows, and K, N multiples of 8). On CUDA, batches up to
    `TRITON_MAX_ROWS` rows run our Triton kernel instead (exact int products, fp32 sums; see w8_matmul.py). Buffers match
    compressed-tensors' "int-quantized" W8A8 checkpoints (weight int8 (out, in), weight_scale (out, 1)).
    SmoothQuant (passes/quant/smoothquant.py) folds the activation outliers into the weights beforehand.
    """

    scheme = "w8a8_int8"

    def _int_mm(self, xq: torch.Tensor) -> torch.Tensor:
        m = xq.shape[0]
        if xq.device.type == "cuda":
            if self.in_features % 8 or self.out_features % 8:
                self.kernel = "int8 emulated (float matmul)"
                return xq.float() @ self.weight.float().T
            self.kernel = "torch._int_mm"
            if m <= 16:  # cuBLASLt int8 GEMM needs M > 16
                xq = torch.cat([xq, xq.new_zeros(17 - m, self.in_features)])
            return torch._int_mm(xq, self.weight.T)[:m]
        self.kernel = "torch._int_mm"
        return torch._int_mm(xq, self.weight.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = triton_w8(x2, self.weight) if x2.shape[0] <= TRITON_MAX_ROWS else None
        if kernel is not None:  # decode sizes: per-token int8 rounding inside our kernel, one launch
            self.kernel = "triton w8_matmul (int8 activations)"
            y = kernel.w8_matmul(x2, self.weight, self.weight_scale, act=kernel.ACT_INT8_TOKEN, bias=self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        y = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for rows in range(0, x2.shape[0], ROWS_PER_GEMM):  # bounded float32/int32 temporaries, whatever the batch
            xq, x_scale = quantize_rows_int8(x2[rows : rows + ROWS_PER_GEMM])
            acc = self._int_mm(xq)  # (rows, N) int32
            y[rows : rows + ROWS_PER_GEMM] = acc.float().mul_(x_scale).mul_(self.weight_scale.reshape(1, -1))
        if self.bias is not None:
            y += self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)
