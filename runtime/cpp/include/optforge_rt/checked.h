// Overflow-checked size arithmetic for counts read from untrusted files (shapes, config sizes).
#pragma once

#include <cstdint>
#include <initializer_list>

namespace optforge_rt {

// The product of `factors` in *out; false (with *out unspecified) when it does not fit in 64 bits.
inline bool checked_product(std::initializer_list<uint64_t> factors, uint64_t* out) {
  uint64_t p = 1;
  for (uint64_t f : factors) {
    if (__builtin_mul_overflow(p, f, &p)) return false;
  }
  *out = p;
  return true;
}

}  // namespace optforge_rt
