"""The quantized KV cache, emulated inside Hugging Face attention: K/V rounded as an FP8/INT8 cache stores them.

`quant.kv_cache` records per-layer scales in optforge.json (`kv_cache`); `apply_kv_cache_layout` makes a
loaded model read K/V through them, so evals see what serving with the quantized cache sees.
"""

from __future__ import annotations

import torch
from torch import nn

from optforge.formats.fp8 import FP8_MAX, round_to_e4m3

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
