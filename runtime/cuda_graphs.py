"""CUDA graphs of the decode step, one per batch size, and the static buffers they read.

One int64 buffer holds a graph's inputs: row 0 the argmax tokens of the last replay (written by the graph),
rows 1-5 host ids, positions, slots, context lengths and sources, refreshed by one copy per step from a
pinned host mirror (block tables only when they change). Row r's input token is buf[:2].flatten()[src[r]]:
its host id (largest + r), or a token of the previous replay that never went to the host (`launch`). Host
mirrors come in pairs: a step fills one while the copy from the other may still be queued behind the step
before. A batch runs in the graph of the smallest captured size that holds it; the padded rows decode token 0
at position 0 into the scratch block.
"""

from __future__ import annotations

from typing import Callable

import torch

from optforge.runtime.attention import slot

BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)  # captured up to max_num_seqs

# step(ids, positions, slots, block_tables, context_lens) -> logits (B, vocab): what a graph captures
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeGraphs:
    def __init__(self, *, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, scratch_block: int, device: torch.device):
        self.sizes = [b for b in BATCH_SIZES if b <= max_num_seqs]
        largest = self.largest = self.sizes[-1]
        self.block_size, self.scratch_block = block_size, scratch_block
        buf = torch.zeros(6, largest, dtype=torch.long, device=device)
        self.static = {"buf": buf, "greedy": buf[0], "tokens": buf[:2].view(-1), "pos": buf[2], "slots": buf[3], "lens": buf[4],
                       "src": buf[5], "tables": torch.full((largest, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)}
        self.host = {"meta": torch.zeros(2, 5, largest, dtype=torch.long).pin_memory(),
                     "tables": torch.full((2, largest, max_blocks_per_seq), scratch_block, dtype=torch.int32).pin_memory(),
                     "tokens": torch.zeros(2, largest, dtype=torch.long).pin_memory()}
        self.host["meta_np"], self.host["tables_np"] = self.host["meta"].numpy(), self.host["tables"].numpy()
        self.host["pad"] = torch.tensor([[0], [0], [slot([scratch_block], 0, block_size)], [1], [0]]).numpy()  # src set per row
        self.host["src"] = torch.arange(largest, 2 * largest).numpy()
        self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._launches = 0
        self._tables_shown: dict[int, list] = {}  # graph size -> the block-table rows last copied for it
        self.by_size: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}  # size -> graph, logits, argmax

    def capture(self, step: DecodeStep) -> None:
        """Capture `step` for every batch size, largest first, in one memory pool."""
        pool = None
        with torch.inference_mode():
            s = self.static
            s["src"].copy_(torch.arange(self.largest, 2 * self.largest))
            for size in reversed(self.sizes):
                body = self.body(size, step)
                body()  # warm up: compiles the Triton kernels, picks the cuBLAS algorithms
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = body()
                    torch.argmax(logits, -1, out=s["greedy"][:size])
                pool = graph.pool()
                self.by_size[size] = (graph, logits, s["greedy"][:size])

    def body(self, size: int, step: DecodeStep) -> Callable[[], torch.Tensor]:
        """`step` over the first `size` rows of the static buffers, as a graph captures it (benchmarks time it bare)."""
        s = self.static

        def body() -> torch.Tensor:
            ids = s["tokens"].index_select(0, s["src"][:size])
            return step(ids, s["pos"][:size], s["slots"][:size], s["tables"][:size], s["lens"][:size])

        return body

    def size_for(self, num_rows: int) -> int | None:
        """The smallest captured batch size >= num_rows, or None."""
        return next((b for b in self.sizes if b >= num_rows), None) if self.by_size else None

    def replay(self, seqs, host_ids: list[int], src: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the graph for a decode step of `seqs`; row r reads its input token at `src[r]` (default: its
        host id, `host_ids[r]`) and attends to its `num_computed_tokens + 1` positions. Returns logits (n, vocab)
        and their argmax (n,), on the device."""
        n = len(seqs)
        size = self.size_for(n)
        src = src if src is not None else [self.largest + r for r in range(n)]
        s, host, j = self.static, self.host, self._launches % 2
        self._launches += 1
        meta = host["meta_np"][j]
        meta[:, :size] = host["pad"]  # padded rows: token 0 at position 0 in the scratch block
        meta[4, :size] = host["src"][:size]
        positions = [q.num_computed_tokens for q in seqs]
        meta[0, :n], meta[1, :n], meta[4, :n] = host_ids, positions, src
        meta[2, :n] = [slot(q.block_table, p, self.block_size) for q, p in zip(seqs, positions)]
        meta[3, :n] = [p + 1 for p in positions]
        s["buf"][1:].copy_(host["meta"][j], non_blocking=True)
        rows = [q.block_table for q in seqs]
        if self._tables_shown.get(size) != rows:  # stale entries past a row's context length are never read
            tables = host["tables_np"][j]
            for r, table in enumerate(rows):
                tables[r, : len(table)] = table
            tables[n:size] = self.scratch_block
            s["tables"][:size].copy_(host["tables"][j, :size], non_blocking=True)
            self._tables_shown = {size: [list(t) for t in rows]}
        graph, logits, greedy = self.by_size[size]
        graph.replay()
        return logits[:n], greedy[:n]

    def launch(self, seqs, host_ids: list[int], src_rows: list[int | None]) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Replay without waiting: row i reads the previous replay's token of row `src_rows[i]` where that is set,
        else its host id. Returns a pinned buffer that the greedy tokens fill (first len(seqs) rows) once the
        event completes."""
        src = [r if r is not None else self.largest + i for i, r in enumerate(src_rows)]
        _, greedy = self.replay(seqs, host_ids, src)
        out, event = self.host["tokens"][self._launches % 2], self._events[self._launches % 2]
        out[: len(seqs)].copy_(greedy, non_blocking=True)
        event.record()
        return out, event
