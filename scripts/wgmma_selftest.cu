// The wgmma building blocks of the sm_90a attention kernels (csrc/cuda/attention_wgmma.cuh), each on its
// own, on the GPU: one warpgroup loads random bf16 matrices into shared memory in the kernels' 128-byte
// swizzled layouts (sw128_offset), builds the descriptors the way the kernels do, issues the wgmma
// chain through the same wrappers and writes its accumulator fragments out; the host compares them
// with a float64 product. If the wgmma forward / backward tests fail on an H100, this says which
// operand form (K-major A / B, N-major B, M-major A, register A, the 64-column block step) is read
// differently from the way the kernels and the host emulation (csrc/cuda/emu/cuda_emu.h) assume.
// Needs only nvcc and an sm_90 GPU (no torch):
//   nvcc -std=c++17 -O2 -gencode arch=compute_90a,code=sm_90a -I csrc/cuda -I csrc/include \
//        scripts/wgmma_selftest.cu -o /tmp/wgmma_selftest && /tmp/wgmma_selftest
// Prints PASS / FAIL per case; the exit status is the number of failures. gpu_check.sh runs it as the
// wgmma_selftest step. The same file also builds against the host emulation, where every case must pass
// (python_tests/test_kernel_emulation.py), so that a failure on the GPU is the hardware reading a form
// differently from cuda_emu.h, not a bug of this test:
//   g++ -std=c++20 -O1 -pthread -x c++ -DGMOD_SELFTEST_EMU -I csrc/cuda -I csrc/include \
//       -I /usr/local/cuda/include scripts/wgmma_selftest.cu -o /tmp/wgmma_selftest_emu
#ifdef GMOD_SELFTEST_EMU
#include "emu/cuda_emu.h"  // first: the CUDA emulation the kernel headers compile against
#endif

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "attention_wgmma.cuh"

using T = __nv_bfloat16;

