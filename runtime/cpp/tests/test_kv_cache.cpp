// The quantized KV cache: FP8 E4M3 encoding against known values (every code round-trips, ties go to the even
// mantissa, saturation at 448), the INT8 rounding, the optforge.json record, and the byte cache's write / read.
#include <cmath>
#include <cstring>
#include <vector>

#include "check.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/kv_cache.h"

using namespace optforge_rt;

static bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

static void check_e4m3_values() {
  CHECK(e4m3_decode(0x00) == 0.f && std::signbit(e4m3_decode(0x80)));
  CHECK(e4m3_decode(0x01) == std::ldexp(1.f, -9));   // smallest subnormal
  CHECK(e4m3_decode(0x07) == 7 * std::ldexp(1.f, -9));
  CHECK(e4m3_decode(0x08) == std::ldexp(1.f, -6));   // smallest normal
  CHECK(e4m3_decode(0x38) == 1.f && e4m3_decode(0x3C) == 1.5f && e4m3_decode(0x40) == 2.f);
  CHECK(e4m3_decode(0x7E) == 448.f && e4m3_decode(0xFE) == -448.f);
  CHECK(std::isnan(e4m3_decode(0x7F)) && std::isnan(e4m3_decode(0xFF)));
  for (int c = 0; c < 256; ++c) CHECK(e4m3_encode(e4m3_decode(static_cast<uint8_t>(c))) == c);  // -0 and NaN keep their sign bit
  // Halfway between neighbours: the even mantissa wins, in normal and subnormal binades and across a binade edge.
  CHECK(e4m3_encode(1.0625f) == 0x38);                       // 1 + 1/16: between 1 (m 0) and 1.125 (m 1)
  CHECK(e4m3_encode(1.1875f) == 0x3A);                       // 1 + 3/16: between 1.125 (m 1) and 1.25 (m 2)
  CHECK(e4m3_encode(17.f) == e4m3_encode(16.f) && e4m3_encode(19.f) == e4m3_encode(20.f));
  CHECK(e4m3_encode(std::ldexp(1.f, -10)) == 0x00);          // half the smallest subnormal
  CHECK(e4m3_encode(3 * std::ldexp(1.f, -10)) == 0x02);      // between 1 and 2 x 2^-9
  CHECK(e4m3_encode(15.5f * std::ldexp(1.f, -9)) == 0x10);   // 1.9375 x 2^-6 rounds up to 2^-5
  CHECK(e4m3_encode(-1.0625f) == 0xB8);
  CHECK(e4m3_encode(1.0626f) == 0x39 && e4m3_encode(1.0624f) == 0x38);
  // Saturation, not overflow to NaN.
  CHECK(e4m3_encode(460.f) == 0x7E && e4m3_encode(1e6f) == 0x7E && e4m3_encode(-INFINITY) == 0xFE);
  // Every float between two codes goes to the nearer one (a sweep over [-500, 500]).
  for (float v = -500.f; v <= 500.f; v += 0.0137f) {
    const float r = e4m3_decode(e4m3_encode(v)), a = std::fabs(v) > 448.f ? std::copysign(448.f, v) : v;
    for (int c = 0; c < 256; ++c) {
      const float o = e4m3_decode(static_cast<uint8_t>(c));
      if (!std::isnan(o)) CHECK(std::fabs(a - r) <= std::fabs(a - o));
    }
  }
}

static void check_spec() {
  const Json none = Json::parse("{}");
  CHECK(kv_cache_spec(none, 2, "x").dtype == KvDtype::kF32);
  const Json fp8 = Json::parse(R"({"kv_cache": {"dtype": "fp8", "scales": {"0": {"k": 0.5, "v": 0.25}, "1": {"k": 2, "v": 1}}}})");
  KvCacheSpec spec = kv_cache_spec(fp8, 2, "x");
  CHECK(spec.dtype == KvDtype::kFp8 && spec.k_scales[1] == 2.f && spec.v_scales[0] == 0.25f);
  CHECK_THROWS_WITH(ArtifactError, kv_cache_spec(fp8, 3, "x"), "no entry for layer 2", "quant.kv_cache");
  CHECK_THROWS_WITH(ArtifactError, kv_cache_spec(Json::parse(R"({"kv_cache": {"dtype": "int4", "scales": {}}})"), 1, "x"), "dtype");
  CHECK_THROWS_WITH(ArtifactError, kv_cache_spec(Json::parse(R"({"kv_cache": {"dtype": "int8", "scales": {"0": {"k": 0, "v": 1}}}})"), 1, "x"),
                    "scales.0.k", "positive");
}

// One token's K/V row through a byte cache: stored as round(x / scale) (int8: half to even, clamped to 127;
// fp8: E4M3), read back as stored * scale; copy_block moves whole blocks; 4 bytes per element become 1.
static void check_cache() {
  const int row = 8;
  KvCacheSpec spec;
  spec.dtype = KvDtype::kInt8;
  spec.k_scales = {0.5f};
  spec.v_scales = {0.1f};
  KvCache cache(spec, 1, 4, 2, row);
  KvCacheSpec f32;
  CHECK(cache.bytes() * 4 == KvCache(f32, 1, 4, 2, row).bytes());
  const float k[row] = {0.25f, 0.75f, -0.25f, 100.f, -100.f, 1.f, 0.3f, -0.f};
  const float v[row] = {0.05f, 0.15f, 0.01f, 12.7f, -12.71f, 0.f, 0.33f, 1.f};
  cache.write(0, 3, k, v);
  float kr[row], vr[row];
  cache.read(0, 3, 0, row, kr, vr);
  const float kq[row] = {0.f, 2.f, -0.f, 127.f, -127.f, 2.f, 1.f, 0.f};  // 0.25 / 0.5 = 0.5 -> 0, 1.5 -> 2 (even)
  for (int i = 0; i < row; ++i) CHECK(kr[i] == kq[i] * 0.5f && vr[i] == std::nearbyint(std::fmin(std::fmax(v[i] / 0.1f, -127.f), 127.f)) * 0.1f);
  cache.copy_block(1, 0);  // slot 3 is block 1, offset 1
  float kc[row], vc[row];
  cache.read(0, 1, 0, row, kc, vc);
  for (int i = 0; i < row; ++i) CHECK(same_bits(kc[i], kr[i]) && same_bits(vc[i], vr[i]));
  cache.read(0, 3, 4, 2, kc, vc);  // a head's slice
  CHECK(kc[0] == kr[4] && kc[1] == kr[5] && vc[1] == vr[5]);
  spec.dtype = KvDtype::kFp8;
  KvCache fp8(spec, 1, 1, 4, row);
  fp8.write(0, 2, k, v);
  fp8.read(0, 2, 0, row, kr, vr);
  for (int i = 0; i < row; ++i) CHECK(kr[i] == e4m3_decode(e4m3_encode(k[i] / 0.5f)) * 0.5f && vr[i] == e4m3_decode(e4m3_encode(v[i] / 0.1f)) * 0.1f);
}

int main() {
  check_e4m3_values();
  check_spec();
  check_cache();
  return 0;
}
