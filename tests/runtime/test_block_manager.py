"""Block manager: reference counts, prefix reuse by chained hashes, copy-on-write, no leaked blocks."""

from hypothesis import given, settings
from hypothesis import strategies as st

from optforge.runtime.block_manager import BlockManager
from optforge.runtime.sequence import Sequence


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for seq in live:
        for block_id in seq.block_table:
            refs[block_id] += 1
    assert refs == [b.ref_count for b in bm.blocks]
    assert set(bm.free_block_ids) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for h, block_id in bm.cached_blocks.items():
        assert bm.blocks[block_id].hash == h


def run_prefill(bm: BlockManager, seq: Sequence) -> list[tuple[int, int]]:
    copies = bm.allocate(seq, len(seq) - bm.num_cached_tokens(seq))
    seq.num_computed_tokens = len(seq)
    bm.commit(seq)
    return copies


def test_allocate_covers_tokens_and_free_returns_everything():
    bm = BlockManager(8, 4)
    seq = Sequence(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_can_allocate_refuses_when_full():
    bm = BlockManager(2, 4)
    assert not bm.can_allocate(Sequence(list(range(9))), 9)
    assert bm.can_allocate(Sequence(list(range(8))), 8)


def test_prefix_reuse_shares_full_blocks_only():
    bm = BlockManager(16, 4)
    a = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    run_prefill(bm, a)
    b = Sequence([1, 2, 3, 4, 5, 6, 7, 8, 99])
    assert bm.num_cached_tokens(b) == 8
    run_prefill(bm, b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    c = Sequence([1, 2, 3, 4, 0, 6, 7, 8])  # the second block differs: the chain stops after one block
    assert bm.num_cached_tokens(c) == 4
    check_invariants(bm, [a, b])


def test_finished_request_still_feeds_the_cache_until_evicted():
    bm = BlockManager(4, 4)
    a = Sequence(list(range(8)))
    run_prefill(bm, a)
    bm.free(a)
    b = Sequence(list(range(8)) + [42])
    assert bm.num_cached_tokens(b) == 8
    run_prefill(bm, b)
    assert bm.prefix_hit_rate > 0
    bm.free(b)
    # fill the cache with other tokens: the old blocks are handed out again and their hashes dropped
    c = Sequence(list(range(100, 116)))
    run_prefill(bm, c)
    assert bm.num_cached_tokens(Sequence(list(range(8)) + [1])) == 0
    check_invariants(bm, [c])


def test_full_prefix_hit_copies_the_last_block_before_writing():
    bm = BlockManager(8, 4)
    a = Sequence(list(range(8)))
    run_prefill(bm, a)
    b = Sequence(list(range(8)))
    assert bm.num_cached_tokens(b) == 7  # one token must run to produce logits
    copies = bm.allocate(b, 1)
    assert copies == [(a.block_table[1], b.block_table[1])]
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    check_invariants(bm, [a, b])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["add", "step", "free"]), st.integers(0, 7), st.integers(1, 20)),
        min_size=1,
        max_size=60,
    ),
    st.booleans(),
)
def test_random_workload_never_leaks_blocks(ops, caching):
    bm = BlockManager(12, 4, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for op, pick, size in ops:
        if op == "add":
            seq = Sequence([pick % 3] * size)  # few distinct prompts: many prefix hits
            n = len(seq) - bm.num_cached_tokens(seq)
            if bm.can_allocate(seq, n):
                bm.allocate(seq, n)
                seq.num_computed_tokens = len(seq)
                bm.commit(seq)
                live.append(seq)
        elif op == "step" and live:
            seq = live[pick % len(live)]
            seq.token_ids.append(pick)
            if bm.can_allocate(seq, 1):
                bm.allocate(seq, 1)
                seq.num_computed_tokens += 1
                bm.commit(seq)
            else:
                seq.token_ids.pop()
        elif op == "free" and live:
            bm.free(live.pop(pick % len(live)))
        check_invariants(bm, live)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
