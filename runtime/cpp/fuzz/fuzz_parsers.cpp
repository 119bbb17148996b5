// Fuzz target for the parsers that read untrusted files: JSON, safetensors headers, tokenizer.json, the
// model config and tokenizer input text. `LLVMFuzzerTestOneInput` is libFuzzer-compatible (build with
// clang -fsanitize=fuzzer,address and -DOPTFORGE_RT_LIBFUZZER); without clang, main() below runs every seed of
// `seeds()` as is and then drives it with a seeded random mutator for --seconds N. Expected errors (FormatError,
// ArtifactError) are fine; anything else (a crash, a sanitizer report, another exception) is a bug.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../tests/tiny_tokenizer.h"
#include "optforge_rt/artifact.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/json.h"
#include "optforge_rt/safetensors.h"
#include "optforge_rt/tokenizer.h"

using namespace optforge_rt;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  static const Tokenizer tiny = Tokenizer::from_json(kTinyTokenizerJson, "tiny");
  std::string body(reinterpret_cast<const char*>(data) + 1, size - 1);
  try {
    switch (data[0] % 5) {
      case 0: Json::parse(body); break;
      case 1: SafeTensors(data + 1, size - 1, "fuzz"); break;
      case 2: Tokenizer::from_json(body, "fuzz").encode("ab abc!"); break;
      case 3: tiny.decode(tiny.encode(body)); break;
      case 4: parse_model_config(Json::parse(body), "fuzz"); break;
    }
  } catch (const FormatError&) {
  } catch (const ArtifactError&) {
  }
  return 0;
}

#ifndef OPTFORGE_RT_LIBFUZZER
namespace {
std::string safetensors_image(std::string header, const std::string& data) {
  header.resize((header.size() + 7) / 8 * 8, ' ');
  uint64_t n = header.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + header + data;
}

// A tiny Llama config.json with `key` set to the raw JSON `value` ("" drops the key).
std::string config_with(const std::string& key = "", const std::string& value = "") {
  const std::pair<const char*, const char*> base[] = {
      {"model_type", "\"llama\""}, {"vocab_size", "10"}, {"hidden_size", "8"}, {"intermediate_size", "16"}, {"num_hidden_layers", "1"},
      {"num_attention_heads", "2"}, {"num_key_value_heads", "1"}, {"head_dim", "4"},
      {"rope_parameters", R"({"rope_theta": 1e4, "rope_type": "default"})"}, {"eos_token_id", "[1, 2]"}, {"bos_token_id", "0"}};
  std::string out = "{";
  for (const auto& [k, v] : base) {
    const std::string text = k == key ? value : v;
    if (!text.empty()) out += (out.size() > 1 ? ", \"" : "\"") + std::string(k) + "\": " + text;
  }
  return out + "}";
}

// Crafted inputs for the size checks: config sizes past int or past their bounds (alone or as products), and
// safetensors shapes whose element count wraps 64 bits, bad offsets, a header longer than the file.
std::vector<std::string> crafted_seeds() {
  std::vector<std::string> out;
  const std::pair<const char*, const char*> configs[] = {
      {"hidden_size", "4294967360"}, {"hidden_size", "-64"}, {"hidden_size", "0"}, {"num_hidden_layers", "2147483648"},
      {"vocab_size", "16777217"}, {"vocab_size", "1e300"}, {"num_attention_heads", "4294967298"}, {"intermediate_size", "4294967312"},
      {"head_dim", "1073741840"}, {"head_dim", "1048576"}, {"head_dim", "15"}, {"num_key_value_heads", "3"}, {"head_dim", ""},
      {"eos_token_id", "[1, -2]"}, {"bos_token_id", "4294967296"}};
  for (const auto& [key, value] : configs) out.push_back("\x04" + config_with(key, value));
  const std::string data(32, '\0');
  const std::pair<const char*, const char*> tensors[] = {
      {"[4294967296, 4294967296]", "[0, 0]"}, {"[1099511627776, 16777216, 16]", "[0, 0]"}, {"[4611686018427387904, 8]", "[0, 0]"},
      {"[2, -3]", "[0, 24]"}, {"[1e300]", "[0, 4]"}, {"[2, 3]", "[-8, 16]"}, {"[2, 3]", "[0, 18446744073709551616]"}, {"[1]", "[24, 20]"}};
  for (const auto& [shape, offsets] : tensors) {
    out.push_back("\x01" + safetensors_image(std::string(R"({"w": {"dtype": "F32", "shape": )") + shape + R"(, "data_offsets": )" + offsets + "}}", data));
  }
  out.push_back("\x01" + std::string(8, '\xff') + "{}");
  return out;
}

std::vector<std::string> seeds() {
  float w[4] = {1, 2, 3, 4};
  std::string st = safetensors_image(R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})", std::string(reinterpret_cast<const char*>(w), 16));
  std::vector<std::string> out = {"\x00" + config_with(), "\x01" + st, "\x02" + std::string(kTinyTokenizerJson),
                                  "\x03 hello  world's 123 \xC3\xA9\xF0\x9F\x98\x80<|x|>ab", "\x04" + config_with()};
  for (std::string& s : crafted_seeds()) out.push_back(std::move(s));
  return out;
}

std::string mutate(std::string s, std::mt19937_64& rng) {
  int edits = 1 + rng() % 8;
  for (int e = 0; e < edits; ++e) {
    size_t pos = s.size() > 1 ? 1 + rng() % (s.size() - 1) : 1;
    switch (rng() % 6) {
      case 0: if (pos < s.size()) s[pos] = static_cast<char>(rng()); break;                      // byte flip
      case 1: s.insert(std::min(pos, s.size()), 1, static_cast<char>(rng())); break;              // insert
      case 2: if (pos < s.size()) s.erase(pos, 1 + rng() % 8); break;                             // delete
      case 3: s.resize(std::max<size_t>(1, std::min(s.size(), pos))); break;                      // truncate
      case 4: { const char* tokens[] = {"{", "}", "[", "]", "\"", ",", ":", "\\u", "-1", "1e999", "null", "0", "4294967296",  // JSON syntax
                                        "-2147483648", "1099511627776", "18446744073709551616", "9007199254740993"};       // and sizes
                s.insert(std::min(pos, s.size()), tokens[rng() % 17]); break; }
      case 5: if (pos + 8 <= s.size()) { uint64_t v = rng() % 3 ? rng() % 4096 : rng(); std::memcpy(&s[pos], &v, 8); } break;  // numbers
    }
  }
  return s;
}
}  // namespace

int main(int argc, char** argv) {
  double seconds = 10;
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--seconds") seconds = std::stod(argv[i + 1]);
  }
  std::mt19937_64 rng(12345);
  std::vector<std::string> corpus = seeds();
  auto start = std::chrono::steady_clock::now();
  uint64_t runs = 0;
  for (const std::string& seed : corpus) {  // every seed as is, then mutants
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(seed.data()), seed.size());
    ++runs;
  }
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    std::string input = mutate(corpus[rng() % corpus.size()], rng);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
    if (++runs % 64 == 0 && corpus.size() < 256) corpus.push_back(input);  // keep some mutants as new seeds
  }
  std::printf("fuzz_parsers: %llu inputs (%zu seeds) in %.0f s, no crash\n", static_cast<unsigned long long>(runs), seeds().size(), seconds);
  return 0;
}
#endif
