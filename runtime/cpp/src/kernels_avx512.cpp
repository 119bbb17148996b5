#include "kernels_internal.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

// The AVX-512 (F, BW, VL) + VNNI kernels (every function marked OF_AVX512): the fp32 dot product and axpy,
// the int8 / int4 GEMV / GEMM rows (int8 activations), the weight-only decode rows and dequantization, and attention. The dispatch (kernels.cpp) uses them only where
// detected_isa() found those instruction sets.

// GCC 12's AVX-512 headers pass _mm512_undefined_*() through masked builtins (permutexvar, cvtepi32_ps,
// reduce_add) and then warn that it is uninitialized (GCC bug 105593, fixed in GCC 13): silence only that.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace optforge_rt::detail {

namespace {

OF_AVX512 inline float dot_f32_avx512(const float* a, const float* b, int n) {
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

// Four rows x two tokens of an fp32 matmul, each output bit-identical to dot_f32_avx512 (the same two
// accumulators over the same columns, the same reduction): each weight vector loaded feeds both tokens and
// each activation vector all four rows, 12 loads per 16 FMAs where one dot product at a time needs 32.
OF_AVX512 inline void f32_tile_4x2(const float* w, int K, const float* x, float* y, int ldy) {
  __m512 acc0[4][2], acc1[4][2];  // [row][token]: even and odd 16-column chunks, as dot_f32_avx512's acc0, acc1
#pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) acc0[r][0] = acc0[r][1] = acc1[r][0] = acc1[r][1] = _mm512_setzero_ps();
  const float* x1 = x + K;
  int i = 0;
  for (; i + 32 <= K; i += 32) {
    const __m512 a0 = _mm512_loadu_ps(x + i), a1 = _mm512_loadu_ps(x + i + 16);
    const __m512 b0 = _mm512_loadu_ps(x1 + i), b1 = _mm512_loadu_ps(x1 + i + 16);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512 w0 = _mm512_loadu_ps(w + static_cast<size_t>(r) * K + i), w1 = _mm512_loadu_ps(w + static_cast<size_t>(r) * K + i + 16);
      acc0[r][0] = _mm512_fmadd_ps(w0, a0, acc0[r][0]);
      acc1[r][0] = _mm512_fmadd_ps(w1, a1, acc1[r][0]);
      acc0[r][1] = _mm512_fmadd_ps(w0, b0, acc0[r][1]);
      acc1[r][1] = _mm512_fmadd_ps(w1, b1, acc1[r][1]);
    }
  }
  for (; i + 16 <= K; i += 16) {
    const __m512 a0 = _mm512_loadu_ps(x + i), b0 = _mm512_loadu_ps(x1 + i);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512 w0 = _mm512_loadu_ps(w + static_cast<size_t>(r) * K + i);
      acc0[r][0] = _mm512_fmadd_ps(w0, a0, acc0[r][0]);
      acc0[r][1] = _mm512_fmadd_ps(w0, b0, acc0[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float* wr = w + static_cast<size_t>(r) * K;
    for (int t = 0; t < 2; ++t) {
      const float* xt = x + static_cast<size_t>(t) * K;
      float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][t], acc1[r][t]));
      for (int j = i; j < K; ++j) s += wr[j] * xt[j];
      y[static_cast<size_t>(t) * ldy + r] = s;
    }
  }
}

// fp32 rows [o0, o1) for M tokens (prefill): 4 x 2 tiles, the leftover rows and tokens by dot_f32_avx512,
// so every output equals the decode path's dot product bit for bit whatever the batch.
OF_AVX512 void f32_rows_avx512(const Linear& w, int o0, int o1, const float* x, int M, float* y, int ldy) {
  const int K = w.in_features;
  auto dot = [&](int o, int m) {
    y[static_cast<size_t>(m) * ldy + o] = dot_f32_avx512(w.f32 + static_cast<size_t>(o) * K, x + static_cast<size_t>(m) * K, K);
  };
  int o = o0;
  for (; o + 4 <= o1; o += 4) {
    int m = 0;
    for (; m + 2 <= M; m += 2) f32_tile_4x2(w.f32 + static_cast<size_t>(o) * K, K, x + static_cast<size_t>(m) * K, y + static_cast<size_t>(m) * ldy + o, ldy);
    for (; m < M; ++m)
      for (int r = o; r < o + 4; ++r) dot(r, m);
  }
  for (; o < o1; ++o)
    for (int m = 0; m < M; ++m) dot(o, m);
}

