"""Matmul kernels for low-bit weights. Each `prepare_*` turns stored (checkpoint-format) tensors into the
layout its kernel reads, once per device; each `*_mm` runs y = x @ W.T for x (M, K)."""
