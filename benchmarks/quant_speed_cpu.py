"""CPU speed of SmolLM2-135M per quantization scheme: prefill and decode tokens/s at batch 1 and 8.

Loads each artifact through optforge's loader (the modules and kernels the runtime uses; fp32 is plain HF
transformers) and times a 128-token prefill and 32 greedy new tokens with HF `generate` (KV cache on).
The kernel column says what ran: `int4pack_mm` (PyTorch's packed int4 CPU kernel, bf16 activations),
`int8 cast+matmul` (int8 stored, cast per call), `dequantize+matmul` (fallback).
Usage: python benchmarks/quant_speed_cpu.py DIR [DIR ...] --threads 1
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path


def main() -> None:
    import torch

    from optforge.formats import kernels_used
    from optforge.model_io import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()} CPU, {args.threads} thread(s), torch {torch.__version__}; prompt {args.prompt}, {args.new} new tokens")
    print("| model | weight bytes | kernels | prefill tok/s b1 | prefill tok/s b8 | decode tok/s b1 | decode tok/s b8 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for d in args.dirs:
        model, _ = load_model(d)
        cells = []
        for batch in (1, 8):
            ids = torch.randint(100, 20000, (batch, args.prompt))
            with torch.inference_mode():
                model(input_ids=ids[:, :16])  # warm-up (prepares packed kernels)
                t = time.perf_counter()
                model(input_ids=ids)
                prefill = batch * args.prompt / (time.perf_counter() - t)
                t = time.perf_counter()
                model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
                total = time.perf_counter() - t
            decode = batch * args.new / max(total - batch * args.prompt / prefill, 1e-9)
            cells.append((prefill, decode))
        kernels = sorted({k for k in kernels_used(model).values() if k}) or ["fp32 dense"]
        size = sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))
        print(f"| {Path(d).name} | {size / 1e6:.1f} MB | {', '.join(kernels)} | {cells[0][0]:.0f} | {cells[1][0]:.0f} | {cells[0][1]:.1f} | {cells[1][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
