// The decoder forward pass (Llama, Gemma-3 text) over a paged KV cache.
//
// One `forward` call runs a flat batch of tokens from any number of sequences (prefill chunks and decode
// tokens mixed, as continuous batching produces them). Token t belongs to sequence seq_of[t] at position
// positions[t]; its K/V go to slot block_table[pos / block_size] * block_size + pos % block_size, and it
// attends to positions 0..pos of its own sequence only (no cross-request leakage by construction), or, in a
// sliding-window layer of window w, to positions pos - w < j <= pos.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "optforge_rt/artifact.h"
#include "optforge_rt/kernels.h"
#include "optforge_rt/kv_cache.h"
#include "optforge_rt/safetensors.h"
#include "optforge_rt/thread_pool.h"

namespace optforge_rt {

struct LayerWeights {
  const float* attn_norm = nullptr;      // input_layernorm
  const float* mlp_norm = nullptr;       // Llama post_attention_layernorm, Gemma pre_feedforward_layernorm
  const float* attn_out_norm = nullptr;  // Gemma post_attention_layernorm: on the attention output, before the residual add
  const float* mlp_out_norm = nullptr;   // Gemma post_feedforward_layernorm: on the MLP output, before the residual add
  const float* q_norm = nullptr;         // Gemma, Qwen3: per head (head_dim), before rotary
  const float* k_norm = nullptr;
  Linear q, k, v, o, gate, up, down;     // gate/up/down: the dense MLP (absent in a sparse layer)
  Linear router;                         // a sparse block's router (num_experts, hidden), float
  std::vector<Linear> experts;           // a sparse block's experts: gate, up, down of expert e at 3e, 3e+1, 3e+2
};

// How a Model is built; the defaults are what every caller wants unless it says otherwise.
struct ModelOptions {
  // Copy the matmul weights at load into one huge-page buffer (decode streams them once per token, and from the
  // file mapping's 4 KiB pages that is a TLB miss every 4 KiB); false: read them from the file mapping. The copy
  // is skipped anyway where it would take more than half of the available memory. Results are the same.
  bool copy_weights = true;
};

struct ForwardBatch {
  std::vector<int> tokens;                    // (T,)
  std::vector<int> positions;                 // (T,)
  std::vector<int> seq_of;                    // (T,) index into block_tables
  std::vector<std::vector<int>> block_tables; // per sequence
  std::vector<int> logits_for;                // token indices whose logits are wanted, in output order
};

class Model {
 public:
  // Loads weights (fp32, pack.cpu engines, or the symmetric int8 / int4 tensors of optforge's quantized
  // artifacts) from the artifact, and sizes the KV cache (float32, or the artifact's `kv_cache` record).
  Model(const Artifact& artifact, int num_kv_blocks, int block_size, const ModelOptions& options = {});

  const ModelConfig& config() const { return config_; }
  int block_size() const { return block_size_; }
  int num_kv_blocks() const { return num_kv_blocks_; }
  std::string weight_format() const;  // "fp32", "int8", "int4" (of the decoder Linears)
  // What the quantized Linears multiply with: "fp32" (weight-only formats, and a model without quantized
  // Linears), "int8" (pack.cpu engines, w8a8_int8), or "mixed".
  std::string activations() const;
  KvDtype kv_cache_dtype() const { return kv_->dtype(); }
  size_t kv_cache_bytes() const { return kv_->bytes(); }
  // "copy": the matmul weights were copied at load into one huge-page buffer (the default); "mmap": they are
  // read from the file mapping (ModelOptions::copy_weights false, or too little free memory for the copy).
  const char* weight_placement() const { return arena_.size() > 0 ? "copy" : "mmap"; }
  size_t weight_bytes() const;

  // Returns logits (len(logits_for), vocab) row-major.
  std::vector<float> forward(const ForwardBatch& batch, ThreadPool& pool);
  // Copies one KV block to another in every layer (copy-on-write of a shared block).
  void copy_block(int src, int dst);

 private:
  Linear load_linear(const std::string& name, int out, int in, const std::string& scheme);
  Linear load_packed_linear(const std::string& name, int out, int in);
  void copy_weights_to_arena();
  void attention(const ForwardBatch& batch, int layer, const float* q, float* out, ThreadPool& pool);
  void attention_dequantized(const ForwardBatch& batch, int layer, const float* q, float* out, ThreadPool& pool);
  void check_batch(const ForwardBatch& batch) const;
  // out (T, hidden) = the layer's sparse block on h (T, hidden): each token's top-k experts, weighted by the router.
  void sparse_mlp(const LayerWeights& lw, const float* h, int T, float* out, ThreadPool& pool);
  // Every Linear of the model (the layers' dense and expert Linears, the routers, the LM head).
  std::vector<const Linear*> all_linears() const;
  std::vector<Linear*> all_linears();

  ModelConfig config_;
  std::unique_ptr<SafeTensors> weights_;
  HugePageArena arena_;                        // load-time copy of every Linear's weights and scales
  std::vector<std::vector<float>> converted_;  // owned float copies of non-F32 norms/embeddings
  const float* embed_ = nullptr;               // (vocab, hidden)
  const float* final_norm_ = nullptr;
  Linear lm_head_;
  std::vector<LayerWeights> layers_;
  int block_size_;
  int num_kv_blocks_;
  int pack_version_ = 0;  // pack.cpu engine format (0: not a packed engine)
  std::unique_ptr<KvCache> kv_;  // per layer (num_blocks, block_size, kv_heads, head_dim)
  std::vector<std::vector<float>> inv_freq_;  // per layer (its layer type's rotary base)
};

}  // namespace optforge_rt
