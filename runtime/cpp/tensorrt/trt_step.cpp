#include "trt_step.h"

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace optforge_rt::trt {

namespace {
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(err));
}
}  // namespace

void StepEngine::Logger::log(Severity severity, const char* msg) noexcept {
  if (severity <= Severity::kWARNING) std::fprintf(stderr, "[TensorRT] %s\n", msg);
}

size_t element_size(nvinfer1::DataType dtype) {
  switch (dtype) {
    case nvinfer1::DataType::kFLOAT: case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kHALF: case nvinfer1::DataType::kBF16: return 2;
    case nvinfer1::DataType::kINT64: return 8;
    case nvinfer1::DataType::kINT8: case nvinfer1::DataType::kUINT8: case nvinfer1::DataType::kBOOL: case nvinfer1::DataType::kFP8: return 1;
    default: throw std::invalid_argument("element_size: unsupported TensorRT data type");
  }
}

StepEngine::StepEngine(const std::string& plan_path) {
  std::ifstream file(plan_path, std::ios::binary);
  if (!file) throw std::runtime_error(plan_path + ": cannot open the TensorRT plan");
  std::vector<char> plan((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  runtime_.reset(nvinfer1::createInferRuntime(logger_));
  if (!runtime_) throw std::runtime_error("TensorRT: createInferRuntime failed");
  engine_.reset(runtime_->deserializeCudaEngine(plan.data(), plan.size()));
  if (!engine_) throw std::runtime_error(plan_path + ": not a TensorRT plan for this TensorRT version and GPU (see the log above)");
  context_.reset(engine_->createExecutionContext());
  if (!context_) throw std::runtime_error("TensorRT: createExecutionContext failed");
  for (int i = 0; i < engine_->getNbIOTensors(); ++i) {
    const char* name = engine_->getIOTensorName(i);
    (engine_->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? inputs_ : outputs_).emplace_back(name);
  }
}

StepEngine::~StepEngine() = default;

std::map<std::string, DeviceTensor> StepEngine::run(const std::map<std::string, DeviceTensor>& feeds, cudaStream_t stream) {
  for (const std::string& name : inputs_) {
    auto it = feeds.find(name);
    if (it == feeds.end()) throw std::invalid_argument("TensorRT step: missing input '" + name + "'");
    if (it->second.dtype != dtype(name)) throw std::invalid_argument("TensorRT step: input '" + name + "' has the wrong data type");
    nvinfer1::Dims dims{};
    dims.nbDims = static_cast<int32_t>(it->second.shape.size());
    for (int d = 0; d < dims.nbDims; ++d) dims.d[d] = it->second.shape[d];
    if (!context_->setInputShape(name.c_str(), dims) || !context_->setTensorAddress(name.c_str(), it->second.data)) {
      throw std::invalid_argument("TensorRT step: input '" + name + "' rejected (shape outside the plan's profile?)");
    }
  }
  std::map<std::string, DeviceTensor> results;
  try {
    for (const std::string& name : outputs_) {
      DeviceTensor& out = results[name];
      nvinfer1::Dims dims = context_->getTensorShape(name.c_str());
      size_t count = 1;
      for (int d = 0; d < dims.nbDims; ++d) {
        if (dims.d[d] < 0) throw std::runtime_error("TensorRT step: output '" + name + "' shape is not determined by the inputs");
        out.shape.push_back(dims.d[d]);
        count *= static_cast<size_t>(dims.d[d]);
      }
      out.dtype = dtype(name);
      check(cudaMalloc(&out.data, count * element_size(out.dtype)), "malloc output");
      if (!context_->setTensorAddress(name.c_str(), out.data)) throw std::runtime_error("TensorRT step: output '" + name + "' rejected");
    }
    if (!context_->enqueueV3(stream)) throw std::runtime_error("TensorRT step: enqueueV3 failed (see the log above)");
    check(cudaStreamSynchronize(stream), "synchronize");
  } catch (...) {
    for (auto& [name, tensor] : results) cudaFree(tensor.data);
    throw;
  }
  return results;
}

}  // namespace optforge_rt::trt
