// The CUDA packed-weight kernels against a double-precision reference of the dequantized weights, for fp32,
// int8 and int4, several shapes and row counts. Exits 77 (ctest: skipped) where no CUDA device is present.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "packed_gemv.h"

using optforge_rt::cuda::DeviceLinear;
using optforge_rt::cuda::Format;

namespace {

int run_case(Format format, int N, int K, int M, std::mt19937& rng) {
  std::uniform_int_distribution<int> q8(-127, 127), q4(0, 15);
  std::uniform_real_distribution<float> uni(-1.f, 1.f), pos(1e-3f, 2e-2f);
  const int blocks = K / 32;
  std::vector<float> scales(static_cast<size_t>(N) * blocks), dense(static_cast<size_t>(N) * K);
  std::vector<float> wf(static_cast<size_t>(N) * K);
  std::vector<int8_t> w8(static_cast<size_t>(N) * K);
  std::vector<uint8_t> w4(static_cast<size_t>(N) * K / 2);
  for (auto& s : scales) s = pos(rng);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      const size_t i = static_cast<size_t>(n) * K + k;
      const float s = scales[static_cast<size_t>(n) * blocks + k / 32];
      if (format == Format::kF32) {
        dense[i] = wf[i] = uni(rng);
      } else if (format == Format::kInt8) {
        w8[i] = static_cast<int8_t>(q8(rng));
        dense[i] = s * w8[i];
      } else {
        const int q = q4(rng);
        uint8_t& byte = w4[static_cast<size_t>(n) * K / 2 + (k / 32) * 16 + k % 16];
        byte = static_cast<uint8_t>((k % 32) < 16 ? (byte & 0xF0) | q : (byte & 0x0F) | (q << 4));
        dense[i] = s * (q - 8);
      }
    }
  }
  const void* weights = format == Format::kF32 ? static_cast<const void*>(wf.data()) : format == Format::kInt8 ? static_cast<const void*>(w8.data()) : w4.data();
  DeviceLinear layer(format, weights, scales.data(), N, K);
  std::vector<float> x(static_cast<size_t>(M) * K), y(static_cast<size_t>(M) * N);
  for (auto& v : x) v = uni(rng);
  layer.matmul_host(x.data(), M, y.data());
  double worst = 0;
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double ref = 0, mag = 0;
      for (int k = 0; k < K; ++k) {
        ref += static_cast<double>(dense[static_cast<size_t>(n) * K + k]) * x[static_cast<size_t>(m) * K + k];
        mag += std::fabs(static_cast<double>(dense[static_cast<size_t>(n) * K + k]) * x[static_cast<size_t>(m) * K + k]);
      }
      worst = std::fmax(worst, std::fabs(ref - y[static_cast<size_t>(m) * N + n]) / (mag + 1e-12));
    }
  }
  std::printf("format %d  N=%d K=%d M=%d  worst relative error %.3g\n", static_cast<int>(format), N, K, M, worst);
  return worst < 1e-5 ? 0 : 1;
}

}  // namespace

int main() {
  if (optforge_rt::cuda::device_count() == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(0);
  int failures = 0;
  for (Format f : {Format::kF32, Format::kInt8, Format::kInt4}) {
    failures += run_case(f, 576, 576, 1, rng);
    failures += run_case(f, 1537, 1536, 3, rng);  // N not a multiple of the warps per block
    failures += run_case(f, 49, 64, 8, rng);
  }
  std::printf(failures ? "FAILED: %d cases\n" : "all cases passed\n", failures);
  return failures ? 1 : 0;
}
