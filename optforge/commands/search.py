"""`optforge search RECIPE`: build every candidate of the recipe's `search:` section and publish the best that passes.

No torch at import time: `optforge --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from optforge.commands.console import fail, progress_bars, setup_logging, stderr_console


def search(
    recipe: Path = typer.Argument(..., help="Recipe YAML with a search: section (see recipes/smollm2-search.yaml)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact directory for the chosen candidate [default: the recipe's `output`]."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Cache of converted sources, pass outputs and eval results [default: ~/.cache/optforge]."),
    device: str = typer.Option("cpu", "--device", help="Device for passes and evals: cpu or cuda."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder that is not an optforge artifact."),
    max_device_memory: Optional[str] = typer.Option(None, "--max-device-memory", show_default=False, help="GPU memory calibrated passes may hold (see `optforge build --help`)."),
    max_host_memory: Optional[str] = typer.Option(None, "--max-host-memory", show_default=False, help="Host memory the build may hold (see `optforge build --help`)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Find the candidate to ship: build each combination of the search's steps, judge it with the search's gates
    against the source model, and publish the one the objective prefers among those that pass.

    Exit 0 with the chosen artifact (and search.html, search.md: every candidate, the Pareto front) at the output
    path; exit 3 when no candidate passes, naming the closest one and its failing gate; exit 2 on bad input.
    Everything is cached: a second run re-runs nothing, a widened search only the new candidates.
    """
    setup_logging(verbose)
    from optforge.errors import OptforgeError
    from optforge.resources import MemoryBudget
    from optforge.search import SearchFailed
    from optforge.search import search as run_search

    try:
        memory = MemoryBudget.parse(max_device_memory, max_host_memory)
        with progress_bars() as progress:
            result = run_search(recipe, output=output, cache_dir=cache_dir, device=device, progress=progress, force=force, memory=memory)
    except SearchFailed as exc:
        _print_candidates(exc.candidates)
        stderr_console().print(f"[bold red]search failed[/]: {exc}", highlight=False)
        stderr_console().print("Nothing was written to the output path.")
        raise typer.Exit(exc.exit_code)
    except OptforgeError as exc:
        fail(exc)
    _print_candidates(result.candidates, chosen=result.chosen["label"])
    typer.echo(f"chosen: {result.chosen['label']}\nartifact: {result.output}  (search.html lists every candidate; {result.seconds:.1f}s)")


def _print_candidates(candidates: list[dict], chosen: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from optforge.search_report import table_rows

    head, rows = table_rows(candidates)
    table = Table(title="search candidates")
    for h in head:
        table.add_column(h)
    for row, c in zip(rows, candidates):
        table.add_row(*row, style="bold" if c["label"] == chosen else None)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("search")(search)
