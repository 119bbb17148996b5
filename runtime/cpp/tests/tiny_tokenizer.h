// A hand-written byte-level BPE tokenizer.json shared by the tokenizer test and the fuzz driver.
#pragma once

static const char* kTinyTokenizerJson = R"({
  "version": "1.0", "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "added_tokens": [{"id": 8, "content": "<|x|>", "special": true}],
  "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "\u0120": 3, "ab": 4, "abc": 5, "\u0120a": 6, "!": 7},
            "merges": ["a b", ["ab", "c"], "\u0120 a"]}
})";
