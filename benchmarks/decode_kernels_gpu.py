"""Batch-1 decode kernels on the GPU, Llama-3.2-1B shapes, bf16: where the decode step's time goes.

1. Each projection of a layer and the LM head: cuBLAS (`F.linear`) against `fused_decode.gemv` with its
   prologue, each config of the gemv timed on its own, in us and GB/s of weight reads (CUDA graphs of calls
   over 16 weight copies, so weights stream from HBM and launch gaps between graph nodes are included, as
   they are in the decode graph).
2. The whole decode step: GPU time of the batch-1 CUDA graph with the fused path (6 launches per layer), the
   same without programmatic dependent launch, and without the fused path (the layer kernels of `_forward_fused`), and a kernel-by-kernel profile of the fused step.
3. Ablations of the fused step at context 383: the graph rebuilt with one part changed or left out.
Usage (GPU machine): python benchmarks/decode_kernels_gpu.py [--sections projections,step,ablate] [--shape NAME]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).parent))
from runtime_gpu import SHAPES, build  # noqa: E402

from optforge.runtime.kernels import fused_decode as fd  # noqa: E402
from optforge.runtime.bench import bench_decode  # noqa: E402
from optforge.runtime.kernels.decode_options import DecodeKernelOptions  # noqa: E402
from optforge.runtime.llm import Engine, EngineConfig  # noqa: E402
from optforge.runtime.model_runner import ModelRunner  # noqa: E402

REPS = 10


def graph_us(fn) -> float:
    """Mean GPU time of fn() in microseconds, from a CUDA graph of REPS calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (10 * REPS) * 1e6


def replay_us(graph: torch.cuda.CUDAGraph, reps: int = 200) -> float:
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


SWEEP = [(bn, bk, w, st, red) for red in (False, True) for bn, bk, w, st in (
    (2, 2048, 4, 2), (4, 1024, 4, 3), (4, 2048, 8, 2), (8, 512, 4, 3), (8, 1024, 4, 3), (8, 1024, 8, 3), (16, 256, 4, 4),
    (16, 512, 4, 3), (16, 512, 8, 3), (16, 1024, 8, 2), (32, 256, 4, 3), (32, 512, 8, 2), (64, 128, 4, 4), (64, 256, 8, 3),
    (4, 512, 2, 3), (8, 256, 2, 4), (2, 1024, 2, 3), (8, 2048, 8, 1), (16, 256, 4, 1), (4, 1024, 4, 1))]


def projections() -> None:
    """Each projection over as many weight copies as a decode step has (16 layers; 1 LM head), so the weights
    stream from HBM as they do in a step, not from the 50 MB L2 as a loop over one copy would."""
    h, i, v = 2048, 8192, 128256
    shapes = {"qkv": (3072, h, fd.PRO_RMSNORM), "o": (h, h, fd.PRO_NONE), "gate_up": (2 * i, h, fd.PRO_RMSNORM),
              "down": (h, i, fd.PRO_SILU_MUL), "lm_head": (v, h, fd.PRO_RMSNORM)}
    print("| projection | N x K | MB | cuBLAS us | GB/s | gemv best us | GB/s | best config | gemv autotuned us | GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    pdl = fd.pdl_enabled(torch.device("cuda"))
    for name, (n, k, pro) in shapes.items():
        copies = 1 if name == "lm_head" else 16
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, 2 * k if pro == fd.PRO_SILU_MUL else k, device="cuda", dtype=torch.bfloat16)
        norm = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        mb = n * k * 2 / 1e6
        per_call = lambda fn: graph_us(lambda: [fn(w) for w in ws]) / copies  # noqa: E731
        cublas = per_call(lambda w: F.linear(x[:, :k], w))
        timings = []
        for bn, bk, nw, st, red in SWEEP:
            def run(w, bn=bn, bk=bk, nw=nw, st=st, red=red):
                fd._gemv_kernel.fn[(triton.cdiv(n, bn),)](
                    x, w, y, norm, y, y, n, k, w.stride(0), 1e-5, PROLOGUE=pro, RESIDUAL=False, HAS_SCALE=False,
                    USE_PDL=pdl, EARLY_LAUNCH=DecodeKernelOptions().launch_dependents_early, BLOCK_N=bn, BLOCK_K=bk,
                    REDUCE_EACH=red, num_warps=nw, num_stages=st, launch_pdl=pdl)
            timings.append((per_call(run), f"{bn}x{bk} w{nw} s{st}{' reduce-each' if red else ''}"))
        best, label = min(timings)
        tuned = per_call(lambda w: fd.gemv(x, w, prologue=pro, norm_weight=norm))
        print(f"| {name} | {n} x {k} | {mb:.1f} | {cublas:.1f} | {mb / cublas * 1e3:.0f} | {best:.1f} | {mb / best * 1e3:.0f} | {label} "
              f"| {tuned:.1f} | {mb / tuned * 1e3:.0f} |")
        print("   all:", "; ".join(f"{lab} {t:.1f}" for t, lab in sorted(timings)[:12]))


