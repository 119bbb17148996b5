"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Pure Python (no torch). Each step has a token budget (`max_num_batched_tokens`) and a sequence budget
(`max_num_seqs`). Running sequences go first, oldest first: decodes take one token each, unfinished prompts
take a chunk (chunked prefill). Waiting sequences are admitted with what budget remains. When the KV blocks
run out, the newest running sequence is preempted by recompute: its blocks are freed and it goes back to the
front of the queue with all its tokens, to be prefilled again later (the prefix cache often makes that cheap).
A sequence is never left with a partial or corrupted KV state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from optforge.runtime.block_manager import BlockManager
from optforge.runtime.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # sequences in one step, at most
    max_num_batched_tokens: int = 8192  # tokens (prompt chunks + decodes) in one step, at most
    enable_chunked_prefill: bool = True  # split long prompts over steps; off: a prompt runs whole or waits

    def __post_init__(self):
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledBatch:
    """One step's work: `num_new_tokens[i]` tokens of `seqs[i]` from `seqs[i].num_computed_tokens` on."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) block ids

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)

    def add(self, seq: Sequence, num_new_tokens: int, copies: list[tuple[int, int]]) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.block_copies.extend(copies)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.block_manager.num_blocks_for(len(seq) + seq.params.max_tokens) > self.block_manager.num_blocks:
            raise ValueError(f"request of {len(seq)} prompt + {seq.params.max_tokens} new tokens can never fit the KV cache")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted: set[int] = set()
        for seq in list(self.running):
            if seq.seq_id in preempted:  # preempted to make room for an older sequence this step
                continue
            if budget == 0 or len(batch) == self.config.max_num_seqs:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if self._make_room(seq, num_new, preempted):
                batch.add(seq, num_new, self.block_manager.allocate(seq, num_new))
                budget -= num_new
        while self.waiting and budget > 0 and len(batch) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = len(seq) - self.block_manager.num_cached_tokens(seq)
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break
            self.waiting.popleft()
            copies = self.block_manager.allocate(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new, copies)
            budget -= num_new
        return batch

    def schedule_alone(self, seq: Sequence) -> ScheduledBatch | None:
        """A step of one waiting sequence and nothing else (the engine runs requests alone to find the one
        that breaks a step); None where its blocks are not free now, and it stays waiting."""
        num_new = min(len(seq) - self.block_manager.num_cached_tokens(seq), self.config.max_num_batched_tokens)
        if seq not in self.waiting or not self.block_manager.can_allocate(seq, num_new):
            return None
        self.waiting.remove(seq)
        batch = ScheduledBatch()
        batch.add(seq, num_new, self.block_manager.allocate(seq, num_new))
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return batch

    def _make_room(self, seq: Sequence, num_new: int, preempted: set[int]) -> bool:
        """Preempt the newest running sequences until `seq` fits; False if `seq` itself had to go.

        Running sequences are scheduled oldest first, so the newest one is never already in this batch
        unless it is `seq` itself."""
        while not self.block_manager.can_allocate(seq, num_new):
            victim = self.running[-1]
            self.preempt(victim)
            preempted.add(victim.seq_id)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Advance each sequence by its scheduled tokens and append `sampled[seq_id]` where a token was
        sampled (the chunk reached the end). Returns the sequences that finished; their blocks are freed."""
        finished = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.commit(seq)
            if seq.seq_id not in sampled:
                continue
            seq.token_ids.append(sampled[seq.seq_id])
            reason = self.stop_reason(seq)
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    @staticmethod
    def stop_reason(seq: Sequence) -> str | None:
        params, last = seq.params, seq.token_ids[-1]
        if last in params.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (stop, length, or an aborted request) and free its blocks, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
