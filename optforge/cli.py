"""The `optforge` command line. Exit codes: 0 ok, 1 internal error, 2 bad input, 3 quality gate failed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from optforge.commands.console import EXIT_FILE, fail, progress_bars, run_under_torchrun, setup_logging, stderr_console
from optforge.errors import GateFailed, OptforgeError

app = typer.Typer(
    name="optforge",
    help=(
        "Optimize generative models with gated passes and emit verified artifacts.\n\n"
        "Start with `optforge build recipes/quickstart.yaml`, then `optforge inspect build/smollm2-int8`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

CacheOpt = typer.Option(None, "--cache-dir", help="Cache of converted sources, pass outputs and eval results [default: ~/.cache/optforge].")
DeviceOpt = typer.Option("cpu", "--device", help="Device for passes and evals: cpu or cuda.")
MaxDeviceOpt = typer.Option(
    None, "--max-device-memory", show_default=False,
    help="GPU memory calibrated passes may hold, e.g. 20GiB: the model stays on the host and one decoder layer at a time visits the GPU; activations that do not fit wait on the host. Too small for one layer: exit 2 with the size that would do.")
MaxHostOpt = typer.Option(
    None, "--max-host-memory", show_default=False,
    help="Host memory the build may hold, e.g. 64GiB (its own memory: the clean pages of the memory-mapped model are the kernel's to drop): calibration activations beyond it are spilled to disk in the cache.")


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/quickstart.yaml)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Artifact directory [default: the recipe's `output`, relative to the recipe file]."),
    cache_dir: Optional[Path] = CacheOpt,
    device: str = DeviceOpt,
    junit: Optional[Path] = typer.Option(None, "--junit", help="Also write each gate as a JUnit XML test case to this file (written when a gate fails too)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder that is not an optforge artifact (an earlier artifact is replaced without it)."),
    max_device_memory: Optional[str] = MaxDeviceOpt,
    max_host_memory: Optional[str] = MaxHostOpt,
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes that calibrate together (torch.distributed: gloo on the CPU, NCCL with one GPU each): runs `torchrun --nproc-per-node N -m optforge build ...`."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Build RECIPE: load the model, run each pass with its gate, and write a verified artifact.

    Nothing is written to the output path unless every gate passes. Exit 3 names the pass whose gate failed.
    An existing artifact at the output path stays whole until the new one replaces it; a non-empty folder
    that is not an artifact is refused (exit 2) unless --force, and the source model's folder, the cache,
    the working directory and the home directory are never replaced.
    """
    setup_logging(verbose)
    if nproc > 1:
        raise typer.Exit(run_under_torchrun(nproc, "--nproc"))
    from optforge.pipeline import build as run_build
    from optforge.resources import MemoryBudget

    try:
        memory = MemoryBudget.parse(max_device_memory, max_host_memory)
        with progress_bars() as progress:
            result = run_build(recipe, output=output, cache_dir=cache_dir, device=device, progress=progress, junit=junit, force=force, memory=memory)
    except GateFailed as exc:
        stderr_console().print(f"[bold red]gate failed[/] in pass [bold]{exc.pass_name}[/]: {exc.result and _gate_line(exc.result)}", highlight=False)
        stderr_console().print("Nothing was written to the output path.")
        raise typer.Exit(exc.exit_code)
    except OptforgeError as exc:
        fail(exc)
    if not result.manifest:
        return  # a rank other than 0 of a torchrun build: rank 0 reports
    _print_summary(result.manifest)
    typer.echo(f"artifact: {result.output}  ({result.seconds:.1f}s)")


def _gate_line(gate: dict) -> str:
    if gate.get("kind") == "speed":
        from optforge.speed import describe_speed

        return describe_speed(gate)
    line = f"{gate['metric']} baseline {gate['baseline']:.4f}, measured {gate['measured']:.4f} ({gate['change_pct']:+.2f}%)"
    if gate["method"] == "not finite":
        return f"{line}: {gate['rule']}"
    unit = "%" if gate["metric"] == "perplexity" else " pts"
    line += f"; drop {gate['drop']:+.2f}{unit} [{gate['ci_low']:+.2f}, {gate['ci_high']:+.2f}] vs allowed {gate['max_drop']:.2f}{unit}, n={gate['n']}: {gate['verdict']}"
    if gate["verdict"] == "undecided" and gate["needed_n"]:
        line += f" (about {gate['needed_n']} items would decide)"
    return line