// Decode GEMV on AVX-512: R output rows at once share each activation load, and each 64-byte step covers two
// blocks in one 512-bit vpdpbusd. vpdpbusd multiplies unsigned by signed bytes, so the weights are made
// unsigned (int8: w ^ 0x80 = w + 128; int4: the stored nibble q + 8) and the excess, C * sum(x) per lane with
// C = 128 or 8, is the accumulator's starting value (prepared once per token, shared by all rows). Every row
// runs the same instruction sequence whatever R is, so a row's result does not depend on its neighbours.

// The fp16 scales of a row's block pair (a lone last block reads only its own) widened by vcvtph2ps and
// spread over the lanes of their blocks, times the token's per-lane activation scales.
OF_AVX512 inline __m512 scale_pair(const uint16_t* s, bool both, __m512i lanes, __m512 xs) {
  uint32_t pair = s[0];
  if (both) std::memcpy(&pair, s, 4);
  const __m128 two = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(pair)));
  return _mm512_mul_ps(_mm512_permutexvar_ps(lanes, _mm512_zextps128_ps512(two)), xs);
}

// Rows ahead whose weights are requested while these are computed: the hardware prefetcher alone left the
// decode GEMV waiting on memory (perf showed the weight load as the stall). A prefetch never faults, so
// reaching past the matrix's end is harmless.
#ifndef OF_PREFETCH_ROWS
#define OF_PREFETCH_ROWS 8
#endif
constexpr int kPrefetchRows = OF_PREFETCH_ROWS;

// What the int8 and int4 row kernels differ in: their prepared activations, which lanes a block pair's two
// scales cover, and how a pair of blocks of one row becomes 64 unsigned weight bytes for vpdpbusd.
struct Int8Rows {
  using Weight = int8_t;
  static const std::vector<int8_t>& x(const PreparedActs& a) { return a.q; }
  static const std::vector<float>& pat(const PreparedActs& a) { return a.pat8; }
  static const std::vector<int32_t>& neg(const PreparedActs& a) { return a.neg8; }
  static constexpr int row_bytes(int K) { return K; }
  OF_AVX512 static __m512i lanes() { return _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0); }
  OF_AVX512 static __m512i pair(const int8_t* row, int K, int p, bool both) {
    const int8_t* wp = row + 64 * p;
    _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchRows * K, _MM_HINT_T0);
    const __m512i wv = both ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wp);
    return _mm512_xor_si512(wv, _mm512_set1_epi8(static_cast<char>(0x80)));
  }
};

// int4 pair p is 32 bytes: low nibbles (columns 0-15 of both blocks) then high nibbles (16-31) after the
// unpack, so the activations are prepared in that order: [b0 0-15 | b1 0-15 | b0 16-31 | b1 16-31].
struct Int4Rows {
  using Weight = uint8_t;
  static const std::vector<int8_t>& x(const PreparedActs& a) { return a.q4; }
  static const std::vector<float>& pat(const PreparedActs& a) { return a.pat4; }
  static const std::vector<int32_t>& neg(const PreparedActs& a) { return a.neg4; }
  static constexpr int row_bytes(int K) { return K / 2; }
  OF_AVX512 static __m512i lanes() { return _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0); }
  OF_AVX512 static __m512i pair(const uint8_t* row, int K, int p, bool both) {
    const uint8_t* wp = row + 32 * p;
    if (p % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchRows * (K / 2), _MM_HINT_T0);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i v = both ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))
                           : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)), 0);
    return _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_and_si256(v, nibble)), _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), 1);
  }
};

