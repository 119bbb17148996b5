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


# Above this many rows the FP8 / W8A8 layers use the vendor GEMMs (compute-bound); below, our Triton kernel.
TRITON_MAX_ROWS = 64


def triton_w8(x2: torch.Tensor, weight: torch.Tensor):
    """The Triton 8-bit-weight kernel module (runtime/kernels/w8_matmul.py) when it can run this call, else None.

    fp32 activations beyond decode sizes (evals in fp32) go to the fallbacks: the kernel's fp32 path uses IEEE
    fp32 FMAs, not tensor cores, and is slower there than dequantizing for cuBLAS."""
    if x2.device.type != "cuda" or (x2.dtype == torch.float32 and x2.shape[0] > TRITON_MAX_ROWS):
        return None
    try:
        from optforge.runtime.kernels import w8_matmul
    except ImportError:  # no triton on this machine
        return None
    return w8_matmul if w8_matmul.supported(x2, weight) else None


class _ChannelInt8Linear(nn.Module):
    """Buffers shared by the int8 schemes: weight int8 (out, in), weight_scale float32 (out, 1), optional bias."""

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


@scheme("int8_weight_only")
class Int8WeightOnlyLinear(_ChannelInt8Linear):
    """y = (x @ q.T) * s + b with q int8 (out, in) and s one scale per output channel.

    Kernel choice, measured (benchmarks/): on CUDA our Triton kernel (runtime/kernels/w8_matmul.py) reads the
    int8 weights and widens them in registers; `aten._weight_int8pack_mm` (13x slower than bf16 on an H100 at
    decode sizes) is the fallback where Triton is missing. On CPU that op costs ~0.5 ms per row for a
    576x1536 weight (slower than fp32 at any batch), so the CPU path casts q to the activation dtype per call
    and applies s after the matmul; the weights stay int8 in memory, the compute is dense. `kernel` names
    the path that ran.
    """

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

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


@scheme("weight_only")
class WeightOnlyLinear(nn.Module):
    """INT4/INT8 weight-only Linear, group-wise or per channel, symmetric or asymmetric.

    Buffers are the compressed-tensors tensors, so the saved state dict is a checkpoint `transformers` loads:
    int8 `weight` (out, in) or int4 `weight_packed` (out, in / 8) int32 + `weight_shape`; `weight_scale`
    (out, G) float32; asymmetric adds `weight_zero_point` (out, G) int8, packed (out / 8, G) for int4.
    Kernels (see runtime/kernels/): int4 runs PyTorch's packed int4 matmul where its shape limits allow; int8
    per channel runs our Triton kernel on CUDA (`aten._weight_int8pack_mm` without Triton) and a cast+matmul
    on CPU; everything else dequantizes then multiplies, and `kernel` says so.
    """

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
        from optforge.runtime.packing import pack_int4

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
        from optforge.passes.quant.grid import Grid, qparams, quantize

        grid = Grid(self.bits, self.group_size, self.symmetric)
        w = w.detach().float()
        scale, zero = qparams(w, grid)
        self.set_quantized(quantize(w, scale, zero, grid), scale, zero)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(q (out, in) int8, scale (out, G) float32, zero (out, G) int8 or None)."""
        from optforge.runtime.packing import unpack_int4

        q = unpack_int4(self.weight_packed) if self.bits == 4 else self.weight
        zero = None
        if not self.symmetric:
            zero = unpack_int4(self.weight_zero_point, dim=0) if self.bits == 4 else self.weight_zero_point
        return q, self.weight_scale, zero

    def dequantized(self) -> torch.Tensor:
        from optforge.passes.quant.grid import dequantize

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


@scheme("fp8")
class Fp8Linear(nn.Module):
    """FP8 (E4M3) weights and activations, W scale per output channel (default) or per tensor.

    spec: `strategy` "channel" | "tensor" (weights); `dynamic` true quantizes activations per token at run
    time, false uses the calibrated per-tensor `input_scale` buffer. CUDA (sm89+): `torch._scaled_mm` reads
    FP8 weights and activations. Elsewhere both are rounded through E4M3 and multiplied in float
    (`kernel` says so), so CPU evals see the same numerics. Buffers match compressed-tensors'
    "float-quantized" checkpoints (weight_scale (out, 1) or (1,), input_scale (1,)).
    """

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


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: x (M, K) float -> (q (M, K) int8, scale (M, 1) float32)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


@scheme("w8a8_int8")
class W8A8Linear(_ChannelInt8Linear):
    """INT8 weights (one scale per output channel) x INT8 activations (one dynamic scale per token).

    y = (q_x @ q_w.T) * s_x * s_w with an int32 accumulator: `torch._int_mm` on CPU and on CUDA (where it
    needs M > 16, so small batches are padded to 17 rows, and K, N multiples of 8). On CUDA, batches up to
    `TRITON_MAX_ROWS` rows run our Triton kernel instead (exact int products, fp32 sums; see w8_matmul.py). Buffers match
    compressed-tensors' "int-quantized" W8A8 checkpoints (weight int8 (out, in), weight_scale (out, 1)).
    SmoothQuant (passes/quant/smoothquant.py) folds the activation outliers into the weights beforehand.
    """

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
        xq, x_scale = quantize_rows_int8(x2)
        acc = self._int_mm(xq)  # (M, N) int32
        y = (acc.float() * x_scale * self.weight_scale.reshape(1, -1)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


# ------------------------------------------------------------------------------- KV-cache quantization

KV_ATTENTION = "optforge_kv_quant"
KV_QMAX = {"fp8": FP8_MAX, "int8": 127.0}


def fake_quantize_kv(t: torch.Tensor, scale: float, dtype: str) -> torch.Tensor:
    """Round a K or V tensor (B, H, T, D) to what an FP8/INT8 cache with this per-tensor scale stores."""
    if dtype == "fp8":
        return (round_to_e4m3(t.float() / scale) * scale).to(t.dtype)
    return (torch.round(t.float() / scale).clamp(-127, 127) * scale).to(t.dtype)


def _kv_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA over the keys and values as the quantized cache holds them (post-RoPE, before GQA repeat)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "kv_quant", None)
    if kv is not None and "observed" in kv:  # calibration: record max |K|, |V| of this layer
        kv["observed"] = (max(kv["observed"][0], float(key.abs().max())), max(kv["observed"][1], float(value.abs().max())))
    elif kv is not None:
        key = fake_quantize_kv(key, kv["k_scale"], kv["dtype"])
        value = fake_quantize_kv(value, kv["v_scale"], kv["dtype"])
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_layers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer_idx: attention module} for HF decoders whose attention modules carry `layer_idx`."""
    return {m.layer_idx: m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "k_proj")}


