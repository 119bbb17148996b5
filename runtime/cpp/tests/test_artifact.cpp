// Opening artifacts: config.json range checks, a crafted model folder, manifest rules (fail closed, paths that leave
// the artifact, symbolic links).
#include <stdlib.h>
#include <unistd.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "check.h"
#include "optforge_rt/artifact.h"
#include "optforge_rt/engine.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/sha256.h"

using namespace optforge_rt;
namespace fs = std::filesystem;

namespace {

using Entries = std::vector<std::pair<std::string, std::string>>;  // key, raw JSON value ("" drops the key)

// A tiny Llama config (vocab 16, hidden 8, 1 layer, 2 heads / 1 KV head of 4) with some keys replaced or dropped.
std::string config_json(const Entries& changes = {}) {
  Entries entries = {{"model_type", "\"llama\""}, {"vocab_size", "16"},        {"hidden_size", "8"},
                     {"intermediate_size", "16"}, {"num_hidden_layers", "1"},  {"num_attention_heads", "2"},
                     {"num_key_value_heads", "1"}, {"head_dim", "4"},          {"rms_norm_eps", "1e-5"},
                     {"rope_theta", "10000.0"},    {"tie_word_embeddings", "true"}, {"eos_token_id", "[1, 2]"},
                     {"bos_token_id", "0"}};
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
  std::string out = "{";
  for (const auto& [key, value] : entries) {
    if (!value.empty()) out += (out.size() > 1 ? ", \"" : "\"") + key + "\": " + value;
  }
  return out + "}";
}

ModelConfig parse_config(const Entries& changes) { return parse_model_config(Json::parse(config_json(changes)), "dir/config.json"); }

// Every size out of range, every product that would overflow, every inconsistent pair: ArtifactError naming the key,
// the value found and what is expected.
void check_config_ranges() {
  ModelConfig ok = parse_config({});
  CHECK(ok.hidden_size == 8 && ok.head_dim == 4 && ok.num_kv_heads == 1 && ok.eos_token_ids.size() == 2 && ok.tie_word_embeddings);
  CHECK(parse_config({{"head_dim", ""}, {"num_key_value_heads", ""}}).head_dim == 4);  // hidden / heads, kv heads = heads
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"hidden_size", "4294967360"}}), "dir/config.json", "'hidden_size' is 4294967360",
                    "expected an integer in [1, 1048576]");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"hidden_size", "-64"}}), "'hidden_size' is -64");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"hidden_size", "0"}}), "'hidden_size' is 0");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"hidden_size", ""}}), "'hidden_size' is missing");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_hidden_layers", "2147483648"}}), "'num_hidden_layers' is 2147483648", "[1, 65536]");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"vocab_size", "16777217"}}), "'vocab_size' is 16777217", "[1, 16777216]");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"vocab_size", "1e300"}}), "'vocab_size' is 1e+300");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"vocab_size", "\"16\""}}), "'vocab_size' is \"16\"");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"intermediate_size", "1.5"}}), "'intermediate_size' is 1.5");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"intermediate_size", "4294967312"}}), "'intermediate_size' is 4294967312");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_attention_heads", "0"}}), "'num_attention_heads' is 0");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_attention_heads", "-2"}}), "'num_attention_heads' is -2");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_attention_heads", "65537"}}), "'num_attention_heads' is 65537");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_key_value_heads", "0"}}), "'num_key_value_heads' is 0");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_key_value_heads", "3"}}), "'num_attention_heads' (2) is not a multiple of 'num_key_value_heads' (3)");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"head_dim", "15"}}), "'head_dim' is 15", "even");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"head_dim", "1073741840"}}), "'head_dim' is 1073741840", "[1, 1048576]");
  // 4 x (2^30 + 16) wraps a 32-bit int to 64: the product is checked in 64 bits.
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"num_attention_heads", "4"}, {"num_key_value_heads", "4"}, {"head_dim", "1048576"}}),
                    "'num_attention_heads' x 'head_dim' is 4 x 1048576", "at most 1048576");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"hidden_size", "66"}, {"num_attention_heads", "4"}, {"num_key_value_heads", "2"}, {"head_dim", ""}}),
                    "'hidden_size' (66) is not a multiple of 'num_attention_heads' (4)");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"hidden_size", "6"}, {"head_dim", ""}}), "'head_dim' is 3 (hidden_size / num_attention_heads)");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"eos_token_id", "[1, -2]"}}), "'eos_token_id[1]' is -2");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"eos_token_id", "4294967296"}}), "'eos_token_id' is 4294967296");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"bos_token_id", "9.5"}}), "'bos_token_id' is 9.5");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"rms_norm_eps", "-1"}}), "'rms_norm_eps' is -1", "positive finite");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"rope_theta", "\"big\""}}), "'rope_theta' is \"big\"");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"rope_parameters", "{\"rope_theta\": 1e99, \"rope_type\": \"default\"}"}}), "'rope_theta' is 1e+99");
  CHECK_THROWS_WITH(ArtifactError, parse_config({{"tie_word_embeddings", "1"}}), "'tie_word_embeddings' is 1", "true or false");
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
  CHECK(out.good());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A safetensors file of F32 tensors (small deterministic values, norms of ones).
