#include <stdexcept>

#include "optforge_rt/engine.h"

namespace optforge_rt {

uint64_t block_hash(uint64_t prev, bool has_prev, const int* tokens, int n) {
  uint64_t h = has_prev ? prev ^ 0x9E3779B97F4A7C15ull : 0xCBF29CE484222325ull;  // FNV-1a over the chain
  auto mix = [&](uint64_t v) {
    for (int i = 0; i < 8; ++i) { h ^= (v >> (8 * i)) & 0xFF; h *= 0x100000001B3ull; }
  };
  mix(prev);
  for (int i = 0; i < n; ++i) mix(static_cast<uint64_t>(static_cast<int64_t>(tokens[i])));
  return h;
}

BlockManager::BlockManager(int num_blocks, int block_size, bool enable_prefix_caching)
    : block_size_(block_size), enable_prefix_caching_(enable_prefix_caching), blocks_(num_blocks) {
  if (num_blocks < 1 || block_size < 1) throw std::invalid_argument("need num_blocks >= 1 and block_size >= 1");
  for (int i = 0; i < num_blocks; ++i) free_pos_[i] = free_ids_.insert(free_ids_.end(), i);
}

std::vector<int> BlockManager::prefix_hits(const Sequence& seq) const {
  std::vector<int> hits;
  if (!enable_prefix_caching_ || !seq.block_table.empty()) return hits;
  uint64_t prev = 0;
  for (int start = 0; start + block_size_ <= seq.size(); start += block_size_) {
    const int* tokens = seq.token_ids.data() + start;
    prev = block_hash(prev, start > 0, tokens, block_size_);
    auto it = cached_.find(prev);
    if (it == cached_.end()) break;
    const Block& b = blocks_[it->second];
    if (!std::equal(b.token_ids.begin(), b.token_ids.end(), tokens) || static_cast<int>(b.token_ids.size()) != block_size_) break;
    hits.push_back(it->second);
  }
  return hits;
}

int BlockManager::num_cached_tokens(const Sequence& seq) const {
  if (!seq.block_table.empty()) return seq.num_computed_tokens;
  return std::min(static_cast<int>(prefix_hits(seq).size()) * block_size_, seq.size() - 1);
}

bool BlockManager::is_writable(int block_id, int extra_refs) const {
  const Block& b = blocks_[block_id];
  return b.ref_count + extra_refs <= 1 && !b.has_hash;
}

bool BlockManager::can_allocate(const Sequence& seq, int num_new_tokens) const {
  std::vector<int> hits = prefix_hits(seq);
  const std::vector<int>& table = seq.block_table.empty() ? hits : seq.block_table;
  int num_computed = num_cached_tokens(seq);
  int needed = std::max(0, num_blocks_for(num_computed + num_new_tokens) - static_cast<int>(table.size()));
  int revived = 0;
  for (int b : hits) revived += blocks_[b].ref_count == 0;
  int cow_index = num_computed / block_size_;
  if (cow_index < static_cast<int>(table.size()) && !is_writable(table[cow_index], hits.empty() ? 0 : 1)) ++needed;
  return needed + revived <= num_free_blocks();
}

std::vector<std::pair<int, int>> BlockManager::allocate(Sequence& seq, int num_new_tokens) {
  if (!can_allocate(seq, num_new_tokens)) throw std::runtime_error("sequence " + std::to_string(seq.seq_id) + ": not enough free KV blocks (call can_allocate first)");
  if (seq.block_table.empty()) {
    std::vector<int> hits = prefix_hits(seq);
    int cached = num_cached_tokens(seq);
    if (enable_prefix_caching_) {
      num_prefix_queries_ += seq.size();
      num_prefix_hits_ += static_cast<int64_t>(hits.size()) * block_size_;
    }
    for (int b : hits) take(b);
    seq.block_table = hits;
    seq.num_computed_tokens = seq.num_cached_tokens = cached;
  }
  std::vector<std::pair<int, int>> copies;
  int index = seq.num_computed_tokens / block_size_;
  if (index < static_cast<int>(seq.block_table.size()) && !is_writable(seq.block_table[index])) {
    int src = seq.block_table[index];
    int dst = pop_free();
    release(src);
    seq.block_table[index] = dst;
    copies.emplace_back(src, dst);
  }
  int end = seq.num_computed_tokens + num_new_tokens;
  while (static_cast<int>(seq.block_table.size()) < num_blocks_for(end)) seq.block_table.push_back(pop_free());
  return copies;
}

void BlockManager::commit(const Sequence& seq) {
  if (!enable_prefix_caching_) return;
  uint64_t prev = 0;
  int num_full = std::min(seq.num_computed_tokens / block_size_, static_cast<int>(seq.block_table.size()));
  for (int index = 0; index < num_full; ++index) {
    Block& b = blocks_[seq.block_table[index]];
    if (!b.has_hash) {
      const int* tokens = seq.token_ids.data() + index * block_size_;
      b.hash = block_hash(prev, index > 0, tokens, block_size_);
      b.has_hash = true;
      b.token_ids.assign(tokens, tokens + block_size_);
      cached_.emplace(b.hash, seq.block_table[index]);
    }
    prev = b.hash;
  }
}

void BlockManager::fork(const Sequence& parent, Sequence& child) {
  child.block_table = parent.block_table;
  child.num_computed_tokens = parent.num_computed_tokens;
  for (int b : child.block_table) take(b);
}

void BlockManager::free(Sequence& seq) {
  for (auto it = seq.block_table.rbegin(); it != seq.block_table.rend(); ++it) release(*it);
  seq.block_table.clear();
  seq.num_computed_tokens = 0;
}

void BlockManager::take(int block_id) {
  Block& b = blocks_[block_id];
  if (b.ref_count == 0) {
    free_ids_.erase(free_pos_.at(block_id));
    free_pos_.erase(block_id);
  }
  ++b.ref_count;
}

void BlockManager::release(int block_id) {
  Block& b = blocks_[block_id];
  if (b.ref_count <= 0) throw std::logic_error("block " + std::to_string(block_id) + " freed twice");
  if (--b.ref_count == 0) free_pos_[block_id] = free_ids_.insert(free_ids_.end(), block_id);
}

int BlockManager::pop_free() {
  if (free_ids_.empty()) throw std::runtime_error("no free KV block");
  int id = free_ids_.front();
  free_ids_.pop_front();
  free_pos_.erase(id);
  Block& b = blocks_[id];
  if (b.has_hash) {  // evict its prefix-cache entry before reuse
    auto it = cached_.find(b.hash);
    if (it != cached_.end() && it->second == id) cached_.erase(it);
    b.has_hash = false;
    b.token_ids.clear();
  }
  b.ref_count = 1;
  return id;
}

}  // namespace optforge_rt
