// Device helpers shared by the SIMT attention kernels (attention_fwd_kernel.cuh, attention_bwd_kernel.cuh):
// element conversion, global -> shared tile loads, warp reductions, the causal visibility rule.
//
// The SIMT kernels stage tiles in shared memory as float32 (converted once on load) and do the inner
// products as plain FMA loops. They run for float32 inputs, on GPUs older than sm_80 and with
// GMOD_ATTN_SIMT=1. bf16 / fp16 on sm_80+ run the tensor-core kernels (attention_fwd_tc_kernel.cuh,
// attention_mma.cuh: ldmatrix + mma.sync.m16n8k16 with S / P / O kept in mma fragments, cp.async
// double buffering), which share the params, the row mapping, the masking rule and the epilogues.
// These headers have no torch dependency, so the kernels also compile as host code against the
// emulation in csrc/cuda/emu/cuda_emu.h (used to test the index math without a GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "gmod/attention_params.h"

#define GMOD_DEV __device__ __forceinline__

namespace gmod::attn {

inline constexpr int kRowGroups = 16;  // threads along the rows of a tile (tid / 8)
inline constexpr int kColLanes = 8;    // threads along keys / head dim (tid % 8)
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

GMOD_DEV int imin(int a, int b) { return a < b ? a : b; }

// Zeroes register accumulators of the kernels' [..][4] shapes (mma C fragments, SIMT 4-wide tiles).
template <int N>
GMOD_DEV void zero_frags(float (&x)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) x[i][e] = 0.f;
}
template <int M, int N>
GMOD_DEV void zero_frags(float (&x)[M][N][4]) {
#pragma unroll
  for (int i = 0; i < M; ++i) zero_frags(x[i]);
}
GMOD_DEV int imax(int a, int b) { return a > b ? a : b; }
GMOD_DEV int iclamp(int x, int lo, int hi) { return imin(imax(x, lo), hi); }
GMOD_DEV int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Programmatic dependent launch (PDL, sm_90+) between the split-k decode kernel and its combine kernel
// (attention_decode.cu launches the combine with cudaLaunchAttributeProgrammaticStreamSerialization):
//   pdl_launch_dependents   a split CTA whose key tiles are all loaded lets the combine grid launch: its
//                           CTAs get scheduled as soon as every split CTA has said so (or exited), instead
//                           of after the whole split grid has drained (one launch latency saved);
//   pdl_wait_prerequisites  the combine waits there until every split CTA has completed and its partials
//                           are visible (griddepcontrol.wait), before it reads any.
// Launched without the attribute, or compiled below sm_90 / for the host emulation, both do nothing.
GMOD_DEV void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
GMOD_DEV void pdl_wait_prerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Keys query i (< q_len) of a row sees: 0 .. n-1 (bottom-right causal alignment).
GMOD_DEV int visible_keys(int i, int ql, int kl) { return imax(0, imin(kl, kl - ql + i + 1)); }

// The work of one backward dk/dv CTA, grid (key tiles, Hk x group / heads_per_cta, B): kv head hk,
// q heads [h_begin, h_begin + heads_per_cta), batch row b and its clamped lengths.
struct DkdvCta {
  int hk, h_begin, b, ql, kl;
};
template <typename Params>
GMOD_DEV DkdvCta dkdv_cta(const Params& p) {
  const int chunks = p.group / p.heads_per_cta;
  const int hk = static_cast<int>(blockIdx.y) / chunks;
  const int b = static_cast<int>(blockIdx.z);
  return {hk, hk * p.group + static_cast<int>(blockIdx.y) % chunks * p.heads_per_cta, b,
          iclamp(p.q_len[b], 0, p.Cq), iclamp(p.k_len[b], 0, p.Ck)};
}

// A dk/dv step's per-query softmax statistics into shared memory (threads tid, tid + nthreads, ..):
// lse log2 e and Delta of queries m0 .. m0 + rows - 1 of head h, 0 for queries without keys (their
// entries are masked anyway).
template <typename Params>
GMOD_DEV void stage_lse_delta(const Params& p, int b, int h, int m0, int rows, int ql, int kl, float* s_lse,
                              float* s_delta, int tid, int nthreads) {
  const float* lse = p.lse + ((int64_t)b * p.Hq + h) * p.Cq;
  const float* delta = p.delta + ((int64_t)b * p.Hq + h) * p.Cq;
  for (int r = tid; r < rows; r += nthreads) {
    const int i = m0 + r;
    const bool live = i < ql && visible_keys(i, ql, kl) > 0;
    s_lse[r] = live ? lse[i] * kLog2e : 0.f;
    s_delta[r] = live ? delta[i] : 0.f;
  }
}

