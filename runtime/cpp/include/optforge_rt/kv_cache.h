// The paged KV cache of every layer: float32, or one byte per element (INT8, or FP8 E4M3 bits) for an artifact
// whose optforge.json carries a `kv_cache` record (written by the quant.kv_cache pass).
//
// A quantized cache holds K (after RoPE) and V as round(x / scale) for one per-layer scale of K and one of V:
// int8 rounds half to even and clamps to +-127; fp8 takes the nearest E4M3 value (ties to even, saturated at
// +-448). Reading gives stored * scale in float32, what optforge.formats.kv_cache emulates in Hugging Face
// attention, so the runtime serves the numerics the artifact's gates judged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "optforge_rt/json.h"

namespace optforge_rt {

enum class KvDtype { kF32, kInt8, kFp8 };

const char* kv_dtype_name(KvDtype dtype);
size_t kv_element_bytes(KvDtype dtype);  // 4, 1, 1

// FP8 E4M3 ("fn": no infinities, 0x7F / 0xFF are NaN). Encoding rounds to the nearest value, ties to even, and
// saturates at +-448 (as optforge.formats.fp8.round_to_e4m3); NaN keeps its sign bit. Decoding is exact.
uint8_t e4m3_encode(float v);
float e4m3_decode(uint8_t code);

// The storage type and per-layer scales of the cache.
struct KvCacheSpec {
  KvDtype dtype = KvDtype::kF32;
  std::vector<float> k_scales, v_scales;  // (num_layers,) for a quantized cache
};

// The spec an artifact's layout (optforge.json) asks for: float32 without a `kv_cache` record; else its dtype
// ("fp8" | "int8") and a positive finite K and V scale for every layer. Throws ArtifactError naming `where`.
KvCacheSpec kv_cache_spec(const Json& layout, int num_layers, const std::string& where);

class KvCache {
 public:
  // num_blocks x block_size slots of `row` elements (kv_heads x head_dim) per layer, for K and for V. Throws
  // std::invalid_argument when the whole cache does not fit in 64 bits or in the available memory.
  KvCache(const KvCacheSpec& spec, int num_layers, int num_blocks, int block_size, int row);

  KvDtype dtype() const { return spec_.dtype; }
  size_t bytes() const;  // K and V of every layer

  // Stores one token's K and V rows (`row` floats each) at `slot` of `layer`, quantized for a byte cache.
  void write(int layer, size_t slot, const float* k, const float* v);
  // The float32 cache of a layer (dtype kF32 only): (num_blocks * block_size, row) row-major.
  const float* k_f32(int layer) const { return reinterpret_cast<const float*>(k_[layer].data()); }
  const float* v_f32(int layer) const { return reinterpret_cast<const float*>(v_[layer].data()); }
  // Elements [offset, offset + n) of the K and V rows at `slot`, read back as float32 (stored * scale).
  void read(int layer, size_t slot, int offset, int n, float* k, float* v) const;
  // Copies one block to another in every layer (copy-on-write of a shared block).
  void copy_block(int src, int dst);

 private:
  KvCacheSpec spec_;
  int block_size_, row_;
  size_t element_bytes_;
  std::vector<std::vector<uint8_t>> k_, v_;  // per layer (num_blocks, block_size, row) elements
};

}  // namespace optforge_rt
