"""Scheduler: budgets, decode-first, chunked prefill, preemption by recompute, no leaked blocks.

A fake model stands in for the runner: the "next token" of a sequence is a function of its tokens, so
recomputation after preemption must give the same stream as an uninterrupted run.
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from optforge.runtime.block_manager import BlockManager
from optforge.runtime.scheduler import Scheduler, SchedulerConfig
from optforge.runtime.sequence import SamplingParams, Sequence, SequenceStatus


def fake_next_token(seq: Sequence) -> int:
    return (sum(seq.token_ids) * 31 + len(seq)) % 1000


def drive(scheduler: Scheduler, max_steps: int = 10_000) -> int:
    """Run to completion with the fake model, checking each batch; returns the number of steps."""
    bm, cfg = scheduler.block_manager, scheduler.config
    for step in range(max_steps):
        if not scheduler.has_unfinished:
            return step
        batch = scheduler.schedule()
        assert batch.num_tokens <= cfg.max_num_batched_tokens and len(batch) <= cfg.max_num_seqs
        assert len({s.seq_id for s in batch.seqs}) == len(batch)
        sampled = {}
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            assert seq.status is SequenceStatus.RUNNING
            # every token being written has a block, and KV before it is in blocks the sequence holds
            assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens + n
            if seq.num_computed_tokens + n == len(seq):
                sampled[seq.seq_id] = fake_next_token(seq)
        scheduler.postprocess(batch, sampled)
        held = sum(len(s.block_table) for s in scheduler.running)
        assert held == sum(b.ref_count for b in bm.blocks)
    raise AssertionError("did not finish")


def test_decodes_go_first_and_prefill_is_chunked():
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=10), bm)
    a = Sequence([1] * 3, SamplingParams(max_tokens=5))
    sched.add(a)
    batch = sched.schedule()
    sched.postprocess(batch, {a.seq_id: 7})
    b = Sequence([2] * 25, SamplingParams(max_tokens=5))
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 9]  # a decodes first; b gets the rest
    sched.postprocess(batch, {a.seq_id: 8})
    assert b.num_computed_tokens == 9 and len(b) == 25


def test_preemption_under_a_tiny_cache_recomputes_the_same_tokens():
    def outputs(num_blocks):
        bm = BlockManager(num_blocks, 4)
        sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), bm)
        seqs = [Sequence([i + 1] * (5 + i), SamplingParams(max_tokens=12)) for i in range(6)]
        for s in seqs:
            sched.add(s)
        drive(sched)
        assert bm.num_free_blocks == bm.num_blocks
        return [s.output_token_ids for s in seqs], sched.num_preemptions

    roomy, none = outputs(200)
    tight, some = outputs(8)
    assert none == 0 and some > 0
    assert tight == roomy


def test_finished_and_aborted_requests_free_their_blocks():
    bm = BlockManager(32, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    keep, drop = Sequence([1, 2, 3], SamplingParams(max_tokens=3)), Sequence([4, 5, 6, 7, 8], SamplingParams(max_tokens=50))
    sched.add(keep)
    sched.add(drop)
    sched.postprocess(sched.schedule(), {keep.seq_id: 9, drop.seq_id: 9})
    sched.finish(drop, "abort")
    assert drop.finish_reason == "abort" and drop.block_table == []
    drive(sched)
    assert keep.finish_reason == "length" and keep.num_output_tokens == 3
    assert bm.num_free_blocks == 32


def test_stop_token_ends_a_sequence():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(), bm)
    seq = Sequence([1], SamplingParams(max_tokens=10, stop_token_ids=(42,)))
    sched.add(seq)
    done = sched.postprocess(sched.schedule(), {seq.seq_id: 42})
    assert done == [seq] and seq.finish_reason == "stop" and bm.num_free_blocks == 8


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=10),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(1, 48),
    max_seqs=st.integers(1, 8),
    caching=st.booleans(),
)
def test_random_workloads_finish_without_leaks_or_corruption(prompts, num_blocks, block_size, budget, max_seqs, caching):
    def run(nb, bs, bud, ms, cache):
        bm = BlockManager(nb, bs, enable_prefix_caching=cache)
        sched = Scheduler(SchedulerConfig(max_num_seqs=ms, max_num_batched_tokens=bud), bm)
        seqs = {}
        for i, (token, length, max_tokens) in enumerate(prompts):
            seq = Sequence([token] * length, SamplingParams(max_tokens=max_tokens))
            if bm.num_blocks_for(length + max_tokens) <= nb:
                sched.add(seq)
                seqs[i] = seq
        drive(sched)
        assert bm.num_free_blocks == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
        assert all(s.is_finished and s.block_table == [] for s in seqs.values())
        return {i: s.output_token_ids for i, s in seqs.items()}

    constrained = run(num_blocks, block_size, budget, max_seqs, caching)
    reference = run(10_000, block_size, 10_000, 64, False)
    # same requests, same streams: no cross-request leakage through shared or recycled blocks
    assert list(constrained.values()) == [v for k, v in reference.items() if k in constrained]
