#include "kernels_internal.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

// The AVX2 + FMA + F16C kernels (every function marked OF_AVX2): the fp32 dot product and axpy, the int8 /
// int4 decode GEMV (int8 activations), the weight-only decode rows and dequantization, attention and the
// activation quantizer. The dispatch (kernels.cpp) uses them only where
// detected_isa() found those instruction sets.

namespace optforge_rt::detail {

namespace {

OF_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

OF_AVX2 inline float dot_f32_avx2(const float* a, const float* b, int n) {
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

// For n a multiple of 32: the eight lane sums that dot_f32_avx2 reduces (its loop, without the tails).
OF_AVX2 inline __m256 dot_lanes_avx2(const float* a, const float* b, int n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  return _mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3));
}

// Lane j = hsum256(t[j]) bit for bit (the same additions in the same tree: ((t0 + t4) + (t2 + t6)) +
// ((t1 + t5) + (t3 + t7))), for eight vectors at once with transposing shuffles instead of eight reductions.
OF_AVX2 inline __m256 hsum8_avx2(const __m256* t) {
  __m256 u[4];  // u[i] = [lo(t[2i]) + hi(t[2i]) | lo(t[2i+1]) + hi(t[2i+1])]
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm256_add_ps(_mm256_permute2f128_ps(t[2 * i], t[2 * i + 1], 0x20), _mm256_permute2f128_ps(t[2 * i], t[2 * i + 1], 0x31));
  }
  // [s0 + s2, s1 + s3] of two vectors per 128-bit lane
  const __m256 v0 = _mm256_add_ps(_mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 v1 = _mm256_add_ps(_mm256_shuffle_ps(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  // lanes [r0 r2 r4 r6 | r1 r3 r5 r7], put back in order
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(v0, v1, _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// Rows ahead whose weights the AVX2 kernels request while these are computed (see kPrefetchRows
// in kernels_avx512.cpp).
#ifndef OF_PREFETCH_ROWS_AVX2
#define OF_PREFETCH_ROWS_AVX2 8
#endif
constexpr int kPrefetchRowsAvx2 = OF_PREFETCH_ROWS_AVX2;

// Decode GEMV on AVX2: R output rows at once share each activation load, with two accumulators per row so
// consecutive blocks do not wait on one FMA chain (a one-row, one-accumulator dot product per row was bound by
// that chain's latency and by the weight loads). The per-block scales are widened 8 blocks at a time
// (vcvtph2ps) and spread over the lanes with a permute instead of a scalar conversion per block. Every row
// runs the same instruction sequence whatever R is, so a row's result does not depend on its neighbours.

// The combined scales (weight fp16 scale x activation scale) of blocks [g, g + 8) of one row, n of them real.
// A short last group reads on into the next rows' scales where `left` (scales from s to the tensor's end) says
// 8 are there (the lanes past n are never used); otherwise it copies its n scales, never reading past the tensor.
OF_AVX2 inline __m256 scales8_avx2(const uint16_t* s, int n, size_t left, const float* xs8) {
  __m128i h;
  if (n == 8 || left >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  } else {
    uint16_t tmp[8] = {0};
    std::memcpy(tmp, s, static_cast<size_t>(n) * sizeof(uint16_t));
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
  }
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(xs8));
}

// int8 block b of R rows into acc (one accumulator per row): maddubs(|x|, sign(w, x)), |x| prepared once per
// token; |w|, |x| <= 127 keeps the int16 pair sums below saturation.
template <int R>
OF_AVX2 inline void q8_block_avx2(const int8_t* w, int K, const int8_t* x, const int8_t* xa, int b, const __m256* sc, __m256i lane, __m256* acc) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * b));
  const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + 32 * b));
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int8_t* wp = w + static_cast<size_t>(r) * K + 32 * b;
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
    const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(wv, xv)), _mm256_set1_epi16(1));
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(sc[r], lane), acc[r]);
  }
}

