"""`--backend cpp`: the Python engine (scheduler, block manager, sampler, server) over the C++ runtime's model.

The C++ extension (`runtime/cpp`, built by `make cpp`) owns the weights, the kernels and the paged KV cache;
this runner hands it one flat step at a time, with the block tables the Python block manager allocated, and
samples from the logits it returns (Llama and Gemma-3 text models; the C++ load refuses others by name). So
`optforge generate/serve/bench --backend cpp` get every sampling option, stop strings, prefix caching,
continuous batching and the HTTP API of the Python runtime, with the C++ kernels underneath (fp32 HF folders,
the symmetric int8 / int4 weights of optforge's quantized artifacts and `pack.cpu` engines).

The C++ model decides per Linear from the artifact's format what the weights multiply with (`activations`):
weight-only formats keep float32 activations (the torch runtime's numerics), pack.cpu engines and w8a8_int8
quantize them to int8 blocks. An artifact with a `kv_cache` record (quant.kv_cache) keeps K and V in one byte
per element, so a byte budget holds 4x the tokens of a float32 cache. The log line at load says which.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from optforge.errors import ArtifactError, UserInputError
from optforge.runtime.prompt_scoring import prompt_positions_to_score, record_prompt_logprobs
from optforge.runtime.sampler import Sampler
from optforge.runtime.scheduler import ScheduledBatch

log = logging.getLogger(__name__)


class CppModelRunner:
    """The ModelRunner interface (`run`, `num_blocks`, `block_size`, `config`, `device`) over `_optforge_rt.StepRunner`."""

    def __init__(self, artifact: str | Path, *, block_size: int = 16, num_blocks: int | None = None, kv_cache_bytes: int | None = None,
                 num_threads: int = 0, verify: bool = True):
        from transformers import AutoConfig

        from optforge.runtime.cpp import load

        try:
            rt = load()
        except RuntimeError as exc:  # not built
            raise UserInputError(str(exc)) from exc
        self.config = AutoConfig.from_pretrained(artifact)  # the HF config, for callers that read vocab_size etc.
        self.block_size = block_size
        self.kv_cache_dtype = _kv_cache_dtype(Path(artifact))
        self.kv_element_bytes = rt.kv_element_bytes(self.kv_cache_dtype)
        self.num_blocks = num_blocks or self._blocks_for_budget(kv_cache_bytes or 512 * 2**20)
        try:
            self.step_runner = rt.StepRunner(str(artifact), num_threads=num_threads or (os.cpu_count() or 1), num_kv_blocks=self.num_blocks,
                                             block_size=block_size, verify=verify)
        except ValueError as exc:  # the extension's ArtifactError / FormatError
            raise ArtifactError(f"{artifact}: the C++ runtime cannot load it: {exc}") from exc
        assert self.step_runner.kv_cache_dtype == self.kv_cache_dtype, "the block budget was counted for another KV cache"
        self.activations = self.step_runner.activations
        log.info("C++ runtime: %s weights, %s activations%s, %s KV cache (%d blocks of %d tokens, %.1f MiB), %d threads",
                 self.step_runner.weight_format, self.activations, " (weight-only)" if self.activations == "fp32" and self.step_runner.weight_format != "fp32" else "",
                 self.step_runner.kv_cache_dtype, self.num_blocks, block_size, self.step_runner.kv_cache_bytes / 2**20, self.step_runner.num_threads)
        self.device = torch.device("cpu")
        self.model = None  # no torch module: comparisons with HF load the model themselves
        self.sampler = Sampler()

    def _blocks_for_budget(self, kv_cache_bytes: int) -> int:
        """KV blocks (K and V of every layer) that fit `kv_cache_bytes`, at the cache's bytes per element."""
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return max(1, kv_cache_bytes // (cfg.num_hidden_layers * 2 * self.block_size * kv_heads * head_dim * self.kv_element_bytes))

    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        """One scheduled step through the C++ forward; returns {seq_id: token} for sequences that completed a chunk."""
        for src, dst in batch.block_copies:
            self.step_runner.copy_block(src, dst)
        tokens, positions, seq_of, logits_for, sampled, scored = [], [], [], [], [], []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            scored += [(seq, len(tokens) + pos - start, pos + 1) for pos in prompt_positions_to_score(seq, n)]
            tokens.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seq_of.extend([i] * n)
            if start + n == len(seq):
                logits_for.append(len(tokens) - 1)
                sampled.append(seq)
        logits = self.step_runner.forward(tokens, positions, seq_of, [seq.block_table for seq in batch.seqs], logits_for + [row for _, row, _ in scored])
        logits = torch.from_numpy(logits)
        if scored:  # the prompt's scored positions cost only their rows of the vocabulary projection
            record_prompt_logprobs(logits[len(logits_for) :], scored)
        if not sampled:
            return {}
        picked = self.sampler(logits[: len(logits_for)], sampled)
        return {seq.seq_id: token for seq, token in zip(sampled, picked)}


def _kv_cache_dtype(artifact: Path) -> str:
    """The KV cache the C++ model keeps for this artifact: "fp32", or the dtype of optforge.json's `kv_cache` record."""
    layout = artifact / "optforge.json"
    if not layout.is_file():
        return "fp32"
    record = json.loads(layout.read_text()).get("kv_cache") or {}
    return record.get("dtype") if record.get("dtype") in ("fp8", "int8") else "fp32"  # a bad record: the C++ load says what is wrong
