// Weight loading of the C++ runtime's Model: a Linear from a pack.cpu engine or an optforge artifact (fp32,
// int8 / int4 weight-only, w8a8_int8), the optional huge-page copy of all weights, and what the loaded weights are.
// The forward pass and attention are in model.cpp.
#include "optforge_rt/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "optforge_rt/checked.h"
#include "optforge_rt/errors.h"

namespace optforge_rt {

namespace {

// Fp16 block scales (out, nb) from float32 scales (out, nb / per): a v1 engine's qscales (per = 1), or the
// per-channel (per = nb) or per-group scales of a w8a8_int8 artifact, spread over their blocks.
void fill_f16_scales(uint16_t* dst, const float* src, int out, int nb, int per) {
  for (int o = 0; o < out; ++o) {
    for (int b = 0; b < nb; ++b) {
      uint16_t& h = dst[static_cast<size_t>(o) * nb + b];
      h = f32_to_f16(src[static_cast<size_t>(o) * (nb / per) + b / per]);
      if (!std::isfinite(f16_to_f32(h))) throw ArtifactError("a weight scale overflows fp16 (> 65504); run the `pack.cpu` pass");
    }
  }
}

}  // namespace

// A pack.cpu engine's Linear: the kernels' block format as stored, with int8 activations (the engine format is
// llama.cpp's Q8_0 / Q4_0 arithmetic, what its tolerances were stated for).
Linear Model::load_packed_linear(const std::string& name, int out, int in) {
  Linear w;
  w.out_features = out;
  w.in_features = in;
  w.activations = Activations::kInt8;
  auto fail = [&](const std::string& why) { throw ArtifactError("model.safetensors: Linear '" + name + "': " + why); };
  const TensorView& q = weights_->get(name + ".qweight");
  const TensorView& s = weights_->get(name + ".qscales");
  if (in % kQuantBlock != 0) fail("in_features must divide by 32");
  const int nb = in / kQuantBlock;
  if (s.numel() != int64_t(out) * nb) fail("qscales must have (out, in / 32) elements");
  // v2 stores fp16 scales, read in place; a v1 engine's fp32 scales are rounded to fp16 here (relative
  // change <= 2^-11 in fp16's normal range; the integer weights are kept). Re-running pack.cpu instead fits
  // the weights to the rounded scales.
  if (s.dtype == DType::kF16 && pack_version_ != 1) {
    w.scales = reinterpret_cast<const uint16_t*>(s.data);
  } else if (s.dtype == DType::kF32 && pack_version_ != 2) {
    w.owned.resize(static_cast<size_t>(out) * nb * sizeof(uint16_t));
    fill_f16_scales(reinterpret_cast<uint16_t*>(w.owned.data()), reinterpret_cast<const float*>(s.data), out, nb, 1);
    w.scales = reinterpret_cast<const uint16_t*>(w.owned.data());
  } else {
    const char* want = pack_version_ == 2 ? "F16 (format optforge-cpu/2)" : pack_version_ == 1 ? "F32 (format optforge-cpu/1)" : "F16 or F32";
    fail(std::string("qscales are ") + dtype_name(s.dtype) + ", expected " + want);
  }
  if (q.dtype == DType::kI8 && q.numel() == int64_t(out) * in) {
    w.format = WeightFormat::kInt8;
    w.q8 = reinterpret_cast<const int8_t*>(q.data);
  } else if (q.dtype == DType::kU8 && q.numel() == int64_t(out) * in / 2) {
    w.format = WeightFormat::kInt4;
    w.q4 = q.data;
  } else {
    fail("qweight must be I8 (out, in) or U8 (out, in / 2)");
  }
  return w;
}

// fp32 weights, or the symmetric int8 / int4 weights of an optforge quantized artifact: quant.int8_weight_only
// and weight-only int8 (`weight` I8 (out, in)) or int4 (`weight_packed` I32 (out, in / 8), compressed-tensors'
// eight nibbles q + 8 per word) with float32 scales (out, G) whose groups are whole 32-column blocks. The scheme
// optforge.json records decides the activations: float32 for weight-only formats, int8 for w8a8_int8.
Linear Model::load_linear(const std::string& name, int out, int in, const std::string& scheme) {
  if (weights_->contains(name + ".qweight")) return load_packed_linear(name, out, in);
  Linear w;
  w.out_features = out;
  w.in_features = in;
  auto fail = [&](const std::string& why) { throw ArtifactError("model.safetensors: Linear '" + name + "': " + why); };
  const bool packed4 = weights_->contains(name + ".weight_packed");
  const TensorView& t = weights_->get(name + (packed4 ? ".weight_packed" : ".weight"));
  if (t.dtype == DType::kF32 && !packed4) {
    if (t.numel() != int64_t(out) * in) fail("weight has " + std::to_string(t.numel()) + " elements, expected " + std::to_string(int64_t(out) * in));
    w.f32 = reinterpret_cast<const float*>(t.data);
    return w;
  }
  const bool int8 = t.dtype == DType::kI8 && !packed4, int4 = t.dtype == DType::kI32 && packed4;
  if ((!int8 && !int4) || !weights_->contains(name + ".weight_scale")) {
    fail(std::string("unsupported weight dtype ") + dtype_name(t.dtype) + "; run the `pack.cpu` pass to write a CPU engine");
  }
  if (weights_->contains(name + ".weight_zero_point")) fail("asymmetric weights (weight_zero_point); run the `pack.cpu` pass (it re-quantizes them symmetric)");
  if (t.numel() != (int8 ? int64_t(out) * in : int64_t(out) * in / 8)) fail("weight has " + std::to_string(t.numel()) + " elements, expected (out, in" + (int8 ? ")" : " / 8)"));
  if (in % kQuantBlock != 0) fail("in_features must divide by 32");
  const int nb = in / kQuantBlock;
  const TensorView& s = weights_->get(name + ".weight_scale");
  const int64_t groups = s.numel() / std::max(out, 1);
  if (s.dtype != DType::kF32 || s.numel() != out * groups || groups < 1 || nb % groups != 0) {
    fail("weight_scale must be F32 (out, G) with groups of whole 32-column blocks; pack other groupings with `pack.cpu` first");
  }
  w.activations = scheme == "w8a8_int8" ? Activations::kInt8 : Activations::kF32;
  const int per = nb / static_cast<int>(groups);
  const size_t q4_bytes = int4 ? static_cast<size_t>(out) * in / 2 : 0;
  if (w.activations == Activations::kF32) {  // weight-only: the float32 scales as stored, read in place
    w.scales_f32 = reinterpret_cast<const float*>(s.data);
    w.blocks_per_scale = per;
    w.owned.resize(q4_bytes);
  } else {  // int8 activations: the kernels' fp16 scale per block
    w.owned.resize(q4_bytes + static_cast<size_t>(out) * nb * sizeof(uint16_t));
    fill_f16_scales(reinterpret_cast<uint16_t*>(w.owned.data() + q4_bytes), reinterpret_cast<const float*>(s.data), out, nb, per);
    w.scales = reinterpret_cast<const uint16_t*>(w.owned.data() + q4_bytes);
  }
  if (int8) {
    w.format = WeightFormat::kInt8;
    w.q8 = reinterpret_cast<const int8_t*>(t.data);
    return w;
  }
  // Column c is nibble c % 8 of word c / 8; the kernels' block layout puts columns j and j + 16 of each block of
  // 32 in one byte (low, high). Both store q + 8.
  const uint32_t* words = reinterpret_cast<const uint32_t*>(t.data);
  uint8_t* q4 = w.owned.data();
  auto nibble = [&](int o, int c) { return (words[static_cast<size_t>(o) * (in / 8) + c / 8] >> (4 * (c % 8))) & 0xF; };
  for (int o = 0; o < out; ++o) {
    for (int c = 0; c < in; c += kQuantBlock) {
      for (int j = 0; j < 16; ++j) q4[(static_cast<size_t>(o) * in + c) / 2 + j] = static_cast<uint8_t>(nibble(o, c + j) | (nibble(o, c + 16 + j) << 4));
    }
  }
  w.format = WeightFormat::kInt4;
  w.q4 = q4;
  return w;
}

// Moves every Linear's weights and scales (and the tied embedding the fp32 lm_head reads) into one huge-page
// buffer: decode streams all of them once per token, and from the 4 KiB pages of the file mapping that is a TLB
// miss every 4 KiB (a streaming read of 143 MB ran ~10% faster from 2 MiB pages on the 2-core EPYC VM).
// Skipped, keeping the mapping, when the copy would take more than half of the available memory or the kernel
// refuses the buffer; the arithmetic is the same either way.
std::vector<const Linear*> Model::all_linears() const {
  std::vector<const Linear*> linears;
  for (const LayerWeights& l : layers_) {
    for (const Linear* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down, &l.router}) {
      if (w->out_features > 0) linears.push_back(w);
    }
    for (const Linear& w : l.experts) linears.push_back(&w);
  }
  linears.push_back(&lm_head_);
  return linears;
}

