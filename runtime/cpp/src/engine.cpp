#include <algorithm>
#include <chrono>
#include <stdexcept>

#include "optforge_rt/engine.h"
#include "optforge_rt/errors.h"

namespace optforge_rt {

namespace {
int argmax(const float* v, int n) {
  int best = 0;
  for (int i = 1; i < n; ++i) {
    if (v[i] > v[best]) best = i;
  }
  return best;
}
double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

Engine::Engine(const std::string& artifact_dir, int num_threads, int num_kv_blocks, int block_size, bool verify, bool enable_prefix_caching,
               const ModelOptions& model_options)
    : pool_(num_threads) {
  Artifact artifact = open_artifact(artifact_dir, verify);
  verified_ = artifact.verified;
  model_ = std::make_unique<Model>(artifact, num_kv_blocks, block_size, model_options);
  blocks_ = std::make_unique<BlockManager>(num_kv_blocks, block_size, enable_prefix_caching);
}

// Runs through the engine's own block manager: a private manager would write this sequence's KV into
// blocks that the engine's prefix cache still maps to other tokens. Prefix hits are exact (every output
// row is computed independently of the batch), so the logits equal those of a run from scratch.
std::vector<float> Engine::last_logits(const std::vector<int>& tokens) {
  if (tokens.empty()) throw std::invalid_argument("last_logits: empty token list");
  Sequence seq;
  seq.seq_id = next_seq_id_++;
  seq.token_ids = tokens;
  int num_new = seq.size() - blocks_->num_cached_tokens(seq);
  if (!blocks_->can_allocate(seq, num_new)) throw std::runtime_error("last_logits: " + std::to_string(seq.size()) + " tokens do not fit the KV cache");
  for (auto [src, dst] : blocks_->allocate(seq, num_new)) model_->copy_block(src, dst);
  ForwardBatch batch;
  batch.block_tables.push_back(seq.block_table);
  for (int p = seq.num_computed_tokens; p < seq.size(); ++p) {
    batch.tokens.push_back(tokens[p]);
    batch.positions.push_back(p);
    batch.seq_of.push_back(0);
  }
  batch.logits_for.push_back(static_cast<int>(batch.tokens.size()) - 1);
  try {
    std::vector<float> logits = model_->forward(batch, pool_);
    blocks_->free(seq);
    return logits;
  } catch (...) {
    blocks_->free(seq);
    throw;
  }
}

std::vector<std::vector<int>> Engine::generate(const std::vector<std::vector<int>>& prompts, const GenerationConfig& cfg, GenerationStats* stats) {
  std::vector<Sequence> seqs(prompts.size());
  try {
    return run(seqs, prompts, cfg, stats);
  } catch (...) {  // a bad prompt or a full cache: hand back every block before the error leaves the engine
    for (Sequence& s : seqs) {
      if (!s.block_table.empty()) blocks_->free(s);
    }
    throw;
  }
}

std::vector<std::vector<int>> Engine::run(std::vector<Sequence>& seqs, const std::vector<std::vector<int>>& prompts, const GenerationConfig& cfg,
                                          GenerationStats* stats) {
  const ModelConfig& mc = model_->config();
  std::deque<int> waiting;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) throw std::invalid_argument("prompt " + std::to_string(i) + " is empty");
    seqs[i].seq_id = next_seq_id_++;
    seqs[i].token_ids = prompts[i];
    seqs[i].num_prompt_tokens = static_cast<int>(prompts[i].size());
    seqs[i].max_new_tokens = cfg.max_new_tokens;
    waiting.push_back(static_cast<int>(i));
  }
  std::vector<int> running;
  GenerationStats local;
  while (!waiting.empty() || !running.empty()) {
    // Schedule: decodes of running sequences first (preempting the newest when blocks run out), then prefills.
    std::vector<std::pair<int, int>> step;  // (sequence index, tokens to run)
    int budget = cfg.max_num_batched_tokens;
    auto preempt_last = [&] {
      blocks_->free(seqs[running.back()]);
      waiting.push_front(running.back());
      running.pop_back();
      ++local.num_preemptions;
    };
    for (size_t r = 0; r < running.size(); ++r) {
      int idx = running[r];
      while (!blocks_->can_allocate(seqs[idx], 1) && running.back() != idx) preempt_last();
      if (!blocks_->can_allocate(seqs[idx], 1)) {
        preempt_last();  // the sequence itself: it recomputes once blocks free up
        break;
      }
      for (auto [src, dst] : blocks_->allocate(seqs[idx], 1)) model_->copy_block(src, dst);
      step.emplace_back(idx, 1);
      --budget;
    }
    while (!waiting.empty() && static_cast<int>(running.size()) < cfg.max_num_seqs) {
      Sequence& s = seqs[waiting.front()];
      int num_new = s.size() - blocks_->num_cached_tokens(s);
      if (num_new > budget && !step.empty()) break;
      if (!blocks_->can_allocate(s, num_new)) {
        if (running.empty() && step.empty()) throw std::runtime_error("a prompt of " + std::to_string(s.size()) + " tokens does not fit the KV cache");
        break;
      }
      for (auto [src, dst] : blocks_->allocate(s, num_new)) model_->copy_block(src, dst);
      step.emplace_back(waiting.front(), s.size() - s.num_computed_tokens);
      budget -= step.back().second;
      running.push_back(waiting.front());
      waiting.pop_front();
    }
    ForwardBatch batch;
    bool is_prefill = false;
    for (size_t i = 0; i < step.size(); ++i) {
      Sequence& s = seqs[step[i].first];
      batch.block_tables.push_back(s.block_table);
      for (int p = s.num_computed_tokens; p < s.num_computed_tokens + step[i].second; ++p) {
        batch.tokens.push_back(s.token_ids[p]);
        batch.positions.push_back(p);
        batch.seq_of.push_back(static_cast<int>(i));
      }
      batch.logits_for.push_back(static_cast<int>(batch.tokens.size()) - 1);
      is_prefill |= step[i].second > 1;
    }
    double t0 = now_seconds();
    std::vector<float> logits = model_->forward(batch, pool_);
    double dt = now_seconds() - t0;
    (is_prefill ? local.prefill_seconds : local.decode_seconds) += dt;
    (is_prefill ? local.prefill_tokens : local.decode_tokens) += static_cast<int64_t>(batch.tokens.size());
    // Postprocess: append the greedy token, register full blocks, retire finished sequences.
    for (size_t i = 0; i < step.size(); ++i) {
      Sequence& s = seqs[step[i].first];
      s.num_computed_tokens += step[i].second;
      int token = argmax(&logits[i * mc.vocab_size], mc.vocab_size);
      s.token_ids.push_back(token);
      blocks_->commit(s);
      bool eos = !cfg.ignore_eos && std::find(mc.eos_token_ids.begin(), mc.eos_token_ids.end(), token) != mc.eos_token_ids.end();
      if (eos || s.num_generated() >= s.max_new_tokens) {
        s.finished = true;
        blocks_->free(s);
        running.erase(std::find(running.begin(), running.end(), step[i].first));
      }
    }
  }
  if (stats != nullptr) *stats = local;
  std::vector<std::vector<int>> out;
  for (const Sequence& s : seqs) out.emplace_back(s.token_ids.begin() + s.num_prompt_tokens, s.token_ids.end());
  return out;
}

}  // namespace optforge_rt
