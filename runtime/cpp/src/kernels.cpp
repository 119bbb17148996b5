#include "optforge_rt/kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "optforge_rt/errors.h"

namespace optforge_rt {

namespace {

// ------------------------------------------------------------------------------------------- scalar

float dot_f32_scalar(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_q8_scalar(const int8_t* w, const float* ws, const int8_t* x, const float* xs, int nblocks) {
  float s = 0.f;
  for (int b = 0; b < nblocks; ++b) {
    int32_t acc = 0;
    for (int j = 0; j < kQuantBlock; ++j) acc += int32_t(w[b * kQuantBlock + j]) * x[b * kQuantBlock + j];
    s += ws[b] * xs[b] * static_cast<float>(acc);
  }
  return s;
}

float dot_q4_scalar(const uint8_t* w, const float* ws, const int8_t* x, const float* xs, int nblocks) {
  float s = 0.f;
  for (int b = 0; b < nblocks; ++b) {
    int32_t acc = 0;
    const uint8_t* wb = w + b * 16;
    const int8_t* xb = x + b * kQuantBlock;
    for (int j = 0; j < 16; ++j) {
      acc += (int32_t(wb[j] & 0xF) - 8) * xb[j] + (int32_t(wb[j] >> 4) - 8) * xb[j + 16];
    }
    s += ws[b] * xs[b] * static_cast<float>(acc);
  }
  return s;
}

// --------------------------------------------------------------------------------------------- AVX2

#define OF_AVX2 __attribute__((target("avx2,fma")))
#define OF_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

OF_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

OF_AVX2 float dot_f32_avx2(const float* a, const float* b, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum256(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

OF_AVX2 inline __m256i unpack_q4(const uint8_t* w) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
  return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
}

// 32 int8 x 32 int8 -> 8 int32 partial sums (maddubs needs an unsigned operand: move x's sign onto w).
OF_AVX2 inline __m256i block_dot_avx2(__m256i w, __m256i x) {
  __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
  return _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
}

OF_AVX2 float dot_q8_avx2(const int8_t* w, const float* ws, const int8_t* x, const float* xs, int nblocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < nblocks; ++b) {
    __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kQuantBlock));
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kQuantBlock));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(wv, xv)), _mm256_set1_ps(ws[b] * xs[b]), acc);
  }
  return hsum256(acc);
}

OF_AVX2 float dot_q4_avx2(const uint8_t* w, const float* ws, const int8_t* x, const float* xs, int nblocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < nblocks; ++b) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kQuantBlock));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_avx2(unpack_q4(w + b * 16), xv)), _mm256_set1_ps(ws[b] * xs[b]), acc);
  }
  return hsum256(acc);
}

// ----------------------------------------------------------------------------------- AVX-512 + VNNI

OF_AVX512 float dot_f32_avx512(const float* a, const float* b, int n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

OF_AVX512 inline __m256i block_dot_vnni(__m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
}

OF_AVX512 float dot_q8_avx512(const int8_t* w, const float* ws, const int8_t* x, const float* xs, int nblocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < nblocks; ++b) {
    __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * kQuantBlock));
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kQuantBlock));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_vnni(wv, xv)), _mm256_set1_ps(ws[b] * xs[b]), acc);
  }
  return hsum256(acc);
}

OF_AVX512 float dot_q4_avx512(const uint8_t* w, const float* ws, const int8_t* x, const float* xs, int nblocks) {
  __m256 acc = _mm256_setzero_ps();
  for (int b = 0; b < nblocks; ++b) {
    __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + b * kQuantBlock));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot_vnni(unpack_q4(w + b * 16), xv)), _mm256_set1_ps(ws[b] * xs[b]), acc);
  }
  return hsum256(acc);
}

// ------------------------------------------------------------------------------------------ dispatch

struct KernelTable {
  float (*dot_f32)(const float*, const float*, int);
  float (*dot_q8)(const int8_t*, const float*, const int8_t*, const float*, int);
  float (*dot_q4)(const uint8_t*, const float*, const int8_t*, const float*, int);
};

const KernelTable kScalar = {dot_f32_scalar, dot_q8_scalar, dot_q4_scalar};
const KernelTable kAvx2 = {dot_f32_avx2, dot_q8_avx2, dot_q4_avx2};
const KernelTable kAvx512 = {dot_f32_avx512, dot_q8_avx512, dot_q4_avx512};

Isa g_isa = detected_isa();

const KernelTable& table() { return g_isa == Isa::kAvx512 ? kAvx512 : g_isa == Isa::kAvx2 ? kAvx2 : kScalar; }

