// The per-token vector ops of the decoder forward (model.cpp) that differ by architecture: RMSNorm, rotary
// embeddings, the MLP activations, the attention window and the final logit cap. Each computes in float32 in
// the order its comment gives, as HF transformers' modules do.
#pragma once

#include <cstddef>
#include <vector>

namespace optforge_rt {

// out = w * (x * (1 / sqrt(mean(x^2) + eps))). Gemma's x * (1 + w') runs as this with w = 1 + w' (folded at load).
void rms_norm(const float* x, const float* w, int n, float eps, float* out);

// w -> 1 + w (float32), Gemma's RMSNorm weight in the form `rms_norm` multiplies.
std::vector<float> plus_one(const float* w, int n);

// The rotary inverse frequencies of one layer: 1 / theta^(2i / head_dim), divided by `factor` (HF's linear type).
std::vector<float> rope_inv_freq(float theta, int head_dim, float factor);

// HF's rotate_half convention on `num_heads` heads of `head_dim`: pairs (i, i + head_dim / 2).
void apply_rope(float* x, int num_heads, int head_dim, int pos, const std::vector<float>& inv_freq);

// gate[i] = silu(gate[i]) * up[i].
void silu_mul(float* gate, const float* up, size_t n);

// gate[i] = gelu_tanh(gate[i]) * up[i], with torch's tanh approximation (`gelu_pytorch_tanh`):
// 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
void gelu_tanh_mul(float* gate, const float* up, size_t n);
float gelu_tanh(float x);

// The first key position a query at `pos` attends to: max(0, pos - window + 1) for a sliding window (keys
// pos - window < j <= pos, HF's sliding mask), 0 for window 0 (every earlier position).
inline int window_start(int pos, int window) { return window > 0 && pos >= window ? pos - window + 1 : 0; }

// x -> cap * tanh(x / cap) for every element (Gemma's final_logit_softcapping).
void softcap(float* x, size_t n, float cap);

}  // namespace optforge_rt
