// The Gemma-3 text model (model_type "gemma3_text") parts of config.json, as HF transformers reads them
// (models/gemma3/configuration_gemma3.py, modeling_gemma3.py): per-layer sliding / full attention, the rotary
// base (and linear scaling) of each layer type, query_pre_attn_scalar, the embedding scale and the final logit
// cap. What the C++ forward does not compute (attention logit softcapping, bidirectional attention, biases,
// another activation, other rope types) is refused with the key and what to do.
#include <cmath>
#include <string>

#include "config_read.h"
#include "optforge_rt/artifact.h"

namespace optforge_rt {

namespace {

const char* const kSliding = "sliding_attention";
const char* const kFull = "full_attention";

[[noreturn]] void refuse(const std::string& where, const std::string& what) {
  throw ArtifactError(where + ": " + what + " is not supported by the C++ runtime for gemma3_text; run this model with the torch "
                      "backend (optforge generate ARTIFACT --backend torch)");
}

// layer_types, or HF's derivation from the sliding window pattern (every pattern-th layer full) when absent.
std::vector<std::string> layer_types(const Json& cfg, const std::string& where, int num_layers) {
  std::vector<std::string> out;
  const Json* types = cfg.find("layer_types");
  if (types == nullptr || types->is_null()) {
    const Json* p = cfg.find("_sliding_window_pattern");
    const char* key = p != nullptr && !p->is_null() ? "_sliding_window_pattern" : "sliding_window_pattern";
    const int pattern = config_int(cfg, key, 1, kMaxLayers, where, 6);
    for (int i = 0; i < num_layers; ++i) out.push_back((i + 1) % pattern != 0 ? kSliding : kFull);
    return out;
  }
  if (!types->is_array() || types->items().size() != static_cast<size_t>(num_layers)) {
    bad_value(where, "layer_types", types->describe(), "a list of " + std::to_string(num_layers) + " layer types (one per layer)");
  }
  for (size_t i = 0; i < types->items().size(); ++i) {
    const Json& t = types->items()[i];
    if (!t.is_string() || (t.str() != kSliding && t.str() != kFull)) {
      bad_value(where, "layer_types[" + std::to_string(i) + "]", t.describe(), "'sliding_attention' or 'full_attention'");
    }
    out.push_back(t.str());
  }
  return out;
}

struct Rope {
  float theta;
  float factor = 1.0f;
};

// One layer type's rotary parameters: rope_type default or linear (inv_freq / factor, as HF's linear type).
Rope rope_entry(const Json& entry, const std::string& where, const std::string& key, float theta_fallback) {
  if (!entry.is_object()) bad_value(where, key, entry.describe(), "an object with 'rope_theta'");
  Rope r{config_float(entry, "rope_theta", where, theta_fallback)};
  std::string type = "default";
  if (const Json* t = entry.find("rope_type"); t != nullptr && !t->is_null()) {
    if (!t->is_string()) bad_value(where, key + ".rope_type", t->describe(), "a string");
    type = t->str();
  }
  if (type == "linear") {
    r.factor = config_float(entry, "factor", where + " (" + key + ")", 0.0f);
    if (r.factor == 0.0f) bad_value(where, key + ".factor", "missing", "a positive number for rope_type 'linear'");
  } else if (type != "default") {
    refuse(where, key + ".rope_type '" + type + "' (only 'default' and 'linear')");
  }
  if (const Json* prf = entry.find("partial_rotary_factor"); prf != nullptr && !prf->is_null() && !(prf->is_number() && prf->number() == 1.0)) {
    refuse(where, key + ".partial_rotary_factor " + prf->describe());
  }
  return r;
}

// HF 5.x: rope_parameters = {"sliding_attention": {...}, "full_attention": {...}}. Older configs: rope_theta and
// rope_scaling for the full layers, rope_local_base_freq for the sliding ones.
void parse_rope_per_type(const Json& cfg, const std::string& where, Rope& sliding, Rope& full) {
  const Json* params = cfg.find("rope_parameters");
  if (params != nullptr && params->is_object() && (params->find(kSliding) != nullptr || params->find(kFull) != nullptr)) {
    for (const char* type : {kSliding, kFull}) {
      const Json* entry = params->find(type);
      if (entry == nullptr || entry->is_null()) refuse(where, std::string("rope_parameters without a '") + type + "' entry");
      (type == kSliding ? sliding : full) = rope_entry(*entry, where, std::string("rope_parameters.") + type, 0.0f);
      if ((type == kSliding ? sliding : full).theta == 0.0f) bad_value(where, std::string("rope_parameters.") + type + ".rope_theta", "missing", "a positive number");
    }
    return;
  }
  full.theta = config_float(cfg, "rope_theta", where, 1000000.0f);
  const Json* scaling = params != nullptr && !params->is_null() ? params : cfg.find("rope_scaling");
  if (scaling != nullptr && !scaling->is_null()) full = rope_entry(*scaling, where, params != nullptr ? "rope_parameters" : "rope_scaling", full.theta);
  sliding = Rope{config_float(cfg, "rope_local_base_freq", where, 10000.0f)};
}

}  // namespace

void parse_gemma3_config(const Json& cfg, const std::string& where, ModelConfig& c) {
  if (const Json* cap = cfg.find("attn_logit_softcapping"); cap != nullptr && !cap->is_null()) refuse(where, "'attn_logit_softcapping' " + cap->describe());
  if (config_bool(cfg, "use_bidirectional_attention", where, false)) refuse(where, "'use_bidirectional_attention' true");
  if (config_bool(cfg, "attention_bias", where, false)) refuse(where, "'attention_bias' true");
  if (const Json* act = cfg.find("hidden_activation"); act != nullptr && !act->is_null() && !(act->is_string() && act->str() == "gelu_pytorch_tanh")) {
    refuse(where, "'hidden_activation' " + act->describe() + " (only 'gelu_pytorch_tanh')");
  }
  c.gemma_norms = true;
  c.gelu_tanh = true;
  // HF: hidden_size ** 0.5 in double, held as a float32 tensor (then cast to the weights' dtype: float32 here).
  c.embed_scale = static_cast<float>(std::sqrt(static_cast<double>(c.hidden_size)));
  c.attn_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(config_float(cfg, "query_pre_attn_scalar", where, 256.0f))));
  c.final_logit_softcap = config_float(cfg, "final_logit_softcapping", where, 0.0f);
  const std::vector<std::string> types = layer_types(cfg, where, c.num_layers);
  bool any_sliding = false;
  for (const auto& t : types) any_sliding = any_sliding || t == kSliding;
  const int window = any_sliding ? config_int(cfg, "sliding_window", 1, int64_t(1) << 30, where) : 0;
  Rope sliding{10000.0f}, full{1000000.0f};
  parse_rope_per_type(cfg, where, sliding, full);
  c.rope_theta = full.theta;
  for (const auto& t : types) {
    const Rope& r = t == kSliding ? sliding : full;
    c.layer_windows.push_back(t == kSliding ? window : 0);
    c.layer_rope_theta.push_back(r.theta);
    c.layer_rope_factor.push_back(r.factor);
  }
}

}  // namespace optforge_rt
