#include "optforge_rt/kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "optforge_rt/errors.h"

// GCC 12's AVX-512 headers pass _mm512_undefined_*() through masked builtins (permutexvar, cvtepi32_ps,
// reduce_add) and then warn that it is uninitialized (GCC bug 105593, fixed in GCC 13): silence only that.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace optforge_rt {

namespace {

// The activations of one matmul, quantized once and shared by every output row and thread. A token's row is
// zero padded to a whole number of block pairs (64 columns) so the AVX-512 kernels never read past it.
struct PreparedActs {
  int M = 0, nb = 0, np = 0, stride = 0;  // blocks, block pairs, bytes per token row (np * 64)
  std::vector<int8_t> q;                  // (M, stride) int8, column order
  std::vector<float> xs;                  // (M, nb) per-block scales
  std::vector<int8_t> q4;                 // (M, stride) AVX-512 int4 order (see q4_rows_avx512)
  std::vector<float> pat8, pat4;          // (M, np, 16) the scale of each vpdpbusd lane's block
  std::vector<int32_t> neg8, neg4;        // (M, np, 16) minus the unsigned-weight excess of each lane
  // AVX2 (see q8_rows_avx2 / q4_rows_avx2): nb8 = nb rounded up to 8
  int nb8 = 0;
  std::vector<int8_t> xa;                 // (M, stride) |q|, maddubs' unsigned operand for int8
  std::vector<float> xs8;                 // (M, nb8) xs zero padded to whole groups of 8 blocks
  std::vector<int32_t> neg4x8;            // (M, np, 8) minus the nibble excess (8 * x) of each madd lane
};

// ------------------------------------------------------------------------------------------- scalar

float dot_f32_scalar(const float* a, const float* b, int n) {
  float s = 0.f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_q8_scalar(const int8_t* w, const uint16_t* ws, const int8_t* x, const float* xs, int nblocks) {
  float s = 0.f;
  for (int b = 0; b < nblocks; ++b) {
    int32_t acc = 0;
    for (int j = 0; j < kQuantBlock; ++j) acc += int32_t(w[b * kQuantBlock + j]) * x[b * kQuantBlock + j];
    s += f16_to_f32(ws[b]) * xs[b] * static_cast<float>(acc);
  }
  return s;
}

float dot_q4_scalar(const uint8_t* w, const uint16_t* ws, const int8_t* x, const float* xs, int nblocks) {
  float s = 0.f;
  for (int b = 0; b < nblocks; ++b) {
    int32_t acc = 0;
    const uint8_t* wb = w + b * 16;
    const int8_t* xb = x + b * kQuantBlock;
    for (int j = 0; j < 16; ++j) {
      acc += (int32_t(wb[j] & 0xF) - 8) * xb[j] + (int32_t(wb[j] >> 4) - 8) * xb[j + 16];
    }
    s += f16_to_f32(ws[b]) * xs[b] * static_cast<float>(acc);
  }
  return s;
}

// --------------------------------------------------------------------------------------------- AVX2

#define OF_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OF_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

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

// Rows ahead whose weights the AVX2 kernels request while these are computed (see kPrefetchRows below).
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
// A short last group reads on into the next row's scales where `more` says one follows (the lanes past n are
// never used); the tensor's last row copies its n scales instead, never reading past the tensor.
OF_AVX2 inline __m256 scales8_avx2(const uint16_t* s, int n, bool more, const float* xs8) {
  __m128i h;
  if (n == 8 || more) {
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
OF_AVX2 void q8_rows_avx2(const int8_t* w, const uint16_t* s, int K, int nb, bool more, const PreparedActs& a, int m, float* y) {
  const int8_t* x = a.q.data() + static_cast<size_t>(m) * a.stride;
  const int8_t* xa = a.xa.data() + static_cast<size_t>(m) * a.stride;
  const float* xs = a.xs8.data() + static_cast<size_t>(m) * a.nb8;
  __m256 acc0[R], acc1[R], sc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int g = 0; g < nb; g += 8) {
    const int n = std::min(8, nb - g);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) sc[r] = scales8_avx2(s + static_cast<size_t>(r) * nb + g, n, more || r + 1 < R, xs + g);
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
OF_AVX2 void q4_rows_avx2(const uint8_t* w, const uint16_t* s, int K, int nb, bool more, const PreparedActs& a, int m, float* y) {
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
    for (int r = 0; r < R; ++r) sc[r] = scales8_avx2(s + static_cast<size_t>(r) * nb + g, n, more || r + 1 < R, xs + g);
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

// ----------------------------------------------------------------------------------- AVX-512 + VNNI

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

template <int R>
OF_AVX512 void q8_rows_avx512(const int8_t* w, const uint16_t* s, int K, int nb, const PreparedActs& a, int m, float* y) {
  const int8_t* x = a.q.data() + static_cast<size_t>(m) * a.stride;
  const float* pat = a.pat8.data() + static_cast<size_t>(m) * a.np * 16;
  const int32_t* neg = a.neg8.data() + static_cast<size_t>(m) * a.np * 16;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int p = 0; p < a.np; ++p) {
    const bool both = 2 * p + 1 < nb;
    const __m512i xv = _mm512_loadu_si512(x + 64 * p);
    const __m512i nv = _mm512_loadu_si512(neg + 16 * p);
    const __m512 pv = _mm512_loadu_ps(pat + 16 * p);
    for (int r = 0; r < R; ++r) {
      const int8_t* wp = w + static_cast<size_t>(r) * K + 64 * p;
      _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchRows * K, _MM_HINT_T0);
      __m512i wv = both ? _mm512_loadu_si512(wp) : _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wp);
      __m512i d = _mm512_dpbusd_epi32(nv, _mm512_xor_si512(wv, flip), xv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale_pair(s + static_cast<size_t>(r) * nb + 2 * p, both, lanes, pv), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

// int4 pair p is 32 bytes: low nibbles (columns 0-15 of both blocks) then high nibbles (16-31) after the
// unpack, so the activations are prepared in that order: [b0 0-15 | b1 0-15 | b0 16-31 | b1 16-31].
template <int R>
OF_AVX512 void q4_rows_avx512(const uint8_t* w, const uint16_t* s, int K, int nb, const PreparedActs& a, int m, float* y) {
  const int8_t* x = a.q4.data() + static_cast<size_t>(m) * a.stride;
  const float* pat = a.pat4.data() + static_cast<size_t>(m) * a.np * 16;
  const int32_t* neg = a.neg4.data() + static_cast<size_t>(m) * a.np * 16;
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int p = 0; p < a.np; ++p) {
    const bool both = 2 * p + 1 < nb;
    const __m512i xv = _mm512_loadu_si512(x + 64 * p);
    const __m512i nv = _mm512_loadu_si512(neg + 16 * p);
    const __m512 pv = _mm512_loadu_ps(pat + 16 * p);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wp = w + static_cast<size_t>(r) * (K / 2) + 32 * p;
      if (p % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(wp) + kPrefetchRows * (K / 2), _MM_HINT_T0);
      __m256i v = both ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp))
                       : _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)), 0);
      __m512i wv = _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_and_si256(v, nibble)), _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble), 1);
      __m512i d = _mm512_dpbusd_epi32(nv, wv, xv);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), scale_pair(s + static_cast<size_t>(r) * nb + 2 * p, both, lanes, pv), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = _mm512_reduce_add_ps(acc[r]);
}

