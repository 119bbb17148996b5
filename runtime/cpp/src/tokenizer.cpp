#include "optforge_rt/tokenizer.h"

#include <algorithm>
#include <climits>

#include "optforge_rt/artifact.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/json.h"

namespace optforge_rt {

namespace {

struct CodeRange {
  uint32_t lo, hi;
};
#include "unicode_tables.inc"

template <size_t N>
bool in_ranges(const CodeRange (&table)[N], uint32_t cp) {
  auto it = std::upper_bound(std::begin(table), std::end(table), cp, [](uint32_t v, const CodeRange& r) { return v < r.lo; });
  return it != std::begin(table) && cp <= (it - 1)->hi;
}

bool is_letter(uint32_t cp) { return in_ranges(kLetterRanges, cp); }
bool is_number(uint32_t cp) { return in_ranges(kNumberRanges, cp); }
bool is_space(uint32_t cp) {  // Unicode White_Space, as the regex engine's \s
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// One decoded code point with its byte span. Invalid UTF-8 bytes become one code point each (0xFFFD).
struct Cp {
  uint32_t cp;
  size_t begin, end;
};

std::vector<Cp> decode_utf8(std::string_view s) {
  std::vector<Cp> out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    unsigned char c = s[i];
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      unsigned char cc = s[i + k];
      ok = (cc & 0xC0) == 0x80;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) { out.push_back({0xFFFD, i, i + 1}); ++i; continue; }
    out.push_back({cp, i, i + len});
    i += len;
  }
  return out;
}

// GPT-2's byte -> printable code point map (bytes_to_unicode).
std::vector<uint32_t> byte_to_codepoint() {
  std::vector<uint32_t> map(256, 0);
  std::vector<bool> direct(256, false);
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  uint32_t next = 256;
  for (int b = 0; b < 256; ++b) map[b] = direct[b] ? b : next++;
  return map;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) { out += char(cp); return; }
  if (cp < 0x800) { out += char(0xC0 | (cp >> 6)); out += char(0x80 | (cp & 0x3F)); return; }
  out += char(0xE0 | (cp >> 12));
  out += char(0x80 | ((cp >> 6) & 0x3F));
  out += char(0x80 | (cp & 0x3F));
}

uint64_t pair_key(int a, int b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

}  // namespace

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+  (first alternative that matches wins)
std::vector<std::pair<size_t, size_t>> pretokenize(std::string_view text) {
  std::vector<Cp> cps = decode_utf8(text);
  std::vector<std::pair<size_t, size_t>> pieces;
  size_t n = cps.size(), i = 0;
  auto cls = [&](size_t k) { return is_letter(cps[k].cp) ? 'L' : is_number(cps[k].cp) ? 'N' : is_space(cps[k].cp) ? 'S' : 'O'; };
  while (i < n) {
    size_t j = i;
    if (cps[i].cp == '\'' && i + 1 < n) {
      uint32_t a = cps[i + 1].cp, b = i + 2 < n ? cps[i + 2].cp : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') j = i + 2;
      else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) j = i + 3;
    }
    if (j == i) {
      // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional ASCII space, then a run of one class.
      size_t start = (cps[i].cp == ' ' && i + 1 < n) ? i + 1 : i;
      char c = cls(start);
      if (c != 'S') {
        j = start;
        while (j < n && cls(j) == c) ++j;
      } else {
        // `\s+(?!\S)` backs off one character when the run is followed by a non-space; `\s+` takes a lone one.
        size_t end = i;
        while (end < n && cls(end) == 'S') ++end;
        j = (end < n && end - i >= 2) ? end - 1 : end;
      }
    }
    pieces.emplace_back(cps[i].begin, cps[j - 1].end);
    i = j;
  }
  return pieces;
}

Tokenizer Tokenizer::from_file(const std::string& path) { return from_json(read_text_file(path), path); }

