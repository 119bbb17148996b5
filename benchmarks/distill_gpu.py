"""Distillation after pruning: prune SmolLM2's MLP width by 25%, then distill.kd from the dense model.

Made for the GPU machine (one H100, ~5 minutes of training), and runs the same code on the CPU with tiny sizes.
Steps, each printed as it happens (flushed, so a run cut off by `timeout` shows how far it got):
1. score the dense source and the MLP-width -25% model (prune.mlp_width, 32 x 256 calibration tokens from
   BoolQ val rows 1000-2128: the same pass output as prune_quality.py's row);
2. distillation text: BoolQ validation rows --rows (default 100-3270), cut into --seq-len windows; disjoint
   from the perplexity rows 0-40 (and from ARC-Easy / HellaSwag, other data sets);
3. unless --steps is given, time --probe-steps training steps of the student (same loss, batch and length)
   and take as many steps as fit --budget-s seconds of training, at most --max-epochs passes over the text
   (410k tokens in rows 100-3270; repeating it much more invites overfitting it);
4. distill.kd (teacher = the dense source, top-64 logits, embeddings/lm_head frozen, AdamW, warmup then
   cosine; on CUDA with TF32 matmuls unless --no-train-tf32, which the probe uses too), then score the
   student (evals always in full fp32). Perplexity: BoolQ val rows 0-40, 256 tokens; ARC-Easy / HellaSwag acc_norm.
The JSON (--out) holds every row and a summary: perplexity before/after, the fraction of the pruning loss
recovered, tokens, seconds, tokens/s, the rows used and the device.

    python benchmarks/distill_gpu.py --source /tmp/smol/fp32 --data eval_data.json.gz --device cuda --out distill.json
    .venv/bin/python benchmarks/distill_gpu.py --cache-dir /tmp/ofcache --steps 2 --batch 1 --seq-len 64 --max-windows 4 --limit-arc 5 --limit-hellaswag 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scoring  # noqa: E402
from prune_quality import CALIB, DENSE, MLP_25, calibration, evaluate, run_cached  # noqa: E402

DISTILLED = f"{MLP_25} + distill.kd"


@contextlib.contextmanager
def train_tf32(args):
    """TF32 matmuls for training only (--train-tf32 on CUDA); the evals stay in full fp32."""
    import torch

    enabled = args.train_tf32 and args.device.startswith("cuda")
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def probe_tokens_per_s(artifact, args) -> float:
    """Training tokens/s of the student at the run's batch and length (the first step, a warm-up, not timed)."""
    import torch

    from optforge.passes.distill.kd import kd_loss
    from optforge.model_io import load_model

    model, _ = load_model(artifact.path, device=args.device)
    model.train()
    params = [p for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (args.batch, args.seq_len), generator=gen).to(args.device)
    vals = torch.randn(args.batch * args.seq_len, args.top_k, generator=gen).to(args.device)
    inds = torch.randint(vocab, (args.batch * args.seq_len, args.top_k), generator=gen).to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for step in range(args.probe_steps + 1):
        if step == 1:
            sync()
            started = time.perf_counter()
        logits = model.lm_head(model.model(input_ids=ids, use_cache=False).last_hidden_state)
        loss = kd_loss(logits.reshape(-1, vocab), vals, inds, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync()
    seconds = time.perf_counter() - started
    del model, optimizer
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return args.probe_steps * args.batch * args.seq_len / seconds


def count_windows(artifact, args) -> int:
    """Windows of --seq-len tokens the distillation text gives (as distill.kd will cut them)."""
    from transformers import AutoTokenizer

    from optforge.evals.datasets import load_texts
    from optforge.passes.calibration import token_windows

    tokenizer = AutoTokenizer.from_pretrained(artifact.path)
    return token_windows(tokenizer, load_texts(calibration(tuple(args.rows))), num_samples=args.max_windows, seq_len=args.seq_len, pass_name="distill_gpu").shape[0]


def plan(results, pruned, args) -> dict:
    """Training steps: --steps, else the plan saved in --out (so a rerun resumes the same run), else the
    steps that fit --budget-s at the probed speed, at most --max-epochs passes over the text."""
    if args.steps:
        return {"steps": args.steps, "probed_tokens_per_s": None}
    key = {"batch": args.batch, "seq_len": args.seq_len, "budget_s": args.budget_s, "max_epochs": args.max_epochs, "rows": list(args.rows), "max_windows": args.max_windows}
    saved = results.doc.get("plan")
    if saved and all(saved.get(k) == v for k, v in key.items()):
        return saved
    windows = count_windows(pruned, args)
    tok_s = probe_tokens_per_s(pruned, args)
    budget_steps = max(1, int(args.budget_s * tok_s / (args.batch * args.seq_len)))
    epoch_steps = max(1, int(args.max_epochs * windows / args.batch))
    steps = min(budget_steps, epoch_steps)
    print(f"plan: {windows} windows of {args.seq_len} tokens; probe {tok_s:.0f} tokens/s -> {budget_steps} steps in {args.budget_s:.0f} s; {args.max_epochs} epochs = {epoch_steps} steps; taking {steps}", flush=True)
    return {"steps": steps, "probed_tokens_per_s": round(tok_s, 1), "windows": windows, **key}


def kd_config(steps: int, args) -> dict:
    return {
        "steps": steps,
        "batch_size": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "warmup_steps": max(1, steps // 20),
        "top_k": args.top_k,
        "max_windows": args.max_windows,
        "checkpoint_every": max(4, steps // 4),
        "log_every": max(1, steps // 40),
    }


def summary(dense: dict, pruned: dict, student: dict, info: dict, args) -> dict:
    d, p, s = (r["perplexity"]["value"] for r in (dense, pruned, student))
    return {
        "perplexity": {"dense": d, "pruned": p, "distilled": s},
        "recovered_fraction": (p - s) / (p - d) if p != d else None,
        "distill_rows": {"dataset": "boolq", "split": "validation", "rows": list(args.rows)},
        "perplexity_rows": {"dataset": "boolq", "split": "validation", "rows": list(scoring.PPL_ROWS), "max_length": scoring.PPL_MAX_LENGTH},
        "prune_calibration": {"rows": [1000, 2128], **CALIB},
        "training": info,
        "train_tf32": bool(args.train_tf32 and args.device.startswith("cuda")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scoring.add_common_args(parser, hellaswag_default=2000)
    parser.add_argument("--rows", type=int, nargs=2, default=(100, 3270), help="BoolQ validation rows [start, stop) of distillation text")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds of training to plan for (with the probe)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps; overrides the probe")
    parser.add_argument("--probe-steps", type=int, default=5)
    parser.add_argument("--max-epochs", type=float, default=10.0, help="at most this many passes over the distillation text (the budget may allow more)")
    parser.add_argument("--batch", type=int, default=16, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    parser.add_argument("--max-windows", type=int, default=None, help="use only the first N windows of the text (default all)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--train-tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls while training on CUDA (evals stay fp32)")
    args = parser.parse_args()
    if args.rows[0] < scoring.PPL_ROWS[1]:
        raise SystemExit(f"--rows {args.rows} overlap the perplexity rows {scoring.PPL_ROWS}; start at {scoring.PPL_ROWS[1]} or later")
    scoring.setup(args)
    from optforge.cache import Cache
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    cache = Cache(args.cache_dir)
    source, _ = resolve_source(ModelSpec(source=args.source), cache)
    results = scoring.Results(args.out, {"machine": scoring.machine(args.device), "source": args.source, "limits": scoring.task_limits(args)})
    if results.get(DENSE) is None:
        print(f"== {DENSE}", flush=True)
        results.add(evaluate(DENSE, source, args))
    print(f"== {MLP_25}", flush=True)
    pruned, seconds, cached = run_cached(cache, "prune.mlp_width", {"ratio": 0.25, **CALIB}, source, calibration(), source=args.source, device=args.device)
    if results.get(MLP_25) is None:
        results.add(evaluate(MLP_25, pruned, args, pass_seconds=round(seconds, 1), pass_cached=cached))
    with train_tf32(args):
        results.doc["plan"] = plan(results, pruned, args)
    config = kd_config(results.doc["plan"]["steps"], args)
    print(f"== distill.kd {json.dumps(config)} on BoolQ val rows {args.rows[0]}-{args.rows[1]} (plan {results.doc['plan']})", flush=True)
    with train_tf32(args):
        student, seconds, cached = run_cached(cache, "distill.kd", config, pruned, calibration(tuple(args.rows)), source=args.source, device=args.device)
    info = json.loads((student.path / "optforge.json").read_text())["distillation"]
    print(f"distill.kd done in {seconds:.1f} s (cached: {cached}): {json.dumps(info)}", flush=True)
    results.add(evaluate(DISTILLED, student, args, config=config, pass_seconds=round(seconds, 1), pass_cached=cached))
    results.doc["summary"] = summary(results.get(DENSE), results.get(MLP_25), results.get(DISTILLED), info, args)
    results.doc["summary"]["distilled_vs_pruned"] = scoring.delta_cells(results.get(MLP_25), results.get(DISTILLED))
    results.add(results.get(DISTILLED))  # rewrite the file with the summary
    print(json.dumps(results.doc["summary"], indent=1), flush=True)
    base = results.get(DENSE)
    for row in results.doc["rows"]:
        deltas = "" if row is base else " | d vs dense " + " / ".join(scoring.delta_cells(base, row))
        print(f"{row['label']}: {' / '.join(scoring.value_cells(row))}{deltas}", flush=True)
    frac = results.doc["summary"]["recovered_fraction"]
    print(f"distilled vs pruned: {' / '.join(results.doc['summary']['distilled_vs_pruned'])}; recovered {frac:.1%} of the perplexity lost to pruning", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
