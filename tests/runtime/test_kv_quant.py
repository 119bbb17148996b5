"""The runtime stores an artifact's FP8/INT8 KV cache in one byte per element, with its per-layer scales:
the block budget counts those bytes, and prompt log-probabilities and greedy tokens through the runtime agree
with Hugging Face's emulation of the same cache (formats/kv_cache.py), on the tiny model (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import optforge
from optforge.evals.lm import HFLM, LoglikelihoodRequest
from optforge.evals.runtime_lm import RuntimeLM
from optforge.formats.kv_cache import StoredKV, decode_kv, encode_kv, fake_quantize_kv
from optforge.model_io import load_model

REQUESTS = [
    LoglikelihoodRequest("Question: Which city is the capital of France?\nAnswer:", " Paris, and the capital of Germany is Berlin."),
    LoglikelihoodRequest("The quick brown fox jumps over the lazy dog. Then", " it sleeps until the sun rises over the hills."),
    LoglikelihoodRequest("def add(a, b):\n    return", " a + b  # the sum of the two numbers a and b"),
]
TOLERANCE = 1e-3  # |log p| difference allowed between the runtime's stored cache and HF's emulation of it


@pytest.fixture(scope="module", params=["int8", "fp8"])
def kv_artifact(request, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"kv-{request.param}") / "out"
    recipe = {
        "name": f"tiny-kv-{request.param}",
        "model": {"source": str(tiny_model_dir), "dtype": "float32"},
        "data": {"calibration": {"dataset": "boolq", "rows": [2000, 2004], "max_length": 32}},
        "passes": [{"name": "quant.kv_cache", "config": {"dtype": request.param}}],
        "output": str(out),
    }
    optforge.build(recipe, cache_dir=out.parent / "cache")
    return request.param, out


def test_encode_decode_is_the_emulation_and_rounds_to_nearest_even():
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 100.0, -100.0, 3.1])
    assert encode_kv(x, 0.5, "int8").tolist() == [0, 2, 0, 2, 127, -127, 6]  # 0.5 -> 0 and 1.5 -> 2: ties to even
    fp8 = encode_kv(torch.tensor([1000.0, -1000.0, 17.0, 0.0]), 1.0, "fp8")
    assert fp8.dtype == torch.float8_e4m3fn and fp8.float().tolist() == [448.0, -448.0, 16.0, 0.0]  # saturated; 17 ties to 16
    y = torch.randn(4, 3, 8, dtype=torch.bfloat16)
    for dtype in ("int8", "fp8"):
        assert torch.equal(fake_quantize_kv(y, 0.01, dtype), decode_kv(encode_kv(y, 0.01, dtype), 0.01, torch.bfloat16))


def test_the_cache_holds_one_byte_per_element_and_four_times_the_fp32_blocks(kv_artifact, tiny_model_dir):
    dtype, path = kv_artifact
    quantized = RuntimeLM.from_path(path, dtype="float32", kv_cache_bytes=2**20).engine.runner
    plain = RuntimeLM.from_path(tiny_model_dir, dtype="float32", kv_cache_bytes=2**20).engine.runner
    assert isinstance(quantized.decoder.kv, StoredKV) and quantized.decoder.kv.dtype == dtype and plain.decoder.kv is None
    assert quantized.kv_cache.dtype == {"int8": torch.int8, "fp8": torch.float8_e4m3fn}[dtype] and quantized.kv_cache.element_size() == 1
    assert plain.bytes_per_block == 4 * quantized.bytes_per_block
    assert quantized.num_blocks == 4 * plain.num_blocks


def test_the_stored_cache_scores_as_the_emulation_and_differs_from_float_kv(kv_artifact, tiny_model_dir):
    dtype, path = kv_artifact
    model, tokenizer = load_model(path, dtype="float32")
    emulated = [r.logprob for r in HFLM(model, tokenizer, batch_size=2).loglikelihood(REQUESTS)]
    stored = RuntimeLM.from_path(path, dtype="float32")
    served = [r.logprob for r in stored.loglikelihood(REQUESTS)]
    plain = [r.logprob for r in RuntimeLM.from_path(tiny_model_dir, dtype="float32").loglikelihood(REQUESTS)]
    gap = max(abs(a - b) for a, b in zip(emulated, served))
    assert gap < TOLERANCE, (emulated, served)
    assert max(abs(a - b) for a, b in zip(plain, served)) > 10 * max(gap, 1e-5)  # the cache really is quantized
    # the bytes in the cache are the encoded K/V: every stored value decodes to a multiple of the layer's scale
    runner = stored.engine.runner
    if dtype == "int8":
        assert runner.kv_cache.abs().max() > 0 and runner.kv_cache.to(torch.int16).abs().max() <= 127
