"""Requests of 128 prompt / 1,024 output tokens that fit one KV-cache budget with bf16, FP8 and INT8 K/V.

Llama-3.2-1B shape, random bf16 weights, on one GPU. The same `--kv-gib` of KV cache is given to the runtime
three times: K/V in bf16, and FP8 / INT8 with per-layer scales calibrated on random prompts (as
`quant.kv_cache` records them). Reports the blocks the budget buys, how many 1,152-token requests fit at once
(blocks / blocks per request), the most sequences the scheduler actually ran in one step, preemptions, and the
output throughput of `--requests` requests at concurrency `--requests`.

    python benchmarks/kv_capacity_gpu.py [--kv-gib 4] [--requests 512] [--out DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_gpu import SHAPES, build  # noqa: E402

from optforge.formats.kv_cache import KV_QMAX, apply_kv_cache_layout  # noqa: E402
from optforge.runtime.bench import Workload, bench_runtime  # noqa: E402
from optforge.runtime.llm import Engine, EngineConfig  # noqa: E402


def kv_layout(model, dtype: str) -> dict:
    from optforge.passes.quant.kv_cache import calibrate_kv

    g = torch.Generator().manual_seed(1)
    samples = [torch.randint(100, model.config.vocab_size - 100, (1, 256), generator=g).cuda() for _ in range(4)]
    amax = calibrate_kv(model, samples)
    return {"dtype": dtype, "scales": {str(i): {"k": k / KV_QMAX[dtype], "v": v / KV_QMAX[dtype]} for i, (k, v) in amax.items()}}


def run(model, kv: str, args) -> dict:
    layout = kv_layout(model, kv) if kv != "bf16" else None
    for module in model.modules():  # each run starts from K/V in the model dtype
        if hasattr(module, "kv_quant"):
            module.kv_quant = None
    if layout:
        apply_kv_cache_layout(model, layout)
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", kv_cache_bytes=int(args.kv_gib * 2**30), max_num_seqs=args.requests,
                                              max_num_batched_tokens=8192, max_model_len=args.input_len + args.output_len))
    runner = engine.runner
    peak = 0
    step = engine.step

    def counting_step():
        nonlocal peak
        peak = max(peak, len(engine.scheduler.running))
        return step()

    engine.step = counting_step
    per_request = -(-(args.input_len + args.output_len) // runner.block_size)
    t = time.perf_counter()
    result = bench_runtime(engine, Workload(input_len=args.input_len, output_len=args.output_len, num_requests=args.requests, concurrency=args.requests))
    row = {"kv": kv, "kv_dtype": str(runner.kv_cache.dtype), "bytes_per_block": runner.bytes_per_block, "num_blocks": runner.num_blocks,
           "requests_that_fit": runner.num_blocks // per_request, "peak_running": peak, "preemptions": result["preemptions"],
           "output_tok_s": result["output_tok_s"], "seconds": time.perf_counter() - t, "ttft_p90_s": result["ttft_s"]["p90"]}
    del engine, runner
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--kv", default="bf16,fp8,int8")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    model = build(SHAPES["Llama-3.2-1B"])
    print(f"{torch.cuda.get_device_name()}, torch {torch.version.cuda and torch.__version__}; Llama-3.2-1B shape bf16, KV budget {args.kv_gib} GiB, "
          f"{args.requests} requests of {args.input_len}/{args.output_len}\n", flush=True)
    print("| K/V | bytes per block | blocks | requests that fit | most running at once | preemptions | output tok/s | TTFT p90 s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    rows = []
    for kv in args.kv.split(","):
        row = run(model, kv, args)
        rows.append(row)
        print(f"| {kv} | {row['bytes_per_block']:,} | {row['num_blocks']:,} | {row['requests_that_fit']} | {row['peak_running']} | "
              f"{row['preemptions']} | {row['output_tok_s']:,.0f} | {row['ttft_p90_s']:.1f} |", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kv_capacity.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