def decode_step(model) -> None:
    # the same graph without programmatic dependent launch, for the comparison below
    no_pdl = ModelRunner(model, max_model_len=512, max_num_seqs=1, kernel_options=DecodeKernelOptions(use_pdl=False))
    no_pdl_ms = replay_us(no_pdl.graphs.by_size[1][0]) / 1e3
    del no_pdl
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=1, max_model_len=512))
    runner = engine.runner
    print("fused decode path active:", runner.decoder.decode_weights is not None, "| PDL:", fd.pdl_enabled(runner.device, runner.kernel_options))
    graph = runner.graphs.by_size[1][0]
    fused_ms = replay_us(graph) / 1e3
    s = runner.graphs.static
    body = runner.graphs.body(1, runner.decode_logits)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        body()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))
    saved, runner.decoder.decode_weights = runner.decoder.decode_weights, None  # the layer path, until captured
    unfused = runner.graphs.body(1, runner.decode_logits)
    unfused()
    torch.cuda.synchronize()
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        unfused()
    runner.decoder.decode_weights = saved
    unfused_ms = replay_us(g2) / 1e3
    print(f"batch-1 decode graph GPU time: fused {fused_ms:.3f} ms, fused without PDL {no_pdl_ms:.3f} ms, "
          f"unfused {unfused_ms:.3f} ms (static input token {s['tokens'][s['src'][0]].item()})")


def ablate(model) -> None:
    """The fused decode graph at context 383 (after a 128-token prompt and 256 new tokens), rebuilt with one
    thing changed at a time: what each part of the step costs inside the pipelined graph, where kernels overlap
    under programmatic dependent launch and a kernel's cost is not its time alone."""
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=1, max_model_len=512))
    print("batch-1 decode:", bench_decode(engine, 1, 128, 256))
    runner = engine.runner
    heads = runner.decoder.num_heads * runner.decoder.head_dim

    def step_ms(options: DecodeKernelOptions) -> float:
        body = runner.graphs.body(1, lambda *inputs: runner.decoder.forward_decode(runner.kv_cache, *inputs, options))
        body()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return replay_us(graph, 500) / 1e3

    attention, splits = fd.rope_paged_attention, fd.attention_splits
    shipped = DecodeKernelOptions()
    variants = {  # name: (kernel options, a kernel function of fused_decode replaced for the run, or None)
        "as shipped": (shipped, None),
        "KV read after the wait": (DecodeKernelOptions(kv_before_wait=False), None),
        "dependents launched after the wait": (DecodeKernelOptions(launch_dependents_early=False), None),
        "attention in one launch (1 split, no combine)": (shipped, ("attention_splits", lambda *a: 1)),
        "attention and combine left out": (shipped, ("rope_paged_attention", lambda qkv, *a, **k: qkv[:, :heads])),
        "no programmatic dependent launch": (DecodeKernelOptions(use_pdl=False), None),
    }
    print(f"context {int(runner.graphs.static['lens'][0])}")
    print("| variant | graph GPU ms | tok/s at that time |")
    print("| --- | --- | --- |")
    for name, (options, replaced) in variants.items():
        if replaced is not None:
            setattr(fd, *replaced)
        try:
            ms = step_ms(options)
        finally:
            fd.rope_paged_attention, fd.attention_splits = attention, splits
        print(f"| {name} | {ms:.3f} | {1e3 / ms:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="projections,step,ablate", help="comma-separated: projections, step, ablate")
    ap.add_argument("--shape", default="Llama-3.2-1B", choices=sorted(SHAPES), help="model shape for --sections step")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    if "projections" in sections:
        projections()
    if "step" in sections:
        decode_step(build(SHAPES[args.shape]))
    if "ablate" in sections:
        ablate(build(SHAPES[args.shape]))


if __name__ == "__main__":
    main()