def use_kv_attention(model: nn.Module, per_layer: dict[int, dict | None]) -> None:
    """Route attention through `_kv_attention`, with `per_layer[idx]` as each layer's `kv_quant` state.

    The emulation keeps the model's own cache in float and rounds K/V on read, which is numerically what a
    quantized cache returns. It needs HF's SDPA attention path (transformers' AttentionInterface).
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(KV_ATTENTION, _kv_attention)
    AttentionMaskInterface.register(KV_ATTENTION, sdpa_mask)
    for idx, module in attention_layers(model).items():
        module.kv_quant = per_layer.get(idx)
    model.config._attn_implementation = KV_ATTENTION


def apply_kv_cache_layout(model: nn.Module, kv_layout: dict | None) -> bool:
    """Make `model` read K/V as the artifact's quantized KV cache would (optforge.json `kv_cache`)."""
    if not kv_layout:
        return False
    scales = kv_layout["scales"]
    use_kv_attention(model, {int(i): {"dtype": kv_layout["dtype"], "k_scale": s["k"], "v_scale": s["v"]} for i, s in scales.items()})
    return True


def kernels_used(model: nn.Module) -> dict[str, str | None]:
    """{module name: kernel that ran last} for every quantized module (None: not run yet)."""
    return {name: m.kernel for name, m in model.named_modules() if hasattr(m, "scheme") and hasattr(m, "kernel")}


def quantize_in_memory(model: nn.Module, spec: dict, *, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Swap every nn.Linear (names containing a `skip` entry excepted) for `spec`'s module, rounded from its
    float weights (RTN, on the weights' device). For speed measurements and tests: artifacts come from the
    passes, which calibrate. Returns the swapped names."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)]
    for name in names:
        old = model.get_submodule(name)
        new = swap_linear(model, name, spec)
        new.set_float(old.weight)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().clone(), requires_grad=False)
        new.to(old.weight.device)
    return names


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
