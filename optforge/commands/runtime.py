"""`optforge generate`, `optforge serve` and `optforge bench`: run an artifact with the serving runtime.

No torch at import time: `optforge --help` stays fast. The heavy modules load inside each command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

DTYPE = typer.Option("float32", "--dtype", help="Weights and KV cache dtype: float32, bfloat16 or float16.")
DEVICE = typer.Option("cpu", "--device", help="cpu or cuda.")
NO_PREFIX = typer.Option(False, "--no-prefix-caching", help="Do not reuse KV blocks of earlier prompts.")
MAX_SEQS = typer.Option(64, "--max-num-seqs", help="Sequences batched in one step, at most.")
BACKEND = typer.Option(
    "torch", "--backend",
    help="torch: the PyTorch runtime (CPU or CUDA). cpp: the C++ runtime's kernels and KV cache under the same scheduler, "
    "sampler and server (CPU, float32; build it with `make cpp`; runs HF fp32 folders, int8 artifacts and pack.cpu engines).",
)
THREADS = typer.Option(0, "--threads", help="CPU threads of the cpp backend (0: all cores).")
NO_VERIFY = typer.Option(
    False, "--no-verify",
    help="Load without checking the files against the artifact's manifest.json. Artifacts are verified by default and "
    "refused when their manifest is missing; plain Hugging Face folders (no optforge.json) load unverified either way.",
)


def _engine_config(dtype: str, device: str, no_prefix: bool, max_num_seqs: int, backend: str = "torch", threads: int = 0,
                   no_verify: bool = False, **extra):
    from optforge.runtime.llm import EngineConfig

    return EngineConfig(dtype=dtype, device=device, enable_prefix_caching=not no_prefix, max_num_seqs=max_num_seqs, backend=backend,
                        num_threads=threads, verify=not no_verify, **extra)


def _load(artifact: Path, config):
    from optforge.errors import ArtifactError
    from optforge.runtime.llm import LLM

    if not (artifact / "config.json").is_file():
        raise ArtifactError(f"{artifact}: not a model directory (no config.json); build one with `optforge build RECIPE`")
    return LLM(artifact, config)


def generate(
    artifact: Path = typer.Argument(..., help="An artifact or model directory."),
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="Wrap each prompt in the tokenizer's chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per prompt."),
    dtype: str = DTYPE,
    device: str = DEVICE,
    no_prefix: bool = NO_PREFIX,
    max_num_seqs: int = MAX_SEQS,
    backend: str = BACKEND,
    threads: int = THREADS,
    no_verify: bool = NO_VERIFY,
):
    """Generate completions for PROMPTS with the runtime (continuous batching, paged KV cache)."""
    from optforge.commands.console import fail as _fail, setup_logging as _setup_logging
    from optforge.errors import OptforgeError
    from optforge.runtime.sequence import SamplingParams

    _setup_logging(False)
    try:
        llm = _load(artifact, _engine_config(dtype, device, no_prefix, max_num_seqs, backend, threads, no_verify))
        if chat:
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        outputs = llm.generate(list(prompts), params)
    except OptforgeError as exc:
        _fail(exc)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    for out in outputs:
        if as_json:
            typer.echo(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "completion_tokens": len(out.token_ids)}))
        else:
            typer.echo(out.text)


def serve(
    artifact: Path = typer.Argument(..., help="An artifact or model directory."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_waiting: int = typer.Option(1024, "--max-waiting", help="Requests waiting for a free slot (beyond --max-num-seqs) past this get HTTP 429."),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", show_default=False,
        help="Prompt + output tokens per request, at most [default: the model's context length, at most 4096, or less where "
        "the KV cache holds less]. The server refuses to start when one request of this length cannot fit the KV cache.",
    ),
    kv_cache_memory: Optional[str] = typer.Option(
        None, "--kv-cache-memory", show_default=False,
        help="KV cache size, e.g. 2GiB, 512MiB or bytes [default: 512MiB on the CPU, half the free GPU memory on CUDA].",
    ),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="OPTFORGE_API_KEY", show_default=False,
        help="Require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); /health stays open.",
    ),
    allowed_origins: str = typer.Option(
        "", "--allowed-origins",
        help="Comma-separated browser origins (e.g. http://localhost:3000) that may call the server, with CORS. Requests "
        "carrying any other Origin header get 403; none are allowed by default.",
    ),
    dtype: str = DTYPE,
    device: str = DEVICE,
    no_prefix: bool = NO_PREFIX,
    max_num_seqs: int = MAX_SEQS,
    backend: str = BACKEND,
    threads: int = THREADS,
    no_verify: bool = NO_VERIFY,
):
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)."""
    from optforge.commands.console import fail as _fail, setup_logging as _setup_logging, stderr_console as _console
    from optforge.errors import OptforgeError, require

    _setup_logging(False)
    try:
        require("aiohttp", "optforge serve", "pip install aiohttp")
        from optforge.runtime.async_engine import AsyncEngine
        from optforge.runtime.serve_options import fit_max_model_len, initial_max_model_len, model_context_length, parse_bytes
        from optforge.runtime.server import serve as run_server

        kv_cache_bytes = parse_bytes(kv_cache_memory) if kv_cache_memory is not None else None
        context = initial_max_model_len(max_model_len, model_context_length(artifact))
        llm = _load(artifact, _engine_config(dtype, device, no_prefix, max_num_seqs, backend, threads, no_verify,
                                             max_model_len=context, kv_cache_bytes=kv_cache_bytes))
        context = fit_max_model_len(llm.engine, max_model_len)
    except OptforgeError as exc:
        _fail(exc)
    _console().print(f"serving {artifact} on http://{host}:{port} (OpenAI API under /v1; max_model_len {context})")
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting)
    origins = tuple(o.strip() for o in allowed_origins.split(",") if o.strip())
    try:
        run_server(engine, artifact.name, host, port, api_key=api_key or None, allowed_origins=origins)
    finally:
        engine.shutdown()


