"""The quantized KV cache inside Triton kernels: what a kernel stores for K or V, and what it reads back.

`KV_CODE`: 0 the model dtype (stored as is), 1 INT8, 2 FP8 E4M3 (`formats.kv_cache.StoredKV.code`). Both round
as `formats.kv_cache.encode_kv` does: x / scale, saturated, to nearest even, so a kernel's cache holds the
same bytes as the torch path's. Reading multiplies by the scale and rounds to the model dtype, as `decode_kv`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def kv_encode(x, scale, KV_CODE: tl.constexpr):
    """x (any float dtype) -> the cache's element: x itself, int8, or float8e4nv (the cast rounds to nearest even
    and saturates on sm_89+, after the explicit clamp)."""
    if KV_CODE == 1:
        y = tl.minimum(tl.maximum(x.to(tl.float32) / scale, -127.0), 127.0)
        r = tl.floor(y + 0.5)  # round half up, then move exact ties that landed on odd integers back down
        r = tl.where((r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)
        return r.to(tl.int8)
    elif KV_CODE == 2:
        return tl.minimum(tl.maximum(x.to(tl.float32) / scale, -448.0), 448.0).to(tl.float8e4nv)
    else:
        return x


@triton.jit
def kv_decode(stored, scale, dtype: tl.constexpr, KV_CODE: tl.constexpr):
    """A cache element -> its value in `dtype` (the model dtype)."""
    if KV_CODE == 0:
        return stored.to(dtype)
    else:
        return (stored.to(tl.float32) * scale).to(dtype)
