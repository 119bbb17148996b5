"""`optforge cache verify|prune|clear`: look after the content-addressed cache.

No torch at import time: `optforge --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from optforge.commands.console import stderr_console

cache_app = typer.Typer(
    name="cache",
    help="Check, trim or empty the cache of converted sources, pass outputs and eval results [default: ~/.cache/optforge].",
    no_args_is_help=True,
)
CACHE_DIR = typer.Option(None, "--cache-dir", help="The cache folder [default: ~/.cache/optforge].")


@cache_app.command()
def verify(
    cache_dir: Optional[Path] = CACHE_DIR,
    discard: bool = typer.Option(False, "--discard", help="Delete the entries that fail (a later build rebuilds them)."),
):
    """Re-hash every entry against what was recorded when it was written. Exit 1 if any entry is corrupt."""
    from optforge.cache import Cache

    console = stderr_console()
    with console.status("hashing cache entries") as status:
        checks = Cache(cache_dir).verify(discard=discard, progress=lambda name: status.update(f"hashing {name}"))
    bad = [c for c in checks if not c.ok]
    for check in bad:
        console.print(f"[red]corrupt[/] {check.kind}/{check.key[:16]}: {check.problem}" + (" (discarded)" if discard else ""), highlight=False)
    console.print(f"{len(checks)} entries checked, {len(bad)} corrupt" + ("" if not bad or discard else "; `optforge cache verify --discard` removes them"))
    if bad:
        raise typer.Exit(1)


@cache_app.command()
def prune(
    older_than: float = typer.Option(30.0, "--older-than", help="Remove entries not used for this many days."),
    cache_dir: Optional[Path] = CACHE_DIR,
):
    """Remove entries not used recently, and staging and resume folders left by interrupted builds."""
    from optforge.cache import Cache

    cache = Cache(cache_dir)
    before = cache.size_bytes()
    removed = cache.prune(older_than_s=older_than * 86400.0)
    stderr_console().print(f"removed {len(removed)} entries, freed {(before - cache.size_bytes()) / 1e6:.1f} MB", highlight=False)


@cache_app.command()
def clear(
    cache_dir: Optional[Path] = CACHE_DIR,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Remove every entry of the cache."""
    from optforge.cache import Cache

    cache = Cache(cache_dir)
    if not yes and not typer.confirm(f"remove everything under {cache.root} ({cache.size_bytes() / 1e6:.1f} MB)?"):
        raise typer.Exit(1)
    cache.clear()
    stderr_console().print(f"cleared {cache.root}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app)