// Even blocks go to acc0, odd ones to acc1 (fixed by the block index, so the same for every R).
template <int R>
OF_AVX2 void q8_rows_avx2(const int8_t* w, const uint16_t* s, int K, int nb, size_t tail, const PreparedActs& a, int m, float* y) {
  const int8_t* x = a.q.data() + static_cast<size_t>(m) * a.stride;
  const int8_t* xa = a.xa.data() + static_cast<size_t>(m) * a.stride;
  const float* xs = a.xs8.data() + static_cast<size_t>(m) * a.nb8;
  __m256 acc0[R], acc1[R], sc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int g = 0; g < nb; g += 8) {
    const int n = std::min(8, nb - g);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sc[r] = scales8_avx2(s + static_cast<size_t>(r) * nb + g, n, static_cast<size_t>(R - r) * nb - g + tail, xs + g);
    int j = 0;
    for (; j + 2 <= n; j += 2) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + static_cast<size_t>(r + kPrefetchRowsAvx2) * K + 32 * (g + j)), _MM_HINT_T0);
      q8_block_avx2<R>(w, K, x, xa, g + j, sc, _mm256_set1_epi32(j), acc0);
      q8_block_avx2<R>(w, K, x, xa, g + j + 1, sc, _mm256_set1_epi32(j + 1), acc1);
    }
    if (j < n) q8_block_avx2<R>(w, K, x, xa, g + j, sc, _mm256_set1_epi32(j), acc0);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) y[r] = hsum256(_mm256_add_ps(acc0[r], acc1[r]));
}

// int4 block pair p (32 weight bytes per row) of R rows into acc: the stored nibbles q + 8 in [0, 15] are
// maddubs' unsigned operand as they are (no sign juggling); the activations come in the pair order of a.q4
// [b0 0-15 | b1 0-15 | b0 16-31 | b1 16-31], so the low nibbles of both blocks meet the first 32 bytes and the
// high nibbles the second, madd lanes 0-3 hold block b0 and 4-7 block b1, and the excess 8 * sum(x) of each
// lane is the integer a.neg4x8 adds back (exact, as the signed dot product).
template <int R>
OF_AVX2 inline void q4_pair_avx2(const uint8_t* w, int K, int nb, const int8_t* x, const int32_t* neg, int p, const __m256* sc, __m256i lane, __m256* acc) {
  const bool both = 2 * p + 1 < nb;
  const __m256i lo_x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * p));
  const __m256i hi_x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64 * p + 32));
  const __m256i nv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(neg + 8 * p));
  const __m256i nibble = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const uint8_t* wp = w + static_cast<size_t>(r) * (K / 2) + 32 * p;
    const __m256i v = both ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))
                           : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
    const __m256i lo = _mm256_and_si256(v, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, lo_x), _mm256_maddubs_epi16(hi, hi_x));  // |.| <= 2 * 2 * 15 * 127
    const __m256i d = _mm256_add_epi32(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)), nv);
    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(sc[r], lane), acc[r]);
  }
}

// Pairs alternate between acc0 and acc1 (fixed by the pair index, so the same for every R).
template <int R>
OF_AVX2 void q4_rows_avx2(const uint8_t* w, const uint16_t* s, int K, int nb, size_t tail, const PreparedActs& a, int m, float* y) {
  const int8_t* x = a.q4.data() + static_cast<size_t>(m) * a.stride;
  const int32_t* neg = a.neg4x8.data() + static_cast<size_t>(m) * a.np * 8;
  const float* xs = a.xs8.data() + static_cast<size_t>(m) * a.nb8;
  const __m256i lanes01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), two = _mm256_set1_epi32(2);
  __m256 acc0[R], acc1[R], sc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int g = 0; g < nb; g += 8) {  // 8 blocks = 4 pairs share one widening of the scales
    const int n = std::min(8, nb - g), pairs = (n + 1) / 2;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sc[r] = scales8_avx2(s + static_cast<size_t>(r) * nb + g, n, static_cast<size_t>(R - r) * nb - g + tail, xs + g);
    __m256i lane = lanes01;
    int j = 0;
    for (; j + 2 <= pairs; j += 2) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + static_cast<size_t>(r + kPrefetchRowsAvx2) * (K / 2) + 16 * (g + 2 * j)), _MM_HINT_T0);
      q4_pair_avx2<R>(w, K, nb, x, neg, g / 2 + j, sc, lane, acc0);
      lane = _mm256_add_epi32(lane, two);
      q4_pair_avx2<R>(w, K, nb, x, neg, g / 2 + j + 1, sc, lane, acc1);
      lane = _mm256_add_epi32(lane, two);
    }
    if (j < pairs) q4_pair_avx2<R>(w, K, nb, x, neg, g / 2 + j, sc, lane, acc0);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) y[r] = hsum256(_mm256_add_ps(acc0[r], acc1[r]));
}

