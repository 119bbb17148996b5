#include "optforge_rt/kv_cache.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "optforge_rt/checked.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/safetensors.h"

namespace optforge_rt {

const char* kv_dtype_name(KvDtype dtype) { return dtype == KvDtype::kInt8 ? "int8" : dtype == KvDtype::kFp8 ? "fp8" : "fp32"; }

size_t kv_element_bytes(KvDtype dtype) { return dtype == KvDtype::kF32 ? sizeof(float) : 1; }

// Rounds |v| the way round_to_e4m3 does: frexp puts |v| in [2^(e-1), 2^e), the binade's step is 2^(e-4) (3
// mantissa bits; 2^-9 below 2^-5, the subnormal spacing), and nearbyint rounds the step count half to even. The
// count r is then the code: in a normal binade r in [8, 16] gives exponent field e + 6 and mantissa r - 8 (r = 16
// carries into the next binade), and below 2^-5 the code is r itself (subnormals, then 2^-6's binade).
uint8_t e4m3_encode(float v) {
  const uint8_t sign = std::signbit(v) ? 0x80 : 0x00;
  if (std::isnan(v)) return sign | 0x7F;
  const float a = std::min(std::fabs(v), 448.f);
  if (a == 0.f) return sign;
  int e = 0;
  std::frexp(a, &e);
  const int step = std::max(e, -5) - 4;
  const int r = static_cast<int>(std::nearbyint(std::ldexp(a, -step)));  // exact scaling by a power of two
  return sign | static_cast<uint8_t>(e <= -5 ? r : ((e + 6) << 3) + r - 8);
}

namespace {
std::array<float, 256> e4m3_table() {
  std::array<float, 256> t{};
  for (int c = 0; c < 256; ++c) {
    const int exp = (c >> 3) & 0xF, mant = c & 7;
    float m = exp == 0 ? std::ldexp(static_cast<float>(mant), -9) : std::ldexp(static_cast<float>(8 + mant), exp - 10);
    if (exp == 15 && mant == 7) m = NAN;
    t[c] = (c & 0x80) ? -m : m;
  }
  return t;
}
const std::array<float, 256> kE4m3 = e4m3_table();

[[noreturn]] void bad_record(const std::string& where, const std::string& what) {
  throw ArtifactError(where + ": kv_cache " + what + "; re-run the quant.kv_cache pass");
}

float layer_scale(const Json& entry, const char* key, int layer, const std::string& where) {
  const Json* s = entry.find(key);
  const double d = s != nullptr && s->is_number() ? s->number() : 0.0;
  if (!(d > 0.0 && d < 3.0e38)) {
    bad_record(where, "scales." + std::to_string(layer) + "." + key + " is " + (s != nullptr ? s->describe() : std::string("missing")) +
                          ", expected a positive finite number");
  }
  return static_cast<float>(d);
}
}  // namespace

float e4m3_decode(uint8_t code) { return kE4m3[code]; }

KvCacheSpec kv_cache_spec(const Json& layout, int num_layers, const std::string& where) {
  KvCacheSpec spec;
  const Json* kv = layout.find("kv_cache");
  if (kv == nullptr || kv->is_null()) return spec;
  const Json* dtype = kv->find("dtype");
  const std::string name = dtype != nullptr && dtype->is_string() ? dtype->str() : "";
  if (name != "fp8" && name != "int8") bad_record(where, "dtype is " + (dtype != nullptr ? dtype->describe() : std::string("missing")) + ", expected \"fp8\" or \"int8\"");
  spec.dtype = name == "fp8" ? KvDtype::kFp8 : KvDtype::kInt8;
  const Json* scales = kv->find("scales");
  if (scales == nullptr || !scales->is_object()) bad_record(where, "has no 'scales' table");
  for (int l = 0; l < num_layers; ++l) {
    const Json* entry = scales->find(std::to_string(l));
    if (entry == nullptr || !entry->is_object()) bad_record(where, "scales have no entry for layer " + std::to_string(l));
    spec.k_scales.push_back(layer_scale(*entry, "k", l, where));
    spec.v_scales.push_back(layer_scale(*entry, "v", l, where));
  }
  return spec;
}

KvCache::KvCache(const KvCacheSpec& spec, int num_layers, int num_blocks, int block_size, int row)
    : spec_(spec), block_size_(block_size), row_(row), element_bytes_(kv_element_bytes(spec.dtype)) {
  if (spec.dtype != KvDtype::kF32 && (static_cast<int>(spec.k_scales.size()) != num_layers || static_cast<int>(spec.v_scales.size()) != num_layers)) {
    throw std::invalid_argument("a quantized KV cache needs one K and one V scale per layer");
  }
  uint64_t per_layer = 0, total = 0;
  const bool fits = checked_product({uint64_t(num_blocks), uint64_t(block_size), uint64_t(row), element_bytes_}, &per_layer) &&
                    checked_product({per_layer, uint64_t(num_layers), 2}, &total);
  const size_t available = available_memory();
  if (!fits || total > available) {
    throw std::invalid_argument("a " + std::string(kv_dtype_name(spec.dtype)) + " KV cache of " + std::to_string(num_blocks) + " blocks x " +
                                std::to_string(block_size) + " tokens x " + std::to_string(num_layers) + " layers needs " +
                                (fits ? std::to_string(total) : std::string("over 2^64")) + " bytes, more than the " + std::to_string(available) +
                                " bytes of memory available; use fewer KV blocks");
  }
  k_.assign(num_layers, std::vector<uint8_t>(static_cast<size_t>(per_layer)));
  v_.assign(num_layers, std::vector<uint8_t>(static_cast<size_t>(per_layer)));
}

size_t KvCache::bytes() const { return k_.empty() ? 0 : 2 * k_.size() * k_.front().size(); }

void KvCache::write(int layer, size_t slot, const float* k, const float* v) {
  uint8_t* kd = k_[layer].data() + slot * row_ * element_bytes_;
  uint8_t* vd = v_[layer].data() + slot * row_ * element_bytes_;
  if (spec_.dtype == KvDtype::kF32) {
    std::memcpy(kd, k, row_ * sizeof(float));
    std::memcpy(vd, v, row_ * sizeof(float));
    return;
  }
  // x / scale as the emulation computes it (a float32 division), then the storage type's rounding.
  const float ks = spec_.k_scales[layer], vs = spec_.v_scales[layer];
  auto store = [&](float x, uint8_t* dst) {
    if (spec_.dtype == KvDtype::kFp8) {
      *dst = e4m3_encode(x);
    } else {
      *dst = static_cast<uint8_t>(static_cast<int8_t>(std::clamp(std::nearbyint(x), -127.f, 127.f)));
    }
  };
  for (int i = 0; i < row_; ++i) {
    store(k[i] / ks, kd + i);
    store(v[i] / vs, vd + i);
  }
}

void KvCache::read(int layer, size_t slot, int offset, int n, float* k, float* v) const {
  const size_t at = slot * row_ + offset;
  if (spec_.dtype == KvDtype::kF32) {
    std::memcpy(k, k_f32(layer) + at, n * sizeof(float));
    std::memcpy(v, v_f32(layer) + at, n * sizeof(float));
    return;
  }
  const uint8_t* kd = k_[layer].data() + at;
  const uint8_t* vd = v_[layer].data() + at;
  const float ks = spec_.k_scales[layer], vs = spec_.v_scales[layer];
  if (spec_.dtype == KvDtype::kFp8) {
    for (int i = 0; i < n; ++i) {
      k[i] = kE4m3[kd[i]] * ks;
      v[i] = kE4m3[vd[i]] * vs;
    }
    return;
  }
  for (int i = 0; i < n; ++i) {
    k[i] = static_cast<float>(static_cast<int8_t>(kd[i])) * ks;
    v[i] = static_cast<float>(static_cast<int8_t>(vd[i])) * vs;
  }
}

void KvCache::copy_block(int src, int dst) {
  const size_t stride = static_cast<size_t>(block_size_) * row_ * element_bytes_;
  for (size_t l = 0; l < k_.size(); ++l) {
    std::memcpy(k_[l].data() + dst * stride, k_[l].data() + src * stride, stride);
    std::memcpy(v_[l].data() + dst * stride, v_[l].data() + src * stride, stride);
  }
}

}  // namespace optforge_rt
