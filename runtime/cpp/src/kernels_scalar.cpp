#include "kernels_internal.h"

#include <algorithm>
#include <cmath>

// The scalar reference kernels: what runs on a CPU without AVX2 (or under set_isa(Isa::kScalar)), and what
// the SIMD kernels of kernels_avx2.cpp / kernels_avx512.cpp are tested against.

namespace optforge_rt::detail {

namespace {

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

// Weight-only: dot_f32_scalar over the widened weights q * scale, the same sum in the same order.
template <class Widen>
void weight_only_rows_scalar(const Linear& w, int o0, int o1, const float* x, float* y, Widen widen) {
  const int nb = w.in_features / kQuantBlock, per = w.blocks_per_scale;
  for (int o = o0; o < o1; ++o) {
    float s = 0.f;
    for (int b = 0; b < nb; ++b) {
      const float scale = w.scales_f32[static_cast<size_t>(o) * (nb / per) + b / per];
      for (int j = 0; j < kQuantBlock; ++j) s += static_cast<float>(widen(o, b, j)) * scale * x[b * kQuantBlock + j];
    }
    y[o] = s;
  }
}

void w8_rows_scalar(const Linear& w, int o0, int o1, const float* x, float* y) {
  const int K = w.in_features;
  weight_only_rows_scalar(w, o0, o1, x, y, [&](int o, int b, int j) { return int(w.q8[static_cast<size_t>(o) * K + b * kQuantBlock + j]); });
}

void w4_rows_scalar(const Linear& w, int o0, int o1, const float* x, float* y) {
  const int K = w.in_features;
  weight_only_rows_scalar(w, o0, o1, x, y, [&](int o, int b, int j) { return int4_at(w.q4 + static_cast<size_t>(o) * K / 2 + b * 16, j); });
}

void dequantize_scalar(const Linear& w, int o0, int o1, float* out) {
  const int K = w.in_features, nb = K / kQuantBlock, per = w.blocks_per_scale;
  for (int o = o0; o < o1; ++o) {
    for (int b = 0; b < nb; ++b) {
      const float scale = w.scales_f32[static_cast<size_t>(o) * (nb / per) + b / per];
      float* ob = out + static_cast<size_t>(o - o0) * K + b * kQuantBlock;
      for (int j = 0; j < kQuantBlock; ++j) {
        const int q = w.format == WeightFormat::kInt8 ? w.q8[static_cast<size_t>(o) * K + b * kQuantBlock + j] : int4_at(w.q4 + static_cast<size_t>(o) * K / 2 + b * 16, j);
        ob[j] = static_cast<float>(q) * scale;
      }
    }
  }
}

void axpy_f32_scalar(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

// y[o] for o in [o0, o1) of token m: one dot product per row (the scalar table; AVX2 and AVX-512 have row kernels).
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

}  // namespace

const KernelTable kScalar = {dot_f32_scalar, axpy_f32_scalar, attend_by_calls<dot_f32_scalar, axpy_f32_scalar>, q8_rows_by_dot<dot_q8_scalar>, q4_rows_by_dot<dot_q4_scalar>,
                          f32_rows_by_dot<dot_f32_scalar>, w8_rows_scalar, w4_rows_scalar, dequantize_scalar, Isa::kScalar};

}  // namespace optforge_rt::detail