namespace gmod::attn {  // (the emulation's shared memory, gmod_attn_smem, lives there)

// The operand forms of the kernels. A: M = 64 rows x K; B: K x N; C = A B, 64 x N fp32.
enum Form {
  kQK128,    // forward S = Q K^T: A K-major [64][128], B K-major (rows = N = 128 keys) [128][128]
  kKQ64,     // backward S^T = K Q^T: A K-major [64][128], B K-major (N = 64 queries) [64][128]
  kPV128,    // forward O += P V: A in registers [64][128], B N-major (rows = K = 128 keys, N = 128)
  kPdO64,    // backward dV += P^T dO: A in registers [64][64], B N-major (K = 64 queries, N = 64)
  kDsK64,    // backward dQ = dS K: A M-major (stored A^T: rows = K = 64 keys, M = 64 cols), B N-major N = 64
  kDsK64Hi,  // the same with B the second 64-column block of a [64 keys][128] K tile (d = 128's cb = 1)
};
struct Case {
  Form form;
  const char* name;
  int K, N;
};
constexpr Case kCases[] = {
    {kQK128, "ss K-major A + K-major B, m64n128, K = 128 (fwd S = Q K^T)", 128, 128},
    {kKQ64, "ss K-major A + K-major B, m64n64, K = 128 (bwd S^T = K Q^T)", 128, 64},
    {kPV128, "rs register A + N-major B, m64n128, K = 128 (fwd O += P V)", 128, 128},
    {kPdO64, "rs register A + N-major B, m64n64, K = 64 (bwd dV += P^T dO)", 64, 64},
    {kDsK64, "ss M-major A + N-major B, m64n64, K = 64 (bwd dQ = dS K)", 64, 64},
    {kDsK64Hi, "ss M-major A + N-major B from column block 1, m64n64, K = 64 (bwd dQ at d = 128)", 64, 64},
};

// a: A as [64][K] row-major; b: B as [K][N] row-major (for kDsK64Hi: [K][128], columns 64.. used).
// c: C as [64][N].
template <Form F, int K, int N>
__global__ void __launch_bounds__(128) selftest_kernel(const T* a, const T* b, float* c) {
  extern __shared__ float4 gmod_attn_smem[];
  char* const smem = reinterpret_cast<char*>(gmod_attn_smem);
  const uint32_t base = smem_u32(smem);
  const uint32_t pad = (1024u - (base & 1023u)) & 1023u;
  char* const sA = smem + pad;
  char* const sB = sA + 64 * 128 * 2 * 2;  // A takes at most 64 x 128 16-bit
  const uint32_t aA = base + pad, aB = aA + 64 * 128 * 2 * 2;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, q = lane % 4;
  constexpr int NB = F == kDsK64Hi ? 128 : N;  // columns of the stored B

  // ---- shared tiles: 16-bit rows as [cols / 64][rows][128 B] (sw128_offset), element by element
  auto put = [&](char* tile, int rows, int r, int col, T v) {
    *reinterpret_cast<T*>(tile + sw128_offset(r, col / 8, rows) + 2 * (col % 8)) = v;
  };
  for (int i = t; i < 64 * K; i += 128) {
    const int m = i / K, k = i % K;
    if constexpr (F == kQK128 || F == kKQ64) put(sA, 64, m, k, a[i]);  // K-major: rows = M
    if constexpr (F == kDsK64 || F == kDsK64Hi) put(sA, K, k, m, a[i]);  // M-major: rows = K, cols = M
  }
  for (int i = t; i < K * NB; i += 128) {
    const int k = i / NB, n = i % NB;
    if constexpr (F == kQK128 || F == kKQ64)
      put(sB, N, n, k, b[i]);  // K-major: rows = N
    else
      put(sB, K, k, n, b[i]);  // N-major: rows = K
  }
  fence_proxy_async();
  __syncthreads();

  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
  wgmma_fence();
  if constexpr (F == kQK128 || F == kKQ64) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      const uint32_t col = (kk % 4) * 32u;
      wgmma_ss<T, N>(acc, wgmma_desc_sw128(aA + (kk / 4) * 64 * 128 + col, 16, 1024),
                     wgmma_desc_sw128(aB + (kk / 4) * N * 128 + col, 16, 1024), kk > 0);
    }
  } else if constexpr (F == kPV128 || F == kPdO64) {
    // A's register fragment (attention_wgmma.cuh): reg j = row 16 w + g + 8 (j % 2), cols 2 q + 8 (j / 2) + {0, 1}
    uint32_t ra[K / 16][4];
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int m = 16 * warp + g + 8 * (j % 2), k = 16 * kk + 2 * q + 8 * (j / 2);
        ra[kk][j] = pack2<T>(__bfloat162float(a[m * K + k]), __bfloat162float(a[m * K + k + 1]));
      }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
      wgmma_rs<T, N>(acc, ra[kk], wgmma_desc_sw128(aB + kk * 16 * 128, K * 128, 1024), true);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_keep_regs(ra);
  } else {
    const uint32_t b0 = F == kDsK64Hi ? K * 128 : 0;  // column block 1 of the [2][K][128 B] tile
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
      wgmma_ss<T, N, true, true>(acc, wgmma_desc_sw128(aA + kk * 16 * 128, 64 * 128, 1024),
                                 wgmma_desc_sw128(aB + b0 + kk * 16 * 128, K * 128, 1024), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_keep(acc);
  // accumulator fragment: element i = row 16 w + g + 8 ((i / 2) % 2), col 8 (i / 4) + 2 q + i % 2
#pragma unroll
  for (int i = 0; i < N / 2; ++i)
    c[(16 * warp + g + 8 * ((i / 2) % 2)) * N + 8 * (i / 4) + 2 * q + i % 2] = acc[i];
}

}  // namespace gmod::attn

using namespace gmod::attn;

