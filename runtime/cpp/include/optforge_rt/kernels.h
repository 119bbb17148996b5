// Native CPU kernels: fp32, int8 and int4 matmuls (GEMV when M == 1, a row-blocked GEMM otherwise) with
// runtime ISA dispatch (scalar, AVX2+FMA, AVX-512 VNNI), plus the small vector ops of the forward pass.
//
// Quantized weights use blocks of 32 input columns with one IEEE fp16 scale per (row, block), as llama.cpp's
// Q8_0 / Q4_0 store them (decode reads every weight byte once per token, so 2 bytes of scale per block count):
//   int8: q (out, in) int8 in [-127, 127];
//   int4: (out, in / 2) uint8, block b of row o holds 16 bytes; byte j's low nibble is column 32b + j,
//         its high nibble column 32b + 16 + j, both stored as q + 8 with q in [-8, 7].
// What a quantized Linear multiplies its weights with is its `activations`, decided per Linear from the artifact's
// format (model.cpp):
//   kF32 (weight-only formats): the activations stay float32 and each weight is widened in registers to the
//     float q * scale, with the artifact's float32 scale as stored (`scales_f32`, one per group of blocks), so
//     y = dot(q * scale, x) is the fp32 matmul of the dequantized weights, bit for bit the fp32 kernel's result
//     on them (a batch dequantizes a tile and runs the fp32 kernel; one token widens in registers);
//   kInt8 (formats that quantize activations, llama.cpp's Q8_0 / Q4_0): activations are quantized to int8 per
//     block of 32 on the fly (dynamic, symmetric), so the inner loop is an integer dot product;
//     y = sum_b scale_b * sx_b * dot(q_b, qx_b) with x ~ qx * sx.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "optforge_rt/thread_pool.h"

namespace optforge_rt {

constexpr int kQuantBlock = 32;

enum class WeightFormat { kF32, kInt8, kInt4 };
enum class Activations { kF32, kInt8 };  // of a quantized Linear (see above); fp32 Linears ignore it

struct Linear {
  WeightFormat format = WeightFormat::kF32;
  int out_features = 0;
  int in_features = 0;
  const float* f32 = nullptr;      // (out, in)
  const int8_t* q8 = nullptr;      // (out, in)
  const uint8_t* q4 = nullptr;     // (out, in / 2)
  const uint16_t* scales = nullptr;  // (out, in / 32) IEEE fp16 bits, for int8 activations
  Activations activations = Activations::kF32;
  // Weight-only (activations kF32): float32 scales (out, in / 32 / blocks_per_scale), one per group of
  // blocks_per_scale blocks of 32 columns (per channel: all of a row's blocks).
  const float* scales_f32 = nullptr;
  int blocks_per_scale = 1;
  std::vector<uint8_t> owned;      // backing store when the weights were converted at load time
  size_t weight_bytes() const;
};

enum class Isa { kScalar, kAvx2, kAvx512 };

Isa detected_isa();
Isa active_isa();
void set_isa(Isa isa);  // clamps to what the CPU supports
const char* isa_name(Isa isa);
Isa parse_isa(const std::string& name);  // "scalar" | "avx2" | "avx512" | "auto"

// y[m, o] for every Linear in `group` (all with the same in_features) over x (M, in): one parallel job
// over all their output rows, so q/k/v or gate/up run as one GEMM. ys[i] is (M, group[i]->out_features).
void matmul_group(const std::vector<const Linear*>& group, const float* x, int M, const std::vector<float*>& ys, ThreadPool& pool);
void matmul(const Linear& w, const float* x, int M, float* y, ThreadPool& pool);

float dot_f32(const float* a, const float* b, int n);
void axpy_f32(float a, const float* x, float* y, int n);  // y += a * x
// One query head's attention over n cached positions, given as row pointers into the paged cache:
// out (D) = sum_p softmax_p(scale * q . k[p]) v[p], the softmax in fp32 with std::exp; scores: n floats of
// scratch. The same arithmetic on every ISA as dot_f32 / axpy_f32 per position (only the calls are gone).
void attend(const float* q, const float* const* k, const float* const* v, int n, int D, float scale, float* scores, float* out);

// IEEE half <-> float. f32_to_f16 rounds to nearest even (as torch's .half() does); f16_to_f32 is exact.
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Quantize (out, in) float weights to the block formats above (used by tests). Each block's scale is rounded
// to fp16 first and the weights are quantized with that rounded scale, so the stored scale is the one used.
void quantize_int8_blocks(const float* w, int out, int in, int8_t* q, uint16_t* scales);
void quantize_int4_blocks(const float* w, int out, int in, uint8_t* q, uint16_t* scales);

}  // namespace optforge_rt
