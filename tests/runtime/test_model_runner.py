"""ModelRunner on the CPU: the KV cache it owns, and the kernel options it passes down (CUDA only)."""

import dataclasses

import pytest
import torch

from optforge.runtime.kernels.decode_options import DecodeKernelOptions
from optforge.runtime.model_runner import ModelRunner


def test_decode_kernel_options_are_frozen_with_the_shipped_defaults():
    options = DecodeKernelOptions()
    assert (options.use_pdl, options.launch_dependents_early, options.kv_before_wait) == (None, True, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.use_pdl = False


def test_the_runner_owns_a_kv_cache_with_a_scratch_block_and_keeps_its_kernel_options(tiny_llama):
    options = DecodeKernelOptions(use_pdl=False)
    runner = ModelRunner(tiny_llama, block_size=4, num_blocks=10, max_model_len=64, kernel_options=options)
    assert runner.kernel_options is options and runner.graphs is None and runner.fused is None
    assert runner.kv_cache.shape == (2, 2, 11, 4, 2, 16)  # (layers, k|v, blocks + scratch, block_size, kv heads, head dim)
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # layers x k|v x block_size x kv heads x head dim x fp32 bytes
    assert ModelRunner(tiny_llama, block_size=4, kv_cache_bytes=7 * per_block + 1).num_blocks == 7
    assert runner.attention.scratch_block == 10 and runner.kv_cache.dtype == torch.float32
