#include "optforge_rt/artifact.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "optforge_rt/errors.h"
#include "optforge_rt/safetensors.h"
#include "optforge_rt/sha256.h"

namespace fs = std::filesystem;

namespace optforge_rt {

const std::vector<std::string>& architecture_table() {
  static const std::vector<std::string> kTable = {"llama"};
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
int get_int(const Json& cfg, const char* key, const std::string& where) {
  const Json* v = cfg.find(key);
  if (v == nullptr) throw ArtifactError(where + ": config.json has no '" + key + "'");
  return static_cast<int>(v->integer(key));
}

std::vector<int> int_list(const Json* v) {
  std::vector<int> out;
  if (v == nullptr || v->is_null()) return out;
  if (v->is_array()) {
    for (const Json& x : v->items()) out.push_back(static_cast<int>(x.integer("eos_token_id")));
  } else {
    out.push_back(static_cast<int>(v->integer("eos_token_id")));
  }
  return out;
}
}  // namespace

ModelConfig parse_model_config(const Json& cfg, const std::string& where) {
  ModelConfig c;
  const Json* mt = cfg.find("model_type");
  c.model_type = mt != nullptr && mt->is_string() ? mt->str() : "";
  const auto& table = architecture_table();
  if (std::find(table.begin(), table.end(), c.model_type) == table.end()) {
    throw ArtifactError(where + ": model_type '" + c.model_type + "' is not supported by the C++ runtime (supported: llama)");
  }
  c.vocab_size = get_int(cfg, "vocab_size", where);
  c.hidden_size = get_int(cfg, "hidden_size", where);
  c.intermediate_size = get_int(cfg, "intermediate_size", where);
  c.num_layers = get_int(cfg, "num_hidden_layers", where);
  c.num_heads = get_int(cfg, "num_attention_heads", where);
  const Json* kv = cfg.find("num_key_value_heads");
  c.num_kv_heads = kv != nullptr && !kv->is_null() ? static_cast<int>(kv->integer()) : c.num_heads;
  const Json* hd = cfg.find("head_dim");
  c.head_dim = hd != nullptr && !hd->is_null() ? static_cast<int>(hd->integer()) : c.hidden_size / std::max(1, c.num_heads);
  if (const Json* eps = cfg.find("rms_norm_eps")) c.rms_norm_eps = static_cast<float>(eps->number("rms_norm_eps"));
  const Json* rope = cfg.find("rope_parameters");
  if (rope == nullptr) rope = cfg.find("rope_scaling");
  if (rope != nullptr && rope->is_object()) {
    if (const Json* type = rope->find("rope_type"); type != nullptr && type->str() != "default") {
      throw ArtifactError(where + ": rope_type '" + type->str() + "' is not supported yet (only 'default')");
    }
    if (const Json* theta = rope->find("rope_theta")) c.rope_theta = static_cast<float>(theta->number());
  }
  if (const Json* theta = cfg.find("rope_theta")) c.rope_theta = static_cast<float>(theta->number());
  if (const Json* tie = cfg.find("tie_word_embeddings")) c.tie_word_embeddings = tie->boolean("tie_word_embeddings");
  c.eos_token_ids = int_list(cfg.find("eos_token_id"));
  if (const Json* bos = cfg.find("bos_token_id"); bos != nullptr && bos->is_number()) c.bos_token_id = static_cast<int>(bos->integer());
  bool bad = c.vocab_size <= 0 || c.hidden_size <= 0 || c.num_layers <= 0 || c.num_heads <= 0 || c.num_kv_heads <= 0 ||
             c.head_dim <= 0 || c.head_dim % 2 != 0 || c.num_heads % c.num_kv_heads != 0 || c.intermediate_size <= 0;
  if (bad) throw ArtifactError(where + ": config.json has inconsistent sizes (heads, head_dim or hidden size)");
  return c;
}

void verify_manifest(const std::string& dir) {
  std::string path = dir + "/manifest.json";
  Json manifest;
  try {
    manifest = Json::parse(read_text_file(path));
  } catch (const FormatError& e) {
    throw ArtifactError(path + ": not valid JSON (" + e.what() + ")");
  }
  const Json* files = manifest.find("files");
  if (files == nullptr) throw ArtifactError(path + ": no 'files' table; rebuild the artifact");
  std::set<std::string> listed;
  for (const Json& row : files->items("manifest files")) {
    const std::string& rel = row.at("path").str("path");
    if (rel.find("..") != std::string::npos || (!rel.empty() && rel[0] == '/')) throw ArtifactError(path + ": bad path '" + rel + "'");
    listed.insert(rel);
    std::string file = dir + "/" + rel;
    if (!fs::is_regular_file(file)) throw ArtifactError(dir + ": file '" + rel + "' listed in the manifest is missing; rebuild the artifact");
    uint64_t size = fs::file_size(file);
    int64_t expected = row.at("bytes").integer("bytes");
    if (static_cast<int64_t>(size) != expected) {
      throw ArtifactError(dir + ": '" + rel + "' has " + std::to_string(size) + " bytes, the manifest says " + std::to_string(expected) +
                          ": the file was changed or truncated; rebuild the artifact");
    }
    MappedFile mapped(file);
    if (sha256_hex(mapped.data(), mapped.size()) != row.at("sha256").str("sha256")) {
      throw ArtifactError(dir + ": '" + rel + "' does not match its sha256 in the manifest: the file was modified after the build; rebuild the artifact");
    }
  }
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (!entry.is_regular_file()) continue;
    std::string rel = fs::relative(entry.path(), dir).generic_string();
    if (rel != "manifest.json" && listed.count(rel) == 0) throw ArtifactError(dir + ": file not in the manifest: " + rel);
  }
}

Artifact open_artifact(const std::string& dir, bool verify, bool require_manifest) {
  if (!fs::is_directory(dir)) throw ArtifactError(dir + ": no such artifact directory");
  bool has_manifest = fs::is_regular_file(dir + "/manifest.json");
  if (require_manifest && !has_manifest) {
    throw ArtifactError(dir + ": not an optforge artifact (no manifest.json); build one with `optforge build RECIPE`");
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
