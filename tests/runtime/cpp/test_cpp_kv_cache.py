"""The C++ runtime's quantized KV cache: an artifact with a `kv_cache` record (quant.kv_cache) keeps K and V in
one byte per element (int8, or FP8 E4M3 bits) with its per-layer scales. Prompt log-probs match the Hugging Face
emulation of that cache (optforge.formats.kv_cache, applied by load_model), the E4M3 encoding matches
round_to_e4m3, and a byte budget holds 4x the blocks of a float32 cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from optforge.formats.fp8 import round_to_e4m3
from optforge.model_io import load_model

IDS = [5, 17, 42, 99, 7, 120, 4, 56, 78, 90, 11, 23, 250, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 3, 3, 3, 60, 61, 62, 63]
# Max |log-prob difference| from the emulation on the same prompt: fp32 summation order (measured 5e-7 for both
# dtypes) with room for a value on a rounding boundary of the cache; the cache itself moves them by 2e-3 (int8)
# and 6e-3 (fp8) here, checked below.
LOGPROB_TOL = 1e-4


@pytest.fixture
def kv_artifact(tiny_model_dir, tmp_path_factory, make_recipe):
    """kv_artifact(dtype) -> the tiny Llama built through quant.kv_cache (a verified artifact with a manifest)."""
    import optforge

    root = tmp_path_factory.getbasetemp() / "cpp_kv_cache"

    def run(dtype: str):
        passes = [{"name": "quant.kv_cache", "config": {"dtype": dtype}}]
        return optforge.build(make_recipe(tiny_model_dir, root / dtype, gate_pct=None, passes=passes), cache_dir=root / "cache").output

    return run


def prompt_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """log p(ids[t + 1] | ids[: t + 1]) from the logits (T, vocab) of every position."""
    logp = torch.log_softmax(torch.as_tensor(logits), dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def cpp_prompt_logprobs(rt, path, ids: list[int], block_size: int = 4) -> np.ndarray:
    runner = rt.StepRunner(str(path), num_threads=2, num_kv_blocks=16, block_size=block_size)
    table = list(range(len(ids) // block_size + 1))[::-1]  # blocks out of order: the slots go through the table
    logits = runner.forward(ids, list(range(len(ids))), [0] * len(ids), [table], list(range(len(ids))))
    return prompt_logprobs(logits, ids)


def hf_prompt_logprobs(path, ids: list[int]) -> np.ndarray:
    model, _ = load_model(path, dtype="float32", device="cpu")  # applies the kv_cache record
    with torch.no_grad():
        return prompt_logprobs(model(torch.tensor([ids])).logits[0].numpy(), ids)


def test_e4m3_encoding_matches_round_to_e4m3(rt):
    values = torch.cat([torch.linspace(-500, 500, 20001), torch.logspace(-12, 3, 4001), -torch.logspace(-12, 3, 4001)])
    ours = torch.tensor([rt.e4m3_decode(rt.e4m3_encode(float(v))) for v in values])
    assert torch.equal(ours, round_to_e4m3(values))


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_prompt_logprobs_match_the_hf_emulation(rt, kv_artifact, tiny_model_dir, dtype):
    path = kv_artifact(dtype)
    layout = json.loads((path / "optforge.json").read_text())
    assert layout["kv_cache"]["dtype"] == dtype
    runner = rt.StepRunner(str(path), num_threads=1, num_kv_blocks=4)
    assert runner.kv_cache_dtype == dtype
    ours, emulated = cpp_prompt_logprobs(rt, path, IDS), hf_prompt_logprobs(path, IDS)
    assert np.abs(ours - emulated).max() < LOGPROB_TOL
    # The cache's rounding is what is being matched: the float32 cache of the same weights is further away.
    unquantized = cpp_prompt_logprobs(rt, tiny_model_dir, IDS)
    assert np.abs(unquantized - emulated).max() > 10 * LOGPROB_TOL


def test_greedy_tokens_with_a_quantized_cache_equal_the_torch_backend(rt, kv_artifact):
    from optforge.runtime.llm import LLM
    from optforge.runtime.sequence import SamplingParams

    path = kv_artifact("fp8")
    prompts, params = [IDS[:10], IDS[5:25]], SamplingParams(max_tokens=12, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, enable_prefix_caching=False).generate(prompts, params)]
    llm = LLM(path, backend="cpp", num_threads=2, num_blocks=12, block_size=4, max_num_batched_tokens=8)  # chunks, preemption, COW
    assert [o.token_ids for o in llm.generate(prompts, params)] == want


def test_a_byte_budget_holds_4x_the_blocks_of_fp32(rt, kv_artifact, tiny_model_dir):
    from optforge.runtime.cpp_runner import CppModelRunner

    budget = 3 * 2**20
    fp32 = CppModelRunner(tiny_model_dir, kv_cache_bytes=budget, num_threads=1, verify=False)
    int8 = CppModelRunner(kv_artifact("int8"), kv_cache_bytes=budget, num_threads=1)
    per_block_fp32 = 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block x kv heads x head_dim x 4 bytes
    assert fp32.num_blocks == budget // per_block_fp32 and int8.num_blocks == 4 * fp32.num_blocks
    assert (fp32.kv_cache_dtype, int8.kv_cache_dtype) == ("fp32", "int8")
    # What the C++ model allocated is what the budget counted, in bytes.
    assert int8.step_runner.kv_cache_bytes == fp32.step_runner.kv_cache_bytes == int8.num_blocks * per_block_fp32 // 4 <= budget