// Weight-only decode: block b of a row widened to the floats q * scale (one rounding), columns 8c..8c+7 in w[c].
OF_AVX2 inline void widen_int8_avx2(const int8_t* row, int b, __m256 scale, __m256* w) {
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 32 * b + 8 * c));
    w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale);
  }
}

// int4: the low nibbles of the block's 16 bytes are columns 0-15, the high nibbles 16-31 (stored as q + 8).
OF_AVX2 inline void widen_int4_avx2(const uint8_t* row, int b, __m256 scale, __m256* w) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b)), nibble = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(v, nibble), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nibble);
  const __m128i half[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  const __m256i eight = _mm256_set1_epi32(8);
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) w[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(half[c]), eight)), scale);
}

// dot_f32_avx2(q * scale, x) of one row (K a multiple of 32): the same four accumulators, the same reduction.
// `s`: the row's float32 scales, one per `per` blocks.
template <bool kInt4>
OF_AVX2 float weight_only_row_avx2(const void* row, const float* s, int per, int K, const float* x) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int nb = K / kQuantBlock, block_bytes = kInt4 ? 16 : 32, row_bytes = kInt4 ? K / 2 : K;
  for (int g = 0; g < nb / per; ++g) {
    const __m256 scale = _mm256_set1_ps(s[g]);
    for (int b = g * per; b < (g + 1) * per; ++b) {
      _mm_prefetch(static_cast<const char*>(row) + b * block_bytes + kPrefetchRowsAvx2 * row_bytes, _MM_HINT_T0);
      __m256 w[4];
      if (kInt4) {
        widen_int4_avx2(static_cast<const uint8_t*>(row), b, scale, w);
      } else {
        widen_int8_avx2(static_cast<const int8_t*>(row), b, scale, w);
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[c] = _mm256_fmadd_ps(w[c], _mm256_loadu_ps(x + 32 * b + 8 * c), acc[c]);
    }
  }
  return hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

OF_AVX2 void w8_rows_avx2(const Linear& w, int o0, int o1, const float* x, float* y) {
  const int K = w.in_features, ns = K / kQuantBlock / w.blocks_per_scale;
  for (int o = o0; o < o1; ++o) y[o] = weight_only_row_avx2<false>(w.q8 + static_cast<size_t>(o) * K, w.scales_f32 + static_cast<size_t>(o) * ns, w.blocks_per_scale, K, x);
}

OF_AVX2 void w4_rows_avx2(const Linear& w, int o0, int o1, const float* x, float* y) {
  const int K = w.in_features, ns = K / kQuantBlock / w.blocks_per_scale;
  for (int o = o0; o < o1; ++o) y[o] = weight_only_row_avx2<true>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales_f32 + static_cast<size_t>(o) * ns, w.blocks_per_scale, K, x);
}

OF_AVX2 void dequantize_avx2(const Linear& w, int o0, int o1, float* out) {
  const int K = w.in_features, per = w.blocks_per_scale, ns = K / kQuantBlock / per;
  for (int o = o0; o < o1; ++o) {
    for (int g = 0; g < ns; ++g) {
      const __m256 scale = _mm256_set1_ps(w.scales_f32[static_cast<size_t>(o) * ns + g]);
      for (int b = g * per; b < (g + 1) * per; ++b) {
        __m256 v[4];
        if (w.format == WeightFormat::kInt8) {
          widen_int8_avx2(w.q8 + static_cast<size_t>(o) * K, b, scale, v);
        } else {
          widen_int4_avx2(w.q4 + static_cast<size_t>(o) * K / 2, b, scale, v);
        }
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + static_cast<size_t>(o - o0) * K + 32 * b + 8 * c, v[c]);
      }
    }
  }
}