template <int R, class Fmt>
OF_AVX512 void rows_avx512(const typename Fmt::Weight* w, const uint16_t* s, int K, int nb, const PreparedActs& a, int m, float* y) {
  const int8_t* x = Fmt::x(a).data() + static_cast<size_t>(m) * a.stride;
  const float* pat = Fmt::pat(a).data() + static_cast<size_t>(m) * a.np * 16;
  const int32_t* neg = Fmt::neg(a).data() + static_cast<size_t>(m) * a.np * 16;
  const __m512i lanes = Fmt::lanes();
  __m512 acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int p = 0; p < a.np; ++p) {
    const bool both = 2 * p + 1 < nb;
    const __m512i xv = _mm512_loadu_si512(x + 64 * p);
    const __m512i nv = _mm512_loadu_si512(neg + 16 * p);
    const __m512 pv = _mm512_loadu_ps(pat + 16 * p);
    // unrolled, the accumulators stay in registers (as a loop, GCC kept them in memory: a store and a reload
    // on every fma's dependency chain, the hottest instructions of int8 prefill in perf)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512i d = _mm512_dpbusd_epi32(nv, Fmt::pair(w + static_cast<size_t>(r) * Fmt::row_bytes(K), K, p, both), xv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale_pair(s + static_cast<size_t>(r) * nb + 2 * p, both, lanes, pv), acc[r]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

// Weight-only decode: the 32 weights of block b of a row widened to the floats q * scale (one rounding) in two
// vectors, columns 0-15 and 16-31. int8: sign-extended bytes; int4: the low nibbles are columns 0-15, the high 16-31.
struct Int8Widen {
  using Weight = int8_t;
  static constexpr int row_bytes(int K) { return K; }
  OF_AVX512 static void widen(const int8_t* row, int b, __m512 scale, __m512* lo, __m512* hi) {
    const __m128i* p = reinterpret_cast<const __m128i*>(row + 32 * b);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p))), scale);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1))), scale);
  }
};

struct Int4Widen {
  using Weight = uint8_t;
  static constexpr int row_bytes(int K) { return K / 2; }
  OF_AVX512 static void widen(const uint8_t* row, int b, __m512 scale, __m512* lo, __m512* hi) {
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b)));
    const __m512i nibble = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
    *lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(u, nibble), eight)), scale);
    *hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(u, 4), eight)), scale);
  }
};

// dot_f32_avx512(q * scale, x) of one row (K a multiple of 32): columns 0-15 of each 32 into acc0, 16-31 into
// acc1, the same reduction; the weights are streamed once, so the rows ahead are prefetched. `s`: the row's
// float32 scales, one per `per` blocks.
template <class Fmt>
OF_AVX512 float weight_only_row_avx512(const typename Fmt::Weight* row, const float* s, int per, int K, const float* x) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int nb = K / kQuantBlock;
  for (int g = 0; g < nb / per; ++g) {
    const __m512 scale = _mm512_set1_ps(s[g]);
    for (int b = g * per; b < (g + 1) * per; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * Fmt::row_bytes(kQuantBlock)) + kPrefetchRows * Fmt::row_bytes(K), _MM_HINT_T0);
      __m512 lo, hi;
      Fmt::widen(row, b, scale, &lo, &hi);
      acc0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + 32 * b), acc0);
      acc1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 32 * b + 16), acc1);
    }
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

OF_AVX512 void w8_rows_avx512(const Linear& w, int o0, int o1, const float* x, float* y) {
  const int K = w.in_features, ns = K / kQuantBlock / w.blocks_per_scale;
  for (int o = o0; o < o1; ++o) {
    y[o] = weight_only_row_avx512<Int8Widen>(w.q8 + static_cast<size_t>(o) * K, w.scales_f32 + static_cast<size_t>(o) * ns, w.blocks_per_scale, K, x);
  }
}