// x (M, K) float -> int8 (M, K) and scales (M, K / 32).
void quantize_acts(const float* x, int M, int K, std::vector<int8_t>& q, std::vector<float>& s) {
  int nb = K / kQuantBlock;
  q.resize(static_cast<size_t>(M) * K);
  s.resize(static_cast<size_t>(M) * nb);
  for (int r = 0; r < M * nb; ++r) {
    const float* xb = x + static_cast<size_t>(r) * kQuantBlock;
    float amax = 0.f;
    for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
    float scale = amax / 127.f, inv = amax > 0 ? 127.f / amax : 0.f;
    s[r] = scale;
    for (int j = 0; j < kQuantBlock; ++j) q[static_cast<size_t>(r) * kQuantBlock + j] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
  }
}

}  // namespace

size_t Linear::weight_bytes() const {
  size_t n = static_cast<size_t>(out_features) * in_features;
  size_t scales_bytes = static_cast<size_t>(out_features) * (in_features / kQuantBlock) * 4;
  switch (format) {
    case WeightFormat::kF32: return n * 4;
    case WeightFormat::kInt8: return n + scales_bytes;
    case WeightFormat::kInt4: return n / 2 + scales_bytes;
  }
  return 0;
}

Isa detected_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kScalar;
}

Isa active_isa() { return g_isa; }
void set_isa(Isa isa) { g_isa = std::min(isa, detected_isa()); }

const char* isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar"; }

Isa parse_isa(const std::string& name) {
  if (name == "scalar") return Isa::kScalar;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  if (name == "auto" || name.empty()) return detected_isa();
  throw std::invalid_argument("unknown ISA '" + name + "' (scalar, avx2, avx512, auto)");
}

float dot_f32(const float* a, const float* b, int n) { return table().dot_f32(a, b, n); }

void axpy_f32(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

void matmul_group(const std::vector<const Linear*>& group, const float* x, int M, const std::vector<float*>& ys, ThreadPool& pool) {
  const int K = group[0]->in_features;
  int total = 0;
  bool any_quant = false;
  std::vector<int> starts;
  for (const Linear* w : group) {
    if (w->in_features != K) throw std::invalid_argument("matmul_group: Linear layers of one group need the same in_features");
    starts.push_back(total);
    total += w->out_features;
    any_quant |= w->format != WeightFormat::kF32;
  }
  std::vector<int8_t> xq;
  std::vector<float> xs;
  if (any_quant) quantize_acts(x, M, K, xq, xs);
  const KernelTable& k = table();
  const int nb = K / kQuantBlock;
  pool.parallel_for(total, [&](int begin, int end) {
    size_t gi = 0;
    for (int row = begin; row < end; ++row) {
      while (gi + 1 < group.size() && row >= starts[gi + 1]) ++gi;
      const Linear& w = *group[gi];
      int o = row - starts[gi];
      float* y = ys[gi];
      const int N = w.out_features;
      for (int m = 0; m < M; ++m) {
        float v;
        if (w.format == WeightFormat::kF32) {
          v = k.dot_f32(w.f32 + static_cast<size_t>(o) * K, x + static_cast<size_t>(m) * K, K);
        } else if (w.format == WeightFormat::kInt8) {
          v = k.dot_q8(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, xq.data() + static_cast<size_t>(m) * K,
                       xs.data() + static_cast<size_t>(m) * nb, nb);
        } else {
          v = k.dot_q4(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, xq.data() + static_cast<size_t>(m) * K,
                       xs.data() + static_cast<size_t>(m) * nb, nb);
        }
        y[static_cast<size_t>(m) * N + o] = v;
      }
    }
  });
}

void matmul(const Linear& w, const float* x, int M, float* y, ThreadPool& pool) { matmul_group({&w}, x, M, {y}, pool); }

void quantize_int8_blocks(const float* w, int out, int in, int8_t* q, float* scales) {
  int nb = in / kQuantBlock;
  for (int r = 0; r < out * nb; ++r) {
    const float* wb = w + static_cast<size_t>(r) * kQuantBlock;
    float amax = 0.f;
    for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(wb[j]));
    float scale = amax > 0 ? amax / 127.f : 1.f;
    scales[r] = scale;
    for (int j = 0; j < kQuantBlock; ++j) {
      q[static_cast<size_t>(r) * kQuantBlock + j] = static_cast<int8_t>(std::clamp(std::nearbyint(wb[j] / scale), -127.f, 127.f));
    }
  }
}

void quantize_int4_blocks(const float* w, int out, int in, uint8_t* q, float* scales) {
  int nb = in / kQuantBlock;
  for (int r = 0; r < out * nb; ++r) {
    const float* wb = w + static_cast<size_t>(r) * kQuantBlock;
    float amax = 0.f;
    for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(wb[j]));
    float scale = amax > 0 ? amax / 7.f : 1.f;
    scales[r] = scale;
    uint8_t* qb = q + static_cast<size_t>(r) * 16;
    for (int j = 0; j < 16; ++j) {
      int lo = static_cast<int>(std::clamp(std::nearbyint(wb[j] / scale), -8.f, 7.f)) + 8;
      int hi = static_cast<int>(std::clamp(std::nearbyint(wb[j + 16] / scale), -8.f, 7.f)) + 8;
      qb[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

}  // namespace optforge_rt