OF_AVX2 void axpy_f32_avx2(float a, const float* x, float* y, int n) {
  const __m256 av = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// AVX2: int8 rows one at a time (a single sequential weight stream: decode is memory bound there, and two
// interleaved rows ran ~5-10% slower on one thread, measured on SmolLM2-shaped matmuls); int4 rows in pairs
// (compute bound: the pair shares each activation load, ~20% faster).
// Scales of the rows from `row` to the tensor's end (what a short scale group may read on into).
inline size_t scales_after(const Linear& w, int row, int nb) { return static_cast<size_t>(w.out_features - row) * nb; }

OF_AVX2 void q8_rows_avx2_single(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  for (int o = o0; o < o1; ++o) q8_rows_avx2<1>(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, K, nb, scales_after(w, o + 1, nb), a, m, y + o);
}

OF_AVX2 void q4_rows_avx2_pairs(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  int o = o0;
  for (; o + 2 <= o1; o += 2) q4_rows_avx2<2>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, scales_after(w, o + 2, nb), a, m, y + o);
  for (; o < o1; ++o) q4_rows_avx2<1>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, scales_after(w, o + 1, nb), a, m, y + o);
}

// AVX2: the same arithmetic with dot_f32_avx2 inlined (an indirect call per position and head cost more than
// the 64-wide dot product itself), and, where D is a multiple of 64, the output kept in eight registers per 64
// columns across all positions instead of loaded and stored by each position's axpy (the same fmas in the
// same order, so the same result).
OF_AVX2 void attend_avx2(const float* q, const float* const* k, const float* const* v, int n, int D, float scale, float* scores, float* out) {
  float max_score = -INFINITY;
  int p = 0;
  if (D % 32 == 0) {  // eight positions at a time, their horizontal sums reduced together
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; p + 8 <= n; p += 8) {
      __m256 t[8];
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) t[j] = dot_lanes_avx2(q, k[p + j], D);
      const __m256 sc = _mm256_mul_ps(hsum8_avx2(t), _mm256_set1_ps(scale));
      _mm256_storeu_ps(scores + p, sc);
      vmax = _mm256_max_ps(vmax, sc);
    }
    alignas(32) float m8[8];
    _mm256_store_ps(m8, vmax);
    for (float m : m8) max_score = std::max(max_score, m);
  }
  for (; p < n; ++p) max_score = std::max(max_score, scores[p] = dot_f32_avx2(q, k[p], D) * scale);
  float sum = 0.f;
  for (int p = 0; p < n; ++p) sum += (scores[p] = std::exp(scores[p] - max_score));
  if (D % 64 != 0) {
    std::fill(out, out + D, 0.f);
    for (int p = 0; p < n; ++p) axpy_f32_avx2(scores[p] / sum, v[p], out, D);
    return;
  }
  for (int c = 0; c < D; c += 64) {
    __m256 acc[8];  // fully unrolled so that the accumulators stay in registers
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int p = 0; p < n; ++p) {
      const __m256 a = _mm256_set1_ps(scores[p] / sum);
      const float* vp = v[p] + c;
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(a, _mm256_loadu_ps(vp + 8 * i), acc[i]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + c + 8 * i, acc[i]);
  }
}

}  // namespace

const KernelTable kAvx2 = {dot_f32_avx2, axpy_f32_avx2, attend_avx2, q8_rows_avx2_single, q4_rows_avx2_pairs,
                          f32_rows_by_dot<dot_f32_avx2>, w8_rows_avx2, w4_rows_avx2, dequantize_avx2, Isa::kAvx2};

// quantize_block (kernels.cpp) on AVX2, bit for bit: max and x * inv are exact or correctly rounded in any
// order, and vroundps in nearest mode rounds half to even as nearbyint does (under the default rounding mode).
OF_AVX2 float quantize_block_avx2(const float* xb, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(xb + 8 * i)));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float a = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256 inv = _mm256_set1_ps(a > 0 ? 127.f / a : 0.f);
  __m256i r[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // packs work within 128-bit lanes: the int32 order after both packs is 0 2 4 6 1 3 5 7 (in groups of 4).
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  return a / 127.f;
}

}  // namespace optforge_rt::detail
