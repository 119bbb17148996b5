"""RuntimeLM on CUDA (the runner's Triton kernels, fused layers and decode graphs) against HFLM on the same
GPU, fp32 without TF32, on the tiny model: log-likelihoods within 1e-4, the same greedy flags and choices, the
prefix cache serving shared contexts, and greedy generation equal to HF's."""

from __future__ import annotations

import pytest
import torch

from optforge.evals.lm import HFLM, GenerateRequest, LoglikelihoodRequest
from optforge.evals.runtime_lm import RuntimeLM
from optforge.model_io import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CONTEXTS = [
    "Question: Which city is the capital of France, and which is the capital of Germany?\nAnswer:",
    "The quick brown fox jumps over the lazy dog. Quantization stores weights in fewer bits; then",
    "def add(a, b):\n    return",
]
CHOICES = [" Paris", " Berlin", " the lazy dog jumps over the fox", " a + b", " 12345 and 3.14159"]


def test_runtime_lm_on_cuda_matches_hflm(tiny_model_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    model, tokenizer = load_model(tiny_model_dir, dtype="float32", device="cuda")
    hf = HFLM(model, tokenizer, batch_size=8)
    rt = RuntimeLM.from_path(tiny_model_dir, dtype="float32", device="cuda", num_blocks=256, max_num_seqs=8, max_model_len=256)
    requests = [LoglikelihoodRequest(c, x) for c in CONTEXTS for x in CHOICES]
    expected, got = hf.loglikelihood(requests), rt.loglikelihood(requests)
    for e, g in zip(expected, got):
        assert abs(g.logprob - e.logprob) < 1e-4 and g.is_greedy == e.is_greedy, (e, g)
    for q in range(len(CONTEXTS)):
        rows = range(q * len(CHOICES), (q + 1) * len(CHOICES))
        assert max(rows, key=lambda i: got[i].logprob) == max(rows, key=lambda i: expected[i].logprob)
    assert rt.engine.block_manager.num_prefix_hits > 0
    gen = [GenerateRequest("The quick brown", max_new_tokens=12), GenerateRequest("Paris is the", max_new_tokens=8, stop=("e",))]
    assert rt.generate(gen) == hf.generate(gen)
