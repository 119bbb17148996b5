// Each matmul format against a double-precision reference on the dequantized weights, on every ISA the CPU has;
// a token's outputs must not depend on the batch or the thread count (bit-exact), whatever the shape's tails.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "optforge_rt/kernels.h"

using namespace optforge_rt;

static double max_rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) { num = std::max(num, std::fabs(a[i] - b[i])); den = std::max(den, std::fabs(b[i])); }
  return num / den;
}

static int nibble(const std::vector<uint8_t>& q4, int N, int K, int n, int k) {
  int j = k % 32;
  uint8_t byte = q4[(n * K + (k - j)) / 2 + (j % 16)];
  return (j < 16 ? (byte & 0xF) : (byte >> 4)) - 8;
}

// Weight-only (fp32 activations) with float32 scales, one per `per` blocks: each format equals the fp32 matmul
// of its dequantized weights bit for bit (batched, grouped or one token at a time), and a double reference to
// fp32 rounding.
static void check_weight_only(const std::vector<int8_t>& q8, const std::vector<uint8_t>& q4, int N, int K, int per,
                              const std::vector<float>& x, int M, ThreadPool& pool) {
  const int ns = K / 32 / per;
  std::vector<float> s8(N * ns), s4(N * ns);
  for (int i = 0; i < N * ns; ++i) {
    s8[i] = 0.01f + 0.001f * float(i % 17) / 3.f;  // not representable in fp16: the scales are used as stored
    s4[i] = 0.1f + 0.01f * float(i % 13) / 7.f;
  }
  Linear l8, l4;
  l8.out_features = l4.out_features = N;
  l8.in_features = l4.in_features = K;
  l8.format = WeightFormat::kInt8; l8.q8 = q8.data(); l8.scales_f32 = s8.data();
  l4.format = WeightFormat::kInt4; l4.q4 = q4.data(); l4.scales_f32 = s4.data();
  l8.blocks_per_scale = l4.blocks_per_scale = per;
  std::vector<float> d8(N * K), d4(N * K);
  std::vector<double> ref8(M * N, 0.0), ref4(M * N, 0.0);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      const int g = n * ns + k / 32 / per;
      d8[n * K + k] = float(q8[n * K + k]) * s8[g];
      d4[n * K + k] = float(nibble(q4, N, K, n, k)) * s4[g];
      for (int m = 0; m < M; ++m) {
        ref8[m * N + n] += double(d8[n * K + k]) * x[m * K + k];
        ref4[m * N + n] += double(d4[n * K + k]) * x[m * K + k];
      }
    }
  }
  Linear f8, f4;
  f8.out_features = f4.out_features = N;
  f8.in_features = f4.in_features = K;
  f8.f32 = d8.data();
  f4.f32 = d4.data();
  std::vector<float> y8(M * N), y4(M * N), e8(M * N), e4(M * N);
  matmul_group({&l8, &l4}, x.data(), M, {y8.data(), y4.data()}, pool);
  matmul_group({&f8, &f4}, x.data(), M, {e8.data(), e4.data()}, pool);
  CHECK(y8 == e8 && y4 == e4);
  CHECK(max_rel_err(y8, ref8) < 1e-5 && max_rel_err(y4, ref4) < 1e-5);
  ThreadPool single(1);
  for (int m = 0; m < M; ++m) {
    std::vector<float> g8(N), g4(N);
    matmul(l8, x.data() + m * K, 1, g8.data(), single);
    matmul(l4, x.data() + m * K, 1, g4.data(), pool);
    for (int n = 0; n < N; ++n) CHECK(g8[n] == y8[m * N + n] && g4[n] == y4[m * N + n]);
  }
  CHECK(l8.weight_bytes() == size_t(N) * K + size_t(N) * ns * 4);
}

