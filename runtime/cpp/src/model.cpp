#include "optforge_rt/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "optforge_rt/checked.h"
#include "optforge_rt/errors.h"

namespace optforge_rt {

namespace {

void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  float ss = 0.f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// The row of a layer's KV cache that holds position `pos` of a sequence: the position's block, from its block
// table, then its offset in that block (the formula of `slot` in runtime/attention.py).
inline size_t kv_slot(const std::vector<int>& block_table, int pos, int block_size) {
  return static_cast<size_t>(block_table[pos / block_size]) * block_size + pos % block_size;
}

// HF's rotate_half convention: pairs (i, i + d/2).
void apply_rope(float* x, int num_heads, int head_dim, int pos, const std::vector<float>& inv_freq) {
  int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    float angle = static_cast<float>(pos) * inv_freq[i];
    float c = std::cos(angle), s = std::sin(angle);
    for (int h = 0; h < num_heads; ++h) {
      float* v = x + h * head_dim;
      float a = v[i], b = v[i + half];
      v[i] = a * c - b * s;
      v[i + half] = b * c + a * s;
    }
  }
}

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

// The quantization scheme optforge.json's `modules` records for a Linear ("" when none).
std::string module_scheme(const Json& layout, const std::string& name) {
  const Json* modules = layout.find("modules");
  const Json* spec = modules != nullptr ? modules->find(name) : nullptr;
  const Json* scheme = spec != nullptr ? spec->find("scheme") : nullptr;
  return scheme != nullptr && scheme->is_string() ? scheme->str() : "";
}

// The pack.cpu format an engine declares in its safetensors metadata: 0 when it declares none (an HF folder or
// a quant.int8_weight_only artifact), else 1 (fp32 block scales) or 2 (fp16); newer versions are refused.
int pack_format_version(const SafeTensors& st, const std::string& dir) {
  auto it = st.metadata().find("format");
  const std::string prefix = "optforge-cpu/";
  if (it == st.metadata().end() || it->second.rfind(prefix, 0) != 0) return 0;
  const std::string version = it->second.substr(prefix.size());
  if (version == "1") return 1;
  if (version == "2") return 2;
  throw ArtifactError(dir + ": engine format '" + it->second + "' is newer than this runtime reads (optforge-cpu/1 and /2); "
                      "rebuild the runtime, or re-run the pack.cpu pass with this checkout");
}

}  // namespace

