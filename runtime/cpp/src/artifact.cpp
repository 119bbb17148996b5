#include "optforge_rt/artifact.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>
#include <sstream>

#include "optforge_rt/checked.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/safetensors.h"
#include "optforge_rt/sha256.h"
#include "config_read.h"

namespace fs = std::filesystem;

namespace optforge_rt {

const std::vector<std::string>& architecture_table() {
  static const std::vector<std::string> kTable = {"llama", "gemma3_text", "qwen3", "qwen3_moe", "mixtral"};
  return kTable;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ArtifactError(path + ": missing or unreadable");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {
// eos_token_id: one token id or a list of them (absent or null: none).
std::vector<int> token_ids(const Json& cfg, const std::string& key, const std::string& where) {
  std::vector<int> out;
  const Json* v = cfg.find(key);
  if (v == nullptr || v->is_null()) return out;
  auto take = [&](const Json& x, const std::string& name) {
    if (!x.is_integer_in(0, kMaxVocabSize - 1)) bad_value(where, name, x.describe(), "a token id, " + range_text(0, kMaxVocabSize - 1));
    out.push_back(static_cast<int>(x.number()));
  };
  if (!v->is_array()) {
    take(*v, key);
    return out;
  }
  for (size_t i = 0; i < v->items().size(); ++i) take(v->items()[i], key + "[" + std::to_string(i) + "]");
  return out;
}

// head_dim from the config, or hidden_size / num_attention_heads when it gives none; even, and heads x head_dim bounded.
int parse_head_dim(const Json& cfg, const ModelConfig& c, const std::string& where) {
  const Json* hd = cfg.find("head_dim");
  const bool derived = hd == nullptr || hd->is_null();
  if (derived && c.hidden_size % c.num_heads != 0) {
    throw ArtifactError(where + ": 'hidden_size' (" + std::to_string(c.hidden_size) + ") is not a multiple of 'num_attention_heads' (" +
                        std::to_string(c.num_heads) + ") and there is no 'head_dim'");
  }
  const int head_dim = config_int(cfg, "head_dim", 1, kMaxModelDim, where, c.hidden_size / c.num_heads);
  if (head_dim % 2 != 0) {
    bad_value(where, "head_dim", std::to_string(head_dim) + (derived ? " (hidden_size / num_attention_heads)" : ""),
              "an even number (rotary embeddings rotate pairs)");
  }
  uint64_t q_dim = 0;
  if (!checked_product({uint64_t(c.num_heads), uint64_t(head_dim)}, &q_dim) || q_dim > uint64_t(kMaxModelDim)) {
    throw ArtifactError(where + ": 'num_attention_heads' x 'head_dim' is " + std::to_string(c.num_heads) + " x " + std::to_string(head_dim) +
                        ", expected at most " + std::to_string(kMaxModelDim) + " in all");
  }
  return head_dim;
}

void parse_sizes(const Json& cfg, const std::string& where, ModelConfig& c) {
  c.vocab_size = config_int(cfg, "vocab_size", 1, kMaxVocabSize, where);
  c.hidden_size = config_int(cfg, "hidden_size", 1, kMaxModelDim, where);
  c.intermediate_size = config_int(cfg, "intermediate_size", 1, kMaxModelDim, where);
  c.num_layers = config_int(cfg, "num_hidden_layers", 1, kMaxLayers, where);
  c.num_heads = config_int(cfg, "num_attention_heads", 1, kMaxHeads, where);
  c.num_kv_heads = config_int(cfg, "num_key_value_heads", 1, kMaxHeads, where, c.num_heads);
  if (c.num_heads % c.num_kv_heads != 0) {
    throw ArtifactError(where + ": 'num_attention_heads' (" + std::to_string(c.num_heads) + ") is not a multiple of 'num_key_value_heads' (" +
                        std::to_string(c.num_kv_heads) + ")");
  }
  c.head_dim = parse_head_dim(cfg, c, where);
}

void parse_rope(const Json& cfg, const std::string& where, ModelConfig& c) {
  const Json* rope = cfg.find("rope_parameters");
  if (rope == nullptr) rope = cfg.find("rope_scaling");
  if (rope != nullptr && rope->is_object()) {
    if (const Json* type = rope->find("rope_type"); type != nullptr && !(type->is_string() && type->str() == "default")) {
      const std::string found = type->is_string() ? "'" + type->str() + "'" : type->describe();
      throw ArtifactError(where + ": rope_type " + found + " is not supported yet (only 'default')");
    }
    c.rope_theta = config_float(*rope, "rope_theta", where, c.rope_theta);
  }
  c.rope_theta = config_float(cfg, "rope_theta", where, c.rope_theta);
}
}  // namespace

ModelConfig parse_model_config(const Json& cfg, const std::string& where) {
  ModelConfig c;
  const Json* mt = cfg.find("model_type");
  c.model_type = mt != nullptr && mt->is_string() ? mt->str() : "";
  const auto& table = architecture_table();
  if (std::find(table.begin(), table.end(), c.model_type) == table.end()) {
    throw ArtifactError(where + ": model_type '" + c.model_type + "' is not supported by the C++ runtime (supported: llama, gemma3_text, qwen3, qwen3_moe, mixtral)");
  }
  parse_sizes(cfg, where, c);
  if (c.model_type == "gemma3_text") {
    c.rms_norm_eps = 1e-6f;  // Gemma3TextConfig's defaults
    c.tie_word_embeddings = true;
    parse_gemma3_config(cfg, where, c);
  } else {
    parse_rope(cfg, where, c);
    c.attn_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    c.layer_windows.assign(c.num_layers, 0);
    c.layer_rope_theta.assign(c.num_layers, c.rope_theta);
    c.layer_rope_factor.assign(c.num_layers, 1.0f);
    if (c.model_type != "llama") parse_moe_config(cfg, where, c);
  }
  if (c.sparse_layers.empty()) c.sparse_layers.assign(c.num_layers, 0);
  c.rms_norm_eps = config_float(cfg, "rms_norm_eps", where, c.rms_norm_eps);
  c.tie_word_embeddings = config_bool(cfg, "tie_word_embeddings", where, c.tie_word_embeddings);
  c.eos_token_ids = token_ids(cfg, "eos_token_id", where);
  c.bos_token_id = config_int(cfg, "bos_token_id", 0, kMaxVocabSize - 1, where, -1);
  return c;
}

namespace {
ArtifactError symlink_error(const std::string& dir, const std::string& rel) {
  return ArtifactError(dir + ": '" + rel + "' is a symbolic link; artifacts hold plain files only (rebuild the artifact)");
}

// The file a manifest row names, refusing any path that could leave the artifact: absolute, with an empty, `.` or
// `..` component or a backslash, or passing through a symbolic link.
std::string listed_file(const std::string& dir, const std::string& rel) {
  auto outside = [&] {
    return ArtifactError(dir + ": the manifest lists '" + rel + "', a path outside the artifact; refusing to read it (rebuild the artifact)");
  };
  if (rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos) throw outside();
  std::string prefix;
  for (size_t start = 0; start <= rel.size();) {
    const size_t slash = std::min(rel.find('/', start), rel.size());
    const std::string part = rel.substr(start, slash - start);
    if (part.empty() || part == "." || part == "..") throw outside();
    prefix += (prefix.empty() ? "" : "/") + part;
    if (fs::is_symlink(fs::symlink_status(dir + "/" + prefix))) throw symlink_error(dir, prefix);
    start = slash + 1;
  }
  return dir + "/" + rel;
}

void check_listed_file(const std::string& dir, const Json& row) {
  const std::string& rel = row.at("path").str("path");
  const std::string file = listed_file(dir, rel);
  if (!fs::is_regular_file(file)) throw ArtifactError(dir + ": file '" + rel + "' listed in the manifest is missing; rebuild the artifact");
  const uint64_t size = fs::file_size(file);
  const Json& expected = row.at("bytes");
  if (!expected.is_integer_in(0, int64_t(1) << 62) || static_cast<int64_t>(size) != static_cast<int64_t>(expected.number())) {
    throw ArtifactError(dir + ": '" + rel + "' has " + std::to_string(size) + " bytes, the manifest says " + expected.describe() +
                        ": the file was changed or truncated; rebuild the artifact");
  }
  MappedFile mapped(file);
  if (sha256_hex(mapped.data(), mapped.size()) != row.at("sha256").str("sha256")) {
    throw ArtifactError(dir + ": '" + rel + "' does not match its sha256 in the manifest: the file was modified after the build; rebuild the artifact");
  }
}

// Every entry under `dir` is a plain file or directory, and every file is listed (or is the manifest itself).
void check_nothing_unlisted(const std::string& dir, const std::set<std::string>& listed) {
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    const std::string rel = entry.path().lexically_relative(dir).generic_string();
    if (entry.is_symlink()) throw symlink_error(dir, rel);
    if (entry.is_regular_file() && rel != "manifest.json" && listed.count(rel) == 0) throw ArtifactError(dir + ": file not in the manifest: " + rel);
  }
}

bool entry_exists(const std::string& path) { return fs::exists(fs::symlink_status(path)); }
}  // namespace

void verify_manifest(const std::string& dir) {
  const std::string path = dir + "/manifest.json";
  try {
    const Json manifest = Json::parse(read_text_file(path));
    const Json* files = manifest.find("files");
    if (files == nullptr || !files->is_array()) throw ArtifactError(path + ": no 'files' table; rebuild the artifact");
    std::set<std::string> listed;
    for (const Json& row : files->items()) {
      check_listed_file(dir, row);
      listed.insert(row.at("path").str());
    }
    check_nothing_unlisted(dir, listed);
  } catch (const FormatError& e) {
    throw ArtifactError(path + ": not a valid manifest (" + e.what() + "); rebuild the artifact");
  } catch (const fs::filesystem_error& e) {
    throw ArtifactError(dir + ": cannot check the files against manifest.json (" + e.what() + ")");
  }
}

Artifact open_artifact(const std::string& dir, bool verify, bool require_manifest) {
  if (!fs::is_directory(dir)) throw ArtifactError(dir + ": no such artifact directory");
  const bool has_manifest = entry_exists(dir + "/manifest.json");
  if (require_manifest && !has_manifest) {
    throw ArtifactError(dir + ": not an optforge artifact (no manifest.json); build one with `optforge build RECIPE`");
  }
  if (verify && !has_manifest && entry_exists(dir + "/optforge.json")) {
    throw ArtifactError(dir + ": manifest.json is missing, so its files cannot be verified; rebuild the artifact, "
                        "or pass --no-verify to load it unverified");
  }
  Artifact a;
  a.dir = dir;
  if (verify && has_manifest) {
    verify_manifest(dir);
    a.verified = true;
  }
  std::string cfg_path = dir + "/config.json";
  try {
    a.config = parse_model_config(Json::parse(read_text_file(cfg_path)), cfg_path);
    std::string layout_path = dir + "/optforge.json";
    a.layout = fs::is_regular_file(layout_path) ? Json::parse(read_text_file(layout_path)) : Json::parse("{}");
  } catch (const FormatError& e) {
    throw ArtifactError(dir + ": " + e.what());
  }
  return a;
}

}  // namespace optforge_rt