def _print_summary(manifest: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{manifest['name']}: passes")
    for col in ("pass", "seconds", "cached", "weight MB", "peak memory", "quality", "speed"):
        table.add_column(col)
    for rec in manifest["passes"]:
        cells = ["\n".join(("[green]pass[/] " if g["passed"] else "[red]fail[/] ") + _gate_line(g) for g in rec["gates"] if (g.get("kind") == "speed") == speed) or "-"
                 for speed in (False, True)]
        table.add_row(rec["name"], f"{rec['seconds']:.1f}", "yes" if rec["cached"] else "no", f"{rec['weight_bytes'] / 1e6:.1f}", _memory_cell(rec.get("memory")), *cells)
    stderr_console().print(table)


def _memory_cell(memory: dict | None) -> str:
    """'host 1.20 GiB' or 'cuda 3.10 GiB, host 1.20 GiB': the pass's peak, from the run that made its output; on the
    host the process's own memory, without the clean pages of memory-mapped model files (older records: resident set)."""
    from optforge.resources import gib

    if not memory:
        return "-"
    cell = f"host {gib(memory.get('host_anonymous_peak_bytes', memory['host_peak_bytes']))}"
    return f"{memory['device']} {gib(memory['device_peak_bytes'])}, {cell}" if "device_peak_bytes" in memory else cell


@app.command()
def inspect(
    artifact: Path = typer.Argument(..., help="Artifact directory written by `optforge build`."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every file's sha256 against the manifest."),
):
    """Show an artifact's manifest: source, passes, gates, files. Verifies hashes by default."""
    from optforge.artifact import read_manifest, verify_artifact

    try:
        manifest = verify_artifact(artifact) if verify else read_manifest(artifact)
    except OptforgeError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    src = manifest["source"]
    typer.echo(f"name: {manifest['name']}  (schema {manifest['schema_version']}, optforge {manifest['optforge_version']})")
    typer.echo(f"source: {src['id']}")
    for name, metric in src.get("metrics", {}).items():
        typer.echo(f"  {name}: {metric['value']:.4f}")
    if manifest.get("evaluated") is False:
        typer.echo("quality: not measured (the recipe gates nothing and asks for no eval in data.eval)")
    _print_summary(manifest)
    total = sum(f["bytes"] for f in manifest["files"])
    typer.echo(f"files: {len(manifest['files'])}, {total / 1e6:.1f} MB" + ("  (hashes verified)" if verify else ""))


@app.command()
def passes():
    """List the registered passes with their config keys, defaults and meaning."""
    from rich.table import Table

    from optforge.pass_ import describe_config, describe_support, registry

    for name, cls in sorted(registry().items()):
        table = Table(title=f"{name} (v{cls.version}): {(cls.__doc__ or sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}", title_justify="left")
        for col in ("key", "type", "default", "meaning"):
            table.add_column(col)
        for row in describe_config(cls):
            table.add_row(row["name"], row["type"], row["default"], row["help"])
        stderr_console().print(table)
        stderr_console().print(f"  requires {sorted(cls.requires)}, produces {sorted(cls.produces)}")
        stderr_console().print(f"  runs in {describe_support(cls)}\n", highlight=False)


# Modules that add commands to `app`, each defining `register(app)`. They must not import torch at top level.
COMMAND_MODULES: tuple[str, ...] = ("optforge.commands.eval", "optforge.commands.runtime", "optforge.commands.cache", "optforge.commands.search")


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app)


_register_commands()


def main() -> None:
    try:
        app()
    except OptforgeError as exc:  # errors raised outside a command body (e.g. while parsing)
        stderr_console().print(f"[bold red]error[/]: {exc}")
        _leave_exit_code(exc.exit_code)
        sys.exit(exc.exit_code)
    except SystemExit as exc:
        _leave_exit_code(exc.code if isinstance(exc.code, int) else 1)
        raise


def _leave_exit_code(code: int | None) -> None:
    import os

    path = os.environ.get(EXIT_FILE)
    if path and os.environ.get("RANK", "0") == "0":
        Path(path).write_text(str(code or 0))


if __name__ == "__main__":
    main()
