// The same scenarios as tests/runtime/test_block_manager.py's core cases: counts, prefix reuse, COW, no leaks.
#include <numeric>
#include <stdexcept>

#include "check.h"
#include "optforge_rt/engine.h"

using namespace optforge_rt;

static Sequence make_seq(int id, int n, int offset = 0) {
  Sequence s;
  s.seq_id = id;
  s.token_ids.resize(n);
  std::iota(s.token_ids.begin(), s.token_ids.end(), offset);
  s.num_prompt_tokens = n;
  return s;
}

int main() {
  BlockManager bm(8, 4, true);
  Sequence a = make_seq(0, 10);
  CHECK(bm.can_allocate(a, 10));
  CHECK(bm.allocate(a, 10).empty());
  CHECK(a.block_table.size() == 3 && bm.num_free_blocks() == 5);
  a.num_computed_tokens = 10;
  bm.commit(a);  // two full blocks registered
  // A second sequence with the same first 8 tokens reuses two blocks and computes the rest.
  Sequence b = make_seq(1, 9);
  CHECK(bm.prefix_hits(b).size() == 2);
  CHECK(bm.num_cached_tokens(b) == 8);
  bm.allocate(b, 1);
  CHECK(b.num_computed_tokens == 8 && b.block_table[0] == a.block_table[0] && b.block_table[1] == a.block_table[1]);
  CHECK(bm.ref_count(a.block_table[0]) == 2);
  CHECK(bm.num_free_blocks() == 4);
  // A full-prefix hit leaves one token to run: the last block is shared and registered, so it is copied.
  Sequence c = make_seq(2, 8);
  CHECK(bm.num_cached_tokens(c) == 7);
  auto copies = bm.allocate(c, 1);
  CHECK(copies.size() == 1 && copies[0].first == a.block_table[1]);
  CHECK(c.block_table[1] != a.block_table[1]);
  // Freeing everything returns every block; nothing leaks.
  bm.free(a); bm.free(b); bm.free(c);
  CHECK(bm.num_free_blocks() == 8);
  // Freed blocks keep feeding the prefix cache until reused.
  Sequence d = make_seq(3, 9);
  CHECK(bm.prefix_hits(d).size() == 2);
  // Exhaustion: can_allocate says no before allocate would fail.
  Sequence big = make_seq(4, 40, 1000);
  CHECK(!bm.can_allocate(big, 40));
  bool threw = false;
  try { bm.allocate(big, 40); } catch (const std::runtime_error&) { threw = true; }
  CHECK(threw);
  // Different tokens with no cache: disabled prefix caching never hits.
  BlockManager off(4, 4, false);
  Sequence e = make_seq(5, 8);
  off.allocate(e, 8);
  e.num_computed_tokens = 8;
  off.commit(e);
  Sequence f = make_seq(6, 8);
  CHECK(off.prefix_hits(f).empty());
  return 0;
}