Model::Model(const Artifact& artifact, int num_kv_blocks, int block_size, const ModelOptions& options)
    : config_(artifact.config), block_size_(block_size), num_kv_blocks_(num_kv_blocks) {
  if (block_size < 1 || num_kv_blocks < 1) throw std::invalid_argument("need block_size >= 1 and num_kv_blocks >= 1");
  weights_ = SafeTensors::open(artifact.dir + "/model.safetensors");
  pack_version_ = pack_format_version(*weights_, artifact.dir);
  const ModelConfig& c = config_;
  auto f32_tensor = [&](const std::string& key, int64_t numel) -> const float* {
    const TensorView& t = weights_->get(key);
    if (t.numel() != numel) throw ArtifactError(artifact.dir + ": tensor '" + key + "' has " + std::to_string(t.numel()) + " elements, expected " + std::to_string(numel));
    if (t.dtype == DType::kF32) return reinterpret_cast<const float*>(t.data);
    if (t.dtype != DType::kBF16 && t.dtype != DType::kF16) throw ArtifactError(artifact.dir + ": tensor '" + key + "' has dtype " + dtype_name(t.dtype) + ", expected a float");
    std::vector<float> out(numel);
    const uint16_t* src = reinterpret_cast<const uint16_t*>(t.data);
    for (int64_t i = 0; i < numel; ++i) {
      if (t.dtype == DType::kBF16) {
        uint32_t bits = uint32_t(src[i]) << 16;
        std::memcpy(&out[i], &bits, 4);
      } else {
        out[i] = static_cast<float>(reinterpret_cast<const _Float16*>(src)[i]);
      }
    }
    converted_.push_back(std::move(out));
    return converted_.back().data();
  };
  embed_ = f32_tensor("model.embed_tokens.weight", int64_t(c.vocab_size) * c.hidden_size);
  final_norm_ = f32_tensor("model.norm.weight", c.hidden_size);
  int q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  for (int l = 0; l < c.num_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.attn_norm = f32_tensor(p + "input_layernorm.weight", c.hidden_size);
    lw.mlp_norm = f32_tensor(p + "post_attention_layernorm.weight", c.hidden_size);
    auto linear = [&](const std::string& name, int out, int in) { return load_linear(p + name, out, in, module_scheme(artifact.layout, p + name)); };
    lw.q = linear("self_attn.q_proj", q_out, c.hidden_size);
    lw.k = linear("self_attn.k_proj", kv_out, c.hidden_size);
    lw.v = linear("self_attn.v_proj", kv_out, c.hidden_size);
    lw.o = linear("self_attn.o_proj", c.hidden_size, q_out);
    lw.gate = linear("mlp.gate_proj", c.intermediate_size, c.hidden_size);
    lw.up = linear("mlp.up_proj", c.intermediate_size, c.hidden_size);
    lw.down = linear("mlp.down_proj", c.hidden_size, c.intermediate_size);
    layers_.push_back(std::move(lw));
  }
  bool has_head = weights_->contains("lm_head.weight") || weights_->contains("lm_head.qweight") || weights_->contains("lm_head.weight_packed");
  if (has_head) {
    lm_head_ = load_linear("lm_head", c.vocab_size, c.hidden_size, module_scheme(artifact.layout, "lm_head"));
  } else if (c.tie_word_embeddings) {
    lm_head_.out_features = c.vocab_size;
    lm_head_.in_features = c.hidden_size;
    lm_head_.f32 = embed_;
  } else {
    throw ArtifactError(artifact.dir + ": no lm_head weights and tie_word_embeddings is false");
  }
  if (options.copy_weights) copy_weights_to_arena();
  kv_ = std::make_unique<KvCache>(kv_cache_spec(artifact.layout, c.num_layers, artifact.dir + "/optforge.json"), c.num_layers, num_kv_blocks,
                                  block_size, c.num_kv_heads * c.head_dim);
  for (int i = 0; i < c.head_dim / 2; ++i) {
    inv_freq_.push_back(1.0f / std::pow(c.rope_theta, static_cast<float>(2 * i) / static_cast<float>(c.head_dim)));
  }
}

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
void Model::copy_weights_to_arena() {
  std::vector<Linear*> linears;
  for (LayerWeights& l : layers_) {
    for (Linear* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) linears.push_back(w);
  }
  linears.push_back(&lm_head_);
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
  for (const LayerWeights& l : layers_) {
    for (const Linear* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down, &lm_head_}) {
      if (w->format == WeightFormat::kF32) continue;
      (w->activations == Activations::kInt8 ? int8 : f32) = true;
    }
  }
  return int8 && f32 ? "mixed" : int8 ? "int8" : "fp32";
}

std::string Model::weight_format() const {
  const Linear& w = layers_.front().q;
  return w.format == WeightFormat::kInt8 ? "int8" : w.format == WeightFormat::kInt4 ? "int4" : "fp32";
}

size_t Model::weight_bytes() const {
  size_t n = lm_head_.weight_bytes();
  for (const LayerWeights& l : layers_) {
    for (const Linear* w : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down}) n += w->weight_bytes();
  }
  return n;
}

void Model::copy_block(int src, int dst) { kv_->copy_block(src, dst); }

void Model::attention(const ForwardBatch& batch, int layer, const float* q, float* out, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int T = static_cast<int>(batch.tokens.size());
  const int D = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  if (kv_->dtype() != KvDtype::kF32) {
    attention_dequantized(batch, layer, q, out, pool);
    return;
  }
  const float* kc = kv_->k_f32(layer);
  const float* vc = kv_->v_f32(layer);
  pool.parallel_for(T * c.num_heads, [&](int begin, int end) {
    std::vector<float> scores;
    std::vector<const float*> k_rows, v_rows;
    for (int job = begin; job < end; ++job) {
      int t = job / c.num_heads, h = job % c.num_heads, kvh = h / group;
      const std::vector<int>& table = batch.block_tables[batch.seq_of[t]];
      int len = batch.positions[t] + 1;
      scores.resize(len);
      k_rows.resize(len);
      v_rows.resize(len);
      for (int p = 0; p < len; ++p) {
        size_t slot = kv_slot(table, p, block_size_);
        k_rows[p] = kc + (slot * c.num_kv_heads + kvh) * D;
        v_rows[p] = vc + (slot * c.num_kv_heads + kvh) * D;
      }
      attend(q + (static_cast<size_t>(t) * c.num_heads + h) * D, k_rows.data(), v_rows.data(), len, D, scale,
             scores.data(), out + (static_cast<size_t>(t) * c.num_heads + h) * D);
    }
  });
}

