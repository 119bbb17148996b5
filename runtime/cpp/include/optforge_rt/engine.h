// Paged KV bookkeeping, scheduling and generation, with the semantics of the Python runtime
// (runtime/block_manager.py, runtime/scheduler.py): fixed-size blocks with reference counts, a prefix cache
// of full blocks keyed by a chained hash of their token ids (checked on every hit), copy-on-write of shared
// blocks, check/act pairs (`can_allocate` / `allocate`), continuous batching with preemption by recompute.
#pragma once

#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "optforge_rt/model.h"

namespace optforge_rt {

struct Sequence {
  int seq_id = 0;
  std::vector<int> token_ids;
  int num_prompt_tokens = 0;
  int max_new_tokens = 0;
  std::vector<int> block_table;
  int num_computed_tokens = 0;
  int num_cached_tokens = 0;  // prompt tokens taken from the prefix cache
  bool finished = false;
  int size() const { return static_cast<int>(token_ids.size()); }
  int num_generated() const { return size() - num_prompt_tokens; }
};

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size, bool enable_prefix_caching);

  int num_free_blocks() const { return static_cast<int>(free_ids_.size()); }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int num_blocks_for(int num_tokens) const { return (num_tokens + block_size_ - 1) / block_size_; }
  int64_t num_prefix_queries() const { return num_prefix_queries_; }
  int64_t num_prefix_hits() const { return num_prefix_hits_; }
  int ref_count(int block_id) const { return blocks_.at(block_id).ref_count; }

  std::vector<int> prefix_hits(const Sequence& seq) const;
  int num_cached_tokens(const Sequence& seq) const;
  bool can_allocate(const Sequence& seq, int num_new_tokens) const;
  std::vector<std::pair<int, int>> allocate(Sequence& seq, int num_new_tokens);  // copy-on-write (src, dst)
  void commit(const Sequence& seq);
  void fork(const Sequence& parent, Sequence& child);
  void free(Sequence& seq);

 private:
  struct Block {
    int ref_count = 0;
    bool has_hash = false;
    uint64_t hash = 0;
    std::vector<int> token_ids;
  };
  bool is_writable(int block_id, int extra_refs = 0) const;
  void take(int block_id);
  void release(int block_id);
  int pop_free();

  int block_size_;
  bool enable_prefix_caching_;
  std::vector<Block> blocks_;
  std::list<int> free_ids_;                               // least recently freed first
  std::unordered_map<int, std::list<int>::iterator> free_pos_;
  std::unordered_map<uint64_t, int> cached_;              // hash -> block id
  int64_t num_prefix_queries_ = 0, num_prefix_hits_ = 0;
};

uint64_t block_hash(uint64_t prev, bool has_prev, const int* tokens, int n);

struct GenerationConfig {
  int max_new_tokens = 64;
  bool ignore_eos = false;
  int max_num_seqs = 8;               // running sequences per step
  int max_num_batched_tokens = 2048;  // tokens per forward step (prefill chunks + decodes)
};

struct GenerationStats {
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;
  int num_preemptions = 0;
};

class Engine {
 public:
  Engine(const std::string& artifact_dir, int num_threads, int num_kv_blocks, int block_size, bool verify, bool enable_prefix_caching,
         const ModelOptions& model_options = {});

  Model& model() { return *model_; }
  BlockManager& block_manager() { return *blocks_; }
  int num_threads() const { return pool_.num_threads(); }
  // Whether every file matched the artifact's manifest.json at load (false: loaded unverified).
  bool verified() const { return verified_; }

  // Greedy generation for every prompt with continuous batching; returns the new tokens of each.
  std::vector<std::vector<int>> generate(const std::vector<std::vector<int>>& prompts, const GenerationConfig& cfg, GenerationStats* stats = nullptr);
  // Logits (vocab,) after `tokens` (a new sequence through the block manager, freed afterwards).
  std::vector<float> last_logits(const std::vector<int>& tokens);

 private:
  std::vector<std::vector<int>> run(std::vector<Sequence>& seqs, const std::vector<std::vector<int>>& prompts, const GenerationConfig& cfg,
                                    GenerationStats* stats);

  ThreadPool pool_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<BlockManager> blocks_;
  int next_seq_id_ = 0;
  bool verified_ = false;
};

}  // namespace optforge_rt
