#include "optforge_rt/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>

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

// Fp16 copies of float32 scales (a v1 engine's qscales, or per-channel scales spread over blocks), owned by w.
void own_f16_scales(Linear& w, const float* src, int out, int nb, bool per_channel) {
  w.owned.resize(static_cast<size_t>(out) * nb * sizeof(uint16_t));
  uint16_t* dst = reinterpret_cast<uint16_t*>(w.owned.data());
  for (int o = 0; o < out; ++o) {
    for (int b = 0; b < nb; ++b) {
      uint16_t& h = dst[static_cast<size_t>(o) * nb + b];
      h = f32_to_f16(per_channel ? src[o] : src[static_cast<size_t>(o) * nb + b]);
      if (!std::isfinite(f16_to_f32(h))) throw ArtifactError("a weight scale overflows fp16 (> 65504); run the `pack.cpu` pass");
    }
  }
  w.scales = dst;
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

// MemAvailable from /proc/meminfo in bytes; SIZE_MAX where it cannot be read.
size_t available_memory() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  while (in >> key >> kb) {
    if (key == "MemAvailable:") return kb * 1024;
    in.ignore(256, '\n');
  }
  return SIZE_MAX;
}

// Floats per layer in the K (and in the V) cache. Throws std::invalid_argument when the whole cache (K and V of
// every layer) does not fit in 64 bits or in the available memory.
size_t kv_cache_floats(const ModelConfig& c, int num_kv_blocks, int block_size) {
  uint64_t floats = 0, bytes = 0;
  const bool fits = checked_product({uint64_t(num_kv_blocks), uint64_t(block_size), uint64_t(c.num_kv_heads), uint64_t(c.head_dim)}, &floats) &&
                    checked_product({floats, uint64_t(c.num_layers), 2, sizeof(float)}, &bytes);
  const size_t available = available_memory();
  if (!fits || bytes > available) {
    throw std::invalid_argument("a KV cache of " + std::to_string(num_kv_blocks) + " blocks x " + std::to_string(block_size) + " tokens x " +
                                std::to_string(c.num_layers) + " layers needs " + (fits ? std::to_string(bytes) : std::string("over 2^64")) +
                                " bytes, more than the " + std::to_string(available) + " bytes of memory available; use fewer KV blocks");
  }
  return static_cast<size_t>(floats);
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
    lw.q = load_linear(p + "self_attn.q_proj", q_out, c.hidden_size);
    lw.k = load_linear(p + "self_attn.k_proj", kv_out, c.hidden_size);
    lw.v = load_linear(p + "self_attn.v_proj", kv_out, c.hidden_size);
    lw.o = load_linear(p + "self_attn.o_proj", c.hidden_size, q_out);
    lw.gate = load_linear(p + "mlp.gate_proj", c.intermediate_size, c.hidden_size);
    lw.up = load_linear(p + "mlp.up_proj", c.intermediate_size, c.hidden_size);
    lw.down = load_linear(p + "mlp.down_proj", c.hidden_size, c.intermediate_size);
    layers_.push_back(std::move(lw));
  }
  bool has_head = weights_->contains("lm_head.weight") || weights_->contains("lm_head.qweight");
  if (has_head) {
    lm_head_ = load_linear("lm_head", c.vocab_size, c.hidden_size);
  } else if (c.tie_word_embeddings) {
    lm_head_.out_features = c.vocab_size;
    lm_head_.in_features = c.hidden_size;
    lm_head_.f32 = embed_;
  } else {
    throw ArtifactError(artifact.dir + ": no lm_head weights and tie_word_embeddings is false");
  }
  if (options.copy_weights) copy_weights_to_arena();
  const size_t cache_floats = kv_cache_floats(c, num_kv_blocks, block_size);
  k_cache_.assign(c.num_layers, std::vector<float>(cache_floats));
  v_cache_.assign(c.num_layers, std::vector<float>(cache_floats));
  for (int i = 0; i < c.head_dim / 2; ++i) {
    inv_freq_.push_back(1.0f / std::pow(c.rope_theta, static_cast<float>(2 * i) / static_cast<float>(c.head_dim)));
  }
}

Linear Model::load_linear(const std::string& name, int out, int in) {
  Linear w;
  w.out_features = out;
  w.in_features = in;
  auto fail = [&](const std::string& why) { throw ArtifactError("model.safetensors: Linear '" + name + "': " + why); };
  if (weights_->contains(name + ".qweight")) {  // pre-packed by the pack.cpu pass
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
      own_f16_scales(w, reinterpret_cast<const float*>(s.data), out, nb, false);
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
  const TensorView& t = weights_->get(name + ".weight");
  if (t.numel() != int64_t(out) * in) fail("weight has " + std::to_string(t.numel()) + " elements, expected " + std::to_string(int64_t(out) * in));
  if (t.dtype == DType::kF32) {
    w.f32 = reinterpret_cast<const float*>(t.data);
    return w;
  }
  if (t.dtype == DType::kI8 && weights_->contains(name + ".weight_scale")) {  // quant.int8_weight_only, per channel
    const TensorView& s = weights_->get(name + ".weight_scale");
    if (s.dtype != DType::kF32 || s.numel() != out) fail("weight_scale must be F32 (out, 1); pack group-wise int8 with `pack.cpu` first");
    if (in % kQuantBlock != 0) fail("in_features must divide by 32");
    int nb = in / kQuantBlock;
    w.format = WeightFormat::kInt8;
    w.q8 = reinterpret_cast<const int8_t*>(t.data);
    own_f16_scales(w, reinterpret_cast<const float*>(s.data), out, nb, true);
    return w;
  }
  fail(std::string("unsupported weight dtype ") + dtype_name(t.dtype) + "; run the `pack.cpu` pass to write a CPU engine");
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
    return w.scales == nullptr ? 0 : static_cast<size_t>(w.out_features) * (w.in_features / kQuantBlock) * sizeof(uint16_t);
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
    w->owned.clear();
    w->owned.shrink_to_fit();
  }
  if (tied) embed_ = lm_head_.f32 = reinterpret_cast<const float*>(arena_.take(embed_, data_bytes(lm_head_)));
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

void Model::copy_block(int src, int dst) {
  size_t stride = static_cast<size_t>(block_size_) * config_.num_kv_heads * config_.head_dim;
  for (int l = 0; l < config_.num_layers; ++l) {
    std::memcpy(k_cache_[l].data() + dst * stride, k_cache_[l].data() + src * stride, stride * sizeof(float));
    std::memcpy(v_cache_[l].data() + dst * stride, v_cache_[l].data() + src * stride, stride * sizeof(float));
  }
}

void Model::attention(const ForwardBatch& batch, int layer, const float* q, float* out, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int T = static_cast<int>(batch.tokens.size());
  const int D = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* kc = k_cache_[layer].data();
  const float* vc = v_cache_[layer].data();
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
      std::memcpy(&k_cache_[l][slot * kv_dim], &k[size_t(t) * kv_dim], kv_dim * sizeof(float));
      std::memcpy(&v_cache_[l][slot * kv_dim], &v[size_t(t) * kv_dim], kv_dim * sizeof(float));
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