template <Form F, int K, int N>
static int run(const Case& cs, std::mt19937& rng) {
  constexpr int NB = F == kDsK64Hi ? 128 : N;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> a(64 * K), b(K * NB);
  for (auto& x : a) x = __float2bfloat16(nd(rng));
  for (auto& x : b) x = __float2bfloat16(nd(rng));
  const int smem = 1024 + 2 * 64 * 128 * 2 * 2;
  std::vector<float> c(64 * N, NAN);  // NaN: an element never written shows up
#ifdef GMOD_SELFTEST_EMU
  emu::launch(dim3(1), 128, smem, [&] { selftest_kernel<F, K, N>(a.data(), b.data(), c.data()); });
  const cudaError_t err = cudaSuccess;
#else
  T *da, *db;
  float* dc;
  cudaMalloc(&da, a.size() * sizeof(T));
  cudaMalloc(&db, b.size() * sizeof(T));
  cudaMalloc(&dc, 64 * N * sizeof(float));
  cudaMemcpy(da, a.data(), a.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemcpy(db, b.data(), b.size() * sizeof(T), cudaMemcpyHostToDevice);
  cudaMemset(dc, 0xff, 64 * N * sizeof(float));
  cudaFuncSetAttribute(selftest_kernel<F, K, N>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  selftest_kernel<F, K, N><<<1, 128, smem>>>(da, db, dc);
  const cudaError_t err = cudaDeviceSynchronize();
  cudaMemcpy(c.data(), dc, c.size() * sizeof(float), cudaMemcpyDeviceToHost);
  cudaFree(da), cudaFree(db), cudaFree(dc);
#endif
  if (err != cudaSuccess) {
    std::printf("FAIL %s: %s\n", cs.name, cudaGetErrorString(err));
    return 1;
  }
  const int n_off = F == kDsK64Hi ? 64 : 0;
  double max_err = 0, max_ref = 0;
  int bad_m = -1, bad_n = -1;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < N; ++n) {
      double r = 0;
      for (int k = 0; k < K; ++k) {
        r += double(__bfloat162float(a[m * K + k])) * double(__bfloat162float(b[k * NB + n_off + n]));
      }
      const double e = std::fabs(c[m * N + n] - r);
      max_ref = std::fmax(max_ref, std::fabs(r));
      if (!(e <= max_err)) {
        max_err = std::isnan(e) ? INFINITY : e;
        bad_m = m, bad_n = n;
      }
    }
  const bool ok = max_err <= 1e-4 * max_ref + 1e-3;
  if (ok)
    std::printf("PASS %s: max err %.2g (|C| up to %.3g)\n", cs.name, max_err, max_ref);
  else
    std::printf("FAIL %s: max err %.3g at (%d, %d): got %.5g (|C| up to %.3g)\n", cs.name, max_err, bad_m, bad_n,
                c[bad_m * N + bad_n], max_ref);
  return ok ? 0 : 1;
}

int main() {
#ifndef GMOD_SELFTEST_EMU
  int dev = 0, major = 0, minor = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (major != 9 || minor != 0) {
    std::printf("wgmma_selftest needs a compute capability 9.0 GPU (this one: %d.%d)\n", major, minor);
    return 99;
  }
#endif
  std::mt19937 rng(7);
  int fails = 0;
  fails += run<kQK128, 128, 128>(kCases[0], rng);
  fails += run<kKQ64, 128, 64>(kCases[1], rng);
  fails += run<kPV128, 128, 128>(kCases[2], rng);
  fails += run<kPdO64, 64, 64>(kCases[3], rng);
  fails += run<kDsK64, 64, 64>(kCases[4], rng);
  fails += run<kDsK64Hi, 64, 64>(kCases[5], rng);
  std::printf("%d of %d wgmma cases failed\n", fails, static_cast<int>(sizeof(kCases) / sizeof(kCases[0])));
  return fails;
}