// ------------------------------------------------------------------------------------------ dispatch

void axpy_f32_scalar(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

OF_AVX2 void axpy_f32_avx2(float a, const float* x, float* y, int n) {
  const __m256 av = _mm256_set1_ps(a);
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

OF_AVX512 inline void axpy_f32_avx512(float a, const float* x, float* y, int n) {
  const __m512 av = _mm512_set1_ps(a);
  int i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// y[o] for o in [o0, o1) of token m: one dot product per row (scalar and AVX2).
template <float (*Dot)(const int8_t*, const uint16_t*, const int8_t*, const float*, int)>
void q8_rows_by_dot(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  for (int o = o0; o < o1; ++o) {
    y[o] = Dot(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, a.q.data() + static_cast<size_t>(m) * a.stride,
               a.xs.data() + static_cast<size_t>(m) * nb, nb);
  }
}

template <float (*Dot)(const uint8_t*, const uint16_t*, const int8_t*, const float*, int)>
void q4_rows_by_dot(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  for (int o = o0; o < o1; ++o) {
    y[o] = Dot(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, a.q.data() + static_cast<size_t>(m) * a.stride,
               a.xs.data() + static_cast<size_t>(m) * nb, nb);
  }
}

// Batches (prefill) take four rows at a time, sharing each activation load; a single token (decode) takes
// rows one by one: there, four interleaved weight streams ran 30% slower (memory bound, measured on SmolLM2
// int8: 67 vs 92-97 tok/s on one thread). A row's result is bit-identical either way.
OF_AVX512 void q8_rows_wide(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  int o = o0;
  for (; a.M > 1 && o + 4 <= o1; o += 4) q8_rows_avx512<4>(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
  for (; o < o1; ++o) q8_rows_avx512<1>(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
}

OF_AVX512 void q4_rows_wide(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  int o = o0;
  for (; a.M > 1 && o + 4 <= o1; o += 4) q4_rows_avx512<4>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
  for (; o < o1; ++o) q4_rows_avx512<1>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, a, m, y + o);
}

// AVX2: int8 rows one at a time (a single sequential weight stream: decode is memory bound there, and two
// interleaved rows ran ~5-10% slower on one thread, measured on SmolLM2-shaped matmuls); int4 rows in pairs
// (compute bound: the pair shares each activation load, ~20% faster).
OF_AVX2 void q8_rows_avx2_single(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  for (int o = o0; o < o1; ++o) q8_rows_avx2<1>(w.q8 + static_cast<size_t>(o) * K, w.scales + static_cast<size_t>(o) * nb, K, nb, o + 1 < w.out_features, a, m, y + o);
}

OF_AVX2 void q4_rows_avx2_pairs(const Linear& w, int o0, int o1, const PreparedActs& a, int m, float* y) {
  const int K = w.in_features, nb = a.nb;
  int o = o0;
  for (; o + 2 <= o1; o += 2) q4_rows_avx2<2>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, o + 2 < w.out_features, a, m, y + o);
  for (; o < o1; ++o) q4_rows_avx2<1>(w.q4 + static_cast<size_t>(o) * K / 2, w.scales + static_cast<size_t>(o) * nb, K, nb, o + 1 < w.out_features, a, m, y + o);
}

// The attention of one head over its cached positions (see kernels.h), through the ISA's dot / axpy.
template <float (*Dot)(const float*, const float*, int), void (*Axpy)(float, const float*, float*, int)>
void attend_by_calls(const float* q, const float* const* k, const float* const* v, int n, int D, float scale, float* scores, float* out) {
  float max_score = -INFINITY;
  for (int p = 0; p < n; ++p) max_score = std::max(max_score, scores[p] = Dot(q, k[p], D) * scale);
  float sum = 0.f;
  for (int p = 0; p < n; ++p) sum += (scores[p] = std::exp(scores[p] - max_score));
  std::fill(out, out + D, 0.f);
  for (int p = 0; p < n; ++p) Axpy(scores[p] / sum, v[p], out, D);
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

// ------------------------------------------------------------------------------------------ dispatch

using RowsFn = void (*)(const Linear&, int, int, const PreparedActs&, int, float*);

struct KernelTable {
  float (*dot_f32)(const float*, const float*, int);
  void (*axpy_f32)(float, const float*, float*, int);
  void (*attend)(const float*, const float* const*, const float* const*, int, int, float, float*, float*);
  RowsFn rows_q8;
  RowsFn rows_q4;
  Isa isa;  // which of PreparedActs' ISA-specific fields the rows kernels read
};

const KernelTable kScalar = {dot_f32_scalar, axpy_f32_scalar, attend_by_calls<dot_f32_scalar, axpy_f32_scalar>, q8_rows_by_dot<dot_q8_scalar>, q4_rows_by_dot<dot_q4_scalar>, Isa::kScalar};
const KernelTable kAvx2 = {dot_f32_avx2, axpy_f32_avx2, attend_avx2, q8_rows_avx2_single, q4_rows_avx2_pairs, Isa::kAvx2};
const KernelTable kAvx512 = {dot_f32_avx512, axpy_f32_avx512, attend_avx512, q8_rows_wide, q4_rows_wide, Isa::kAvx512};

Isa g_isa = detected_isa();

const KernelTable& table() { return g_isa == Isa::kAvx512 ? kAvx512 : g_isa == Isa::kAvx2 ? kAvx2 : kScalar; }

// One block of 32 floats -> int8 (symmetric, round to nearest even); returns the block's scale.
float quantize_block(const float* xb, int8_t* q) {
  float amax = 0.f;
  for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(xb[j]));
  float inv = amax > 0 ? 127.f / amax : 0.f;
  for (int j = 0; j < kQuantBlock; ++j) q[j] = static_cast<int8_t>(std::nearbyint(xb[j] * inv));
  return amax / 127.f;
}

// The same on AVX2, bit for bit: max and x * inv are exact or correctly rounded in any order, and vroundps
// in nearest mode rounds half to even as nearbyint does (under the default rounding mode).
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

// The per-lane tables of one token for the AVX-512 kernels: lane l of pair p covers bytes 4l..4l+3 of the
// pair's 64 activation bytes; block_of(l) says which of the pair's two blocks those bytes belong to.
void prepare_lanes(const int8_t* x, const float* xs, int nb, int np, int excess, int (*block_of)(int), float* pat, int32_t* neg) {
  for (int p = 0; p < np; ++p) {
    for (int l = 0; l < 16; ++l) {
      int b = 2 * p + block_of(l);
      const int8_t* xl = x + 64 * p + 4 * l;
      pat[16 * p + l] = b < nb ? xs[b] : 0.f;
      neg[16 * p + l] = -excess * (xl[0] + xl[1] + xl[2] + xl[3]);
    }
  }
}

// x (M, K) float -> the PreparedActs the active ISA's kernels read, for the weight formats in use.
void prepare_acts(const float* x, int M, int K, bool need8, bool need4, Isa isa, PreparedActs& a) {
  a.M = M;
  a.nb = K / kQuantBlock;
  a.np = (a.nb + 1) / 2;
  a.stride = a.np * 64;
  a.nb8 = (a.nb + 7) / 8 * 8;
  a.q.assign(static_cast<size_t>(M) * a.stride, 0);
  a.xs.resize(static_cast<size_t>(M) * a.nb);
  for (int m = 0; m < M; ++m) {
    for (int b = 0; b < a.nb; ++b) {
      const float* xb = x + size_t(m) * K + b * kQuantBlock;
      int8_t* qb = &a.q[size_t(m) * a.stride + b * kQuantBlock];
      a.xs[size_t(m) * a.nb + b] = isa == Isa::kScalar ? quantize_block(xb, qb) : quantize_block_avx2(xb, qb);
    }
  }
  if (isa == Isa::kScalar) return;
  if (need4) {  // both SIMD int4 kernels read the pair order
    a.q4.resize(a.q.size());
    for (int m = 0; m < M; ++m) {
      const int8_t* src = &a.q[size_t(m) * a.stride];
      int8_t* dst = &a.q4[size_t(m) * a.stride];
      for (int p = 0; p < a.np; ++p) {  // [b0 0-15 | b1 0-15 | b0 16-31 | b1 16-31]
        for (int quarter = 0; quarter < 4; ++quarter) {
          std::memcpy(dst + 64 * p + 16 * quarter, src + 64 * p + 32 * (quarter % 2) + 16 * (quarter / 2), 16);
        }
      }
    }
  }
  if (isa == Isa::kAvx2) {
    a.xs8.assign(static_cast<size_t>(M) * a.nb8, 0.f);
    for (int m = 0; m < M; ++m) std::memcpy(&a.xs8[size_t(m) * a.nb8], &a.xs[size_t(m) * a.nb], a.nb * sizeof(float));
    if (need8) {
      a.xa.resize(a.q.size());
      for (size_t i = 0; i < a.q.size(); ++i) a.xa[i] = static_cast<int8_t>(std::abs(a.q[i]));  // |q| <= 127
    }
    if (need4) {  // madd lane l of pair p sums pair-order bytes 4l..4l+3 and 32+4l..32+4l+3
      a.neg4x8.resize(static_cast<size_t>(M) * a.np * 8);
      for (int m = 0; m < M; ++m) {
        for (int p = 0; p < a.np; ++p) {
          const int8_t* xp = &a.q4[size_t(m) * a.stride + 64 * p];
          for (int l = 0; l < 8; ++l) {
            int sum = 0;
            for (int i = 0; i < 4; ++i) sum += xp[4 * l + i] + xp[32 + 4 * l + i];
            a.neg4x8[(size_t(m) * a.np + p) * 8 + l] = -8 * sum;
          }
        }
      }
    }
    return;
  }
  const size_t lanes = static_cast<size_t>(M) * a.np * 16;
  if (need8) {
    a.pat8.resize(lanes);
    a.neg8.resize(lanes);
    for (int m = 0; m < M; ++m) {
      prepare_lanes(&a.q[size_t(m) * a.stride], &a.xs[size_t(m) * a.nb], a.nb, a.np, 128, [](int l) { return l / 8; },
                    &a.pat8[size_t(m) * a.np * 16], &a.neg8[size_t(m) * a.np * 16]);
    }
  }
  if (need4) {
    a.pat4.resize(lanes);
    a.neg4.resize(lanes);
    for (int m = 0; m < M; ++m) {
      prepare_lanes(&a.q4[size_t(m) * a.stride], &a.xs[size_t(m) * a.nb], a.nb, a.np, 8, [](int l) { return (l / 4) % 2; },
                    &a.pat4[size_t(m) * a.np * 16], &a.neg4[size_t(m) * a.np * 16]);
    }
  }
}

}  // namespace

size_t Linear::weight_bytes() const {
  size_t n = static_cast<size_t>(out_features) * in_features;
  size_t scales_bytes = static_cast<size_t>(out_features) * (in_features / kQuantBlock) * sizeof(uint16_t);
  switch (format) {
    case WeightFormat::kF32: return n * 4;
    case WeightFormat::kInt8: return n + scales_bytes;
    case WeightFormat::kInt4: return n / 2 + scales_bytes;
  }
  return 0;
}

Isa detected_isa() {
  __builtin_cpu_init();
  // F16C widens the fp16 weight scales; every AVX2 CPU made has it, but it is a separate CPUID bit.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512vnni")) {
    return Isa::kAvx512;
  }
  if (avx2) return Isa::kAvx2;
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

void axpy_f32(float a, const float* x, float* y, int n) { table().axpy_f32(a, x, y, n); }

void attend(const float* q, const float* const* k, const float* const* v, int n, int D, float scale, float* scores, float* out) {
  table().attend(q, k, v, n, D, scale, scores, out);
}

void matmul_group(const std::vector<const Linear*>& group, const float* x, int M, const std::vector<float*>& ys, ThreadPool& pool) {
  constexpr int kMaxGroup = 4;
  const int K = group[0]->in_features;
  const int G = static_cast<int>(group.size());
  if (G > kMaxGroup || ys.size() != group.size()) throw std::invalid_argument("matmul_group: 1 to 4 Linear layers, one output each");
  int starts[kMaxGroup + 1] = {0};
  bool need8 = false, need4 = false;
  for (int g = 0; g < G; ++g) {
    if (group[g]->in_features != K) throw std::invalid_argument("matmul_group: Linear layers of one group need the same in_features");
    starts[g + 1] = starts[g] + group[g]->out_features;
    need8 |= group[g]->format == WeightFormat::kInt8;
    need4 |= group[g]->format == WeightFormat::kInt4;
  }
  const KernelTable& k = table();
  // Reused across calls (no allocation once grown). Bound to a reference: inside the lambda the name of a
  // thread_local would mean each worker's own, empty copy.
  static thread_local PreparedActs scratch;
  PreparedActs& acts = scratch;
  if (need8 || need4) prepare_acts(x, M, K, need8, need4, k.isa, acts);
  // Work is handed out in tiles of 4 rows (the AVX-512 kernels' height); a tile never straddles two Linears'
  // boundary badly: the rows on each side are computed by that Linear, one kernel call per side.
  constexpr int kTile = 4;
  const int total = starts[G];
  pool.parallel_for((total + kTile - 1) / kTile, [&](int begin, int end) {
    const int row_end = std::min(total, end * kTile);
    for (int g = 0; g < G; ++g) {
      const Linear& w = *group[g];
      const int o_begin = std::max(begin * kTile, starts[g]) - starts[g], o_end = std::min(row_end, starts[g + 1]) - starts[g];
      for (int o = o_begin; o < o_end; o += kTile) {
        const int tile_end = std::min(o_end, o + kTile);
        for (int m = 0; m < M; ++m) {
          float* y = ys[g] + static_cast<size_t>(m) * w.out_features;
          if (w.format == WeightFormat::kInt8) {
            k.rows_q8(w, o, tile_end, acts, m, y);
          } else if (w.format == WeightFormat::kInt4) {
            k.rows_q4(w, o, tile_end, acts, m, y);
          } else {
            for (int r = o; r < tile_end; ++r) y[r] = k.dot_f32(w.f32 + static_cast<size_t>(r) * K, x + static_cast<size_t>(m) * K, K);
          }
        }
      }
    }
  });
}

void matmul(const Linear& w, const float* x, int M, float* y, ThreadPool& pool) { matmul_group({&w}, x, M, {y}, pool); }

float f16_to_f32(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

uint16_t f32_to_f16(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}

namespace {

// A block's scale amax / qmax rounded to fp16; 1 where that is 0 (an all-zero block, or one so small that
// its scale underflows: its weights then quantize to 0), as the pack pass does.
uint16_t block_scale_f16(const float* wb, float qmax) {
  float amax = 0.f;
  for (int j = 0; j < kQuantBlock; ++j) amax = std::max(amax, std::fabs(wb[j]));
  const uint16_t h = f32_to_f16(amax / qmax);
  if (!std::isfinite(f16_to_f32(h))) throw std::invalid_argument("quantize: a block's scale amax / qmax overflows fp16 (> 65504)");
  return f16_to_f32(h) > 0.f ? h : f32_to_f16(1.f);
}

}  // namespace

void quantize_int8_blocks(const float* w, int out, int in, int8_t* q, uint16_t* scales) {
  int nb = in / kQuantBlock;
  for (int r = 0; r < out * nb; ++r) {
    const float* wb = w + static_cast<size_t>(r) * kQuantBlock;
    scales[r] = block_scale_f16(wb, 127.f);
    const float scale = f16_to_f32(scales[r]);
    for (int j = 0; j < kQuantBlock; ++j) {
      q[static_cast<size_t>(r) * kQuantBlock + j] = static_cast<int8_t>(std::clamp(std::nearbyint(wb[j] / scale), -127.f, 127.f));
    }
  }
}

void quantize_int4_blocks(const float* w, int out, int in, uint8_t* q, uint16_t* scales) {
  int nb = in / kQuantBlock;
  for (int r = 0; r < out * nb; ++r) {
    const float* wb = w + static_cast<size_t>(r) * kQuantBlock;
    scales[r] = block_scale_f16(wb, 7.f);
    const float scale = f16_to_f32(scales[r]);
    uint8_t* qb = q + static_cast<size_t>(r) * 16;
    for (int j = 0; j < 16; ++j) {
      int lo = static_cast<int>(std::clamp(std::nearbyint(wb[j] / scale), -8.f, 7.f)) + 8;
      int hi = static_cast<int>(std::clamp(std::nearbyint(wb[j + 16] / scale), -8.f, 7.f)) + 8;
      qb[j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
}

}  // namespace optforge_rt
