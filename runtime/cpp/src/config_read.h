// Reading checked values from config.json (shared by artifact.cpp and the per-architecture parsers). Every error
// is an ArtifactError naming the file, the key, what was found and what was expected.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "optforge_rt/errors.h"
#include "optforge_rt/json.h"

namespace optforge_rt {

inline std::string range_text(int64_t lo, int64_t hi) {
  return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

[[noreturn]] inline void bad_value(const std::string& where, const std::string& key, const std::string& found, const std::string& expected) {
  throw ArtifactError(where + ": '" + key + "' is " + found + ", expected " + expected);
}

// cfg[key] as an integer in [lo, hi]; `fallback` when absent or null (an error when there is none).
inline int config_int(const Json& cfg, const std::string& key, int64_t lo, int64_t hi, const std::string& where,
                      std::optional<int> fallback = std::nullopt) {
  const Json* v = cfg.find(key);
  if (v == nullptr || v->is_null()) {
    if (fallback.has_value()) return *fallback;
    throw ArtifactError(where + ": '" + key + "' is missing, expected " + range_text(lo, hi));
  }
  if (!v->is_integer_in(lo, hi)) bad_value(where, key, v->describe(), range_text(lo, hi));
  return static_cast<int>(v->number());
}

// cfg[key] as a positive finite float; `fallback` when absent or null.
inline float config_float(const Json& cfg, const std::string& key, const std::string& where, float fallback) {
  const Json* v = cfg.find(key);
  if (v == nullptr || v->is_null()) return fallback;
  const double d = v->is_number() ? v->number() : 0.0;
  if (!(d > 0.0 && d <= 3.0e38)) bad_value(where, key, v->describe(), "a positive finite number");
  return static_cast<float>(d);
}

// cfg[key] as a bool; `fallback` when absent or null.
inline bool config_bool(const Json& cfg, const std::string& key, const std::string& where, bool fallback) {
  const Json* v = cfg.find(key);
  if (v == nullptr || v->is_null()) return fallback;
  if (v->type() != Json::Type::kBool) bad_value(where, key, v->describe(), "true or false");
  return v->boolean();
}

}  // namespace optforge_rt
