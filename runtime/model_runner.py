"""Runs a Llama-family, Gemma-3 or mixture-of-experts model over a paged KV cache: owns the KV cache tensors and the CUDA graphs, and
turns a scheduled step into the forward's inputs (token ids, positions, slots, the rows to sample).

The forward and the weights it needs are runtime/decoder.py; attention and its metadata runtime/attention.py;
the decode CUDA graphs runtime/cuda_graphs.py. On CPU (and for steps with prefill chunks on CUDA) attention
gathers each sequence's keys and values into SDPA; on CUDA, decode-only steps use our Triton paged-attention
kernel and the fused layer, captured in CUDA graphs for the decode batch sizes up to `max_num_seqs`. A model
whose sliding window hides keys within `max_model_len` (Gemma-3, windowed Mistral/Qwen) runs every step
gathered, unfused and without graphs, on CUDA too: the kernel and the fused forms attend to the whole context.
Mixture-of-experts models (Qwen3-MoE, Mixtral) run unfused and without graphs on CUDA: HF's sparse blocks pick
which experts to run from the routing of each step, which a captured graph would replay unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from optforge.runtime.architectures import binding_windows
from optforge.runtime.attention import PagedAttention, slot
from optforge.runtime.cuda_graphs import DecodeGraphs
from optforge.runtime.decoder import Decoder
from optforge.runtime.kernels.decode_options import DecodeKernelOptions
from optforge.runtime.prompt_scoring import prompt_positions_to_score, record_prompt_logprobs
from optforge.runtime.sampler import Sampler
from optforge.runtime.scheduler import ScheduledBatch
from optforge.runtime.sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class Launched:
    """A decode step started by `ModelRunner.launch`: its greedy tokens, on the host once `event` completes
    (a pinned buffer that the copy fills), or a list already there (no event)."""

    num_rows: int
    tokens: torch.Tensor | list[int]
    event: torch.cuda.Event | None


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_model_len: int = 4096,
        max_num_seqs: int = 256,
        use_cuda_graphs: bool = True,
        kernel_options: DecodeKernelOptions = DecodeKernelOptions(),
    ):
        """`kernel_options`: how the batch-1 decode kernels launch (CUDA; kernels/decode_options.py)."""
        self.decoder = decoder = Decoder(model)
        self.model, self.config, self.device, self.dtype = model, decoder.config, decoder.device, decoder.dtype
        self.block_size, self.max_model_len = block_size, max_model_len
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.is_cuda = self.device.type == "cuda"
        self.kernel_options = kernel_options
        windows = binding_windows(decoder.arch.windows, max_model_len)  # per layer; None where nothing is hidden
        # Triton on CUDA: the paged kernel, the fused layers and the graphs, for models whose windows hide nothing
        self.use_paged_kernel = self.is_cuda and _triton_available() and not any(windows)
        # K/V in the model dtype, or one byte each (FP8/INT8 with the artifact's per-layer scales: formats/kv_cache.py)
        self.kv_dtype = decoder.kv.storage if decoder.kv is not None else self.dtype
        self.num_blocks = num_blocks or self._blocks_for_budget(kv_cache_bytes)
        # (layers, k|v, blocks + 1 scratch, block_size, kv heads, head dim)
        self.kv_cache = torch.zeros(
            len(decoder.layers), 2, self.num_blocks + 1, block_size, decoder.num_kv_heads, decoder.head_dim,
            dtype=self.kv_dtype, device=self.device,
        )
        self.attention = PagedAttention(self.kv_cache, num_heads=decoder.num_heads, scale=decoder.scale, use_paged_kernel=self.use_paged_kernel,
                                        kv=decoder.kv, dtype=self.dtype, windows=windows)
        if self.use_paged_kernel:
            decoder.fuse(max_model_len)
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        self._last_launch: list[int] = []  # tokens of the last `launch` without graphs
        if self.use_paged_kernel and use_cuda_graphs and not decoder.arch.is_moe:
            self.graphs = DecodeGraphs(max_num_seqs=max_num_seqs, max_blocks_per_seq=self.max_blocks_per_seq, block_size=block_size,
                                       scratch_block=self.num_blocks, device=self.device)
            self.graphs.capture(self.decode_logits)
        log.info("model runner: %d KV blocks of %d tokens on %s, K/V stored as %s (%d bytes per block; triton=%s, graphs=%s)", self.num_blocks, block_size,
                 self.device, decoder.kv.dtype if decoder.kv is not None else str(self.dtype).removeprefix("torch."), self.bytes_per_block,
                 self.use_paged_kernel, self.graphs is not None)

    @property
    def fused(self) -> list[dict] | None:
        """The fused q|k|v and gate|up modules of each layer, or None where the layers run unfused (decoder.py)."""
        return self.decoder.fused

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one KV block over all layers, K and V: halved by an FP8/INT8 cache against bf16, quartered against fp32."""
        d = self.decoder
        return len(d.layers) * 2 * self.block_size * d.num_kv_heads * d.head_dim * self.kv_dtype.itemsize

    def _blocks_for_budget(self, kv_cache_bytes: int | None) -> int:
        per_block = self.bytes_per_block
        if kv_cache_bytes is None:
            if self.is_cuda:
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_cache_bytes = int(free * 0.5)
            else:
                kv_cache_bytes = 512 * 2**20
        return max(1, kv_cache_bytes // per_block)

    # ---- one step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        """Run one scheduled step; returns {seq_id: sampled token} for sequences whose chunk ended their tokens."""
        self._copy_blocks(batch)
        ids, positions, slots, sample_rows = [], [], [], []
        scored: list[tuple[Sequence, int, int]] = []  # (sequence, row, position of the prompt token its logits predict)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            scored += [(seq, len(ids) + pos - start, pos + 1) for pos in prompt_positions_to_score(seq, n)]
            ids.extend(seq.token_ids[start : start + n])
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(slot(seq.block_table, pos, self.block_size))
            if start + n == len(seq):
                sample_rows.append(len(ids) - 1)
        sampled_seqs = [s for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)]
        greedy = None
        if batch.is_decode_only and self._graph_size(len(batch)) and not scored:
            logits, greedy = self.graphs.replay(batch.seqs, ids)
        else:
            logits = self._forward_eager(batch, ids, positions, slots, sample_rows + [row for _, row, _ in scored])
            if scored:
                record_prompt_logprobs(logits[len(sample_rows) :], scored)
                logits = logits[: len(sample_rows)]
        if not sampled_seqs:
            return {}
        tokens = self.sampler(logits, sampled_seqs, greedy)
        return {seq.seq_id: token for seq, token in zip(sampled_seqs, tokens)}

    @torch.inference_mode()
    def forward_only(self, batch) -> None:
        """One step's forward without logits or sampling: the other ranks under tensor parallelism, which write their
        KV heads and join the all-reduces of rank 0's step (runtime/tensor_parallel.py)."""
        self._copy_blocks(batch)
        ids, positions, slots = [], [], []
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(slot(seq.block_table, pos, self.block_size) for pos in range(start, start + n))
        self._forward_eager(batch, ids, positions, slots, [])

    # ---- overlapped decode: launch a step before the previous one's tokens reach the host ----------------
    def can_launch(self, batch: ScheduledBatch) -> bool:
        """Whether `launch` takes this batch: decode rows only, and within the largest CUDA graph where graphs run."""
        return batch.is_decode_only and (self.graphs is None or self._graph_size(len(batch)) is not None)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, src_rows: list[int | None]) -> Launched:
        """Start a decode step whose tokens are picked greedily (argmax of the raw logits); `collect` returns them.

        Row i's input token is `src_rows[i]`'s token of the previous launch where that is set (that token may
        not have reached the host yet: on CUDA the graph reads it on the device), else the sequence's token at
        `num_computed_tokens`. Each row attends to its `num_computed_tokens + 1` positions. On CUDA nothing
        waits for the GPU here; elsewhere the step runs now."""
        self._copy_blocks(batch)
        if self._graph_size(len(batch)):
            host_ids = [0 if r is not None else seq.token_ids[seq.num_computed_tokens] for seq, r in zip(batch.seqs, src_rows)]
            tokens, event = self.graphs.launch(batch.seqs, host_ids, src_rows)
            return Launched(len(batch), tokens, event)
        ids = [self._last_launch[r] if r is not None else seq.token_ids[seq.num_computed_tokens] for seq, r in zip(batch.seqs, src_rows)]
        positions = [seq.num_computed_tokens for seq in batch.seqs]
        slots = [slot(seq.block_table, p, self.block_size) for seq, p in zip(batch.seqs, positions)]
        logits = self._forward_eager(batch, ids, positions, slots, list(range(len(batch))))
        self._last_launch = logits.argmax(-1).tolist()
        return Launched(len(batch), self._last_launch, None)

    @staticmethod
    def collect(launched: Launched) -> list[int]:
        """The tokens of a `launch`, one per row; waits for that step (and only it) to finish."""
        if launched.event is not None:
            launched.event.synchronize()
            return launched.tokens[: launched.num_rows].tolist()
        return launched.tokens

    # ---- the forward's inputs -----------------------------------------------------------------------
    def _copy_blocks(self, batch: ScheduledBatch) -> None:
        for src, dst in batch.block_copies:
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _graph_size(self, n: int) -> int | None:
        """The smallest captured graph batch size >= n, or None."""
        return self.graphs.size_for(n) if self.graphs is not None else None

    def _forward_eager(self, batch: ScheduledBatch, ids, positions, slots, sample_rows) -> torch.Tensor | None:
        """Logits (len(sample_rows), vocab) of one step without CUDA graphs."""
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long, device=self.device)  # noqa: E731
        input_ids, pos_t, slot_t = as_tensor(ids), as_tensor(positions), as_tensor(slots)
        attend = self.attention.for_step(batch)
        hidden = self.decoder.forward(self.kv_cache, input_ids, pos_t, slot_t, attend)
        return self.decoder.logits(hidden[as_tensor(sample_rows)]) if sample_rows else None

    def decode_logits(self, ids, positions, slots, block_tables, context_lens) -> torch.Tensor:
        """Logits (B, vocab) of a decode step from device tensors, as a CUDA graph captures it: the batch-1 path
        in six launches per layer where it applies, else the layer path with paged attention."""
        if ids.shape[0] == 1 and self.decoder.decode_weights is not None:
            return self.decoder.forward_decode(self.kv_cache, ids, positions, slots, block_tables, context_lens, self.kernel_options)
        attend = self.attention.paged(block_tables, context_lens)
        return self.decoder.logits(self.decoder.forward(self.kv_cache, ids, positions, slots, attend))

