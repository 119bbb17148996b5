// Opening an optforge artifact directory: manifest verification, the model config and the layout.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "optforge_rt/json.h"

namespace optforge_rt {

// What the forward pass needs from config.json. Architectures join through `architecture_table()`.
struct ModelConfig {
  std::string model_type;  // "llama", "gemma3_text", "qwen3", "qwen3_moe" or "mixtral"
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  bool tie_word_embeddings = false;
  std::vector<int> eos_token_ids;
  int bos_token_id = -1;
  // What differs by architecture (parse_model_config fills every field for every architecture).
  bool gemma_norms = false;          // RMSNorm computes x * (1 + w); q/k norms per head; norms on the attention and MLP outputs
  bool gelu_tanh = false;            // MLP activation: gelu (tanh approximation) instead of silu
  float embed_scale = 1.0f;          // embeddings are multiplied by this (Gemma: sqrt(hidden_size) rounded to fp32)
  float attn_scale = 0.0f;           // attention logits scale: head_dim ** -0.5, Gemma query_pre_attn_scalar ** -0.5
  float final_logit_softcap = 0.0f;  // logits -> cap * tanh(logits / cap) where > 0
  std::vector<int> layer_windows;    // per layer: positions a query sees, its own included (p - w < j <= p); 0: all
  std::vector<float> layer_rope_theta;   // per layer rotary base
  std::vector<float> layer_rope_factor;  // per layer linear rope scaling (inv_freq / factor); 1: none
  bool qk_norm = false;              // Qwen3: RMSNorm per head on q and k before rotary (plain x * w)
  // Mixture of experts (Qwen3-MoE, Mixtral); num_experts 0: every MLP dense.
  int num_experts = 0;
  int experts_per_token = 0;
  int moe_intermediate_size = 0;     // each expert's width
  bool norm_topk_prob = false;       // the top-k routing weights renormalized to sum to 1
  std::vector<char> sparse_layers;   // per layer: its MLP is a sparse block
  std::string moe_block;             // the block's tensor prefix in the files ("mlp", Mixtral "block_sparse_moe")
  std::vector<std::string> expert_linears;  // an expert's gate, up and down Linears as the files name them
};

// Bounds on config.json sizes (inclusive). Every size is checked against them before any allocation or loop uses it,
// so products of sizes fit comfortably in 64 bits and per-row sizes fit in int.
constexpr int64_t kMaxModelDim = int64_t(1) << 20;  // hidden_size, intermediate_size, head_dim, heads x head_dim
constexpr int64_t kMaxVocabSize = int64_t(1) << 24;
constexpr int64_t kMaxLayers = int64_t(1) << 16;
constexpr int64_t kMaxHeads = int64_t(1) << 16;

// Architectures this runtime runs (model_type values): llama, gemma3_text, qwen3, qwen3_moe, mixtral.
const std::vector<std::string>& architecture_table();

ModelConfig parse_model_config(const Json& config, const std::string& where);
// The Gemma-3 parts of `c` (norms, activation, windows, per-type rope, scales); refuses what the runtime cannot run.
void parse_gemma3_config(const Json& config, const std::string& where, ModelConfig& c);
// The Qwen3 / Qwen3-MoE / Mixtral parts of `c` (q/k norms, experts, sparse layers, window).
void parse_moe_config(const Json& config, const std::string& where, ModelConfig& c);

// Reads a whole small file; throws ArtifactError naming it when missing.
std::string read_text_file(const std::string& path);

// Checks every file listed in `dir`/manifest.json (size and sha256) and that no unlisted file exists, like
// optforge.artifact.verify_artifact. Paths that leave the artifact (absolute, `..`, symbolic links) are refused.
// Throws ArtifactError with the file and what to do.
void verify_manifest(const std::string& dir);

struct Artifact {
  std::string dir;
  ModelConfig config;
  Json layout;            // optforge.json ({} when absent)
  bool verified = false;  // every file matched manifest.json
};

// `verify`: check every file against manifest.json. An optforge model directory (it has optforge.json) without a
// manifest fails closed; a plain Hugging Face folder (neither file) never had one and opens unverified
// (`Artifact::verified` says which). `require_manifest`: fail without a manifest even when `verify` is off.
Artifact open_artifact(const std::string& dir, bool verify, bool require_manifest = false);

}  // namespace optforge_rt