std::vector<Linear*> Model::all_linears() {
  std::vector<Linear*> linears;
  for (const Linear* w : std::as_const(*this).all_linears()) linears.push_back(const_cast<Linear*>(w));
  return linears;
}

void Model::copy_weights_to_arena() {
  std::vector<Linear*> linears = all_linears();
  auto data_bytes = [](const Linear& w) {
    const size_t n = static_cast<size_t>(w.out_features) * w.in_features;
    return w.format == WeightFormat::kF32 ? n * 4 : w.format == WeightFormat::kInt8 ? n : n / 2;
  };
  auto scale_bytes = [](const Linear& w) {
    const size_t nb = static_cast<size_t>(w.in_features / kQuantBlock);
    return w.scales != nullptr ? w.out_features * nb * sizeof(uint16_t) : w.scales_f32 != nullptr ? w.out_features * (nb / w.blocks_per_scale) * sizeof(float) : 0;
  };
  size_t total = 0;
  for (const Linear* w : linears) total += data_bytes(*w) + scale_bytes(*w) + 128;  // + 2 x 64 alignment
  if (total > available_memory() / 2 || !arena_.reserve(total)) return;
  const bool tied = lm_head_.f32 != nullptr && lm_head_.f32 == embed_;
  for (Linear* w : linears) {
    if (w == &lm_head_ && tied) continue;
    const void* data = w->f32 != nullptr ? static_cast<const void*>(w->f32) : w->q8 != nullptr ? static_cast<const void*>(w->q8) : w->q4;
    const uint8_t* copy = arena_.take(data, data_bytes(*w));
    if (w->format == WeightFormat::kF32) w->f32 = reinterpret_cast<const float*>(copy);
    if (w->format == WeightFormat::kInt8) w->q8 = reinterpret_cast<const int8_t*>(copy);
    if (w->format == WeightFormat::kInt4) w->q4 = copy;
    if (w->scales != nullptr) w->scales = reinterpret_cast<const uint16_t*>(arena_.take(w->scales, scale_bytes(*w)));
    if (w->scales_f32 != nullptr) w->scales_f32 = reinterpret_cast<const float*>(arena_.take(w->scales_f32, scale_bytes(*w)));
    w->owned.clear();
    w->owned.shrink_to_fit();
  }
  if (tied) embed_ = lm_head_.f32 = reinterpret_cast<const float*>(arena_.take(embed_, data_bytes(lm_head_)));
}

std::string Model::activations() const {
  bool f32 = false, int8 = false;
  for (const Linear* w : all_linears()) {
    if (w->format == WeightFormat::kF32) continue;
    (w->activations == Activations::kInt8 ? int8 : f32) = true;
  }
  return int8 && f32 ? "mixed" : int8 ? "int8" : "fp32";
}

std::string Model::weight_format() const {
  const Linear& w = layers_.front().q;
  return w.format == WeightFormat::kInt8 ? "int8" : w.format == WeightFormat::kInt4 ? "int4" : "fp32";
}

size_t Model::weight_bytes() const {
  size_t n = 0;
  for (const Linear* w : all_linears()) n += w->weight_bytes();
  return n;
}

}  // namespace optforge_rt
