// Gemma-3 (gemma3_text) in the C++ runtime: config.json parsing (per-layer windows and rotary bases, HF 5.x and
// older rope keys, the refusals) and the vector ops that differ from Llama (sliding window bounds, gelu tanh,
// x * (1 + w) norms, the logit cap, linear rope scaling), each against a double-precision reference.
#include <cmath>
#include <string>
#include <vector>

#include "check.h"
#include "optforge_rt/artifact.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/layer_ops.h"

using namespace optforge_rt;

namespace {

using Entries = std::vector<std::pair<std::string, std::string>>;  // key, raw JSON value ("" drops the key)

const char* const kRope = R"({"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0}})";

// A tiny Gemma-3 config (4 layers: sliding, sliding, full, sliding; window 8) with some keys replaced or dropped.
ModelConfig parse(const Entries& changes = {}) {
  Entries entries = {{"model_type", "\"gemma3_text\""}, {"vocab_size", "512"}, {"hidden_size", "64"}, {"intermediate_size", "128"},
                     {"num_hidden_layers", "4"}, {"num_attention_heads", "4"}, {"num_key_value_heads", "2"}, {"head_dim", "16"},
                     {"rms_norm_eps", "1e-6"}, {"query_pre_attn_scalar", "16"}, {"sliding_window", "8"},
                     {"hidden_activation", "\"gelu_pytorch_tanh\""},
                     {"layer_types", R"(["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])"},
                     {"final_logit_softcapping", "null"}, {"attn_logit_softcapping", "null"}, {"tie_word_embeddings", "true"},
                     {"rope_parameters", kRope}};
  for (const auto& [key, value] : changes) {
    bool found = false;
    for (auto& entry : entries) {
      if (entry.first == key) {
        entry.second = value;
        found = true;
      }
    }
    if (!found) entries.emplace_back(key, value);
  }
  std::string text = "{";
  for (const auto& [key, value] : entries) {
    if (!value.empty()) text += (text.size() > 1 ? ", \"" : "\"") + key + "\": " + value;
  }
  return parse_model_config(Json::parse(text + "}"), "dir/config.json");
}

void check_config() {
  ModelConfig c = parse();
  CHECK(c.gemma_norms && c.gelu_tanh && c.tie_word_embeddings && c.final_logit_softcap == 0.0f);
  CHECK((c.layer_windows == std::vector<int>{8, 8, 0, 8}));
  CHECK((c.layer_rope_theta == std::vector<float>{100.0f, 100.0f, 10000.0f, 100.0f}));
  CHECK((c.layer_rope_factor == std::vector<float>{1.0f, 1.0f, 8.0f, 1.0f}));
  CHECK(c.attn_scale == 0.25f);                                  // 16 ** -0.5
  CHECK(c.embed_scale == static_cast<float>(std::sqrt(64.0)));  // 8, exactly
  CHECK(parse({{"hidden_size", "640"}}).embed_scale == static_cast<float>(std::sqrt(640.0)));
  CHECK(parse({{"final_logit_softcapping", "30.0"}}).final_logit_softcap == 30.0f);
  // Older keys: rope_theta for full layers, rope_local_base_freq for sliding ones; no layer_types: every 6th is full.
  ModelConfig legacy = parse({{"rope_parameters", ""}, {"rope_theta", "1000000.0"}, {"rope_local_base_freq", "10000.0"}, {"layer_types", ""}, {"num_hidden_layers", "7"}});
  CHECK((legacy.layer_windows == std::vector<int>{8, 8, 8, 8, 8, 0, 8}));
  CHECK(legacy.layer_rope_theta[5] == 1e6f && legacy.layer_rope_theta[0] == 1e4f && legacy.layer_rope_factor[5] == 1.0f);
  // Llama keeps one base, no window, head_dim ** -0.5.
  ModelConfig llama = parse_model_config(Json::parse(R"({"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
    "num_hidden_layers": 2, "num_attention_heads": 2, "rope_theta": 500.0})"), "x");
  CHECK(!llama.gemma_norms && !llama.gelu_tanh && llama.embed_scale == 1.0f && llama.attn_scale == 0.5f);
  CHECK((llama.layer_windows == std::vector<int>{0, 0}) && (llama.layer_rope_theta == std::vector<float>{500.0f, 500.0f}));

  CHECK_THROWS_WITH(ArtifactError, parse({{"attn_logit_softcapping", "50.0"}}), "dir/config.json", "'attn_logit_softcapping' 50", "torch");
  CHECK_THROWS_WITH(ArtifactError, parse({{"use_bidirectional_attention", "true"}}), "'use_bidirectional_attention' true", "not supported");
  CHECK_THROWS_WITH(ArtifactError, parse({{"attention_bias", "true"}}), "'attention_bias' true");
  CHECK_THROWS_WITH(ArtifactError, parse({{"hidden_activation", "\"gelu\""}}), "'hidden_activation' \"gelu\"", "gelu_pytorch_tanh");
  CHECK_THROWS_WITH(ArtifactError, parse({{"layer_types", R"(["sliding_attention", "chunked_attention", "full_attention", "full_attention"])"}}),
                    "'layer_types[1]' is \"chunked_attention\"");
  CHECK_THROWS_WITH(ArtifactError, parse({{"layer_types", R"(["full_attention"])"}}), "'layer_types'", "a list of 4 layer types");
  CHECK_THROWS_WITH(ArtifactError, parse({{"sliding_window", "null"}}), "'sliding_window' is missing");
  CHECK_THROWS_WITH(ArtifactError,
                    parse({{"rope_parameters", R"({"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}})"}}),
                    "rope_parameters.full_attention.rope_type 'yarn'", "not supported");
  CHECK_THROWS_WITH(ArtifactError, parse({{"rope_parameters", R"({"sliding_attention": {"rope_theta": 1e4}, "full_attention": {"rope_type": "linear", "rope_theta": 1e6}})"}}),
                    "rope_parameters.full_attention.factor");
  CHECK_THROWS_WITH(ArtifactError, parse({{"rope_parameters", R"({"full_attention": {"rope_theta": 1e6}})"}}), "'sliding_attention' entry");
  CHECK_THROWS_WITH(ArtifactError, parse({{"rope_parameters", R"({"sliding_attention": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}, "full_attention": {"rope_theta": 1e6}})"}}),
                    "partial_rotary_factor 0.5");
  CHECK_THROWS_WITH(ArtifactError, parse_model_config(Json::parse(R"({"model_type": "gemma2"})"), "x"), "model_type 'gemma2'", "gemma3_text");
}