std::string safetensors_image(const std::vector<std::pair<std::string, std::vector<int>>>& tensors) {
  std::string header = "{", data;
  for (const auto& [name, shape] : tensors) {
    size_t n = 1;
    std::string dims;
    for (int d : shape) {
      n *= d;
      dims += (dims.empty() ? "" : ", ") + std::to_string(d);
    }
    for (size_t i = 0; i < n; ++i) {
      float v = name.find("norm") != std::string::npos ? 1.0f : 0.05f * static_cast<float>(static_cast<int>(i % 7) - 3);
      data.append(reinterpret_cast<const char*>(&v), 4);
    }
    header += (header.size() > 1 ? ", \"" : "\"") + name + "\": {\"dtype\": \"F32\", \"shape\": [" + dims + "], \"data_offsets\": [" +
              std::to_string(data.size() - 4 * n) + ", " + std::to_string(data.size()) + "]}";
  }
  header += "}";
  header.resize((header.size() + 7) / 8 * 8, ' ');
  uint64_t len = header.size();
  return std::string(reinterpret_cast<const char*>(&len), 8) + header + data;
}

std::string tiny_weights() {
  const std::string l = "model.layers.0.";
  return safetensors_image({{"model.embed_tokens.weight", {16, 8}}, {"model.norm.weight", {8}}, {l + "input_layernorm.weight", {8}},
                            {l + "post_attention_layernorm.weight", {8}}, {l + "self_attn.q_proj.weight", {8, 8}},
                            {l + "self_attn.k_proj.weight", {4, 8}}, {l + "self_attn.v_proj.weight", {4, 8}},
                            {l + "self_attn.o_proj.weight", {8, 8}}, {l + "mlp.gate_proj.weight", {16, 8}},
                            {l + "mlp.up_proj.weight", {16, 8}}, {l + "mlp.down_proj.weight", {8, 16}}});
}

// A manifest.json listing `paths` of `dir` with their sizes and sha256 (what `optforge build` writes).
void write_manifest(const std::string& dir, const std::vector<std::string>& paths) {
  std::string rows;
  for (const std::string& rel : paths) {
    std::string bytes = read_file(dir + "/" + rel);
    rows += (rows.empty() ? "" : ", ") + std::string("{\"path\": \"") + rel + "\", \"bytes\": " + std::to_string(bytes.size()) +
            ", \"sha256\": \"" + sha256_hex(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()) + "\"}";
  }
  write_file(dir + "/manifest.json", "{\"schema_version\": 1, \"files\": [" + rows + "]}");
}

// The tiny model loads and generates; a crafted config is refused before any tensor is read; a KV cache whose size
// overflows is refused before it is allocated.
void check_model_folder(const std::string& root) {
  const std::string dir = root + "/model";
  fs::create_directories(dir);
  write_file(dir + "/config.json", config_json());
  write_file(dir + "/model.safetensors", tiny_weights());
  Engine engine(dir, 1, 8, 4, true, false);
  GenerationConfig cfg;
  cfg.max_new_tokens = 3;
  cfg.ignore_eos = true;
  std::vector<std::vector<int>> out = engine.generate({{3, 4, 5}}, cfg);
  CHECK(out.size() == 1 && out[0].size() == 3);
  for (int t : out[0]) CHECK(t >= 0 && t < 16);
  ModelOptions mapped;
  mapped.copy_weights = false;  // weights read from the file mapping: the same tokens
  Engine from_mapping(dir, 1, 8, 4, true, false, mapped);
  CHECK(std::string(from_mapping.model().weight_placement()) == "mmap");
  CHECK(from_mapping.generate({{3, 4, 5}}, cfg) == out);
  Artifact artifact = open_artifact(dir, false);
  CHECK_THROWS_WITH(std::invalid_argument, Model(artifact, INT_MAX, INT_MAX), "KV cache of 2147483647 blocks", "use fewer KV blocks");
  write_file(dir + "/config.json", config_json({{"num_attention_heads", "4"}, {"num_key_value_heads", "4"}, {"head_dim", "1073741840"}}));
  CHECK_THROWS_WITH(ArtifactError, Engine(dir, 1, 8, 4, false, false), "config.json", "'head_dim' is 1073741840");
  write_file(dir + "/config.json", config_json({{"hidden_size", "16"}, {"head_dim", ""}}));
  CHECK_THROWS_WITH(ArtifactError, Engine(dir, 1, 8, 4, false, false), "model.embed_tokens.weight", "expected 256");
}