Tokenizer Tokenizer::from_json(std::string_view text, const std::string& name) {
  Json root = Json::parse(text);
  const Json& model = root.at("model");
  const Json* type = model.find("type");
  if (type == nullptr || type->str("model.type") != "BPE") throw FormatError(name + ": model.type must be 'BPE'");
  const Json* pre = root.find("pre_tokenizer");
  if (pre == nullptr || !pre->is_object() || pre->at("type").str() != "ByteLevel") {
    // Gemma / Llama-2 style: spaces become '\u2581' (a Metaspace pre_tokenizer or a Replace normalizer) and
    // unknown bytes fall back to <0xNN> tokens. Not implemented here: say so, and where it does run.
    const Json* fallback = model.find("byte_fallback");
    const bool sentencepiece = (fallback != nullptr && fallback->type() == Json::Type::kBool && fallback->boolean()) ||
                               (pre != nullptr && pre->is_object() && pre->find("type") != nullptr && pre->at("type").str() == "Metaspace");
    if (sentencepiece) {
      throw FormatError(name + ": a SentencePiece-style tokenizer (metaspace '\u2581' spaces, byte fallback; Gemma's) is not supported by "
                        "optforge-rt's tokenizer, which reads byte-level BPE only; run the model through the Python tokenizer: "
                        "optforge generate ARTIFACT PROMPT --backend cpp");
    }
    throw FormatError(name + ": only the ByteLevel pre_tokenizer is supported");
  }
  if (const Json* norm = root.find("normalizer"); norm != nullptr && !norm->is_null()) {
    throw FormatError(name + ": normalizers are not supported (found one)");
  }
  Tokenizer t;
  for (const auto& [token, id] : model.at("vocab").members("model.vocab")) {
    int64_t v = id.integer("vocab id");
    if (v < 0 || v > 10'000'000) throw FormatError(name + ": vocab id out of range");
    if (static_cast<size_t>(v) >= t.id_to_token_.size()) t.id_to_token_.resize(v + 1);
    t.id_to_token_[v] = token;
    t.token_to_id_[token] = static_cast<int>(v);
  }
  for (const Json& added : root.at("added_tokens").items("added_tokens")) {
    int64_t v = added.at("id").integer("added token id");
    if (v < 0 || v > 10'000'000) throw FormatError(name + ": added token id out of range");
    const std::string& content = added.at("content").str("content");
    if (content.empty()) continue;
    if (static_cast<size_t>(v) >= t.id_to_token_.size()) t.id_to_token_.resize(v + 1);
    t.id_to_token_[v] = content;
    t.token_to_id_[content] = static_cast<int>(v);
    t.added_.push_back({content, static_cast<int>(v)});
  }
  std::stable_sort(t.added_.begin(), t.added_.end(), [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  int rank = 0;
  for (const Json& merge : model.at("merges").items("model.merges")) {
    std::string left, right;
    if (merge.is_array() && merge.items().size() == 2) {
      left = merge.items()[0].str("merge");
      right = merge.items()[1].str("merge");
    } else {
      const std::string& s = merge.str("merge");
      size_t sp = s.find(' ');
      if (sp == std::string::npos) throw FormatError(name + ": bad merge '" + s + "'");
      left = s.substr(0, sp);
      right = s.substr(sp + 1);
    }
    auto a = t.token_to_id_.find(left), b = t.token_to_id_.find(right), m = t.token_to_id_.find(left + right);
    if (a != t.token_to_id_.end() && b != t.token_to_id_.end() && m != t.token_to_id_.end()) {
      t.merges_.emplace(pair_key(a->second, b->second), std::make_pair(rank, m->second));
    }
    ++rank;
  }
  std::vector<uint32_t> b2c = byte_to_codepoint();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    append_utf8(s, b2c[b]);
    auto it = t.token_to_id_.find(s);
    t.byte_token_[b] = it == t.token_to_id_.end() ? -1 : it->second;
  }
  return t;
}

int Tokenizer::token_id(const std::string& token) const {
  auto it = token_to_id_.find(token);
  return it == token_to_id_.end() ? -1 : it->second;
}

void Tokenizer::bpe(std::string_view piece, std::vector<int>& out) const {
  std::string key(piece);
  if (auto it = cache_.find(key); it != cache_.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  std::vector<int> word;
  for (unsigned char c : piece) {
    if (byte_token_[c] >= 0) word.push_back(byte_token_[c]);
  }
  while (word.size() > 1) {
    int best_rank = INT_MAX, best_id = -1;
    for (size_t k = 0; k + 1 < word.size(); ++k) {
      auto it = merges_.find(pair_key(word[k], word[k + 1]));
      if (it != merges_.end() && it->second.first < best_rank) { best_rank = it->second.first; best_id = it->second.second; }
    }
    if (best_id < 0) break;
    std::vector<int> next;
    next.reserve(word.size());
    for (size_t k = 0; k < word.size(); ++k) {
      if (k + 1 < word.size()) {
        auto it = merges_.find(pair_key(word[k], word[k + 1]));
        if (it != merges_.end() && it->second.first == best_rank) { next.push_back(best_id); ++k; continue; }
      }
      next.push_back(word[k]);
    }
    word.swap(next);
  }
  if (cache_.size() < 100000) cache_.emplace(std::move(key), word);
  out.insert(out.end(), word.begin(), word.end());
}

void Tokenizer::encode_plain(std::string_view text, std::vector<int>& out) const {
  for (auto [b, e] : pretokenize(text)) bpe(text.substr(b, e - b), out);
}

std::vector<int> Tokenizer::encode(std::string_view text) const {
  std::vector<int> out;
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& a : added_) {
      if (text.compare(i, a.content.size(), a.content) == 0) { hit = &a; break; }
    }
    if (hit == nullptr) { ++i; continue; }
    encode_plain(text.substr(start, i - start), out);
    out.push_back(hit->id);
    i += hit->content.size();
    start = i;
  }
  encode_plain(text.substr(start), out);
  return out;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  static const std::vector<uint32_t> b2c = byte_to_codepoint();
  static const std::unordered_map<uint32_t, unsigned char> c2b = [] {
    std::unordered_map<uint32_t, unsigned char> m;
    for (int b = 0; b < 256; ++b) m[b2c[b]] = static_cast<unsigned char>(b);
    return m;
  }();
  std::string out;
  for (int id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) continue;
    const std::string& tok = id_to_token_[id];
    bool is_added = std::any_of(added_.begin(), added_.end(), [&](const AddedToken& a) { return a.id == id; });
    if (is_added) { out += tok; continue; }
    for (const Cp& c : decode_utf8(tok)) {
      auto it = c2b.find(c.cp);
      if (it != c2b.end()) out += static_cast<char>(it->second);
    }
  }
  return out;
}

std::string Tokenizer::apply_chat_template(const std::vector<ChatMessage>& messages, bool add_generation_prompt) const {
  std::string out;
  if (!default_system_.empty() && (messages.empty() || messages[0].role != "system")) {
    out += "<|im_start|>system\n" + default_system_ + "<|im_end|>\n";
  }
  for (const ChatMessage& m : messages) out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

}  // namespace optforge_rt