// N rows, K columns, M tokens: N not a multiple of 4 and an odd block count exercise the kernels' tails.
static void check_shape(int N, int K, int M) {
  std::mt19937 rng(N * 1000 + K);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> w(N * K), x(M * K);
  for (float& v : w) v = dist(rng);
  for (float& v : x) v = dist(rng);
  std::vector<int8_t> q8(N * K);
  std::vector<uint8_t> q4(N * K / 2);
  std::vector<uint16_t> s8(N * K / 32), s4(N * K / 32);  // fp16 bits
  quantize_int8_blocks(w.data(), N, K, q8.data(), s8.data());
  quantize_int4_blocks(w.data(), N, K, q4.data(), s4.data());
  std::vector<double> ref32(M * N), ref8(M * N), ref4(M * N);
  for (int m = 0; m < M; ++m) {
    for (int n = 0; n < N; ++n) {
      double a = 0, b = 0, c = 0;
      for (int k = 0; k < K; ++k) {
        int blk = n * (K / 32) + k / 32;
        a += double(w[n * K + k]) * x[m * K + k];
        b += double(q8[n * K + k]) * f16_to_f32(s8[blk]) * x[m * K + k];
        c += double(nibble(q4, N, K, n, k)) * f16_to_f32(s4[blk]) * x[m * K + k];
      }
      ref32[m * N + n] = a; ref8[m * N + n] = b; ref4[m * N + n] = c;
    }
  }
  // Reconstruction error is at most half a step of the stored (fp16) scale: the weights were quantized with
  // the rounded scale, not with amax / qmax.
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k) {
      float s = f16_to_f32(s4[n * (K / 32) + k / 32]), t = f16_to_f32(s8[n * (K / 32) + k / 32]);
      CHECK(std::fabs(nibble(q4, N, K, n, k) * s - w[n * K + k]) <= 0.5f * s + 1e-6f);
      CHECK(std::fabs(q8[n * K + k] * t - w[n * K + k]) <= 0.5f * t + 1e-6f);
    }
  }
  ThreadPool pool(3), single(1);
  std::vector<float> scalar8, scalar4;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (isa > detected_isa()) continue;
    set_isa(isa);
    std::fprintf(stderr, "N=%d K=%d M=%d isa=%s\n", N, K, M, isa_name(isa));
    Linear l32, l8, l4;
    l32.out_features = l8.out_features = l4.out_features = N;
    l32.in_features = l8.in_features = l4.in_features = K;
    l32.f32 = w.data();
    l8.format = WeightFormat::kInt8; l8.q8 = q8.data(); l8.scales = s8.data();
    l4.format = WeightFormat::kInt4; l4.q4 = q4.data(); l4.scales = s4.data();
    l8.activations = l4.activations = Activations::kInt8;
    std::vector<float> y32(M * N), y8(M * N), y4(M * N);
    matmul_group({&l32, &l8, &l4}, x.data(), M, {y32.data(), y8.data(), y4.data()}, pool);
    check_weight_only(q8, q4, N, K, 1, x, M, pool);       // a scale per block
    check_weight_only(q8, q4, N, K, K / 32, x, M, pool);  // per channel, as quant.int8_weight_only stores them
    if ((K / 32) % 4 == 0) check_weight_only(q8, q4, N, K, 4, x, M, pool);  // groups of 128 columns
    CHECK(max_rel_err(y32, ref32) < 1e-5);
    CHECK(max_rel_err(y8, ref8) < 2e-2);  // activations are quantized to int8 per block of 32
    CHECK(max_rel_err(y4, ref4) < 2e-2);
    if (isa == Isa::kScalar) {
      scalar8 = y8;
      scalar4 = y4;
    } else {  // the integer dot products are exact, so the ISAs differ only by float summation order
      for (int i = 0; i < M * N; ++i) {
        CHECK(std::fabs(y8[i] - scalar8[i]) <= 1e-4f * (1.f + std::fabs(scalar8[i])));
        CHECK(std::fabs(y4[i] - scalar4[i]) <= 1e-4f * (1.f + std::fabs(scalar4[i])));
      }
    }
    for (int m = 0; m < M; ++m) {  // each token alone, on one thread, equals its row of the batched GEMM
      std::vector<float> g32(N), g8(N), g4(N);
      matmul(l32, x.data() + m * K, 1, g32.data(), single);
      matmul(l8, x.data() + m * K, 1, g8.data(), single);
      matmul(l4, x.data() + m * K, 1, g4.data(), m % 2 ? single : pool);
      for (int n = 0; n < N; ++n) CHECK(g32[n] == y32[m * N + n] && g8[n] == y8[m * N + n] && g4[n] == y4[m * N + n]);
    }
    std::vector<float> ax(37), ay(37, 1.f);
    for (int i = 0; i < 37; ++i) ax[i] = float(i);
    axpy_f32(0.5f, ax.data(), ay.data(), 37);
    for (int i = 0; i < 37; ++i) CHECK(ay[i] == 1.f + 0.5f * float(i));
  }
  set_isa(detected_isa());
}

// fp32 only, any K (the 16-column and scalar tails of the AVX-512 4 x 2 tiles): batched rows equal one token
// at a time bit for bit, and a double reference closely.
static void check_f32_batch(int N, int K, int M) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> w(N * K), x(M * K);
  for (float& v : w) v = dist(rng);
  for (float& v : x) v = dist(rng);
  ThreadPool pool(2), single(1);
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (isa > detected_isa()) continue;
    set_isa(isa);
    Linear l;
    l.out_features = N;
    l.in_features = K;
    l.f32 = w.data();
    std::vector<float> y(M * N), g(N);
    matmul(l, x.data(), M, y.data(), pool);
    for (int m = 0; m < M; ++m) {
      matmul(l, x.data() + m * K, 1, g.data(), single);
      for (int n = 0; n < N; ++n) {
        double ref = 0;
        for (int k = 0; k < K; ++k) ref += double(w[n * K + k]) * x[m * K + k];
        CHECK(g[n] == y[m * N + n]);
        CHECK(std::fabs(y[m * N + n] - ref) <= 1e-5 * (1.0 + std::fabs(ref)) * std::sqrt(double(K)));
      }
    }
  }
  set_isa(detected_isa());
}