// Tile geometry shared by the passes. A thread owns
//   rows   rg + 16 * ii     (ii < kRowsPerThread)   of a BLOCK_M tile,  rg = tid / 8
//   keys   lc + 8 * jj      (jj < kKeysPerThread)   of S / P / dS,      lc = tid % 8
//   cols   4 * lc + 32 * c + (0..3)  (c < kColChunks)  of O / dQ / dK / dV rows
// Shared tiles are float32 with padded rows (kStrideD = d + 4, kStrideN = BLOCK_N + 8 floats), so the
// float4 reads below are free of bank conflicts.
template <int kHeadDim_, int kBlockM_, int kBlockN_>
struct TileTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static_assert(kHeadDim % 32 == 0, "head dim must be a multiple of 32");
  static_assert(kBlockM % kRowGroups == 0, "BLOCK_M must be a multiple of 16");
  static_assert(kBlockN % 16 == 0, "BLOCK_N must be a multiple of 16");
  static constexpr int kRowsPerThread = kBlockM / kRowGroups;
  static constexpr int kKeysPerThread = kBlockN / kColLanes;
  static constexpr int kKeyRowsPerThread = kBlockN / kRowGroups;  // dK/dV rows of a thread (bwd)
  static constexpr int kColChunks = kHeadDim / 32;
  static constexpr int kStrideD = kHeadDim + 4;
  static constexpr int kStrideN = kBlockN + 8;
};

// ---------------------------------------------------------------- element conversion
template <typename T> struct Elem;

template <> struct Elem<float> {
  static constexpr int kVec = 4;  // elements per 16-byte load
  static GMOD_DEV void load_vec(const float* src, float (&x)[4]) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
  static GMOD_DEV float to_float(float v) { return v; }
  static GMOD_DEV void store4(float* dst, const float (&x)[4]) {
    *reinterpret_cast<float4*>(dst) = make_float4(x[0], x[1], x[2], x[3]);
  }
};

template <> struct Elem<__half> {
  static constexpr int kVec = 8;
  static GMOD_DEV void load_vec(const __half* src, float (&x)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    __half2 h[4];
    memcpy(h, &raw, sizeof(raw));  // register bit-cast (a pointer cast would break strict aliasing)
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const float2 f = __half22float2(h[t]);
      x[2 * t] = f.x;
      x[2 * t + 1] = f.y;
    }
  }
  static GMOD_DEV float to_float(__half v) { return __half2float(v); }
  static GMOD_DEV void store4(__half* dst, const float (&x)[4]) {
    const __half2 h[2] = {__floats2half2_rn(x[0], x[1]), __floats2half2_rn(x[2], x[3])};
    uint2 raw;
    memcpy(&raw, h, sizeof(raw));
    *reinterpret_cast<uint2*>(dst) = raw;
  }
};

template <> struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  static GMOD_DEV void load_vec(const __nv_bfloat16* src, float (&x)[8]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    __nv_bfloat162 h[4];
    memcpy(h, &raw, sizeof(raw));
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const float2 f = __bfloat1622float2(h[t]);
      x[2 * t] = f.x;
      x[2 * t + 1] = f.y;
    }
  }
  static GMOD_DEV float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static GMOD_DEV void store4(__nv_bfloat16* dst, const float (&x)[4]) {
    const __nv_bfloat162 h[2] = {__floats2bfloat162_rn(x[0], x[1]), __floats2bfloat162_rn(x[2], x[3])};
    uint2 raw;
    memcpy(&raw, h, sizeof(raw));
    *reinterpret_cast<uint2*>(dst) = raw;
  }
};

// ---------------------------------------------------------------- shared memory tiles
GMOD_DEV float4 lds4(const float* p) { return *reinterpret_cast<const float4*>(p); }
GMOD_DEV float comp(const float4& v, int t) { return t == 0 ? v.x : t == 1 ? v.y : t == 2 ? v.z : v.w; }

// Rows [0, kRows) of a tile, kHeadDim elements each, into shared memory as float32 with row stride
// kStride floats. row_ptr(r) is the global address of row r, or nullptr for a row that reads as
// zeros (past q_len / k_len / the tensor): padded rows are never read from global memory.
// MMA SITE (loads): cp.async.cg 16-byte copies of the 16-bit rows into a swizzled layout.
template <typename T, int kHeadDim, int kRows, int kStride, typename RowPtr>
GMOD_DEV void load_tile(float* smem, RowPtr row_ptr) {
  constexpr int kVec = Elem<T>::kVec;
  constexpr int kChunks = kHeadDim / kVec;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kNThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * kVec;
    const T* src = row_ptr(r);
    float x[kVec];
    if (src != nullptr) {
      Elem<T>::load_vec(src + c, x);
    } else {
#pragma unroll
      for (int t = 0; t < kVec; ++t) x[t] = 0.f;
    }
    float* dst = smem + r * kStride + c;
#pragma unroll
    for (int t = 0; t < kVec; t += 4)
      *reinterpret_cast<float4*>(dst + t) = make_float4(x[t], x[t + 1], x[t + 2], x[t + 3]);
  }
}

// ---------------------------------------------------------------- reductions
// Over the 8 lanes of a row group (consecutive lanes of one warp). Every lane of the warp must call.
GMOD_DEV float rowgroup_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 4));
  return x;
}
GMOD_DEV float rowgroup_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  return x;
}
GMOD_DEV float warp_max(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}
GMOD_DEV float warp_sum(float x) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

}  // namespace gmod::attn
