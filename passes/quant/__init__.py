"""Quantization passes."""

from optforge.passes.quant import int8_weight_only  # noqa: F401