// The half conversions: exact widening, round-to-nearest-even narrowing, subnormals, and the quantizers'
// scale for an all-zero block (1, never 0).
static void check_f16() {
  CHECK(f32_to_f16(1.f) == 0x3C00 && f16_to_f32(0x3C00) == 1.f);
  CHECK(f32_to_f16(-2.f) == 0xC000 && f32_to_f16(65504.f) == 0x7BFF);
  CHECK(f32_to_f16(1.f + std::ldexp(1.f, -11)) == 0x3C00);      // a tie rounds to the even neighbour
  CHECK(f32_to_f16(1.f + 3 * std::ldexp(1.f, -11)) == 0x3C02);  // ... in both directions
  CHECK(f16_to_f32(0x0001) == std::ldexp(1.f, -24));             // smallest subnormal
  for (uint32_t h = 0; h < 0x7C00; ++h) CHECK(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h))) == h);
  std::vector<float> zeros(64, 0.f);
  std::vector<int8_t> q8(64, 1);
  std::vector<uint8_t> q4(32, 0);
  std::vector<uint16_t> s(2);
  quantize_int8_blocks(zeros.data(), 1, 64, q8.data(), s.data());
  CHECK(s[0] == 0x3C00 && s[1] == 0x3C00 && q8[0] == 0 && q8[63] == 0);
  quantize_int4_blocks(zeros.data(), 1, 64, q4.data(), s.data());
  CHECK(s[0] == 0x3C00 && q4[0] == 0x88);
}

// attend() against a double reference, and bit for bit against its definition through dot_f32 / axpy_f32 on
// every ISA (the AVX2 kernel keeps the output in registers where D is a multiple of 64: same fmas, same order).
static void check_attend(int n, int D) {
  std::mt19937 rng(n * 100 + D);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> q(D), kv(2 * n * D);
  for (float& v : q) v = dist(rng);
  for (float& v : kv) v = dist(rng);
  std::vector<const float*> k(n), v(n);
  for (int p = 0; p < n; ++p) { k[p] = &kv[2 * p * D]; v[p] = &kv[(2 * p + 1) * D]; }
  const float scale = 1.f / std::sqrt(float(D));
  std::vector<double> ref(D, 0.0), e(n);
  double mx = -1e300, sum = 0;
  for (int p = 0; p < n; ++p) {
    e[p] = 0;
    for (int i = 0; i < D; ++i) e[p] += double(q[i]) * k[p][i];
    e[p] *= scale;
    mx = std::max(mx, e[p]);
  }
  for (int p = 0; p < n; ++p) sum += (e[p] = std::exp(e[p] - mx));
  for (int p = 0; p < n; ++p) for (int i = 0; i < D; ++i) ref[i] += e[p] / sum * v[p][i];
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (isa > detected_isa()) continue;
    set_isa(isa);
    std::vector<float> scores(n), out(D), manual(D, 0.f);
    attend(q.data(), k.data(), v.data(), n, D, scale, scores.data(), out.data());
    CHECK(max_rel_err(out, ref) < 1e-5);
    float m = -INFINITY, s = 0.f;
    for (int p = 0; p < n; ++p) m = std::max(m, scores[p] = dot_f32(q.data(), k[p], D) * scale);
    for (int p = 0; p < n; ++p) s += (scores[p] = std::exp(scores[p] - m));
    for (int p = 0; p < n; ++p) axpy_f32(scores[p] / s, v[p], manual.data(), D);
    for (int i = 0; i < D; ++i) CHECK(out[i] == manual[i]);
  }
  set_isa(detected_isa());
}

int main() {
  check_f16();
  check_attend(1, 64);
  check_attend(37, 64);   // SmolLM2's head_dim
  check_attend(20, 128);
  check_attend(9, 40);    // not a multiple of 64: the per-position axpy
  check_shape(7, 576, 2);  // 18 blocks: AVX2 scale groups of 8, 8 and a short 2; odd rows
  check_shape(5, 288, 1);  // 9 blocks: a short group holding a lone block
  check_shape(72, 96, 5);   // 3 blocks: one pair and a lone block
  check_shape(70, 128, 3);  // 4 blocks; 70 rows leave a tail of 2 under 4-row tiles
  check_shape(9, 32, 2);    // one block, fewer rows than threads x tiles
  check_shape(6, 544, 2);   // 17 blocks (8 pairs and a lone one), as SmolLM2's 576 columns make 9 pairs
  check_shape(5, 1024, 2);  // 32 blocks
  check_shape(13, 576, 7);  // SmolLM2's width, an odd number of tokens and rows: 4 x 2 tiles and their leftovers
  check_f32_batch(9, 50, 5);  // 32 + 16 + 2 columns
  check_f32_batch(4, 16, 2);
  check_f32_batch(6, 7, 3);   // no vector step at all
  return 0;
}