void check_ops() {
  // A query at p sees keys p - window < j <= p.
  CHECK(window_start(0, 8) == 0 && window_start(7, 8) == 0 && window_start(8, 8) == 1 && window_start(20, 8) == 13);
  CHECK(window_start(20, 0) == 0 && window_start(5, 1) == 5);
  for (float x : {-6.0f, -2.5f, -0.3f, 0.0f, 1e-3f, 0.7f, 3.0f, 9.0f}) {
    const double d = x, ref = 0.5 * d * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (d + 0.044715 * d * d * d)));
    CHECK(std::fabs(gelu_tanh(x) - ref) <= 1e-6 * std::max(1.0, std::fabs(ref)));
  }
  std::vector<float> gate = {1.5f, -2.0f}, up = {2.0f, 3.0f};
  gelu_tanh_mul(gate.data(), up.data(), 2);
  CHECK(gate[0] == gelu_tanh(1.5f) * 2.0f && gate[1] == gelu_tanh(-2.0f) * 3.0f);
  // Gemma's x * (1 + w): weights folded to 1 + w, then the Llama norm.
  const std::vector<float> x = {1.0f, -2.0f, 3.0f, 0.5f}, w = {0.0f, -0.5f, 0.25f, -1.0f};
  std::vector<float> folded = plus_one(w.data(), 4), out(4);
  CHECK((folded == std::vector<float>{1.0f, 0.5f, 1.25f, 0.0f}));
  rms_norm(x.data(), folded.data(), 4, 1e-6f, out.data());
  const double rms = std::sqrt((1.0 + 4.0 + 9.0 + 0.25) / 4.0 + 1e-6);
  for (int i = 0; i < 4; ++i) CHECK(std::fabs(out[i] - x[i] / rms * (1.0 + w[i])) < 1e-6);
  std::vector<float> logits = {0.0f, 15.0f, -300.0f};
  softcap(logits.data(), 3, 30.0f);
  CHECK(logits[0] == 0.0f && std::fabs(logits[1] - 30.0 * std::tanh(0.5)) < 1e-5 && std::fabs(logits[2] + 30.0) < 1e-5);
  // Linear scaling divides every inverse frequency by the factor.
  const std::vector<float> base = rope_inv_freq(10000.0f, 16, 1.0f), scaled = rope_inv_freq(10000.0f, 16, 8.0f);
  CHECK(base.size() == 8 && base[0] == 1.0f);
  for (int i = 0; i < 8; ++i) CHECK(scaled[i] == base[i] / 8.0f && std::fabs(base[i] - std::pow(10000.0, -2.0 * i / 16)) < 1e-6 * base[i] + 1e-9);
}

}  // namespace

int main() {
  check_config();
  check_ops();
  return 0;
}
