// Host emulation of gmod.rope's CUDA kernel (csrc/cuda/rope_kernel.cuh): every vector width the launcher
// can pick (1, 2, 4, 8 elements), full and partial rotary (a copied tail), a grid smaller than the work (the
// grid-stride loop), forward and backward, in fp32 / bf16 / fp16 / fp64. The expected values come from a plain
// loop over the same per-pair formula (gmod/rope_pair.h), so results must match bit for bit: what this checks is
// the kernel's indexing (which pair each lane reads and writes, the tail, the rows' angle tables), with every
// output poisoned (NaN) beforehand so that an element nobody writes shows.
//   g++ -std=c++20 -O1 -pthread -Icsrc/include -I$CUDA_HOME/include csrc/cuda/emu/rope_emu_test.cpp
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"  // first: the CUDA emulation the kernel header compiles against

#include "../rope_kernel.cuh"

using gmod::rope::gmod_rope_kernel;
using gmod::rope::kThreads;

template <typename T> T from_f(float x) { return static_cast<T>(x); }
template <typename T> float to_f(T x) { return static_cast<float>(x); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "fp32"; }
template <> const char* tname<double>() { return "fp64"; }
template <> const char* tname<__half>() { return "fp16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }

static int g_failures = 0, g_cases = 0;

template <typename T>
static bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// rows = B * C * H rows of d; H heads share a token's r angles.
template <typename scalar_t, typename acc_t, int V, bool kBackward>
static void run_case(int64_t rows, int64_t H, int64_t d, int64_t r, unsigned blocks, uint32_t seed) {
  ++g_cases;
  std::mt19937 gen(seed);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ang(0.f, 6.28f);
  const int64_t tokens = rows / H, half = r / 2;
  // the rows' storage 16-byte aligned, as the launcher requires for V > 1
  std::vector<scalar_t, std::allocator<scalar_t>> x(rows * d), cs(tokens * r), sn(tokens * r);
  for (auto& v : x) v = from_f<scalar_t>(nd(gen));
  for (int64_t i = 0; i < tokens * r; ++i) {  // both halves drawn on their own: the kernel reads each
    const float a = ang(gen);
    cs[i] = from_f<scalar_t>(std::cos(a));
    sn[i] = from_f<scalar_t>(std::sin(a) * (i % 3 == 0 ? -1.f : 1.f));
  }
  std::vector<scalar_t> want(rows * d), got(rows * d, from_f<scalar_t>(NAN));
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t tok = n / H;
    for (int64_t j = 0; j < half; ++j) {
      acc_t lo, hi;
      gmod::rope_pair<kBackward, acc_t>(static_cast<acc_t>(x[n * d + j]), static_cast<acc_t>(x[n * d + j + half]),
                                        static_cast<acc_t>(cs[tok * r + j]), static_cast<acc_t>(cs[tok * r + j + half]),
                                        static_cast<acc_t>(sn[tok * r + j]), static_cast<acc_t>(sn[tok * r + j + half]),
                                        lo, hi);
      want[n * d + j] = static_cast<scalar_t>(lo);
      want[n * d + j + half] = static_cast<scalar_t>(hi);
    }
    for (int64_t j = r; j < d; ++j) want[n * d + j] = x[n * d + j];
  }
  emu::launch(dim3(blocks), kThreads, 0, [&] {
    gmod_rope_kernel<scalar_t, acc_t, V, kBackward>(x.data(), cs.data(), sn.data(), got.data(), rows, H, d, r);
  });
  int64_t bad = 0, first = -1;
  for (int64_t i = 0; i < rows * d; ++i)
    if (!same_bits(got[i], want[i])) {
      if (first < 0) first = i;
      ++bad;
    }
  std::printf("%s %s V=%d rows=%lld H=%lld d=%lld r=%lld blocks=%u: %s\n", tname<scalar_t>(),
              kBackward ? "bwd" : "fwd", V, static_cast<long long>(rows), static_cast<long long>(H),
              static_cast<long long>(d), static_cast<long long>(r), blocks, bad ? "FAIL" : "ok");
  if (bad) {
    ++g_failures;
    std::printf("  FAIL %lld of %lld elements differ; first at row %lld dim %lld: got %g want %g\n",
                static_cast<long long>(bad), static_cast<long long>(rows * d), static_cast<long long>(first / d),
                static_cast<long long>(first % d), static_cast<double>(to_f(got[first])),
                static_cast<double>(to_f(want[first])));
  }
}

template <typename scalar_t, typename acc_t, int V>
static void both(int64_t rows, int64_t H, int64_t d, int64_t r, unsigned blocks, uint32_t& seed) {
  run_case<scalar_t, acc_t, V, false>(rows, H, d, r, blocks, seed++);
  run_case<scalar_t, acc_t, V, true>(rows, H, d, r, blocks, seed++);
}

int main() {
  uint32_t seed = 7;
  // 16-byte vectors of Llama's head (d = r = 128), bf16 / fp16: 8 elements; fp32: 4; fp64: 2
  both<__nv_bfloat16, float, 8>(12, 4, 128, 128, 1, seed);
  both<__half, float, 8>(6, 3, 128, 128, 1, seed);
  both<float, float, 4>(6, 2, 128, 128, 1, seed);
  both<double, double, 2>(4, 2, 64, 64, 1, seed);
  // partial rotary: the tail copied in vectors of the same width (r / 2 = 16, d - r = 32)
  both<__nv_bfloat16, float, 8>(10, 5, 64, 32, 1, seed);
  // narrower vectors: r / 2 = 12 and d - r = 8 allow 4 (bf16); r / 2 = 6 and d - r = 4 allow 2; odd halves 1
  both<__nv_bfloat16, float, 4>(8, 4, 32, 24, 1, seed);
  both<__nv_bfloat16, float, 2>(8, 2, 16, 12, 1, seed);
  both<float, float, 1>(9, 3, 10, 6, 1, seed);
  both<__half, float, 1>(5, 5, 14, 10, 1, seed);
  // more work than threads: the grid-stride loop (40 rows x 48 items over 2 blocks of 256)
  both<float, float, 1>(40, 4, 64, 32, 2, seed);
  both<__nv_bfloat16, float, 8>(64, 8, 128, 128, 1, seed);
  std::printf("%d cases, %d failures\n", g_cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
