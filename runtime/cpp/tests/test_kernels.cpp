// Each matmul format against a double-precision reference on the dequantized weights, on every ISA the CPU has.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "optforge_rt/kernels.h"

using namespace optforge_rt;

static double max_rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) { num = std::max(num, std::fabs(a[i] - b[i])); den = std::max(den, std::fabs(b[i])); }
  return num / den;
}

int main() {
  const int N = 72, K = 96, M = 5;
  std::mt19937 rng(0);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> w(N * K), x(M * K);
  for (float& v : w) v = dist(rng);
  for (float& v : x) v = dist(rng);
  std::vector<int8_t> q8(N * K);
  std::vector<uint8_t> q4(N * K / 2);
  std::vector<float> s8(N * K / 32), s4(N * K / 32);
  quantize_int8_blocks(w.data(), N, K, q8.data(), s8.data());
  quantize_int4_blocks(w.data(), N, K, q4.data(), s4.data());
  // Dequantized references.
  std::vector<double> ref32(M * N), ref8(M * N), ref4(M * N);
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double a = 0, b = 0, c = 0;
      for (int k = 0; k < K; ++k) {
        int blk = n * (K / 32) + k / 32, j = k % 32;
        uint8_t byte = q4[(n * K + (k - j)) / 2 + (j % 16)];
        int v4 = (j < 16 ? (byte & 0xF) : (byte >> 4)) - 8;
        a += double(w[n * K + k]) * x[m * K + k];
        b += double(q8[n * K + k]) * s8[blk] * x[m * K + k];
        c += double(v4) * s4[blk] * x[m * K + k];
      }
      ref32[m * N + n] = a; ref8[m * N + n] = b; ref4[m * N + n] = c;
    }
  }
  // int4 reconstruction error is bounded by half a step per weight.
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      int blk = n * (K / 32) + k / 32, j = k % 32;
      uint8_t byte = q4[(n * K + (k - j)) / 2 + (j % 16)];
      int v4 = (j < 16 ? (byte & 0xF) : (byte >> 4)) - 8;
      CHECK(std::fabs(v4 * s4[blk] - w[n * K + k]) <= 0.5f * s4[blk] + 1e-6f);
    }
  }
  ThreadPool pool(3);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (isa > detected_isa()) continue;
    set_isa(isa);
    Linear l32, l8, l4;
    l32.out_features = l8.out_features = l4.out_features = N;
    l32.in_features = l8.in_features = l4.in_features = K;
    l32.f32 = w.data();
    l8.format = WeightFormat::kInt8; l8.q8 = q8.data(); l8.scales = s8.data();
    l4.format = WeightFormat::kInt4; l4.q4 = q4.data(); l4.scales = s4.data();
    std::vector<float> y32(M * N), y8(M * N), y4(M * N);
    matmul_group({&l32, &l8, &l4}, x.data(), M, {y32.data(), y8.data(), y4.data()}, pool);
    CHECK(max_rel_err(y32, ref32) < 1e-5);
    CHECK(max_rel_err(y8, ref8) < 2e-2);  // activations are quantized to int8 per block of 32
    CHECK(max_rel_err(y4, ref4) < 2e-2);
    std::vector<float> g1(N);
    matmul(l8, x.data(), 1, g1.data(), pool);  // GEMV equals the first GEMM row
    for (int n = 0; n < N; ++n) CHECK(g1[n] == y8[n]);
  }
  set_isa(detected_isa());
  return 0;
}
