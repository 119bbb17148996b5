"""Where the runtime's time goes on the GPU: host profile of batch-1 decode, GPU time of one decode graph,
and per-step wall time by step kind for the 256 x 128/128 throughput workload (Llama-3.2-1B shape, bf16).
Usage (GPU machine): python benchmarks/profile_runtime_gpu.py [--batch1-only | --gaps]
(--gaps: only the GPU timeline of overlapped batch-1 decode steps, and where it idles)
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from runtime_gpu import SHAPES, build  # noqa: E402

from optforge.runtime.bench import Workload, bench_decode  # noqa: E402
from optforge.runtime.llm import Engine, EngineConfig  # noqa: E402
from optforge.runtime.sequence import SamplingParams  # noqa: E402


def batch1(model) -> None:
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=1, max_model_len=512))
    bench_decode(engine, 1, 128, 16)
    prof = cProfile.Profile()
    prof.enable()
    print("batch-1 decode:", bench_decode(engine, 1, 128, 256))
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    print(out.getvalue())
    graph = engine.runner.graphs.by_size[1][0]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    print(f"GPU time of one batch-1 decode graph: {(time.perf_counter() - start) / 200 * 1e3:.3f} ms "
          f"(context {int(engine.runner.graphs.static['lens'][0])}, as the last step left it)")
    body = engine.runner.graphs.body(1, engine.runner.decode_logits)  # the same kernels outside the graph, at that context: GPU time per kernel
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        body()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=50))


def gaps(model, steps: int = 24) -> None:
    """Where a batch-1 decode step's wall time goes beyond the graph's kernels: the GPU timeline of `steps`
    overlapped steps (kernels and copies, from the CUDA profiler), its idle gaps longer than 2 us, and the
    operations on either side of each."""
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=1, max_model_len=512))
    engine.add_request("gaps", Workload(input_len=128, num_requests=1).prompts(model.config.vocab_size)[0], SamplingParams(max_tokens=200, ignore_eos=True))
    for _ in range(40):  # prefill, then into the overlapped steady state
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in events)
    idle: dict[tuple[str, str], list[float]] = defaultdict(list)
    end = events[0].time_range.end
    for before, after in zip(events, events[1:]):
        gap = after.time_range.start - max(end, before.time_range.end)
        end = max(end, before.time_range.end)
        if gap > 2:
            idle[(before.name[:40], after.name[:40])].append(gap)
    span = events[-1].time_range.end - events[0].time_range.start
    print(f"{steps} overlapped batch-1 steps: wall {1e6 * wall / steps:.0f} us/step, GPU span {span / steps:.0f} us/step, "
          f"{len(events) / steps:.0f} GPU operations/step, their summed time {busy / steps:.0f} us/step")
    print("| idle gap > 2 us: after -> before | count | mean us | total us/step |")
    print("| --- | --- | --- | --- |")
    for (a, b), gs in sorted(idle.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"| {a} -> {b} | {len(gs)} | {sum(gs) / len(gs):.1f} | {sum(gs) / steps:.1f} |")


def throughput(model) -> None:
    engine = Engine(model, None, EngineConfig(dtype="bfloat16", device="cuda", max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=512))
    work = Workload(input_len=128, output_len=128, num_requests=256, concurrency=256)
    params = SamplingParams(max_tokens=128, ignore_eos=True)
    for i, prompt in enumerate(work.prompts(model.config.vocab_size)):
        engine.add_request(str(i), prompt, params)
    by_kind: dict[str, list[float]] = defaultdict(list)
    profiled = None
    start = time.perf_counter()
    while engine.has_unfinished:
        sched = engine.scheduler
        has_prefill = bool(sched.waiting) or any(q.num_uncomputed_tokens > 1 for q in sched.running)
        t = time.perf_counter()
        if has_prefill and len(by_kind["with prefill"]) == 1:  # the second prefill step (mixed with decodes)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as profiled:
                engine.step()
                torch.cuda.synchronize()
        else:
            engine.step()
            torch.cuda.synchronize()
        by_kind["with prefill" if has_prefill else "decode-only"].append(time.perf_counter() - t)
    total = time.perf_counter() - start
    print(f"throughput workload: {256 * 128 / total:,.0f} output tok/s, {total:.2f} s")
    for kind, times in by_kind.items():
        print(f"  {kind}: {len(times)} steps, {sum(times):.2f} s, mean {1e3 * sum(times) / len(times):.1f} ms, max {1e3 * max(times):.1f} ms")
        print("    step ms:", " ".join(f"{1e3 * x:.1f}" for x in times[:8]))
    if profiled is not None:  # where the second prefill step's time goes (profiled, so slower than the rest)
        for key in ("self_cuda_time_total", "self_cpu_time_total"):
            print(profiled.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))


def main() -> None:
    model = build(SHAPES["Llama-3.2-1B"])
    if "--gaps" in sys.argv:
        gaps(model)
        return
    batch1(model)
    if "--batch1-only" not in sys.argv:
        throughput(model)


if __name__ == "__main__":
    main()
