// Fuzz target for the parsers that read untrusted files: JSON, safetensors headers, tokenizer.json, the
// model config and tokenizer input text. `LLVMFuzzerTestOneInput` is libFuzzer-compatible (build with
// clang -fsanitize=fuzzer,address and -DOPTFORGE_RT_LIBFUZZER); without clang, main() below drives it with
// a seeded random mutator for --seconds N. Expected errors (FormatError, ArtifactError) are fine; anything
// else (a crash, a sanitizer report, another exception) is a bug.
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
std::vector<std::string> seeds() {
  float w[4] = {1, 2, 3, 4};
  std::string header = R"({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})";
  uint64_t n = header.size();
  std::string st(reinterpret_cast<const char*>(&n), 8);
  st += header + std::string(reinterpret_cast<const char*>(w), 16);
  std::string config = R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}, "eos_token_id": [1, 2]})";
  return {"\x00" + config, "\x01" + st, "\x02" + std::string(kTinyTokenizerJson), "\x03 hello  world's 123 \xC3\xA9\xF0\x9F\x98\x80<|x|>ab", "\x04" + config};
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
      case 4: { const char* tokens[] = {"{", "}", "[", "]", "\"", ",", ":", "\\u", "-1", "1e999", "null"};  // JSON syntax
                s.insert(std::min(pos, s.size()), tokens[rng() % 11]); break; }
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
  while (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds) {
    std::string input = mutate(corpus[rng() % corpus.size()], rng);
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(input.data()), input.size());
    if (++runs % 64 == 0 && corpus.size() < 256) corpus.push_back(input);  // keep some mutants as new seeds
  }
  std::printf("fuzz_parsers: %llu inputs in %.0f s, no crash\n", static_cast<unsigned long long>(runs), seconds);
  return 0;
}
#endif
