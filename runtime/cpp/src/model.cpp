#include "optforge_rt/model.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "optforge_rt/checked.h"
#include "optforge_rt/errors.h"
#include "optforge_rt/layer_ops.h"

namespace optforge_rt {

namespace {

// The row of a layer's KV cache that holds position `pos` of a sequence: the position's block, from its block
// table, then its offset in that block (the formula of `slot` in runtime/attention.py).
inline size_t kv_slot(const std::vector<int>& block_table, int pos, int block_size) {
  return static_cast<size_t>(block_table[pos / block_size]) * block_size + pos % block_size;
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
  // Gemma's RMSNorm computes x * (1 + w): its weights are stored here as 1 + w, so one rms_norm serves both.
  auto norm = [&](const std::string& key, int n) -> const float* {
    const float* w = f32_tensor(key, n);
    if (!c.gemma_norms) return w;
    converted_.push_back(plus_one(w, n));
    return converted_.back().data();
  };
  embed_ = f32_tensor("model.embed_tokens.weight", int64_t(c.vocab_size) * c.hidden_size);
  final_norm_ = norm("model.norm.weight", c.hidden_size);
  int q_out = c.num_heads * c.head_dim, kv_out = c.num_kv_heads * c.head_dim;
  for (int l = 0; l < c.num_layers; ++l) {
    std::string p = "model.layers." + std::to_string(l) + ".";
    LayerWeights lw;
    lw.attn_norm = norm(p + "input_layernorm.weight", c.hidden_size);
    if (c.gemma_norms) {
      lw.attn_out_norm = norm(p + "post_attention_layernorm.weight", c.hidden_size);
      lw.mlp_norm = norm(p + "pre_feedforward_layernorm.weight", c.hidden_size);
      lw.mlp_out_norm = norm(p + "post_feedforward_layernorm.weight", c.hidden_size);
      lw.q_norm = norm(p + "self_attn.q_norm.weight", c.head_dim);
      lw.k_norm = norm(p + "self_attn.k_norm.weight", c.head_dim);
    } else {
      lw.mlp_norm = norm(p + "post_attention_layernorm.weight", c.hidden_size);
      if (c.qk_norm) {
        lw.q_norm = f32_tensor(p + "self_attn.q_norm.weight", c.head_dim);
        lw.k_norm = f32_tensor(p + "self_attn.k_norm.weight", c.head_dim);
      }
    }
    auto linear = [&](const std::string& name, int out, int in) { return load_linear(p + name, out, in, module_scheme(artifact.layout, p + name)); };
    lw.q = linear("self_attn.q_proj", q_out, c.hidden_size);
    lw.k = linear("self_attn.k_proj", kv_out, c.hidden_size);
    lw.v = linear("self_attn.v_proj", kv_out, c.hidden_size);
    lw.o = linear("self_attn.o_proj", c.hidden_size, q_out);
    if (c.sparse_layers[l]) {
      // Files name the block as the Hub does (Mixtral: block_sparse_moe); optforge.json names modules as in memory (mlp).
      const std::string block = p + c.moe_block + ".";
      lw.router = Linear{};
      lw.router.out_features = c.num_experts;
      lw.router.in_features = c.hidden_size;
      lw.router.f32 = f32_tensor(block + "gate.weight", int64_t(c.num_experts) * c.hidden_size);
      const int width = c.moe_intermediate_size;
      for (int e = 0; e < c.num_experts; ++e) {
        const std::string expert = "experts." + std::to_string(e) + ".";
        for (int j = 0; j < 3; ++j) {
          const std::string name = expert + c.expert_linears[j];
          const int out = j < 2 ? width : c.hidden_size, in = j < 2 ? c.hidden_size : width;
          lw.experts.push_back(load_linear(block + name, out, in, module_scheme(artifact.layout, p + "mlp." + name)));
        }
      }
    } else {
      lw.gate = linear("mlp.gate_proj", c.intermediate_size, c.hidden_size);
      lw.up = linear("mlp.up_proj", c.intermediate_size, c.hidden_size);
      lw.down = linear("mlp.down_proj", c.hidden_size, c.intermediate_size);
    }
    layers_.push_back(std::move(lw));
    inv_freq_.push_back(rope_inv_freq(c.layer_rope_theta.at(l), c.head_dim, c.layer_rope_factor.at(l)));
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
}


void Model::copy_block(int src, int dst) { kv_->copy_block(src, dst); }

void Model::attention(const ForwardBatch& batch, int layer, const float* q, float* out, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int T = static_cast<int>(batch.tokens.size());
  const int D = c.head_dim, group = c.num_heads / c.num_kv_heads;
  const float scale = c.attn_scale;
  const int window = c.layer_windows[layer];
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
      const int start = window_start(batch.positions[t], window), len = batch.positions[t] + 1 - start;
      scores.resize(len);
      k_rows.resize(len);
      v_rows.resize(len);
      for (int p = 0; p < len; ++p) {
        size_t slot = kv_slot(table, start + p, block_size_);
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
  const float scale = c.attn_scale;
  const int window = c.layer_windows[layer];
  pool.parallel_for(T * c.num_kv_heads, [&](int begin, int end) {
    std::vector<float> scores, keys, values;
    std::vector<const float*> k_rows, v_rows;
    for (int job = begin; job < end; ++job) {
      const int t = job / c.num_kv_heads, kvh = job % c.num_kv_heads;
      const std::vector<int>& table = batch.block_tables[batch.seq_of[t]];
      const int start = window_start(batch.positions[t], window), len = batch.positions[t] + 1 - start;
      scores.resize(len);
      keys.resize(static_cast<size_t>(len) * D);
      values.resize(keys.size());
      k_rows.resize(len);
      v_rows.resize(len);
      for (int p = 0; p < len; ++p) {
        k_rows[p] = &keys[static_cast<size_t>(p) * D];
        v_rows[p] = &values[static_cast<size_t>(p) * D];
        kv_->read(layer, kv_slot(table, start + p, block_size_), kvh * D, D, &keys[static_cast<size_t>(p) * D], &values[static_cast<size_t>(p) * D]);
      }
      for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        attend(q + (static_cast<size_t>(t) * c.num_heads + h) * D, k_rows.data(), v_rows.data(), len, D, scale, scores.data(),
               out + (static_cast<size_t>(t) * c.num_heads + h) * D);
      }
    }
  });
}

void Model::check_batch(const ForwardBatch& batch) const {
  const int T = static_cast<int>(batch.tokens.size());
  if (int64_t(T) * config_.num_heads > INT_MAX) throw std::invalid_argument("a step of " + std::to_string(T) + " tokens is too large for one forward");
  for (int t = 0; t < T; ++t) {
    if (batch.tokens[t] < 0 || batch.tokens[t] >= config_.vocab_size) throw std::invalid_argument("token id out of range: " + std::to_string(batch.tokens[t]));
    const auto& table = batch.block_tables.at(batch.seq_of[t]);
    int needed = batch.positions[t] / block_size_;
    if (batch.positions[t] < 0 || needed >= static_cast<int>(table.size()) || table[needed] < 0 || table[needed] >= num_kv_blocks_) {
      throw std::invalid_argument("token " + std::to_string(t) + ": position " + std::to_string(batch.positions[t]) + " has no KV block");
    }
  }
}

// A sparse block as HF computes it: router logits, softmax over the experts (fp32), the top k (renormalized when
// the config says so), then per expert with tokens: its rows gathered, down(silu(gate x) * up x), added to each
// token's output times its routing weight (experts in index order, as HF sums them).
void Model::sparse_mlp(const LayerWeights& lw, const float* h, int T, float* out, ThreadPool& pool) {
  const ModelConfig& c = config_;
  const int H = c.hidden_size, E = c.num_experts, K = c.experts_per_token, W = c.moe_intermediate_size;
  std::vector<float> logits(static_cast<size_t>(T) * E);
  matmul(lw.router, h, T, logits.data(), pool);
  std::vector<std::vector<std::pair<int, float>>> routed(E);  // expert -> (token, weight)
  std::vector<int> order(E);
  for (int t = 0; t < T; ++t) {
    float* row = &logits[size_t(t) * E];
    const float top = *std::max_element(row, row + E);
    float sum = 0.f;
    for (int e = 0; e < E; ++e) sum += (row[e] = std::exp(row[e] - top));
    for (int e = 0; e < E; ++e) row[e] /= sum;
    for (int e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.end(), [&](int a, int b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
    float chosen = 0.f;
    for (int j = 0; j < K; ++j) chosen += row[order[j]];
    for (int j = 0; j < K; ++j) routed[order[j]].push_back({t, c.norm_topk_prob ? row[order[j]] / chosen : row[order[j]]});
  }
  std::fill(out, out + size_t(T) * H, 0.f);
  std::vector<float> rows, gate, up, y;
  for (int e = 0; e < E; ++e) {
    const int n = static_cast<int>(routed[e].size());
    if (n == 0) continue;
    rows.resize(size_t(n) * H);
    gate.resize(size_t(n) * W);
    up.resize(gate.size());
    y.resize(rows.size());
    for (int r = 0; r < n; ++r) std::memcpy(&rows[size_t(r) * H], h + size_t(routed[e][r].first) * H, H * sizeof(float));
    const Linear* w = &lw.experts[size_t(3) * e];
    matmul_group({&w[0], &w[1]}, rows.data(), n, {gate.data(), up.data()}, pool);
    silu_mul(gate.data(), up.data(), gate.size());
    matmul(w[2], gate.data(), n, y.data(), pool);
    for (int r = 0; r < n; ++r) {
      float* dst = out + size_t(routed[e][r].first) * H;
      const float weight = routed[e][r].second;
      for (int i = 0; i < H; ++i) dst[i] += weight * y[size_t(r) * H + i];
    }
  }
}

// Llama: x += attn(norm(x)); x += mlp(norm(x)). Gemma-3 adds a norm on each output before its residual add, q/k
// norms per head before rotary, GeGLU (gelu tanh), scaled embeddings and an optional cap on the logits.
std::vector<float> Model::forward(const ForwardBatch& batch, ThreadPool& pool) {
  check_batch(batch);
  const ModelConfig& c = config_;
  const int T = static_cast<int>(batch.tokens.size());
  const int H = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
  const int q_dim = c.num_heads * D, kv_dim = c.num_kv_heads * D;
  std::vector<float> x(static_cast<size_t>(T) * H), h(x.size()), q(static_cast<size_t>(T) * q_dim), k(static_cast<size_t>(T) * kv_dim),
      v(k.size()), attn(q.size()), o(x.size()), gate(static_cast<size_t>(T) * I), up(gate.size());
  for (int t = 0; t < T; ++t) std::memcpy(&x[static_cast<size_t>(t) * H], embed_ + static_cast<size_t>(batch.tokens[t]) * H, H * sizeof(float));
  if (c.embed_scale != 1.0f) {
    for (float& e : x) e *= c.embed_scale;
  }
  auto norm_rows = [&](float* rows, const float* w, int n, int count, float* out) {  // (count, n), in place when out == rows
    for (int r = 0; r < count; ++r) rms_norm(rows + size_t(r) * n, w, n, c.rms_norm_eps, out + size_t(r) * n);
  };
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = layers_[l];
    norm_rows(x.data(), lw.attn_norm, H, T, h.data());
    matmul_group({&lw.q, &lw.k, &lw.v}, h.data(), T, {q.data(), k.data(), v.data()}, pool);
    if (lw.q_norm != nullptr) {
      norm_rows(q.data(), lw.q_norm, D, T * c.num_heads, q.data());
      norm_rows(k.data(), lw.k_norm, D, T * c.num_kv_heads, k.data());
    }
    for (int t = 0; t < T; ++t) {
      apply_rope(&q[size_t(t) * q_dim], c.num_heads, D, batch.positions[t], inv_freq_[l]);
      apply_rope(&k[size_t(t) * kv_dim], c.num_kv_heads, D, batch.positions[t], inv_freq_[l]);
      int pos = batch.positions[t];
      size_t slot = kv_slot(batch.block_tables[batch.seq_of[t]], pos, block_size_);
      kv_->write(l, slot, &k[size_t(t) * kv_dim], &v[size_t(t) * kv_dim]);
    }
    attention(batch, l, q.data(), attn.data(), pool);
    matmul(lw.o, attn.data(), T, o.data(), pool);
    if (lw.attn_out_norm != nullptr) norm_rows(o.data(), lw.attn_out_norm, H, T, o.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    norm_rows(x.data(), lw.mlp_norm, H, T, h.data());
    if (!lw.experts.empty()) {
      sparse_mlp(lw, h.data(), T, o.data(), pool);
    } else {
      matmul_group({&lw.gate, &lw.up}, h.data(), T, {gate.data(), up.data()}, pool);
      if (c.gelu_tanh) {
        gelu_tanh_mul(gate.data(), up.data(), size_t(T) * I);
      } else {
        silu_mul(gate.data(), up.data(), size_t(T) * I);
      }
      matmul(lw.down, gate.data(), T, o.data(), pool);
    }
    if (lw.mlp_out_norm != nullptr) norm_rows(o.data(), lw.mlp_out_norm, H, T, o.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
  }
  const int R = static_cast<int>(batch.logits_for.size());
  std::vector<float> last(static_cast<size_t>(R) * H), logits(static_cast<size_t>(R) * c.vocab_size);
  for (int r = 0; r < R; ++r) rms_norm(&x[size_t(batch.logits_for[r]) * H], final_norm_, H, c.rms_norm_eps, &last[size_t(r) * H]);
  matmul(lm_head_, last.data(), R, logits.data(), pool);
  if (c.final_logit_softcap > 0.0f) softcap(logits.data(), logits.size(), c.final_logit_softcap);
  return logits;
}

}  // namespace optforge_rt