def bench(
    artifact: Path = typer.Argument(..., help="An artifact or model directory."),
    input_len: int = typer.Option(128, "--input-len"),
    output_len: int = typer.Option(128, "--output-len"),
    concurrency: int = typer.Option(16, "--concurrency"),
    num_requests: int = typer.Option(32, "--num-requests"),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Also run the workload through HF transformers generate."),
    dtype: str = DTYPE,
    device: str = DEVICE,
    backend: str = BACKEND,
    threads: int = THREADS,
    no_verify: bool = NO_VERIFY,
):
    """Throughput, TTFT and inter-token latency of ARTIFACT on random prompts, beside HF generate."""
    from optforge.commands.console import fail as _fail, setup_logging as _setup_logging, stderr_console as _console
    from optforge.errors import OptforgeError
    from optforge.runtime.bench import Workload, bench_hf, bench_runtime

    _setup_logging(False)
    workload = Workload(input_len=input_len, output_len=output_len, num_requests=num_requests, concurrency=concurrency)
    try:
        config = _engine_config(dtype, device, False, concurrency, backend, threads, no_verify, max_model_len=input_len + output_len + 16)
        llm = _load(artifact, config)
    except OptforgeError as exc:
        _fail(exc)
    ours = bench_runtime(llm.engine, workload)
    rows = [("optforge runtime", ours)]
    if hf:
        model = llm.engine.runner.model
        if model is None:  # the cpp backend holds no torch module: load the same folder into HF transformers
            from optforge.model_io import load_model

            model, _ = load_model(artifact, dtype=dtype, device=device)
        rows.append((f"HF generate, batch {concurrency}", bench_hf(model, workload, batch_size=concurrency)))
    console = _console()
    console.print(f"{num_requests} requests, {input_len} in / {output_len} out, concurrency {concurrency}, {device} {dtype}, backend {backend}")
    console.print("| engine | output tok/s | seconds | TTFT p50/p90/p99 s | ITL p50/p90/p99 ms |")
    console.print("| --- | --- | --- | --- | --- |")
    for name, r in rows:
        ttft = "/".join(f"{v:.3f}" for v in r["ttft_s"].values()) if "ttft_s" in r else "-"
        itl = "/".join(f"{1e3 * v:.1f}" for v in r["itl_s"].values()) if "itl_s" in r else "-"
        console.print(f"| {name} | {r['output_tok_s']:.1f} | {r['seconds']:.2f} | {ttft} | {itl} |", highlight=False)
    if hf:
        console.print(f"ratio runtime / HF: {ours['output_tok_s'] / rows[1][1]['output_tok_s']:.2f}x")


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(serve)
    app.command()(bench)
