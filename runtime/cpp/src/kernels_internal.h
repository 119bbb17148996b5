// Private to the CPU kernels: what the dispatch in kernels.cpp (ISA selection, activation preparation, the
// public API of kernels.h) shares with the kernels of each instruction set in kernels_scalar.cpp,
// kernels_avx2.cpp and kernels_avx512.cpp. Each of those files keeps its kernels file-local (so the compiler
// inlines and specializes them as it sees fit) and hands the dispatch one table of entry points.
#pragma once

#include <cstdint>
#include <vector>

#include "optforge_rt/kernels.h"

// The SIMD kernels carry their instruction set as a per-function target attribute (no -mavx2 / -mavx512f for
// the whole file), so one binary runs on any x86-64 and picks AVX2 / AVX-512 at run time. A declaration
// here must carry the same attribute as its definition.
#define OF_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OF_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace optforge_rt::detail {

// The activations of one matmul, quantized once and shared by every output row and thread. A token's row is
// zero padded to a whole number of block pairs (64 columns) so the AVX-512 kernels never read past it.
struct PreparedActs {
  int M = 0, nb = 0, np = 0, stride = 0;  // blocks, block pairs, bytes per token row (np * 64)
  std::vector<int8_t> q;                  // (M, stride) int8, column order
  std::vector<float> xs;                  // (M, nb) per-block scales
  std::vector<int8_t> q4;                 // (M, stride) AVX-512 int4 order (see Int4Rows in kernels_avx512.cpp)
  std::vector<float> pat8, pat4;          // (M, np, 16) the scale of each vpdpbusd lane's block
  std::vector<int32_t> neg8, neg4;        // (M, np, 16) minus the unsigned-weight excess of each lane
  // AVX2 (see q8_rows_avx2 / q4_rows_avx2): nb8 = nb rounded up to 8
  int nb8 = 0;
  std::vector<int8_t> xa;                 // (M, stride) |q|, maddubs' unsigned operand for int8
  std::vector<float> xs8;                 // (M, nb8) xs zero padded to whole groups of 8 blocks
  std::vector<int32_t> neg4x8;            // (M, np, 8) minus the nibble excess (8 * x) of each madd lane
};

using RowsFn = void (*)(const Linear&, int, int, const PreparedActs&, int, float*);
// fp32 rows [o0, o1) of a Linear for all M token rows of x (M, K): y[m * ldy + o] for each m and o.
using RowsF32Fn = void (*)(const Linear&, int, int, const float*, int, float*, int);

// Weight-only rows [o0, o1) of a quantized Linear for one token x (K): y[o] = dot(q * scale, x) with the fp32
// dot product's own accumulators and order, so the result equals rows_f32 on the dequantized weights.
using RowsWeightOnlyFn = void (*)(const Linear&, int, int, const float*, float*);
// The float weights q * scale (one rounding, as the rows kernels widen them) of rows [o0, o1) of a quantized
// Linear into out ((o1 - o0), K).
using DequantizeFn = void (*)(const Linear&, int, int, float*);

// RowsF32Fn as one Dot call per (row, token): the scalar and AVX2 tables' fp32 matmul.
template <float (*Dot)(const float*, const float*, int)>
void f32_rows_by_dot(const Linear& w, int o0, int o1, const float* x, int M, float* y, int ldy) {
  const int K = w.in_features;
  for (int m = 0; m < M; ++m)
    for (int o = o0; o < o1; ++o) y[static_cast<size_t>(m) * ldy + o] = Dot(w.f32 + static_cast<size_t>(o) * K, x + static_cast<size_t>(m) * K, K);
}

struct KernelTable {
  float (*dot_f32)(const float*, const float*, int);
  void (*axpy_f32)(float, const float*, float*, int);
  void (*attend)(const float*, const float* const*, const float* const*, int, int, float, float*, float*);
  RowsFn rows_q8;
  RowsFn rows_q4;
  RowsF32Fn rows_f32;
  RowsWeightOnlyFn rows_w8, rows_w4;  // one token (decode); batches dequantize a tile and run rows_f32
  DequantizeFn dequantize;
  Isa isa;  // which of PreparedActs' ISA-specific fields the rows kernels read
};

extern const KernelTable kScalar;  // kernels_scalar.cpp
extern const KernelTable kAvx2;    // kernels_avx2.cpp
extern const KernelTable kAvx512;  // kernels_avx512.cpp

// Column j of int4 block row `b` (16 bytes): the low nibbles hold columns 0-15, the high nibbles 16-31, as q + 8.
inline int int4_at(const uint8_t* b, int j) { return (j < 16 ? (b[j] & 0xF) : (b[j - 16] >> 4)) - 8; }

// One block of 32 floats -> int8 on AVX2 (kernels_avx2.cpp), bit-identical to quantize_block (kernels.cpp).
OF_AVX2 float quantize_block_avx2(const float* xb, int8_t* q);

}  // namespace optforge_rt::detail
