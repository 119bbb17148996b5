#include <string>
#include <vector>

#include "check.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/tokenizer.h"
#include "tiny_tokenizer.h"

using namespace optforge_rt;

static std::vector<std::string> pieces(const std::string& s) {
  std::vector<std::string> out;
  for (auto [b, e] : pretokenize(s)) out.push_back(s.substr(b, e - b));
  return out;
}

int main() {
  // The GPT-2 regex: contractions, ' ?' + letter/number/other runs, and whitespace that leaves one space
  // for the next word.
  std::vector<std::string> expected = {"Hello", " ", " world", "\n\n", " x", "'s", " 123", "abc", "!?", "   "};
  CHECK(pieces("Hello  world\n\n x's 123abc!?   ") == expected);
  CHECK((pieces("caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87") == std::vector<std::string>{"caf\xC3\xA9", " \xE4\xB8\xAD\xE6\x96\x87"}));
  CHECK((pieces("\t a") == std::vector<std::string>{"\t", " a"}));
  CHECK(pieces("").empty());
  CHECK(pieces("\xFF\xFE").size() == 1);  // invalid UTF-8: one "other" run, no crash

  Tokenizer tok = Tokenizer::from_json(kTinyTokenizerJson, "tiny");
  std::vector<int> ids = tok.encode("abc ab!<|x|>abc");
  CHECK((ids == std::vector<int>{5, 3, 4, 7, 8, 5}));  // " ab" merges a+b (rank 0) before Ġ+a (rank 2)
  CHECK(tok.decode(ids) == "abc ab!<|x|>abc");
  CHECK(tok.token_id("<|x|>") == 8 && tok.token_id("zz") == -1);
  CHECK(tok.encode("zz").empty());  // bytes without a vocab entry are dropped (no byte fallback)
  tok.set_default_system_prompt("S");
  CHECK(tok.apply_chat_template({{"user", "hi"}}, true) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  CHECK_THROWS(FormatError, Tokenizer::from_json(R"({"model": {"type": "Unigram"}})", "x"));
  CHECK_THROWS(FormatError, Tokenizer::from_json("{", "x"));
  // Gemma's tokenizer.json (Replace ' ' -> U+2581, Split on ' ', BPE with byte fallback): refused with where it runs.
  CHECK_THROWS_WITH(FormatError, Tokenizer::from_json(R"({"normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
      "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
      "model": {"type": "BPE", "byte_fallback": true, "vocab": {}, "merges": []}, "added_tokens": []})", "gemma/tokenizer.json"),
                    "gemma/tokenizer.json", "SentencePiece-style", "--backend cpp");
  return 0;
}
