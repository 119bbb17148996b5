// A small JSON reader: enough for manifest.json, config.json, optforge.json, tokenizer.json and
// safetensors headers. Parse errors throw optforge_rt::FormatError naming the offset; depth is bounded.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace optforge_rt {

class Json {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  static Json parse(std::string_view text);  // throws FormatError

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_object() const { return type_ == Type::kObject; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_number() const { return type_ == Type::kNumber; }

  // Typed accessors throw FormatError naming `what` when the value has another type.
  double number(const char* what = "value") const;
  int64_t integer(const char* what = "value") const;
  bool boolean(const char* what = "value") const;
  const std::string& str(const char* what = "value") const;
  const std::vector<Json>& items(const char* what = "value") const;
  const std::vector<std::pair<std::string, Json>>& members(const char* what = "value") const;

  // True for a number that is a whole integer within [lo, hi] (no conversion of an out-of-range value).
  bool is_integer_in(int64_t lo, int64_t hi) const;
  // The value as an error message shows it: a number, a quoted prefix of a string, or its type.
  std::string describe() const;

  // Object lookup: nullptr when absent (or when this is not an object).
  const Json* find(std::string_view key) const;
  // Object lookup that throws FormatError("missing key ...") when absent.
  const Json& at(std::string_view key) const;

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<Json> array_;
  std::vector<std::pair<std::string, Json>> object_;
};

}  // namespace optforge_rt
