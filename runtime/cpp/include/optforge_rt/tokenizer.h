// A byte-level BPE tokenizer read from Hugging Face's tokenizer.json (GPT-2 style: ByteLevel pre-tokenizer
// with its regex, BPE merges by rank, added tokens matched before splitting). Produces the same ids as the
// `tokenizers` library for such files; other model types fail with a FormatError naming the field.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace optforge_rt {

struct ChatMessage {
  std::string role;
  std::string content;
};

class Tokenizer {
 public:
  static Tokenizer from_file(const std::string& path);      // throws ArtifactError / FormatError
  static Tokenizer from_json(std::string_view text, const std::string& name);

  std::vector<int> encode(std::string_view text) const;
  std::string decode(const std::vector<int>& ids) const;
  int vocab_size() const { return static_cast<int>(id_to_token_.size()); }
  // Id of an added or regular token, or -1 when absent.
  int token_id(const std::string& token) const;

  // ChatML (the template family of SmolLM2/Qwen): system prompt, turns, optional assistant opener.
  std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const;
  void set_default_system_prompt(std::string prompt) { default_system_ = std::move(prompt); }

 private:
  struct PairHash {
    size_t operator()(uint64_t v) const { return std::hash<uint64_t>()(v); }
  };
  struct AddedToken {
    std::string content;
    int id;
  };

  void bpe(std::string_view piece, std::vector<int>& out) const;
  void encode_plain(std::string_view text, std::vector<int>& out) const;

  std::unordered_map<std::string, int> token_to_id_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<uint64_t, std::pair<int, int>, PairHash> merges_;  // (left id, right id) -> (rank, merged id)
  std::vector<AddedToken> added_;  // longest first
  int byte_token_[256];            // id of the byte-level symbol of each byte, -1 if absent
  std::string default_system_;
  mutable std::unordered_map<std::string, std::vector<int>> cache_;
};

// The byte-level pre-tokenizer's split of `text` into pieces (byte ranges), exposed for tests.
std::vector<std::pair<size_t, size_t>> pretokenize(std::string_view text);

}  // namespace optforge_rt
