"""What every command prints through: the stderr console, logging, progress bars, and a typed error's exit.

The CLI (`optforge.cli`) and the command modules import these from here, never from each other. Rich loads
on first use, so `optforge --help` stays fast.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from optforge.errors import OptforgeError


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[RichHandler(console=stderr_console(), show_path=False, show_time=False)])
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def progress_bars():
    """A rich progress display; yields progress(description, total) -> advance(n)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr_console(), transient=True) as bar:

        def start(description: str, total: int):
            task = bar.add_task(description, total=total)
            return lambda n=1: bar.advance(task, n)

        yield start


def fail(exc: OptforgeError) -> None:
    """Print a typed error and exit with its code (2 bad input, 3 gate failed, 1 otherwise)."""
    stderr_console().print(f"[bold red]error[/]: {exc}", highlight=False)
    raise typer.Exit(exc.exit_code)


# Set by `run_under_torchrun`: where rank 0 of the torchrun group leaves its exit code (torchrun's own is 1 for any
# failure, and a failing gate must still exit 3). `optforge.cli.main` writes it.
EXIT_FILE = "OPTFORGE_EXIT_FILE"


def run_under_torchrun(nproc: int, flag: str) -> int:
    """This command line under `torchrun --standalone --nproc-per-node N`, without `flag N` (the option that asked
    for it); returns rank 0's exit code."""
    import os
    import subprocess
    import tempfile

    args, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith(flag + "="):
            skip = False
            continue
        skip = arg == flag
        if not skip:
            args.append(arg)
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit"
        env = {**os.environ, EXIT_FILE: str(exit_file)}
        rc = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "optforge", *args], env=env)
        return int(exit_file.read_text()) if exit_file.is_file() else rc
