// Runs csrc/'s CUDA q_sample and posterior kernels on the CPU (see cuda_runtime.h) and checks
// what a GPU-less machine cannot otherwise see: which element each thread takes, and that the
// in-kernel noise is element L = lane L % 4 of Philox block L / 4 (philox_randn) whichever
// mapping a tile uses (4 consecutive elements per thread on rows a multiple of 4 long).
// Prints "all match" and exits 0, or the first mismatches and exits 1.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_launch.h"
#include "kernel_args.h"
#include "philox.h"

using namespace ddpm_fast;

namespace {

int failures = 0;

void fail(const char* what, long s, long i, double got, double want) {
  if (failures++ < 10) std::printf("%s (S=%ld, element %ld): %.9g vs %.9g\n", what, s, i, got, want);
}

// (N, C, S) strides: NCHW, or channels_last (C innermost).
View3 view(float* p, int64_t C, int64_t S, bool channels_last) {
  return channels_last ? View3{p, C * S, 1, C} : View3{p, C * S, S, 1};
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  std::vector<float> sqrt_ab(1000), sqrt_1mab(1000), alphas_cumprod(1000);
  for (int i = 0; i < 1000; ++i) {
    alphas_cumprod[i] = 1.0f - 0.0009f * static_cast<float>(i);
    sqrt_ab[i] = std::sqrt(alphas_cumprod[i]);
    sqrt_1mab[i] = std::sqrt(1.0f - alphas_cumprod[i]);
  }
  const int64_t seed = 0x123456789abcLL;
  std::vector<int64_t> t = {7, 900}, prev_t = {6, 899};
  const int64_t N = 2, C = 3;
  for (int64_t S : {3, 35, 64, 1024, 1280, 2052}) {
    for (bool cl : {false, true}) {
      const int64_t L = N * C * S;
      std::vector<float> x0(L), x_t(L), drawn(L), x_t_given(L), normals(L);
      for (auto& v : x0) v = normal(rng);
      // normals[i]: the noise of the element stored at i (logical index n C S + c S + s)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t s = 0; s < S; ++s)
            normals[view(nullptr, C, S, cl).at(n, c, s)] = philox_randn(seed, static_cast<uint64_t>((n * C + c) * S + s));

      QSampleArgs a;
      a.x0 = view(x0.data(), C, S, cl), a.x_t = view(x_t.data(), C, S, cl), a.noise_out = view(drawn.data(), C, S, cl);
      a.t = t.data(), a.sqrt_ab = Table{sqrt_ab.data(), false}, a.sqrt_1mab = Table{sqrt_1mab.data(), false};
      a.seed = &seed, a.T = 1000, a.N = N, a.C = C, a.S = S;
      launch_q_sample_cuda(a, kF32, nullptr);
      for (int64_t i = 0; i < L; ++i) {
        if (std::memcmp(&drawn[i], &normals[i], sizeof(float)) != 0) fail("q_sample drawn noise", S, i, drawn[i], normals[i]);
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c)
          for (int64_t s = 0; s < S; ++s) {
            const int64_t i = a.x_t.at(n, c, s);
            const double want = double(sqrt_ab[t[n]]) * x0[i] + double(sqrt_1mab[t[n]]) * drawn[i];
            if (std::fabs(x_t[i] - want) > 1e-6 * (1.0 + std::fabs(want))) fail("q_sample x_t", S, i, x_t[i], want);
          }
      QSampleArgs given = a;
      given.noise = view(drawn.data(), C, S, cl), given.noise_out = View3{}, given.seed = nullptr;
      given.x_t = view(x_t_given.data(), C, S, cl);
      launch_q_sample_cuda(given, kF32, nullptr);
      if (std::memcmp(x_t.data(), x_t_given.data(), L * sizeof(float)) != 0) fail("q_sample drawn vs given x_t", S, -1, 0, 0);

      // posterior_step, drawn noise against the same normals given
      std::vector<float> mo(L), x(L), prev(L), prev_given(L);
      for (auto& v : mo) v = normal(rng);
      for (auto& v : x) v = normal(rng);
      for (int kind : {kDDPM, kDDIM}) {
        PosteriorArgs p;
        p.model_output = view(mo.data(), C, S, cl), p.sample = view(x.data(), C, S, cl);
        p.prev = view(prev.data(), C, S, cl);
        p.t = t.data(), p.prev_t = prev_t.data(), p.alphas_cumprod = Table{alphas_cumprod.data(), false};
        p.seed = &seed, p.T = 1000, p.N = N, p.C = C, p.S = S;
        p.kind = kind, p.pred = kPredEps, p.var = kFixedSmall, p.clip = kClip, p.eta = kind == kDDIM ? 0.5 : 0.0;
        launch_posterior_cuda(p, kF32, kF32, nullptr);
        PosteriorArgs q = p;
        q.seed = nullptr, q.noise = view(normals.data(), C, S, cl), q.prev = view(prev_given.data(), C, S, cl);
        launch_posterior_cuda(q, kF32, kF32, nullptr);
        for (int64_t i = 0; i < L; ++i) {
          if (std::memcmp(&prev[i], &prev_given[i], sizeof(float)) != 0) {
            fail(kind == kDDPM ? "posterior DDPM drawn vs given" : "posterior DDIM drawn vs given", S, i, prev[i],
                 prev_given[i]);
          }
        }
      }
    }
  }
  std::printf(failures ? "%d mismatches\n" : "all match\n", failures);
  return failures != 0;
}
