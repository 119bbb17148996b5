"""Paged KV-cache bookkeeping: fixed-size blocks, reference counts, prefix caching, copy-on-write.

Pure Python (no torch): it only hands out block ids; the model runner owns the tensors. A block holds the
KV of `block_size` consecutive token positions of one or more sequences. A full block whose KV is computed
is registered under a chained hash (hash of the previous block's hash and its own token ids), so a later
sequence with the same prefix reuses it instead of recomputing. A freed block keeps its hash until it is
handed out again (least recently freed first), so finished requests still feed the cache.

A block is written in place only when exactly one sequence holds it and it is not registered in the prefix
cache; any other write copies it first (copy-on-write) and reports the (src, dst) copy for the runner.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

from optforge.runtime.sequence import Sequence


def block_hash(prev_hash: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """The chained hash of a full block: blake2b-128 over the previous hash and the int64 token ids."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(prev_hash or b"")
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return digest.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full, computed and registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the tokens behind `hash`, checked on every hit


class BlockManager:
    """Hands out KV blocks to sequences. Check/act pairs: `can_allocate` then `allocate`."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[bytes, int] = {}  # hash -> block id
        self.num_prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found

    # ---- queries -------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq`'s full blocks (no side effects)."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        hits, prev = [], None
        scored_from = seq.params.prompt_logprobs_from
        # A scored prompt runs from the position whose logits predict its first scored token.
        num_cacheable = len(seq) if scored_from is None else min(len(seq), scored_from - 1)
        for start in range(0, num_cacheable - self.block_size + 1, self.block_size):
            tokens = tuple(seq.token_ids[start : start + self.block_size])
            prev = block_hash(prev, tokens)
            block_id = self.cached_blocks.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def num_cached_tokens(self, seq: Sequence) -> int:
        """Tokens of `seq` that `allocate` would take from the prefix cache; at least one is left to run."""
        if seq.block_table:
            return seq.num_computed_tokens
        return min(len(self.prefix_hits(seq)) * self.block_size, len(seq) - 1)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether `allocate(seq, num_new_tokens)` would find enough free blocks."""
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self.free_block_ids)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks that `allocate(seq, num_new_tokens)` would take (new blocks, a copy-on-write target, and
        cached blocks it would revive from the free list)."""
        table, num_computed, extra_refs, num_revived = seq.block_table, seq.num_computed_tokens, 0, 0
        if not table:
            table = hits = self.prefix_hits(seq)
            num_computed = self.num_cached_tokens(seq)
            extra_refs = int(bool(hits))  # taking a hit adds a reference before the write
            num_revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        num_needed = max(0, self.num_blocks_for(num_computed + num_new_tokens) - len(table))
        cow_index = num_computed // self.block_size
        if cow_index < len(table) and not self._is_writable(table[cow_index], extra_refs):
            num_needed += 1
        return num_needed + num_revived

    # ---- actions -------------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Give `seq` the blocks for its next `num_new_tokens` tokens; returns copy-on-write (src, dst) pairs.

        On a sequence without blocks this first takes its cached prefix and sets `num_computed_tokens`.
        """
        if not self.can_allocate(seq, num_new_tokens):
            raise RuntimeError(f"sequence {seq.seq_id}: not enough free KV blocks (call can_allocate first)")
        if not seq.block_table:
            hits, num_cached = self.prefix_hits(seq), self.num_cached_tokens(seq)
            if self.enable_prefix_caching:
                self.num_prefix_queries += len(seq)
                self.num_prefix_hits += len(hits) * self.block_size
            for block_id in hits:
                self._take(block_id)
            seq.block_table = hits
            seq.num_computed_tokens = seq.num_cached_tokens = num_cached
        copies = []
        index = seq.num_computed_tokens // self.block_size
        if index < len(seq.block_table) and not self._is_writable(seq.block_table[index]):
            src = seq.block_table[index]
            dst = self._pop_free()
            self._release(src)
            seq.block_table[index] = dst
            copies.append((src, dst))
        end = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) < self.num_blocks_for(end):
            seq.block_table.append(self._pop_free())
        return copies

    def commit(self, seq: Sequence) -> None:
        """Register the full, computed blocks of `seq` in the prefix cache (call after each step)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        # blocks before the last hashed one are hashed too (blocks fill in order): start from there
        first = num_full
        while first > 0 and self.blocks[seq.block_table[first - 1]].hash is None:
            first -= 1
        prev = self.blocks[seq.block_table[first - 1]].hash if first else None
        for index in range(first, num_full):
            block = self.blocks[seq.block_table[index]]
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            block.hash, block.token_ids = block_hash(prev, tokens), tokens
            self.cached_blocks.setdefault(block.hash, block.block_id)
            prev = block.hash

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its blocks return to the free list (tail blocks are evicted first)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0

    # ---- internals -----------------------------------------------------------------------------------
    def _is_writable(self, block_id: int, extra_refs: int = 0) -> bool:
        block = self.blocks[block_id]
        return block.ref_count + extra_refs <= 1 and block.hash is None

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} freed twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_block_ids[block_id] = None

    def _pop_free(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached_blocks.get(block.hash) == block_id:
            del self.cached_blocks[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
