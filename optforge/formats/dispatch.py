"""Which runtime kernel an 8-bit-weight module calls: the Triton kernel where it can run, else None.

The quantized modules stay importable without the runtime: the kernel module is imported on the call.
"""

from __future__ import annotations

import torch

# Above this many rows the FP8 / W8A8 layers use the vendor GEMMs (compute-bound); below, our Triton kernel.
TRITON_MAX_ROWS = 64
# A large batch goes to the vendor GEMM this many rows at a time, so its int32/float32 temporaries stay bounded
# (4096 rows x 28672 outputs x 12 bytes: 1.3 GiB) whatever the batch: a calibration forward of 32k tokens
# through a W8A8 MLP would otherwise hold several copies of a (tokens x intermediate) float32 matrix.
ROWS_PER_GEMM = 4096


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
