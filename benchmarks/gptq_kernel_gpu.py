"""GPTQ's column loop on the GPU: the torch loop (one launch sequence per column) against the Triton block
kernel (`passes/quant/gptq_block.py`, one launch per 128-column block), on the Linear stacks of a
Llama-3.1-8B layer as the GPTQ pass solves them (q|k|v and gate|up stacked on their shared Hessian).

Each shape: random bf16-scale weights, a Hessian from 4,096 random correlated tokens, int4 g128 symmetric,
in order and with act_order; wall time of `gptq_quantize` for each path (CUDA synchronized), the fraction of
codes that differ and the relative change of the Hessian-weighted reconstruction error. One JSON line per
case to `--out`/gptq_kernel.jsonl.

    python benchmarks/gptq_kernel_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from optforge.formats.grid import Grid, dequantize
from optforge.passes.quant import gptq

SHAPES = {"q|k|v": (6144, 4096), "o": (4096, 4096), "gate|up": (28672, 4096), "down": (4096, 14336)}


def _timed(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    grid = Grid(4, 128, True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    original = gptq._block_kernel
    for name in args.shapes:
        rows, cols = SHAPES[name]
        x = torch.randn(4096, cols, device="cuda", generator=gen)
        x = x + 0.5 * torch.randn(4096, 1, device="cuda", generator=gen)  # a shared component: correlated columns
        h = 2 * x.T @ x / x.shape[0]
        w = torch.randn(rows, cols, device="cuda", generator=gen) * 0.02
        for act_order in (False, True):
            solve = lambda: gptq.gptq_quantize(w, h, grid, act_order=act_order, damp=0.01, block_size=128)  # noqa: E731
            solve()  # Triton compile and cuBLAS warm-up, outside the timing
            fast, fast_s = _timed(solve)
            gptq._block_kernel = lambda W, **kw: None
            try:
                ref, ref_s = _timed(solve)
            finally:
                gptq._block_kernel = original

            def error(q, s, z):
                d = dequantize(q, s, z) - w
                return float(((d @ h) * d).sum())

            line = {"shape": name, "rows": rows, "columns": cols, "act_order": act_order, "torch_loop_s": round(ref_s, 3),
                    "triton_block_s": round(fast_s, 3), "speedup": round(ref_s / fast_s, 1),
                    "codes_differing": float((fast[0] != ref[0]).float().mean()),
                    "error_change": error(*fast) / error(*ref) - 1}
            print(json.dumps(line), flush=True)
            with open(args.out / "gptq_kernel.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
