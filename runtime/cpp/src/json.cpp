#include "optforge_rt/json.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "optforge_rt/errors.h"

namespace optforge_rt {

namespace {
constexpr int kMaxDepth = 256;

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}
}  // namespace

class JsonParser {
 public:
  explicit JsonParser(std::string_view text) : s_(text) {}

  Json document() {
    Json value = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw FormatError("invalid JSON at offset " + std::to_string(pos_) + ": " + why);
  }

  void skip_ws() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }

  char peek() {
    skip_ws();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }

  void expect_word(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) fail("expected '" + std::string(word) + "'");
    pos_ += word.size();
  }

  Json parse_value(int depth) {
    if (depth > kMaxDepth) fail("nesting deeper than 256");
    Json v;
    char c = peek();
    if (c == '{') {
      v.type_ = Json::Type::kObject;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = parse_string();
        if (peek() != ':') fail("expected ':'");
        ++pos_;
        v.object_.emplace_back(std::move(key), parse_value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == '}') break;
        if (d != ',') fail("expected ',' or '}'");
      }
    } else if (c == '[') {
      v.type_ = Json::Type::kArray;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      while (true) {
        v.array_.push_back(parse_value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == ']') break;
        if (d != ',') fail("expected ',' or ']'");
      }
    } else if (c == '"') {
      v.type_ = Json::Type::kString;
      v.string_ = parse_string();
    } else if (c == 't') {
      expect_word("true");
      v.type_ = Json::Type::kBool;
      v.bool_ = true;
    } else if (c == 'f') {
      expect_word("false");
      v.type_ = Json::Type::kBool;
    } else if (c == 'n') {
      expect_word("null");
    } else if (c == '-' || (c >= '0' && c <= '9')) {
      v.type_ = Json::Type::kNumber;
      v.number_ = parse_number();
    } else if (c == 'N' || c == 'I') {  // Python's json writes NaN / Infinity
      v.type_ = Json::Type::kNumber;
      if (s_.substr(pos_, 3) == "NaN") { pos_ += 3; v.number_ = NAN; } else { expect_word("Infinity"); v.number_ = INFINITY; }
    } else {
      fail(std::string("unexpected character '") + c + "'");
    }
    return v;
  }

  double parse_number() {
    size_t start = pos_;
    while (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '-' || s_[pos_] == '+' ||
                                s_[pos_] == '.' || s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
    }
    if (s_.substr(start, pos_ - start) == "-" && s_.substr(pos_, 8) == "Infinity") { pos_ += 8; return -INFINITY; }
    std::string token(s_.substr(start, pos_ - start));
    char* end = nullptr;
    double value = std::strtod(token.c_str(), &end);
    if (token.empty() || end != token.c_str() + token.size()) fail("bad number '" + token + "'");
    return value;
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t cp = 0;
    for (int i = 0; i < 4; ++i) {
      char h = s_[pos_++];
      cp <<= 4;
      if (h >= '0' && h <= '9') cp |= h - '0';
      else if (h >= 'a' && h <= 'f') cp |= h - 'a' + 10;
      else if (h >= 'A' && h <= 'F') cp |= h - 'A' + 10;
      else fail("bad \\u escape");
    }
    return cp;
  }

  std::string parse_string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xD800 && cp < 0xDC00 && s_.substr(pos_, 2) == "\\u") {
            size_t save = pos_;
            pos_ += 2;
            uint32_t low = parse_hex4();
            if (low >= 0xDC00 && low < 0xE000) cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            else pos_ = save;  // a lone high surrogate: keep it as is
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }

  std::string_view s_;
  size_t pos_ = 0;
};

Json Json::parse(std::string_view text) { return JsonParser(text).document(); }

namespace {
[[noreturn]] void wrong_type(const char* what, const char* expected) {
  throw FormatError(std::string(what) + ": expected " + expected);
}
}  // namespace

double Json::number(const char* what) const {
  if (type_ != Type::kNumber) wrong_type(what, "a number");
  return number_;
}

int64_t Json::integer(const char* what) const {
  double v = number(what);
  if (!(v >= -9.2e18 && v <= 9.2e18) || v != std::floor(v)) wrong_type(what, "an integer");
  return static_cast<int64_t>(v);
}

bool Json::boolean(const char* what) const {
  if (type_ != Type::kBool) wrong_type(what, "true or false");
  return bool_;
}

const std::string& Json::str(const char* what) const {
  if (type_ != Type::kString) wrong_type(what, "a string");
  return string_;
}

const std::vector<Json>& Json::items(const char* what) const {
  if (type_ != Type::kArray) wrong_type(what, "an array");
  return array_;
}

const std::vector<std::pair<std::string, Json>>& Json::members(const char* what) const {
  if (type_ != Type::kObject) wrong_type(what, "an object");
  return object_;
}

bool Json::is_integer_in(int64_t lo, int64_t hi) const {
  if (type_ != Type::kNumber) return false;
  return number_ >= static_cast<double>(lo) && number_ <= static_cast<double>(hi) && number_ == std::floor(number_);
}

std::string Json::describe() const {
  switch (type_) {
    case Type::kNull: return "null";
    case Type::kBool: return bool_ ? "true" : "false";
    case Type::kArray: return "an array";
    case Type::kObject: return "an object";
    case Type::kString: return string_.size() > 32 ? "\"" + string_.substr(0, 32) + "...\"" : "\"" + string_ + "\"";
    case Type::kNumber: break;
  }
  if (is_integer_in(-(int64_t(1) << 62), int64_t(1) << 62)) return std::to_string(static_cast<int64_t>(number_));
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {  // the shortest text that reads back as the same double
    std::snprintf(buf, sizeof(buf), "%.*g", precision, number_);
    if (std::strtod(buf, nullptr) == number_) break;
  }
  return buf;
}

const Json* Json::find(std::string_view key) const {
  for (const auto& [k, v] : object_) {
    if (k == key) return &v;
  }
  return nullptr;
}

const Json& Json::at(std::string_view key) const {
  const Json* v = find(key);
  if (v == nullptr) throw FormatError("missing key '" + std::string(key) + "'");
  return *v;
}

}  // namespace optforge_rt
