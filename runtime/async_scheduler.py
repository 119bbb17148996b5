"""The scheduler of overlapped decode (after vLLM v1's `AsyncScheduler`): the next decode step is scheduled,
and its KV blocks allocated, while the step before it is still on the GPU and its tokens are not known.

Pure Python (no torch). The engine launches a greedy decode-only step of every running sequence, then each
`step()` schedules the following step with `schedule_following(launched)` before it reads the launched one's
tokens, and hands those tokens to `postprocess_launched`. Between them the launched step's KV is counted as
computed (as vLLM counts its output placeholders): each of its rows wrote one position, whatever token the row
turns out to give. A sequence that stops on the token it is given is finished then; the row computed for it in
the following step is dropped by the engine (its KV write lands in a position past its end, in a block that
is not in the prefix cache), and `finish` frees its blocks as for any other finished sequence.
"""

from __future__ import annotations

from optforge.runtime.scheduler import ScheduledBatch, Scheduler
from optforge.runtime.sequence import Sequence


class AsyncScheduler(Scheduler):
    def can_overlap(self, batch: ScheduledBatch) -> bool:
        """Whether the steps after `batch` can be scheduled before its tokens are read: it decodes every running
        sequence (the following steps repeat it, so none may be left out) and nothing waits to be admitted."""
        return batch.is_decode_only and not self.waiting and len(batch) == len(self.running)

    def schedule_following(self, launched: ScheduledBatch) -> ScheduledBatch | None:
        """Count `launched`'s KV as computed, then schedule the decode step after it as `schedule` would, with one
        more block for a sequence whose block fills up: the same sequences, less those finished since the launch
        (aborted) and those whose launched token is their last (max_tokens). None where `schedule` could decide
        otherwise (a request waits), nothing is left to run, or the free blocks do not cover the step."""
        live = [seq for seq in launched.seqs if not seq.is_finished]
        for seq in live:
            seq.num_computed_tokens += 1
            self.block_manager.commit(seq)
        if not live or self.waiting:
            return None
        seqs = [seq for seq in live if seq.num_output_tokens + 1 < seq.params.max_tokens]
        if not seqs or sum(self.block_manager.num_blocks_needed(seq, 1) for seq in seqs) > self.block_manager.num_free_blocks:
            return None
        batch = ScheduledBatch()
        for seq in seqs:
            batch.add(seq, 1, self.block_manager.allocate(seq, 1))
        return batch

    def postprocess_launched(self, launched: ScheduledBatch, tokens: list[int]) -> list[tuple[Sequence, int]]:
        """Append each row's token read back from `launched` to its sequence, skipping rows whose sequence has
        finished since the launch, and finish those that stop on it (a stop token or max_tokens). Returns
        (sequence, token) for each token appended."""
        produced = []
        for seq, token in zip(launched.seqs, tokens):
            if seq.is_finished:
                continue
            seq.token_ids.append(token)
            produced.append((seq, token))
            reason = self.stop_reason(seq)
            if reason:
                self.finish(seq, reason)
        return produced
