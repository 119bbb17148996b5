"""Measure the runtime on a fixed workload, and the same workload through HF transformers `generate`.

Random prompt token ids of `input_len`, exactly `output_len` new tokens each (eos ignored), at most
`concurrency` requests in flight, after an untimed warm-up. Reports output tokens/s (end to end and over decode
steps alone), TTFT and inter-token latency percentiles.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Workload:
    input_len: int = 128  # prompt tokens per request
    output_len: int = 128  # new tokens per request (eos ignored)
    num_requests: int = 64
    concurrency: int = 64  # requests in flight at most
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        # token ids from a middle range: random ids, but never special tokens at the ends of the vocabulary
        return [[rng.randrange(100, vocab_size - 100) for _ in range(self.input_len)] for _ in range(self.num_requests)]


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{q}": float("nan") for q in qs}
    ordered = sorted(values)
    return {f"p{q}": ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] for q in qs}


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_runtime(engine, workload: Workload, *, warmup: bool = True) -> dict:
    """Run `workload` through an `Engine`; TTFT counts from the moment the request was added.

    First (with `warmup`) a short untimed run of the same shape (one request per concurrency slot, 8 new tokens):
    kernels are compiled and autotuned, CUDA graphs captured, caches allocated before the clock starts.
    `decode_tok_s` is the output rate over the steps that ran no prompt tokens, beside `output_tok_s` over the
    whole run (prefills included)."""
    started = time.perf_counter()
    if warmup:
        _drive(engine, Workload(input_len=workload.input_len, output_len=min(8, workload.output_len), num_requests=min(workload.concurrency, workload.num_requests),
                                concurrency=workload.concurrency, seed=workload.seed + 1), prefix="warmup")
    warmup_s = time.perf_counter() - started
    steps, preemptions = engine.num_steps, engine.scheduler.num_preemptions
    run = _drive(engine, workload, prefix="bench")
    num_out = workload.num_requests * workload.output_len
    first, gaps = run["first"], run["gaps"]
    return {
        "seconds": run["seconds"],
        "output_tok_s": num_out / run["seconds"],
        "total_tok_s": workload.num_requests * (workload.input_len + workload.output_len) / run["seconds"],
        "decode_tok_s": run["decode_tokens"] / run["decode_seconds"] if run["decode_seconds"] else float("nan"),
        "warmup_s": warmup_s,
        "ttft_s": percentiles(list(first.values())),
        "itl_s": percentiles(gaps),
        # means, for rates: per-stream decode tokens/s is 1 / itl_mean_s (what optforge.speed gates read)
        "ttft_mean_s": sum(first.values()) / len(first) if first else float("nan"),
        "itl_mean_s": sum(gaps) / len(gaps) if gaps else float("nan"),
        "steps": engine.num_steps - steps,
        "preemptions": engine.scheduler.num_preemptions - preemptions,
    }


def _drive(engine, workload: Workload, *, prefix: str) -> dict:
    """Every request of `workload` through `engine`, at most `concurrency` in flight; times, per request and per step."""
    from optforge.runtime.sequence import SamplingParams

    params = SamplingParams(max_tokens=workload.output_len, ignore_eos=True)
    pending = list(enumerate(workload.prompts(engine.runner.config.vocab_size)))
    in_flight, added, first, last, gaps = 0, {}, {}, {}, []
    decode_tokens, decode_seconds = 0, 0.0
    start = time.perf_counter()
    while pending or engine.has_unfinished:
        while pending and in_flight < workload.concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(f"{prefix}-{i}", prompt, params)
            added[f"{prefix}-{i}"] = time.perf_counter()
            in_flight += 1
        step_start = time.perf_counter()
        produced = engine.step()
        _sync(engine.runner.device)
        now = time.perf_counter()
        if produced and not engine.last_step_prefilled:
            decode_tokens, decode_seconds = decode_tokens + len(produced), decode_seconds + (now - step_start)
        for seq, _ in produced:
            rid = seq.request_id
            if rid not in first:
                first[rid] = now - added[rid]
            else:
                gaps.append(now - last[rid])
            last[rid] = now
            if seq.is_finished:
                in_flight -= 1
    return {"seconds": time.perf_counter() - start, "first": first, "gaps": gaps, "decode_tokens": decode_tokens, "decode_seconds": decode_seconds}


def bench_decode(engine, batch: int = 1, input_len: int = 128, output_len: int = 256) -> dict:
    """`batch` requests started together; tokens/s over the decode steps only (prefill steps timed apart)."""
    from optforge.runtime.sequence import SamplingParams

    prompts = Workload(input_len=input_len, num_requests=batch).prompts(engine.runner.config.vocab_size)
    seqs = [engine.add_request(f"decode-{i}", p, SamplingParams(max_tokens=output_len, ignore_eos=True)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    while any(not s.output_token_ids for s in seqs):  # prefill: every prompt gets its first token
        engine.step()
    _sync(engine.runner.device)
    t1 = time.perf_counter()
    done = sum(len(s.output_token_ids) for s in seqs)
    while engine.has_unfinished:
        engine.step()
    _sync(engine.runner.device)
    t2 = time.perf_counter()
    return {"batch": batch, "prefill_s": t1 - t0, "decode_tok_s": (batch * output_len - done) / (t2 - t1)}


def bench_batch1_decode(engine, input_len: int = 128, output_len: int = 256) -> dict:
    return bench_decode(engine, 1, input_len, output_len)


def bench_hf(model, workload: Workload, *, batch_size: int) -> dict:
    """The same workload through HF eager `generate` in fixed batches (equal-length prompts: no padding). Batch-1
    decode against HF's static-cache compiled `generate` is `bench_hf_decode`."""
    import torch

    prompts = workload.prompts(model.config.vocab_size)
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=workload.output_len, min_new_tokens=workload.output_len, do_sample=False)
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:batch_size], device=device), **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        _sync(device)
        start = time.perf_counter()
        for i in range(0, len(prompts), batch_size):
            model.generate(torch.tensor(prompts[i : i + batch_size], device=device), **kwargs)
        _sync(device)
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "output_tok_s": len(prompts) * workload.output_len / elapsed}


def bench_hf_decode(model, input_len: int = 128, output_len: int = 256, *, static_cache: bool = True, repeats: int = 3) -> dict:
    """Batch-1 HF `generate`, timed as `bench_decode` times the runtime: the decode steps only. Each repeat times
    a generate of `output_len` tokens and one of a single token (prefill + first token); decode tokens/s is
    (output_len - 1) / (median full - median single). Also reports output_len / median full (prefill included),
    the figure earlier runs quoted."""
    import statistics

    import torch

    prompt = torch.tensor(Workload(input_len=input_len, num_requests=1).prompts(model.config.vocab_size), device=next(model.parameters()).device)
    kwargs = dict(do_sample=False, **({"cache_implementation": "static"} if static_cache else {}))
    full, single = [], []
    with torch.inference_mode():
        for n in (output_len, 1):  # warm-up: compiles the decode step (static cache) and the prefill
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        for _ in range(repeats):
            for n, times in ((output_len, full), (1, single)):
                _sync(prompt.device)
                t = time.perf_counter()
                model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
                _sync(prompt.device)
                times.append(time.perf_counter() - t)
    t_full, t_single = statistics.median(full), statistics.median(single)
    return {"decode_tok_s": (output_len - 1) / (t_full - t_single), "output_tok_s": output_len / t_full,
            "full_s": full, "single_s": single}
