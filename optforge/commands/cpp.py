"""`optforge cpp-generate`: generate with the C++ runtime (runtime/cpp) from the CLI.

No torch and no extension import at module level: `optforge --help` stays fast and works without a build.
"""

from __future__ import annotations

from pathlib import Path

import typer


def cpp_generate(
    artifact: Path = typer.Argument(..., help="artifact directory (manifest checked) or pack.cpu engine"),
    prompt: str = typer.Argument(..., help="prompt text"),
    max_new_tokens: int = typer.Option(64, help="tokens to generate (greedy)"),
    chat: bool = typer.Option(False, help="wrap the prompt in the model's ChatML template"),
    threads: int = typer.Option(0, help="CPU threads (0: all cores)"),
    verify: bool = typer.Option(True, help="check every file against manifest.json"),
) -> None:
    """Generate greedily with the C++ runtime and print the completion."""
    from optforge.runtime.cpp import load

    try:
        rt = load()
        tok = rt.Tokenizer.from_file(str(artifact / "tokenizer.json"))
        engine = rt.Engine(str(artifact), num_threads=threads, verify=verify)
    except (RuntimeError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" if chat else prompt
    out, stats = engine.generate([tok.encode(text)], max_new_tokens=max_new_tokens)
    typer.echo(tok.decode(out[0]))
    typer.echo(f"[{engine.weight_format}, {stats.decode_tokens / max(stats.decode_seconds, 1e-9):.1f} tok/s decode]", err=True)


def register(app: typer.Typer) -> None:
    app.command("cpp-generate")(cpp_generate)