OF_AVX512 void w4_rows_avx512(const Linear& w, int o0, int o1, const float* x, float* y) {
  const int K = w.in_features, ns = K / kQuantBlock / w.blocks_per_scale;
  for (int o = o0; o < o1; ++o) {
    y[o] = weight_only_row_avx512<Int4Widen>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales_f32 + static_cast<size_t>(o) * ns, w.blocks_per_scale, K, x);
  }
}

OF_AVX512 void dequantize_avx512(const Linear& w, int o0, int o1, float* out) {
  const int K = w.in_features, per = w.blocks_per_scale, ns = K / kQuantBlock / per;
  for (int o = o0; o < o1; ++o) {
    for (int g = 0; g < ns; ++g) {
      const __m512 scale = _mm512_set1_ps(w.scales_f32[static_cast<size_t>(o) * ns + g]);
      for (int b = g * per; b < (g + 1) * per; ++b) {
        __m512 lo, hi;
        if (w.format == WeightFormat::kInt8) {
          Int8Widen::widen(w.q8 + static_cast<size_t>(o) * K, b, scale, &lo, &hi);
        } else {
          Int4Widen::widen(w.q4 + static_cast<size_t>(o) * K / 2, b, scale, &lo, &hi);
        }
        float* ob = out + static_cast<size_t>(o - o0) * K + 32 * b;
        _mm512_storeu_ps(ob, lo);
        _mm512_storeu_ps(ob + 16, hi);
      }
    }
  }
}

OF_AVX512 inline void axpy_f32_avx512(float a, const float* x, float* y, int n) {
  const __m512 av = _mm512_set1_ps(a);
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// Batches (prefill) take four rows at a time, sharing each activation load; a single token (decode) takes
// rows one by one: there, four interleaved weight streams ran 30% slower (memory bound, measured on SmolLM2
// int8: 67 vs 92-97 tok/s on one thread). A row's result is bit-identical either way.
OF_AVX512 void q8_rows_wide(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  int o = o0;
  for (; a.M > 1 && o + 4 <= o1; o += 4) rows_avx512<4, Int8Rows>(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
  for (; o < o1; ++o) rows_avx512<1, Int8Rows>(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
}

OF_AVX512 void q4_rows_wide(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  int o = o0;
  for (; a.M > 1 && o + 4 <= o1; o += 4) rows_avx512<4, Int4Rows>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
  for (; o < o1; ++o) rows_avx512<1, Int4Rows>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
}

// AVX-512: dot_f32_avx512 inlined, and the output kept in four registers per 64 columns across all positions
// where D is a multiple of 64 (the same fmas in the same order as axpy_f32_avx512).
OF_AVX512 void attend_avx512(const float* q, const float* const* k, const float* const* v, int n, int D, float scale, float* scores, float* out) {
  float max_score = -INFINITY;
  for (int p = 0; p < n; ++p) max_score = std::max(max_score, scores[p] = dot_f32_avx512(q, k[p], D) * scale);
  float sum = 0.f;
  for (int p = 0; p < n; ++p) sum += (scores[p] = std::exp(scores[p] - max_score));
  if (D % 64 != 0) {
    std::fill(out, out + D, 0.f);
    for (int p = 0; p < n; ++p) axpy_f32_avx512(scores[p] / sum, v[p], out, D);
    return;
  }
  for (int c = 0; c < D; c += 64) {
    __m512 acc[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[i] = _mm512_setzero_ps();
    for (int p = 0; p < n; ++p) {
      const __m512 a = _mm512_set1_ps(scores[p] / sum);
      const float* vp = v[p] + c;
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_fmadd_ps(a, _mm512_loadu_ps(vp + 16 * i), acc[i]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + c + 16 * i, acc[i]);
  }
}

}  // namespace

const KernelTable kAvx512 = {dot_f32_avx512, axpy_f32_avx512, attend_avx512, q8_rows_wide, q4_rows_wide, f32_rows_avx512,
                            w8_rows_avx512, w4_rows_avx512, dequantize_avx512, Isa::kAvx512};

}  // namespace optforge_rt::detail
