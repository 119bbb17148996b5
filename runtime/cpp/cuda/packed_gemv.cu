#include "packed_gemv.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace optforge_rt::cuda {

namespace {

constexpr int kBlock = 32;  // input columns per scale
constexpr int kWarpsPerCta = 4;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
}

__device__ inline float weight_at(Format format, const void* w, const float* scales, int n, int k, int K) {
  const int blocks = K / kBlock;
  if (format == Format::kF32) return static_cast<const float*>(w)[static_cast<size_t>(n) * K + k];
  const float scale = scales[static_cast<size_t>(n) * blocks + k / kBlock];
  if (format == Format::kInt8) return scale * static_cast<const int8_t*>(w)[static_cast<size_t>(n) * K + k];
  const uint8_t byte = static_cast<const uint8_t*>(w)[static_cast<size_t>(n) * (K / 2) + (k / kBlock) * (kBlock / 2) + (k % (kBlock / 2))];
  const int q = (k % kBlock) < kBlock / 2 ? (byte & 0xF) : (byte >> 4);
  return scale * static_cast<float>(q - 8);
}

// One warp per output feature: lanes stride over K (coalesced weight reads), then a shuffle reduction.
__global__ void packed_gemv_kernel(Format format, const void* w, const float* scales, const float* x, float* y, int M, int N, int K) {
  const int n = blockIdx.x * kWarpsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  for (int m = 0; m < M; ++m) {
    const float* xm = x + static_cast<size_t>(m) * K;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) acc += weight_at(format, w, scales, n, k, K) * xm[k];
    for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
    if (lane == 0) y[static_cast<size_t>(m) * N + n] = acc;
  }
}

}  // namespace

DeviceLinear::DeviceLinear(Format format, const void* weights, const float* scales, int out_features, int in_features)
    : format_(format), out_(out_features), in_(in_features) {
  if (out_features <= 0 || in_features <= 0 || (format != Format::kF32 && in_features % kBlock)) {
    throw std::invalid_argument("DeviceLinear: bad shape (quantized formats need in_features % 32 == 0)");
  }
  const size_t n = static_cast<size_t>(out_) * in_;
  const size_t bytes = format == Format::kF32 ? n * 4 : format == Format::kInt8 ? n : n / 2;
  check(cudaMalloc(&weights_, bytes), "malloc weights");
  check(cudaMemcpy(weights_, weights, bytes, cudaMemcpyHostToDevice), "copy weights");
  if (format != Format::kF32) {
    const size_t scale_bytes = static_cast<size_t>(out_) * (in_ / kBlock) * sizeof(float);
    check(cudaMalloc(reinterpret_cast<void**>(&scales_), scale_bytes), "malloc scales");
    check(cudaMemcpy(scales_, scales, scale_bytes, cudaMemcpyHostToDevice), "copy scales");
  }
}

DeviceLinear::~DeviceLinear() {
  cudaFree(weights_);
  cudaFree(scales_);
}

DeviceLinear::DeviceLinear(DeviceLinear&& other) noexcept
    : format_(other.format_), out_(other.out_), in_(other.in_), weights_(std::exchange(other.weights_, nullptr)),
      scales_(std::exchange(other.scales_, nullptr)) {}

void DeviceLinear::matmul(const float* x_device, int rows, float* y_device, void* stream) const {
  const int ctas = (out_ + kWarpsPerCta - 1) / kWarpsPerCta;
  packed_gemv_kernel<<<ctas, kWarpsPerCta * 32, 0, static_cast<cudaStream_t>(stream)>>>(format_, weights_, scales_, x_device, y_device, rows, out_, in_);
  check(cudaGetLastError(), "launch packed_gemv_kernel");
}

void DeviceLinear::matmul_host(const float* x, int rows, float* y) const {
  float *dx = nullptr, *dy = nullptr;
  const size_t x_bytes = static_cast<size_t>(rows) * in_ * sizeof(float), y_bytes = static_cast<size_t>(rows) * out_ * sizeof(float);
  check(cudaMalloc(reinterpret_cast<void**>(&dx), x_bytes), "malloc x");
  check(cudaMalloc(reinterpret_cast<void**>(&dy), y_bytes), "malloc y");
  try {
    check(cudaMemcpy(dx, x, x_bytes, cudaMemcpyHostToDevice), "copy x");
    matmul(dx, rows, dy);
    check(cudaMemcpy(y, dy, y_bytes, cudaMemcpyDeviceToHost), "copy y");
  } catch (...) {
    cudaFree(dx);
    cudaFree(dy);
    throw;
  }
  cudaFree(dx);
  cudaFree(dy);
}

int device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // namespace optforge_rt::cuda
