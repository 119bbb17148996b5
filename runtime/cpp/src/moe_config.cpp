// Qwen3 (model_type "qwen3"), Qwen3-MoE ("qwen3_moe") and Mixtral ("mixtral") parts of config.json, as HF
// transformers reads them: Qwen3's per-head q/k RMSNorm; the sparse blocks' expert count, top-k, expert width and
// which layers hold one (Qwen3-MoE: every `decoder_sparse_step`-th layer not in `mlp_only_layers`; Mixtral: all);
// whether the top-k routing weights are renormalized; Mixtral's sliding window. Expert tensors are read under the
// Hub's per-expert names (Qwen3-MoE `mlp.experts.E.gate_proj`, Mixtral `block_sparse_moe.experts.E.w1`).
#include <algorithm>
#include <string>

#include "config_read.h"
#include "optforge_rt/artifact.h"

namespace optforge_rt {

namespace {

[[noreturn]] void refuse(const std::string& where, const std::string& model_type, const std::string& what) {
  throw ArtifactError(where + ": " + what + " is not supported by the C++ runtime for " + model_type + "; run this model with the torch "
                      "backend (optforge generate ARTIFACT --backend torch)");
}

std::vector<int> int_list(const Json& cfg, const std::string& key, int lo, int hi, const std::string& where) {
  std::vector<int> out;
  const Json* v = cfg.find(key);
  if (v == nullptr || v->is_null()) return out;
  if (!v->is_array()) bad_value(where, key, v->describe(), "a list of layer indices");
  for (size_t i = 0; i < v->items().size(); ++i) {
    const Json& x = v->items()[i];
    if (!x.is_integer_in(lo, hi)) bad_value(where, key + "[" + std::to_string(i) + "]", x.describe(), range_text(lo, hi));
    out.push_back(static_cast<int>(x.number()));
  }
  return out;
}

}  // namespace

void parse_moe_config(const Json& cfg, const std::string& where, ModelConfig& c) {
  const std::string& mt = c.model_type;
  if (config_bool(cfg, "attention_bias", where, false)) refuse(where, mt, "attention_bias: true");
  c.sparse_layers.assign(c.num_layers, 0);
  if (mt == "qwen3" || mt == "qwen3_moe") {
    c.qk_norm = true;
    if (config_bool(cfg, "use_sliding_window", where, false)) refuse(where, mt, "use_sliding_window: true");
  }
  if (mt == "qwen3_moe") {
    // Hub configs say num_experts; transformers 5.x writes num_local_experts (its attribute_map).
    c.num_experts = config_int(cfg, "num_local_experts", 0, kMaxHeads, where, config_int(cfg, "num_experts", 0, kMaxHeads, where, 0));
    c.moe_intermediate_size = config_int(cfg, "moe_intermediate_size", 1, kMaxModelDim, where, c.intermediate_size);
    c.norm_topk_prob = config_bool(cfg, "norm_topk_prob", where, false);
    const int step = config_int(cfg, "decoder_sparse_step", 1, kMaxLayers, where, 1);
    const std::vector<int> dense = int_list(cfg, "mlp_only_layers", 0, c.num_layers - 1, where);
    for (int l = 0; l < c.num_layers && c.num_experts > 0; ++l) {
      c.sparse_layers[l] = std::find(dense.begin(), dense.end(), l) == dense.end() && (l + 1) % step == 0;
    }
    c.moe_block = "mlp";
    c.expert_linears = {"gate_proj", "up_proj", "down_proj"};
  } else if (mt == "mixtral") {
    c.num_experts = config_int(cfg, "num_local_experts", 1, kMaxHeads, where, 8);
    c.moe_intermediate_size = c.intermediate_size;
    c.norm_topk_prob = true;
    c.sparse_layers.assign(c.num_layers, 1);
    c.moe_block = "block_sparse_moe";
    c.expert_linears = {"w1", "w3", "w2"};
    const int window = config_int(cfg, "sliding_window", 1, 1 << 30, where, 0);
    c.layer_windows.assign(c.num_layers, window);
  }
  if (c.num_experts > 0) {
    c.experts_per_token = config_int(cfg, "num_experts_per_tok", 1, c.num_experts, where, 2);
    const Json* act = cfg.find("hidden_act");
    if (act != nullptr && !(act->is_string() && act->str() == "silu")) refuse(where, mt, "hidden_act " + act->describe() + " (only silu)");
  }
}

}  // namespace optforge_rt