// A byte cache: each job reads one KV head's positions back as float32 once (stored * scale) and runs the
// attention of every query head that shares it; the arithmetic after the read is the float cache's.
void Model::attention_dequantized(const ForwardBatch& batch, int layer, const float* q, float* out, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int T = static_cast<int>(batch.tokens.size());
  const int D = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  pool.parallel_for(T * c.num_kv_heads, [&](int begin, int end) {
    std::vector<float> scores, keys, values;
    std::vector<const float*> k_rows, v_rows;
    for (int job = begin; job < end; ++job) {
      const int t = job / c.num_kv_heads, kvh = job % c.num_kv_heads;
      const std::vector<int>& table = batch.block_tables[batch.seq_of[t]];
      const int len = batch.positions[t] + 1;
      scores.resize(len);
      keys.resize(static_cast<size_t>(len) * D);
      values.resize(keys.size());
      k_rows.resize(len);
      v_rows.resize(len);
      for (int p = 0; p < len; ++p) {
        k_rows[p] = &keys[static_cast<size_t>(p) * D];
        v_rows[p] = &values[static_cast<size_t>(p) * D];
        kv_->read(layer, kv_slot(table, p, block_size_), kvh * D, D, &keys[static_cast<size_t>(p) * D], &values[static_cast<size_t>(p) * D]);
      }
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        attend(q + (static_cast<size_t>(t) * c.num_heads + h) * D, k_rows.data(), v_rows.data(), len, D, scale, scores.data(),
               out + (static_cast<size_t>(t) * c.num_heads + h) * D);
      }
    }
  });
}

std::vector<float> Model::forward(const ForwardBatch& batch, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int T = static_cast<int>(batch.tokens.size());
  const int H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int q_dim = c.num_heads * D, kv_dim = c.num_kv_heads * D;
  if (int64_t(T) * c.num_heads > INT_MAX) throw std::invalid_argument("a step of " + std::to_string(T) + " tokens is too large for one forward");
  for (int t = 0; t < T; ++t) {
    if (batch.tokens[t] < 0 || batch.tokens[t] >= c.vocab_size) throw std::invalid_argument("token id out of range: " + std::to_string(batch.tokens[t]));
    const auto& table = batch.block_tables.at(batch.seq_of[t]);
    int needed = batch.positions[t] / block_size_;
    if (batch.positions[t] < 0 || needed >= static_cast<int>(table.size()) || table[needed] < 0 || table[needed] >= num_kv_blocks_) {
      throw std::invalid_argument("token " + std::to_string(t) + ": position " + std::to_string(batch.positions[t]) + " has no KV block");
    }
  }
  std::vector<float> x(static_cast<size_t>(T) * H), h(x.size()), q(static_cast<size_t>(T) * q_dim), k(static_cast<size_t>(T) * kv_dim),
      v(k.size()), attn(q.size()), o(x.size()), gate(static_cast<size_t>(T) * I), up(gate.size());
  for (int t = 0; t < T; ++t) std::memcpy(&x[static_cast<size_t>(t) * H], embed_ + static_cast<size_t>(batch.tokens[t]) * H, H * sizeof(float));
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = layers_[l];
    for (int t = 0; t < T; ++t) rms_norm(&x[size_t(t) * H], lw.attn_norm, H, c.rms_norm_eps, &h[size_t(t) * H]);
    matmul_group({&lw.q, &lw.k, &lw.v}, h.data(), T, {q.data(), k.data(), v.data()}, pool);
    for (int t = 0; t < T; ++t) {
      apply_rope(&q[size_t(t) * q_dim], c.num_heads, D, batch.positions[t], inv_freq_);
      apply_rope(&k[size_t(t) * kv_dim], c.num_kv_heads, D, batch.positions[t], inv_freq_);
      int pos = batch.positions[t];
      size_t slot = kv_slot(batch.block_tables[batch.seq_of[t]], pos, block_size_);
      kv_->write(l, slot, &k[size_t(t) * kv_dim], &v[size_t(t) * kv_dim]);
    }
    attention(batch, l, q.data(), attn.data(), pool);
    matmul(lw.o, attn.data(), T, o.data(), pool);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    for (int t = 0; t < T; ++t) rms_norm(&x[size_t(t) * H], lw.mlp_norm, H, c.rms_norm_eps, &h[size_t(t) * H]);
    matmul_group({&lw.gate, &lw.up}, h.data(), T, {gate.data(), up.data()}, pool);
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    matmul(lw.down, gate.data(), T, o.data(), pool);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
  }
  const int R = static_cast<int>(batch.logits_for.size());
  std::vector<float> last(static_cast<size_t>(R) * H), logits(static_cast<size_t>(R) * c.vocab_size);
  for (int r = 0; r < R; ++r) rms_norm(&x[size_t(batch.logits_for[r]) * H], final_norm_, H, c.rms_norm_eps, &last[size_t(r) * H]);
  matmul(lm_head_, last.data(), R, logits.data(), pool);
  return logits;
}

}  // namespace optforge_rt
