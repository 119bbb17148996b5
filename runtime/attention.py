"""Attention over the paged KV cache, and the metadata of a step that it reads.

KV cache: `(layers, k|v, num_blocks + 1, block_size, num_kv_heads, head_dim)`, in the model dtype or, for an
artifact with a quantized KV cache, one byte per element (`formats.kv_cache.StoredKV`: both paths decode what
they read with the layer's scale, as the writers encode). The block at the end is scratch
space: padded rows of a CUDA graph write there, and padded block-table entries point there. A token's K/V live
in one row of a layer's flattened cache, its `slot` (the one place that formula is written).

Two paths build the `attend(layer, q) -> out` function of a step:
- gathered: each sequence's keys and values are gathered from its blocks and go through torch SDPA with a
  causal mask offset by its cached context (CPU, and steps with prefill chunks on CUDA, where the decode rows
  of such a mixed step go through one paged launch instead of one SDPA call each), and on a layer with a
  sliding window only the keys of its window (`window_mask`);
- paged: one query token per sequence, and our Triton kernel reads the blocks in place (decode on CUDA; only
  for models without a window that hides keys: the kernel attends to the whole context).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from optforge.formats.kv_cache import StoredKV, kv_kernel_args
from optforge.runtime.scheduler import ScheduledBatch

# cuDNN's SDPA is left out: it builds a cuDNN graph per new shape on the host, ~26 ms per call on an H100
# host (benchmarks/RESULTS.md), and every prefill step brings new shapes; flash attention needs no such step.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def slot(block_table, position, block_size: int):
    """The row of a layer's flattened KV cache `(blocks * block_size, heads, dim)` that holds `position`'s K/V:
    the position's block, from the block table, then its offset in that block. On ints (a list block table),
    or elementwise on arrays (numpy or torch: a block-table array indexed by an array of positions)."""
    return block_table[position // block_size] * block_size + position % block_size


def window_mask(start: int, n: int, window: int | None, device) -> tuple[int, torch.Tensor | None]:
    """Which keys the queries at positions start .. start + n - 1 see: the first key position any of them sees,
    and a bool mask (n, start + n - first) over the keys from there, None for one query (it sees them all).

    A query at p sees keys p - window < j <= p (its own and the window - 1 before it, as HF's sliding mask),
    or with `window` None every j <= p. Every layer reads the sequence's one block table and global layers
    read every block, so blocks stay allocated after they leave a window; the window only hides their keys."""
    first = 0 if window is None else max(0, start - window + 1)
    if n == 1:
        return first, None
    keys = torch.arange(first, start + n, device=device)[None, :]
    queries = torch.arange(start, start + n, device=device)[:, None]
    mask = keys <= queries
    return first, mask if window is None else mask & (keys > queries - window)


class PagedAttention:
    """The attention of one step over `kv_cache` (see the module docstring); the cache is the runner's."""

    def __init__(self, kv_cache: torch.Tensor, *, num_heads: int, scale: float, use_paged_kernel: bool, kv: StoredKV | None = None,
                 dtype: torch.dtype | None = None, windows: tuple[int | None, ...] | None = None):
        """`kv`: how `kv_cache` stores K/V where that is not `dtype`, the model dtype that attention computes in.
        `windows`: per layer, the positions a query sees, its own included (None: all; see `window_mask`)."""
        self.kv_cache, self.kv = kv_cache, kv
        self.windows = windows or (None,) * kv_cache.shape[0]
        assert not (use_paged_kernel and any(self.windows)), "the paged kernel attends to the whole context"
        self.dtype = dtype or kv_cache.dtype
        num_blocks_with_scratch, self.block_size, self.num_kv_heads, self.head_dim = kv_cache.shape[2:]
        self.scratch_block = num_blocks_with_scratch - 1
        self.num_heads, self.scale = num_heads, scale
        self.use_paged_kernel = use_paged_kernel  # Triton on CUDA: decode rows read their blocks in place
        self.device = kv_cache.device

    def for_step(self, batch: ScheduledBatch):
        """`attend` for a step without CUDA graphs: paged where every row decodes and the kernel runs, else gathered."""
        if self.use_paged_kernel and batch.is_decode_only:
            return self.paged(*self.metadata(batch.seqs))
        return self.gathered(batch)

    def metadata(self, seqs, context_lens: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Block tables (B, widest table) int32 padded with the scratch block, and context lengths (B,) int32
        (default: each sequence's computed tokens plus the one this decode step adds)."""
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [self.scratch_block] * (width - len(s.block_table)) for s in seqs]
        block_tables = torch.tensor(tables, dtype=torch.int32, device=self.device)
        context_lens = torch.tensor(context_lens or [s.num_computed_tokens + 1 for s in seqs], dtype=torch.int32, device=self.device)
        return block_tables, context_lens

    def paged(self, block_tables: torch.Tensor, context_lens: torch.Tensor):
        """`attend` of one new token per row with the Triton paged-attention kernel (CUDA)."""
        from optforge.runtime.kernels.triton_ops import paged_decode_attention

        assert not any(self.windows), "the paged kernel attends to the whole context"

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:  # q (B, Hq, D) -> (B, Hq, D)
            return paged_decode_attention(q, self.kv_cache[layer, 0], self.kv_cache[layer, 1], block_tables, context_lens, self.scale,
                                          **kv_kernel_args(self.kv, layer))

        return attend

    def gathered(self, batch: ScheduledBatch):
        """SDPA over KV gathered from the blocks.

        Fresh prompts of equal length (no cached context) go through one batched causal SDPA call; with the
        paged kernel the decode rows of a mixed step go through one paged launch; every other sequence (a chunk
        after cached context, a decode on CPU) gets its own call with an offset mask. A layer with a window
        gathers only the keys its queries can see and masks the rest (`window_mask`, once per distinct window).
        """
        q_start = 0
        fresh: dict[int, list[tuple[int, torch.Tensor]]] = {}  # prompt length -> [(first row, gather index)]
        single = []  # (first row, first position, new tokens, gather index)
        decodes = []  # (row, seq, context length): one new token each, for the paged kernel
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            ctx = start + n
            if n == 1 and self.use_paged_kernel:
                decodes.append((q_start, seq, ctx))
                q_start += 1
                continue
            gather = torch.from_numpy(slot(np.asarray(seq.block_table, dtype=np.int64), np.arange(ctx), self.block_size)).to(self.device)
            if n > 1 and start == 0:
                fresh.setdefault(n, []).append((q_start, gather))
            else:
                single.append((q_start, start, n, gather))
            q_start += n
        groups = []
        for n, members in fresh.items():
            rows = torch.cat([torch.arange(r, r + n, device=self.device) for r, _ in members])  # (G n,)
            groups.append((len(members), n, rows, torch.stack([g for _, g in members])))  # gather (G, n)
        plans = {window: self._plan(groups, single, window) for window in set(self.windows)}

        if decodes:  # decode rows of a mixed step: one batched paged-attention launch instead of one SDPA each
            decode_rows = torch.tensor([r for r, _, _ in decodes], dtype=torch.long, device=self.device)
            decode_attend = self.paged(*self.metadata([s for _, s, _ in decodes], [c for _, _, c in decodes]))

        def attend(layer: int, q: torch.Tensor) -> torch.Tensor:  # q (T, Hq, D) -> (T, Hq, D)
            with sdpa_kernel(_SDPA_BACKENDS):
                return gathered(layer, q)

        def read(layer: int, kv: int, stored: torch.Tensor) -> torch.Tensor:
            return self.kv.decode(stored, layer, kv, self.dtype) if self.kv is not None else stored

        def gathered(layer: int, q: torch.Tensor) -> torch.Tensor:
            k_flat = self.kv_cache[layer, 0].view(-1, self.num_kv_heads, self.head_dim)
            v_flat = self.kv_cache[layer, 1].view(-1, self.num_kv_heads, self.head_dim)
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            if decodes:
                out[decode_rows] = decode_attend(layer, q[decode_rows])
            plan_groups, plan_single = plans[self.windows[layer]]
            for num_seqs, n, rows, gather, mask in plan_groups:
                qq = q[rows].view(num_seqs, n, self.num_heads, self.head_dim).transpose(1, 2)  # (G, Hq, n, D)
                kk, vv = read(layer, 0, k_flat[gather]).transpose(1, 2), read(layer, 1, v_flat[gather]).transpose(1, 2)  # (G, Hkv, n, D)
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=True)
                out[rows] = o.transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
            for qs, qe, gather, mask in plan_single:
                qq = q[qs:qe].transpose(0, 1)[None]  # (1, Hq, n, D)
                kk = read(layer, 0, k_flat[gather]).transpose(0, 1)[None]  # (1, Hkv, keys, D)
                vv = read(layer, 1, v_flat[gather]).transpose(0, 1)[None]
                o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=self.scale, enable_gqa=True)
                out[qs:qe] = o[0].transpose(0, 1)
            return out

        return attend

    def _plan(self, groups, single, window: int | None) -> tuple[list, list]:
        """The SDPA calls of `gathered` for layers with `window`: fresh-prompt groups (G, n, rows, gather, mask:
        None for plain causal, where the window hides nothing), and single sequences (first row, end row, gather
        from the window's first key, mask)."""
        plan_groups = []
        for num_seqs, n, rows, gather in groups:
            mask = window_mask(0, n, window, self.device)[1] if window is not None and n > window else None
            plan_groups.append((num_seqs, n, rows, gather, mask))
        plan_single = []
        for q_start, start, n, gather in single:
            first, mask = window_mask(start, n, window, self.device)
            plan_single.append((q_start, q_start + n, gather[first:], mask))
        return plan_groups, plan_single
