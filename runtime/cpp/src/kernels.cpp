#include "optforge_rt/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels_internal.h"
#include "optforge_rt/errors.h"

// The dispatch: which ISA's kernel table runs, the activation preparation (quantized once per matmul for the
// Linears with int8 activations), the weight-only batches, the public API of kernels.h, fp16 conversion and
// the weight quantizers. The kernels themselves are in
// kernels_scalar.cpp, kernels_avx2.cpp and kernels_avx512.cpp (their tables: kernels_internal.h).

namespace optforge_rt {

using namespace detail;

namespace {

// ------------------------------------------------------------------------------------------ dispatch

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

// Weight-only rows [o0, o1) for M tokens of x (M, K) into y[m * ldy + o]. One token widens the weights in
// registers (rows_w8 / rows_w4); a batch dequantizes the tile once into the same floats and runs the fp32 kernel
// over all its tokens. Both give the fp32 matmul of q * scale, so a token's result does not depend on its batch.
void weight_only_rows(const KernelTable& k, const Linear& w, int o0, int o1, const float* x, int M, float* y, int ldy) {
  if (M == 1) {
    (w.format == WeightFormat::kInt8 ? k.rows_w8 : k.rows_w4)(w, o0, o1, x, y);
    return;
  }
  static thread_local std::vector<float> tile;  // each worker's own
  tile.resize(static_cast<size_t>(o1 - o0) * w.in_features);
  k.dequantize(w, o0, o1, tile.data());
  Linear dense;
  dense.out_features = o1 - o0;
  dense.in_features = w.in_features;
  dense.f32 = tile.data();
  k.rows_f32(dense, 0, o1 - o0, x, M, y + o0, ldy);
}

}  // namespace

size_t Linear::weight_bytes() const {
  size_t n = static_cast<size_t>(out_features) * in_features;
  const size_t nb = static_cast<size_t>(in_features / kQuantBlock);
  size_t scales_bytes = activations == Activations::kF32 ? out_features * (nb / blocks_per_scale) * sizeof(float) : out_features * nb * sizeof(uint16_t);
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
    const bool int8_acts = group[g]->activations == Activations::kInt8;
    need8 |= int8_acts && group[g]->format == WeightFormat::kInt8;
    need4 |= int8_acts && group[g]->format == WeightFormat::kInt4;
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
  // Long prefills go in chunks of tokens whose activations stay in L2 while every row tile reads them (a
  // 1,024-token batch would stream them from L3 once per tile); each output is the same with or without chunks.
  const int chunk = std::max(2, static_cast<int>((size_t{512} << 10) / (static_cast<size_t>(K) * sizeof(float))) & ~1);
  for (int m0 = 0; m0 < M; m0 += chunk) {
    const int m1 = std::min(M, m0 + chunk);
    pool.parallel_for((total + kTile - 1) / kTile, [&](int begin, int end) {
      const int row_end = std::min(total, end * kTile);
      for (int g = 0; g < G; ++g) {
        const Linear& w = *group[g];
        const int o_begin = std::max(begin * kTile, starts[g]) - starts[g], o_end = std::min(row_end, starts[g + 1]) - starts[g];
        for (int o = o_begin; o < o_end; o += kTile) {
          const int tile_end = std::min(o_end, o + kTile);
          if (w.format == WeightFormat::kF32) {
            k.rows_f32(w, o, tile_end, x + static_cast<size_t>(m0) * K, m1 - m0, ys[g] + static_cast<size_t>(m0) * w.out_features, w.out_features);
            continue;
          }
          if (w.activations == Activations::kF32) {
            weight_only_rows(k, w, o, tile_end, x + static_cast<size_t>(m0) * K, m1 - m0, ys[g] + static_cast<size_t>(m0) * w.out_features, w.out_features);
            continue;
          }
          for (int m = m0; m < m1; ++m) {
            float* y = ys[g] + static_cast<size_t>(m) * w.out_features;
            if (w.format == WeightFormat::kInt8) {
              k.rows_q8(w, o, tile_end, acts, m, y);
            } else {
              k.rows_q4(w, o, tile_end, acts, m, y);
            }
          }
        }
      }
    });
  }
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
