"""runtime/attention.py on the CPU: the slot of a position, and the block tables the paged kernel reads."""

import numpy as np
import torch

from optforge.runtime.attention import PagedAttention, slot
from optforge.runtime.sequence import Sequence


def test_slot_is_the_same_on_ints_numpy_and_torch():
    table, block_size = [7, 2, 5], 4
    ints = [slot(table, p, block_size) for p in range(12)]
    assert ints == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21, 22, 23]
    assert slot(np.asarray(table), np.arange(12), block_size).tolist() == ints
    assert slot(torch.tensor(table), torch.arange(12), block_size).tolist() == ints


def test_metadata_pads_block_tables_with_the_scratch_block():
    kv_cache = torch.zeros(1, 2, 9, 4, 2, 8)  # 8 blocks + the scratch block (id 8)
    attention = PagedAttention(kv_cache, num_heads=4, scale=1.0, use_paged_kernel=False)
    short, long = Sequence([1, 2, 3]), Sequence([1] * 9)
    short.block_table, short.num_computed_tokens = [3], 3
    long.block_table, long.num_computed_tokens = [0, 1, 6], 9
    block_tables, context_lens = attention.metadata([short, long])
    assert block_tables.tolist() == [[3, 8, 8], [0, 1, 6]] and block_tables.dtype == torch.int32
    assert context_lens.tolist() == [4, 10]  # computed tokens + the one this decode step adds
