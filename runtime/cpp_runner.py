"""`--backend cpp`: the Python engine (scheduler, block manager, sampler, server) over the C++ runtime's model.

The C++ extension (`runtime/cpp`, built by `make cpp`) owns the weights, the kernels and the paged KV cache;
this runner hands it one flat step at a time, with the block tables the Python block manager allocated, and
samples from the logits it returns. So `optforge generate/serve/bench --backend cpp` get every sampling
option, stop strings, prefix caching, continuous batching and the HTTP API of the Python runtime, with the
C++ kernels underneath (fp32 HF folders, `quant.int8_weight_only` outputs and `pack.cpu` engines).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from optforge.errors import ArtifactError, UserInputError
from optforge.runtime.prompt_scoring import prompt_positions_to_score, record_prompt_logprobs
from optforge.runtime.sampler import Sampler
from optforge.runtime.scheduler import ScheduledBatch


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
        self.num_blocks = num_blocks or self._blocks_for_budget(kv_cache_bytes or 512 * 2**20)
        try:
            self.step_runner = rt.StepRunner(str(artifact), num_threads=num_threads or (os.cpu_count() or 1), num_kv_blocks=self.num_blocks,
                                             block_size=block_size, verify=verify)
        except ValueError as exc:  # the extension's ArtifactError / FormatError
            raise ArtifactError(f"{artifact}: the C++ runtime cannot load it: {exc}") from exc
        self.device = torch.device("cpu")
        self.model = None  # no torch module: comparisons with HF load the model themselves
        self.sampler = Sampler()

    def _blocks_for_budget(self, kv_cache_bytes: int) -> int:
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        per_block = cfg.num_hidden_layers * 2 * self.block_size * kv_heads * head_dim * 4  # fp32 K and V
        return max(1, kv_cache_bytes // per_block)

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
