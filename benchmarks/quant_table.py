"""Quality of SmolLM2-135M-Instruct per quantization scheme (perplexity, ARC-Easy, HellaSwag), on the CPU or a GPU.

Builds each scheme through `optforge.build` (pass outputs cached in --cache-dir; the build's own perplexity
eval runs on --device), then scores the artifact on --device: perplexity (BoolQ val rows 0-40, 256 tokens)
and ARC-Easy / HellaSwag acc_norm (`benchmarks/scoring.py`), with deltas against the first scheme (fp32)
and 95% paired intervals. "bf16" casts the fp32 source at load; the KV rows run fp32 weights with K/V
rounded through the calibrated cache scales. Calibration: BoolQ val rows 2000-(2000 + --calib-rows).

Where the passes compute: the build runs on --device, so with cuda the calibrated passes (AWQ, GPTQ,
SmoothQuant, static FP8, KV cache) load the model, the calibration samples and their statistics on the GPU;
the "calibration" column is the pass's own calibration time there.

    python benchmarks/quant_table.py --cache-dir /tmp/ofcache --limit-arc 100 --limit-hellaswag 100 --out quant.json
    python benchmarks/quant_table.py --source /tmp/smol/fp32 --data eval_data.json.gz --device cuda --out quant.json
    python benchmarks/quant_table.py --table-only quant.json [more.json ...]   # print the table of saved rows
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scoring  # noqa: E402

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
    # NVIDIA ModelOpt's own calibration under optforge (quant.modelopt), beside optforge's passes for the same scheme
    "FP8 E4M3 (tensor W, static A), ModelOpt FP8_DEFAULT_CFG": [{"name": "quant.modelopt", "config": {"config": "FP8_DEFAULT_CFG"}}],
    "int4 AWQ g128, ModelOpt INT4_AWQ_CFG": [{"name": "quant.modelopt", "config": {"config": "INT4_AWQ_CFG"}}],
    "fp32 weights + INT8 KV cache": [{"name": "quant.kv_cache", "config": {"dtype": "int8"}}],
    "fp32 weights + FP8 KV cache": [{"name": "quant.kv_cache", "config": {"dtype": "fp8"}}],
    "bf16": [],
}
# Schemes evaluated in another dtype than fp32 (the artifact is the fp32 source).
LOAD_DTYPE = {"bf16": "bfloat16"}


def recipe(passes: list, calib_rows: int, source: str) -> dict:
    return {
        "name": "quant-table",
        "model": {"source": source},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2000 + calib_rows], "max_length": 512}, "eval": {"perplexity": {"dataset": "boolq", "rows": [0, 40], "max_length": 256}}},
        "passes": passes,
        "output": "/tmp/quant-table/out",
    }


def run_scheme(label: str, args) -> dict:
    from optforge import build
    from optforge.model_io import load_model

    started = time.perf_counter()
    out_dir = Path(args.work_dir) / re.sub(r"[^A-Za-z0-9]+", "_", label)
    result = build(recipe(SCHEMES[label], args.calib_rows, args.source), cache_dir=args.cache_dir, output=out_dir, device=args.device)
    passes = result.manifest["passes"]
    layout = json.loads((result.output / "optforge.json").read_text())
    model, tokenizer = load_model(result.output, dtype=LOAD_DTYPE.get(label, "float32"), device=args.device)
    row = {"label": label, **scoring.score(model, tokenizer, limits=scoring.task_limits(args), batch_size=args.batch_size)}
    nbytes = sum(f["bytes"] for f in result.manifest["files"] if f["path"].endswith(".safetensors"))
    row["bytes"] = nbytes // 2 if label in LOAD_DTYPE else nbytes
    record = layout.get("kv_cache") or layout.get("quantization") or {}
    row["calib_s"] = record.get("calibration_seconds", passes[-1]["seconds"] if passes else 0.0)
    row["pass_cached"] = bool(passes and passes[-1]["cached"])
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def table(doc: dict) -> str:
    rows = doc["rows"]
    base = next((r for r in rows if r["label"] == "fp32"), rows[0])
    lines = [f"Machine: {doc['machine']}", "", "| scheme | weight bytes | perplexity | ARC-Easy | HellaSwag | d ppl [95% CI] | d ARC-Easy [95% CI] | d HellaSwag [95% CI] | calibration |", "|" + " --- |" * 9]
    for row in rows:
        deltas = ["", "", ""] if row is base else scoring.delta_cells(base, row)
        lines.append("| " + " | ".join([row["label"], f"{row['bytes'] / 1e6:.1f} MB", *scoring.value_cells(row), *deltas, f"{row['calib_s']:.1f} s" + (" (cached)" if row.get("pass_cached") else "")]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scoring.add_common_args(parser, hellaswag_default=2000)
    parser.add_argument("--calib-rows", type=int, default=64)
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES), help="labels to run, in order; the first is the baseline")
    parser.add_argument("--work-dir", default="/tmp/quant-table", help="where each scheme's artifact is written")
    parser.add_argument("--table-only", nargs="*", default=None, help="print the table of these JSON result files and exit")
    args = parser.parse_args()
    if args.table_only is not None:
        print(table(scoring.saved_results(args.table_only)))
        return 0
    unknown = [s for s in args.schemes if s not in SCHEMES]
    if unknown:
        raise SystemExit(f"unknown schemes {unknown}; known: {list(SCHEMES)}")
    scoring.setup(args)
    results = scoring.Results(args.out, {"machine": scoring.machine(args.device), "source": args.source, "calib_rows": args.calib_rows, "limits": scoring.task_limits(args)})
    for label in args.schemes:
        if results.get(label) is not None:
            print(f"{label}: already in {args.out}, skipped", flush=True)
            continue
        print(f"== {label}", flush=True)
        results.add(run_scheme(label, args))
        print(table(results.doc).splitlines()[-1], flush=True)
    print(table(results.doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
