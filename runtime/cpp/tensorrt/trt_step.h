// TensorRT execution of a plan written by the `export.tensorrt` pass (ONNX decoder with past/present KV
// tensors): name-based I/O of the TensorRT 10 C++ API. Built only where CMake finds NvInfer.h, libnvinfer and
// CUDA (OPTFORGE_RT_TENSORRT); NOT compiled or run on the machines of this project (TensorRT cannot be
// installed there, see ENVIRONMENT.md). The Python twin is runtime/tensorrt_runner.py.
#pragma once

#include <NvInfer.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace optforge_rt::trt {

struct DeviceTensor {
  void* data = nullptr;            // device memory; outputs are allocated by run() and owned by the caller (cudaFree)
  std::vector<int64_t> shape;
  nvinfer1::DataType dtype = nvinfer1::DataType::kFLOAT;
};

class StepEngine {
 public:
  explicit StepEngine(const std::string& plan_path);
  ~StepEngine();
  StepEngine(const StepEngine&) = delete;
  StepEngine& operator=(const StepEngine&) = delete;

  const std::vector<std::string>& inputs() const { return inputs_; }
  const std::vector<std::string>& outputs() const { return outputs_; }
  nvinfer1::DataType dtype(const std::string& name) const { return engine_->getTensorDataType(name.c_str()); }

  // One step: binds every input (input_ids, position_ids, past_key_values.*), allocates every output (logits,
  // present.*) at the shape the inputs imply, enqueues on `stream` and waits for it.
  std::map<std::string, DeviceTensor> run(const std::map<std::string, DeviceTensor>& feeds, cudaStream_t stream);

 private:
  class Logger : public nvinfer1::ILogger {
    void log(Severity severity, const char* msg) noexcept override;
  };
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  std::vector<std::string> inputs_, outputs_;
};

size_t element_size(nvinfer1::DataType dtype);

}  // namespace optforge_rt::trt
