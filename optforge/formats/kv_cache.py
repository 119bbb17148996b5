"""The quantized KV cache: FP8 (E4M3) or INT8 K/V, one byte per element, with a scale per layer for K and for V.

`quant.kv_cache` records the scales in optforge.json (`kv_cache`). A cache stores `encode_kv(x)` (x / scale,
saturated, rounded to nearest even) and reads back `decode_kv(stored)` (stored * scale, in the model dtype).
- The serving runtime's paged cache holds the encoded bytes (`StoredKV`, from the model's layers).
- Hugging Face attention emulates it (`apply_kv_cache_layout`): K/V pass through encode and decode on read, so
  evals through HF see the values the runtime's cache returns.
"""

from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

from optforge.errors import ArtifactError
from optforge.formats.fp8 import FP8_MAX, quantize_fp8

KV_ATTENTION = "optforge_kv_quant"
KV_QMAX = {"fp8": FP8_MAX, "int8": 127.0}
KV_STORAGE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


def encode_kv(x: torch.Tensor, scale: float, dtype: str) -> torch.Tensor:
    """What an FP8/INT8 cache with this scale stores for K or V: x / scale saturated and rounded to nearest even."""
    if dtype == "fp8":
        return quantize_fp8(x, scale)
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8)


def decode_kv(stored: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The K or V values an FP8/INT8 cache returns, in the model dtype."""
    return (stored.float() * scale).to(dtype)


def fake_quantize_kv(t: torch.Tensor, scale: float, dtype: str) -> torch.Tensor:
    """A K or V tensor as an FP8/INT8 cache with this scale returns it (same dtype and shape)."""
    return decode_kv(encode_kv(t, scale, dtype), scale, t.dtype)


@dataclass(frozen=True)
class StoredKV:
    """How a paged cache holds a model's K/V: `dtype` fp8 or int8, one byte per element, with `scales[layer]`
    = (k_scale, v_scale). `code` is the kernels' name for the format (0 would be the model dtype)."""

    dtype: str
    scales: tuple[tuple[float, float], ...]

    @property
    def storage(self) -> torch.dtype:
        return KV_STORAGE[self.dtype]

    @property
    def code(self) -> int:
        return {"int8": 1, "fp8": 2}[self.dtype]

    def encode(self, x: torch.Tensor, layer: int, kv: int) -> torch.Tensor:
        """`kv`: 0 for K, 1 for V."""
        return encode_kv(x, self.scales[layer][kv], self.dtype)

    def decode(self, stored: torch.Tensor, layer: int, kv: int, dtype: torch.dtype) -> torch.Tensor:
        return decode_kv(stored, self.scales[layer][kv], dtype)


def kv_kernel_args(kv: StoredKV | None, layer: int) -> dict:
    """How layer `layer`'s cache stores K/V, as the runtime's Triton kernels take it (`kv_code` 0: the model dtype)."""
    if kv is None:
        return {"kv_scales": (1.0, 1.0), "kv_code": 0}
    return {"kv_scales": kv.scales[layer], "kv_code": kv.code}


def stored_kv(model: nn.Module) -> StoredKV | None:
    """The quantized KV cache that a loaded artifact declares (`apply_kv_cache_layout` set it on every attention
    layer), or None where K/V stay in the model dtype."""
    layers = attention_layers(model)
    states = [getattr(layers[i], "kv_quant", None) for i in sorted(layers)]
    if not any(states):
        return None
    if not all(states) or len({s["dtype"] for s in states}) != 1 or any("observed" in s for s in states):
        raise ArtifactError("the artifact's KV-cache layout does not cover every attention layer with one dtype; rebuild it with quant.kv_cache")
    return StoredKV(states[0]["dtype"], tuple((float(s["k_scale"]), float(s["v_scale"])) for s in states))


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
