"""FP8 E4M3 weights and activations (`fp8`), and the E4M3 rounding shared with the FP8 KV cache."""

from __future__ import annotations

import torch
from torch import nn

from optforge.formats.dispatch import TRITON_MAX_ROWS, triton_w8

FP8_MAX = 448.0  # largest finite float8_e4m3fn value


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to the E4M3 range and cast (a plain cast overflows to NaN)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """The E4M3 value nearest each float (ties to even), kept in float32, saturated at +-448.

    Same values as a cast to float8_e4m3fn and back, without the cast: on CPU that cast runs ~100x slower
    than this (measured: ~120 ms for a 128 x 576 activation on the dev machine).
    """
    v = v.float().clamp(-FP8_MAX, FP8_MAX)
    _, exp = torch.frexp(v)  # |v| in [2^(exp-1), 2^exp)
    step = torch.exp2((exp.clamp(min=-5) - 4).float())  # 3 mantissa bits; subnormal spacing 2^-9
    return torch.round(v / step) * step


class Fp8Linear(nn.Module):
    """FP8 (E4M3) weights and activations, W scale per output channel (default) or per tensor.

    spec: `strategy` "channel" | "tensor" (weights); `dynamic` true quantizes activations per token at run
    time, false uses the calibrated per-tensor `input_scale` buffer. CUDA (sm89+): `torch._scaled_mm` reads
    FP8 weights and activations. Elsewhere both are rounded through E4M3 and multiplied in float
    (`kernel` says so), so CPU evals see the same numerics. Buffers match compressed-tensors'
    "float-quantized" checkpoints (weight_scale (out, 1) or (1,), input_scale (1,)).
    """

    scheme = "fp8"

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: dict | None = None):
        super().__init__()
        spec = spec or {}
        self.in_features, self.out_features = in_features, out_features
        self.strategy = spec.get("strategy", "channel")
        self.dynamic = bool(spec.get("dynamic", True))
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.empty((out_features, 1) if self.strategy == "channel" else (1,), dtype=torch.float32))
        if not self.dynamic:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.kernel: str | None = None
        self._dense: torch.Tensor | None = None
        self._w_scale_rows: torch.Tensor | None = None  # weight_scale as (N,), for the Triton kernel

    def set_float(self, w: torch.Tensor, input_amax: float | None = None) -> None:
        """Quantize float weights w (out, in); `input_amax` sets the static activation scale."""
        if not self.dynamic and input_amax is None:
            raise ValueError("a static FP8 layer needs input_amax (the calibrated max |x|) for its activation scale")
        w = w.detach().float()
        amax = w.abs().amax(dim=1, keepdim=True) if self.strategy == "channel" else w.abs().amax().reshape(1)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        self.weight = quantize_fp8(w, scale if self.strategy == "channel" else scale.reshape(1, 1))
        self.weight_scale = scale
        self._dense = self._w_scale_rows = None
        if not self.dynamic:
            self.input_scale = torch.tensor([max(input_amax or 0.0, 1e-6) / FP8_MAX], dtype=torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loaders cast floating tensors to the model dtype; E4M3 values survive the round trip exactly.
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dtype != torch.float8_e4m3fn:
            state_dict[key] = state_dict[key].to(torch.float8_e4m3fn)
        self._dense = self._w_scale_rows = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _activation_scale(self, x2: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            return x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # (M, 1)
        return self.input_scale.reshape(1, 1).expand(x2.shape[0], 1)

    def _triton(self, x2: torch.Tensor) -> torch.Tensor | None:
        """Decode-sized batches on CUDA: our kernel rounds x to E4M3 in the same launch (no extra kernels)."""
        kernel = triton_w8(x2, self.weight) if x2.shape[0] <= TRITON_MAX_ROWS else None
        if kernel is None:
            return None
        if self._w_scale_rows is None or self._w_scale_rows.device != x2.device:
            self._w_scale_rows = self.weight_scale.reshape(-1).expand(self.out_features).contiguous()
        self.kernel = "triton w8_matmul (E4M3 activations)"
        act = kernel.ACT_FP8_TOKEN if self.dynamic else kernel.ACT_FP8_STATIC
        return kernel.w8_matmul(x2, self.weight, self._w_scale_rows, act=act, input_scale=None if self.dynamic else self.input_scale, bias=self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = self._triton(x2)
        if y is not None:
            return y.reshape(*shape[:-1], self.out_features)
        x_scale = self._activation_scale(x2)  # (M, 1)
        w_scale = self.weight_scale.reshape(1, -1).expand(1, self.out_features)  # (1, N)
        if x.device.type == "cuda":
            self.kernel = "torch._scaled_mm"
            xq = quantize_fp8(x2, x_scale)
            y = torch._scaled_mm(xq, self.weight.T, scale_a=x_scale.contiguous(), scale_b=w_scale.contiguous(), out_dtype=torch.bfloat16).to(x.dtype)
        else:
            self.kernel = "fp8 emulated (dequantize+matmul)"
            if self._dense is None or self._dense.device != x.device:
                self._dense = self.weight.float()  # float copy of the E4M3 values: emulation, not a saving
            y = ((round_to_e4m3(x2.float() / x_scale) @ self._dense.T) * x_scale * w_scale).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, strategy={self.strategy}, dynamic={self.dynamic}, kernel={self.kernel}"
