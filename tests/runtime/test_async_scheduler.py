"""AsyncScheduler: the decode step after a launched one is scheduled, and its blocks allocated, before the launched
step's tokens are known; the token streams equal step-by-step scheduling and no block leaks.

A fake model stands in for the runner, as in test_scheduler.py: the tokens of a launched step are computed when
it is collected, from the sequence as it is then (the GPU runs the launched steps in order).
"""

from hypothesis import given, settings
from hypothesis import strategies as st

from optforge.runtime.async_scheduler import AsyncScheduler
from optforge.runtime.block_manager import BlockManager
from optforge.runtime.scheduler import Scheduler, SchedulerConfig
from optforge.runtime.sequence import SamplingParams, Sequence


def fake_next_token(seq: Sequence) -> int:
    return (sum(seq.token_ids) * 31 + len(seq)) % 50  # few values: stop tokens get hit


def step_alone(sched: Scheduler) -> None:
    batch = sched.schedule()
    sampled = {s.seq_id: fake_next_token(s) for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)}
    sched.postprocess(batch, sampled)


def check_blocks(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert sum(len(s.block_table) for s in sched.running) == sum(b.ref_count for b in bm.blocks)


def drive_overlapped(sched: AsyncScheduler, max_steps: int = 10_000) -> int:
    """Run to completion as the engine does; returns how many steps were scheduled before the last one's tokens."""
    launched, num_overlapped = None, 0
    for _ in range(max_steps):
        if launched is None:
            if not sched.has_unfinished:
                return num_overlapped
            batch = sched.schedule()
            if not sched.can_overlap(batch):
                sampled = {s.seq_id: fake_next_token(s) for s, n in zip(batch.seqs, batch.num_new_tokens) if s.num_computed_tokens + n == len(s)}
                sched.postprocess(batch, sampled)
                check_blocks(sched)
                continue
            launched = batch
        following = sched.schedule_following(launched)
        if following is not None:
            num_overlapped += 1
            for seq in following.seqs:  # the next position has a block before its token is known
                assert len(seq.block_table) * sched.block_manager.block_size >= seq.num_computed_tokens + 1
        tokens = [fake_next_token(s) for s in launched.seqs]
        sched.postprocess_launched(launched, tokens)
        launched = following if following is not None and not all(s.is_finished for s in following.seqs) else None
        check_blocks(sched)
    raise AssertionError("did not finish")


def outputs(scheduler_cls, prompts, max_tokens, num_blocks, stop_token_ids=()):
    bm = BlockManager(num_blocks, 4)
    sched = scheduler_cls(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), bm)
    seqs = [Sequence(p, SamplingParams(max_tokens=m, stop_token_ids=stop_token_ids)) for p, m in zip(prompts, max_tokens)]
    for seq in seqs:
        sched.add(seq)
    if scheduler_cls is AsyncScheduler:
        drive_overlapped(sched)
    else:
        while sched.has_unfinished:
            step_alone(sched)
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked
    return [(s.output_token_ids, s.finish_reason) for s in seqs]


def test_the_following_step_counts_the_launched_one_and_takes_a_block_when_one_fills():
    bm = BlockManager(8, 4)
    sched = AsyncScheduler(SchedulerConfig(), bm)
    seq = Sequence([1, 2, 3], SamplingParams(max_tokens=10))
    sched.add(seq)
    step_alone(sched)  # the prompt: 3 tokens computed, 1 sampled
    batch = sched.schedule()
    assert sched.can_overlap(batch) and seq.block_table and len(seq.block_table) == 1
    following = sched.schedule_following(batch)
    assert seq.num_computed_tokens == 4  # the launched step wrote position 3
    assert following.seqs == [seq] and following.num_new_tokens == [1]
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6  # position 4 starts the second block
    assert sched.postprocess_launched(batch, [42]) == [(seq, 42)] and seq.token_ids[-1] == 42


def test_no_following_step_while_a_request_waits_or_at_the_last_token():
    bm = BlockManager(8, 4)
    sched = AsyncScheduler(SchedulerConfig(), bm)
    last = Sequence([1, 2], SamplingParams(max_tokens=2))
    sched.add(last)
    step_alone(sched)
    batch = sched.schedule()
    assert sched.schedule_following(batch) is None  # its launched token is its last (max_tokens)
    assert sched.postprocess_launched(batch, [5]) and last.finish_reason == "length"
    assert bm.num_free_blocks == 8
    a = Sequence([1, 2], SamplingParams(max_tokens=5))
    sched.add(a)
    step_alone(sched)
    batch = sched.schedule()
    sched.add(Sequence([3], SamplingParams(max_tokens=5)))
    assert not sched.can_overlap(batch)
    free = bm.num_free_blocks
    assert sched.schedule_following(batch) is None and bm.num_free_blocks == free  # the waiting one is scheduled next
    assert a.num_computed_tokens == 3


def two_decoding(num_blocks: int, max_tokens: int):
    """A scheduler whose two sequences are prefilled (3 prompt tokens each, blocks of 4) and scheduled to decode."""
    sched = AsyncScheduler(SchedulerConfig(), BlockManager(num_blocks, 4))
    a, b = Sequence([1, 2, 3], SamplingParams(max_tokens=max_tokens)), Sequence([4, 5, 6], SamplingParams(max_tokens=max_tokens))
    sched.add(a)
    sched.add(b)
    step_alone(sched)
    return sched, sched.schedule(), a, b


def test_no_following_step_without_the_free_blocks_and_nothing_allocated():
    sched, batch, a, b = two_decoding(num_blocks=2, max_tokens=5)
    assert sched.can_overlap(batch) and sched.block_manager.num_free_blocks == 0
    assert sched.schedule_following(batch) is None and [len(a.block_table), len(b.block_table)] == [1, 1]


def test_a_sequence_finished_since_the_launch_is_dropped():
    sched, batch, a, b = two_decoding(num_blocks=8, max_tokens=8)
    sched.finish(a, "abort")
    following = sched.schedule_following(batch)
    assert following.seqs == [b]
    assert sched.postprocess_launched(batch, [7, 9]) == [(b, 9)] and len(a.output_token_ids) == 1


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 14), min_size=1, max_size=6),
    max_tokens=st.lists(st.integers(1, 12), min_size=6, max_size=6),
    num_blocks=st.integers(8, 40),
    stop_token=st.integers(0, 49),
)
def test_overlapped_scheduling_gives_the_step_by_step_tokens(lengths, max_tokens, num_blocks, stop_token):
    prompts = [[(7 * i + j) % 50 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    max_tokens = max_tokens[: len(prompts)]
    num_blocks = max([num_blocks] + [-(-(len(p) + m) // 4) for p, m in zip(prompts, max_tokens)])  # each request fits alone
    stops = (stop_token,)
    assert outputs(AsyncScheduler, prompts, max_tokens, num_blocks, stops) == outputs(Scheduler, prompts, max_tokens, num_blocks, stops)
