"""Pruning on SmolLM2-135M-Instruct: size, perplexity, ARC-Easy, HellaSwag, paired deltas; CPU or GPU machine.

Runs each pruning pass through the same cache the pipeline uses (same cache keys as
recipes/smollm2-prune-distill-quant.yaml), on --device (the prune passes load their input there, so their
calibration runs on the GPU with --device cuda), then scores every model on --device
(`benchmarks/scoring.py`): perplexity over BoolQ validation rows 0-40 (256 tokens), ARC-Easy and HellaSwag
acc_norm, with deltas against the dense model and 95% paired intervals. Calibration text: BoolQ validation
rows 1000-2128 (the passes read their first 32 windows x 256 tokens; disjoint from the eval rows).
`--distill-steps N` adds distill.kd on the MLP-width -25% model (the GPU run uses benchmarks/distill_gpu.py).

    .venv/bin/python benchmarks/prune_quality.py --cache-dir /tmp/ofcache --limit-arc 100 --limit-hellaswag 100 --out prune.json
    python benchmarks/prune_quality.py --source /tmp/smol/fp32 --data eval_data.json.gz --device cuda --out prune.json
    python benchmarks/prune_quality.py --table-only prune.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scoring  # noqa: E402

# The same data section as recipes/smollm2-prune-distill-quant.yaml, so the recipe reuses these pass outputs.
CALIBRATION_ROWS, CALIBRATION_MAX_LENGTH = (1000, 2128), 512
CALIB = {"num_samples": 32, "seq_len": 256}  # 8,192 calibration tokens
DENSE = "SmolLM2-135M-Instruct dense fp32"
MLP_25 = "MLP width -25%"
PRUNINGS = [
    ("magnitude 50%", "prune.magnitude", {"sparsity": 0.5}),
    ("Wanda 50%", "prune.wanda", {"sparsity": 0.5, **CALIB}),
    ("SparseGPT 50%", "prune.sparsegpt", {"sparsity": 0.5, **CALIB}),
    ("magnitude 2:4", "prune.magnitude", {"pattern": "2:4"}),
    ("Wanda 2:4", "prune.wanda", {"pattern": "2:4", **CALIB}),
    ("SparseGPT 2:4", "prune.sparsegpt", {"pattern": "2:4", **CALIB}),
    (MLP_25, "prune.mlp_width", {"ratio": 0.25, **CALIB}),
    ("heads 9 -> 6 (GQA)", "prune.heads", {"ratio": 0.34, "unit": "query", **CALIB}),
    ("depth 30 -> 26 layers", "prune.depth", {"num_layers": 4, **CALIB}),
]


def calibration(rows: tuple[int, int] = CALIBRATION_ROWS):
    from optforge.recipe import CalibrationSpec

    return CalibrationSpec(rows=rows, max_length=CALIBRATION_MAX_LENGTH)


def run_cached(cache, name: str, config: dict, artifact, calib, *, source: str, device: str):
    """Run a pass as the pipeline does (same cache keys), without evals or gates. Returns (artifact, seconds, cached)."""
    from optforge.artifact import ModelArtifact
    from optforge.context import PassContext
    from optforge.pass_ import get_pass, make_config
    from optforge.recipe import ModelSpec

    cls = get_pass(name)
    p = cls(make_config(cls, config))
    key = p.cache_key(artifact.digest, calib.model_dump(mode="json"))
    started = time.perf_counter()
    entry, cached = cache.get_or_build_dir(
        "passes", key, lambda tmp: p.run(artifact, PassContext(output_dir=tmp, model=ModelSpec(source=source), calibration=calib, device=device)))
    return ModelArtifact.open(entry.path, entry.files), time.perf_counter() - started, cached


def evaluate(label: str, artifact, args, **extra) -> dict:
    from optforge.model_io import load_model

    model, tokenizer = load_model(artifact.path, device=args.device)
    row = {"label": label, "params": sum(p.numel() for p in model.parameters()), "bytes": artifact.weight_bytes(), **extra}
    row.update(scoring.score(model, tokenizer, limits=scoring.task_limits(args), batch_size=args.batch_size))
    return row


def table(doc: dict) -> str:
    rows = doc["rows"]
    base = next((r for r in rows if r["label"] == DENSE), rows[0])
    lines = [f"Machine: {doc['machine']}", "", "| model | params | weights | perplexity | ARC-Easy | HellaSwag | d ppl [95% CI] | d ARC-Easy [95% CI] | d HellaSwag [95% CI] |", "|" + " --- |" * 9]
    for row in rows:
        deltas = ["", "", ""] if row is base else scoring.delta_cells(base, row)
        lines.append("| " + " | ".join([row["label"], f"{row['params'] / 1e6:.1f}M", f"{row['bytes'] / 1e6:.0f} MB", *scoring.value_cells(row), *deltas]) + " |")
    return "\n".join(lines)


def distill_row(cache, pruned, args) -> dict:
    config = {"steps": args.distill_steps, "batch_size": args.distill_batch, "seq_len": args.distill_seq_len, "max_windows": args.distill_steps * args.distill_batch, "lr": args.distill_lr, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2}
    student, seconds, cached = run_cached(cache, "distill.kd", config, pruned, calibration(), source=args.source, device=args.device)
    info = json.loads((student.path / "optforge.json").read_text())["distillation"]
    label = f"{MLP_25} + distill.kd ({info['steps']} steps, {info['tokens']} tokens, {info['seconds']:.0f} s on {info['device']})"
    return evaluate(label, student, args, distillation=info, pass_seconds=round(seconds, 1), pass_cached=cached)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scoring.add_common_args(parser, hellaswag_default=2000)
    parser.add_argument("--only", nargs="*", default=None, help="run only the rows whose label contains one of these (case-insensitive), e.g. mlp wanda")
    parser.add_argument("--distill-steps", type=int, default=0, help="distill.kd steps on the MLP-width model; 0 skips it")
    parser.add_argument("--distill-seq-len", type=int, default=128)
    parser.add_argument("--distill-batch", type=int, default=4)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--table-only", nargs="*", default=None, help="print the table of these JSON result files and exit")
    args = parser.parse_args()
    if args.table_only is not None:
        print(table(scoring.saved_results(args.table_only)))
        return 0
    scoring.setup(args)
    from optforge.cache import Cache
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    cache = Cache(args.cache_dir)
    source, _ = resolve_source(ModelSpec(source=args.source), cache)
    results = scoring.Results(args.out, {"machine": scoring.machine(args.device), "source": args.source, "calibration_rows": list(CALIBRATION_ROWS), "limits": scoring.task_limits(args)})
    if results.get(DENSE) is None:
        results.add(evaluate(DENSE, source, args))
    for label, name, config in PRUNINGS:
        distill = label == MLP_25 and args.distill_steps > 0
        if (args.only and not any(o.lower() in label.lower() for o in args.only)) or (results.get(label) is not None and not distill):
            continue
        print(f"== {label}", flush=True)
        pruned, seconds, cached = run_cached(cache, name, config, source, calibration(), source=args.source, device=args.device)
        if results.get(label) is None:
            results.add(evaluate(label, pruned, args, pass_seconds=round(seconds, 1), pass_cached=cached))
        print(table(results.doc).splitlines()[-1], flush=True)
        if distill:
            results.add(distill_row(cache, pruned, args))
    print(table(results.doc), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