// An optforge model directory (optforge.json) fails closed without its manifest; a plain folder opens unverified.
void check_missing_manifest(const std::string& root) {
  const std::string dir = root + "/built";
  fs::create_directories(dir);
  write_file(dir + "/config.json", config_json());
  write_file(dir + "/model.safetensors", tiny_weights());
  write_file(dir + "/optforge.json", "{\"properties\": []}");
  write_manifest(dir, {"config.json", "model.safetensors", "optforge.json"});
  CHECK(open_artifact(dir, true).verified);
  fs::remove(dir + "/manifest.json");
  const std::string missing = dir + ": manifest.json is missing, so its files cannot be verified";
  CHECK_THROWS_WITH(ArtifactError, open_artifact(dir, true), missing.c_str(), "rebuild the artifact, or pass --no-verify to load it unverified");
  CHECK_THROWS_WITH(ArtifactError, Engine(dir, 1, 8, 4, true, false), "manifest.json is missing");
  CHECK(!open_artifact(dir, false).verified);  // --no-verify
  fs::create_directory(dir + "/manifest.json");  // not a file: still fails closed
  CHECK_THROWS(ArtifactError, open_artifact(dir, true));
  fs::remove(dir + "/manifest.json");
  fs::remove(dir + "/optforge.json");  // a plain Hugging Face folder: never had a manifest
  CHECK(!open_artifact(dir, true).verified);
  CHECK_THROWS_WITH(ArtifactError, open_artifact(dir, true, true), "no manifest.json");
}

// Manifest rows that leave the artifact, by path or through a symbolic link, are refused; so is an unlisted link.
void check_manifest_paths(const std::string& root) {
  const std::string dir = root + "/paths", outside = root + "/outside";
  fs::create_directories(dir);
  fs::create_directories(outside);
  write_file(dir + "/config.json", config_json());
  write_file(outside + "/secret", "outside the artifact");
  write_file(dir + "/twin", "outside the artifact");
  auto with_rows = [&](const std::string& rel) {
    write_manifest(dir, {"config.json", "twin"});  // valid rows, then one more row naming `rel` with the secret's size and hash
    std::string m = read_file(dir + "/manifest.json");
    std::string row = m.substr(m.rfind("{\"path\": \"twin\""));
    row = row.substr(0, row.find('}') + 1);
    row.replace(row.find("twin"), 4, rel);
    m.insert(m.rfind(']'), ", " + row);
    write_file(dir + "/manifest.json", m);
  };
  write_manifest(dir, {"config.json", "twin"});
  verify_manifest(dir);
  for (const std::string& rel : {outside + "/secret", std::string("../outside/secret"), std::string("twin/../../outside/secret"),
                                 std::string("./twin"), std::string("a//twin"), std::string("")}) {
    with_rows(rel);
    const std::string quoted = "'" + rel + "'";
    CHECK_THROWS_WITH(ArtifactError, verify_manifest(dir), "a path outside the artifact", quoted.c_str());
  }
  fs::create_symlink(outside + "/secret", dir + "/link");
  with_rows("link");
  CHECK_THROWS_WITH(ArtifactError, verify_manifest(dir), "'link' is a symbolic link");
  fs::remove(dir + "/link");
  fs::create_directory_symlink(outside, dir + "/sub");
  with_rows("sub/secret");
  CHECK_THROWS_WITH(ArtifactError, verify_manifest(dir), "'sub' is a symbolic link");
  write_manifest(dir, {"config.json", "twin"});  // the link is not listed, and is still refused
  CHECK_THROWS_WITH(ArtifactError, verify_manifest(dir), "'sub' is a symbolic link");
  fs::remove(dir + "/sub");
  verify_manifest(dir);
  write_file(dir + "/twin", "changed");
  CHECK_THROWS_WITH(ArtifactError, verify_manifest(dir), "'twin' has 7 bytes, the manifest says 20");
}

}  // namespace

int main() {
  check_config_ranges();
  char tmpl[] = "/tmp/optforge_rt_test_XXXXXX";
  CHECK(mkdtemp(tmpl) != nullptr);
  const std::string root = tmpl;
  check_model_folder(root);
  check_missing_manifest(root);
  check_manifest_paths(root);
  fs::remove_all(root);
  return 0;
}
