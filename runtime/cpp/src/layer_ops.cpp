#include "optforge_rt/layer_ops.h"

#include <cmath>

namespace optforge_rt {

void rms_norm(const float* x, const float* w, int n, float eps, float* out) {
  float ss = 0.f;
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

std::vector<float> plus_one(const float* w, int n) {
  std::vector<float> out(w, w + n);
  for (float& v : out) v = 1.0f + v;
  return out;
}

std::vector<float> rope_inv_freq(float theta, int head_dim, float factor) {
  std::vector<float> out;
  for (int i = 0; i < head_dim / 2; ++i) {
    float f = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
    out.push_back(factor == 1.0f ? f : f / factor);
  }
  return out;
}

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

void silu_mul(float* gate, const float* up, size_t n) {
  for (size_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

float gelu_tanh(float x) {
  const float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);  // sqrt(2 / pi), as torch's kernel spells it
  const float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * (x * x * x));
  return 0.5f * x * (1.0f + std::tanh(inner));
}

void gelu_tanh_mul(float* gate, const float* up, size_t n) {
  for (size_t i = 0; i < n; ++i) gate[i] = gelu_tanh(gate[i]) * up[i];
}

void softcap(float* x, size_t n, float cap) {
  for (size_t i = 0; i < n; ++i) x[i] = std::tanh(x[i] / cap) * cap;
}

}  // namespace optforge_rt
