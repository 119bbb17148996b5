// Opening an optforge artifact directory: manifest verification, the model config and the layout.
#pragma once

#include <string>
#include <vector>

#include "optforge_rt/json.h"

namespace optforge_rt {

// What the forward pass needs from config.json. Architectures join through `architecture_table()`.
struct ModelConfig {
  std::string model_type;  // "llama"
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
};

// Architectures this runtime runs (model_type values); Gemma-3 joins by adding its norms and rope here.
const std::vector<std::string>& architecture_table();

ModelConfig parse_model_config(const Json& config, const std::string& where);

// Reads a whole small file; throws ArtifactError naming it when missing.
std::string read_text_file(const std::string& path);

// Checks every file listed in `dir`/manifest.json (size and sha256) and that no unlisted file exists, like
// optforge.artifact.verify_artifact. Throws ArtifactError with the file and what to do.
void verify_manifest(const std::string& dir);

struct Artifact {
  std::string dir;
  ModelConfig config;
  Json layout;       // optforge.json ({} when absent)
  bool verified = false;
};

// `verify`: check manifest.json when present; `require_manifest`: fail without one (a built artifact).
Artifact open_artifact(const std::string& dir, bool verify, bool require_manifest = false);

}  // namespace optforge_rt
