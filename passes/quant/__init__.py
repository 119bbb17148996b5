"""Quantization passes."""

from optforge.passes.quant import awq, fp8, gptq, int8_weight_only, kv_cache, modelopt_quant, rtn, smoothquant  # noqa: F401
