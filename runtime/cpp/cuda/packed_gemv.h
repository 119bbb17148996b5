// CUDA kernels of the C++ runtime for the packed CPU-engine weights (passes/pack/cpu.py): fp32, int8 and int4
// blocks of 32 input columns with one scale each. Built only where CMake finds a CUDA compiler
// (OPTFORGE_RT_CUDA); the CPU model forward does not call them yet: they are the first piece of a CUDA
// backend, tested against a double-precision reference by test_cuda_gemv.
//
// Numerics: activations stay fp32 and each weight is dequantized in registers (weight-only), so results
// equal x @ dequant(W)^T up to fp32 summation order. The CPU int8/int4 kernels instead round the activations
// to int8 per block (llama.cpp-style), so the two backends agree to that rounding, not bit for bit.
#pragma once

#include <cstdint>

namespace optforge_rt::cuda {

enum class Format { kF32, kInt8, kInt4 };

// Weights and scales in device memory; owns them (move-only).
class DeviceLinear {
 public:
  // weights: float (N, K), int8 (N, K) or nibble-packed uint8 (N, K / 2) (column j of a block in the low
  // nibble of byte j, column j + 16 in the high nibble, values + 8); scales: float (N, K / 32), unused for fp32.
  DeviceLinear(Format format, const void* weights, const float* scales, int out_features, int in_features);
  ~DeviceLinear();
  DeviceLinear(const DeviceLinear&) = delete;
  DeviceLinear& operator=(const DeviceLinear&) = delete;
  DeviceLinear(DeviceLinear&& other) noexcept;

  // y (M, N) = x (M, K) W^T with device pointers, on `stream` (a cudaStream_t; nullptr: the default stream).
  void matmul(const float* x_device, int rows, float* y_device, void* stream = nullptr) const;
  // The same from host memory (copies in and out, synchronous): tests and probes.
  void matmul_host(const float* x, int rows, float* y) const;

  int out_features() const { return out_; }
  int in_features() const { return in_; }

 private:
  Format format_;
  int out_, in_;
  void* weights_ = nullptr;
  float* scales_ = nullptr;
};

int device_count();  // 0 where the driver or a device is missing

}  // namespace optforge_rt::cuda
