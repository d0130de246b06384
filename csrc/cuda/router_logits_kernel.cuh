// The row-block kernel of gmod.router_logits, forward and backward (semantics: csrc/cpu/router_logits.cpp):
//   logit = r * sum_j x_j a_j,   r = 1 / sqrt(mean(x^2) + eps),   a_j = weight_j * norm_weight_j
//   dx    = g r a - (g r^3 dot / D) x,   U_j = sum_rows g r x_j,   dweight = U nw,   dnorm = U w
//
// Why a block per row chunk (and not a warp per row): the backward's weight gradient U needs a
// per-column sum over rows. With one block owning whole rows, thread t owns the same 16-byte column
// groups of every row, so U accumulates in its registers and x is read from memory exactly once
// (the warp-per-row design read x twice more for U and the dx pass). The same layout gives the forward
// a[] in registers (loaded once per block, no per-row re-read of a[D]).
//
// Block: T threads (a multiple of 32, <= kRowBlockMaxThreads); thread t owns column groups
// g = t + k T (k < CPT) of VN elements (16 bytes of x). Rows [chunk * rows_per_chunk, ...) are
// walked R = 4 / CPT at a time: 4 vector loads per thread in flight, the next step's loads issued
// before this step's reduction. Per step the 2R row sums (x.x and x.a) go warp shuffle (one
// reduce-scatter for all 2R) -> shared memory -> warp 0 adds the warps in order -> shared memory,
// two block barriers per step.
// Every summation order is fixed, so results are bit-reproducible run to run; the backward's
// partial[chunk, D] is reduced over chunks in order by gmod_router_logits_wgrad_reduce_kernel.
//
// Torch-free (raw pointers, scalar_t = c10 or CUDA 16-bit types) so that csrc/cuda/emu can run it
// on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace gmod::router {

constexpr int kRowBlockWarp = 32;
constexpr int kRowBlockMaxThreads = 512;
constexpr int kRowBlockMaxWarps = kRowBlockMaxThreads / kRowBlockWarp;
constexpr int kRowBlockLoads = 4;  // R * CPT: 16-byte loads per thread per step

template <typename T, int N>
struct alignas(sizeof(T) * N) RowVec {
  T v[N];
};

template <typename acc_t>
struct RowBlockParams {
  const void* x;        // [rows, D] scalar_t, 16-byte aligned rows
  const void* w;        // [D] float32 or scalar_t
  const void* nw;       // [D] float32 or scalar_t, or null
  bool w_f32, nw_f32;
  int64_t rows, D;
  acc_t eps;
  int threads;              // T = blockDim.x
  int64_t rows_per_chunk;   // rows of one block (block b: rows [b * rows_per_chunk, ...))
  acc_t* out;               // forward: [rows]
  const acc_t* grad;        // backward: [rows]
  void* dx;                 // backward: [rows, D] scalar_t
  acc_t* partial;           // backward: [gridDim.x, D], U of each chunk
};

template <typename acc_t>
__device__ __forceinline__ acc_t row_block_sqrt(acc_t v) {
  if constexpr (std::is_same_v<acc_t, float>)
    return sqrtf(v);  // IEEE (no fast math), as the CPU
  else
    return sqrt(v);
}

// Warp sums of N values at once (N a power of two <= 32), as a reduce-scatter: at the shuffle distance
// 16 a lane keeps one half of its values and sends the other (N / 2 shuffles), then N / 4 at 8, ...,
// then plain butterfly steps for the one value left. N - 1 + log2(32 / N) shuffles instead of
// 5 N (8 values: 9 instead of 40). Lane l ends with the sum of value row_block_scatter_index<N>(l),
// identical over each run of 32 / N lanes; the order of the additions is fixed.
template <int N, typename acc_t>
__device__ __forceinline__ acc_t row_block_warp_sum_scatter(acc_t (&v)[N], int lane) {
  static_assert(N >= 1 && N <= kRowBlockWarp && (N & (N - 1)) == 0, "N: a power of two <= 32");
  int off = kRowBlockWarp / 2;
#pragma unroll
  for (int half = N / 2; half >= 1; half /= 2, off /= 2) {
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const acc_t send = upper ? v[i] : v[i + half];
      const acc_t keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
  }
  acc_t s = v[0];
#pragma unroll
  for (; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}
// The value whose sum lane `lane` holds after row_block_warp_sum_scatter<N>.
template <int N>
__device__ __forceinline__ int row_block_scatter_index(int lane) {
  int j = 0, off = kRowBlockWarp / 2;
#pragma unroll
  for (int half = N / 2; half >= 1; half /= 2, off /= 2)
    if (lane & off) j += half;
  return j;
}

// bf16 element types (cuda_bf16.h's here; the launcher adds c10::BFloat16): a bf16 is the upper half of
// its fp32 value, so a 32-bit word of two converts with one shift and one mask.
template <typename T>
struct RowBlockIsBf16 : std::false_type {};
template <>
struct RowBlockIsBf16<__nv_bfloat16> : std::true_type {};

__device__ __forceinline__ uint32_t row_block_word(const uint4& w, int j) {
  return j == 0 ? w.x : j == 1 ? w.y : j == 2 ? w.z : w.w;
}

// Elements e and e + 1 (e even) of the 16 bytes w of a row, as acc_t. The rows stay in uint4 registers
// (loaded, zero-filled and moved as whole words): as arrays of 16-bit elements, the compiler built the
// zero-or-load select and the prefetch copy one 16-bit half at a time (~60 byte permutes per step).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_block_pair(const uint4& w, int e, acc_t& lo, acc_t& hi) {
  if constexpr (RowBlockIsBf16<scalar_t>::value && std::is_same_v<acc_t, float> && sizeof(scalar_t) == 2) {
    const uint32_t x = row_block_word(w, e / 2), xl = x << 16, xh = x & 0xffff0000u;
    std::memcpy(&lo, &xl, 4);
    std::memcpy(&hi, &xh, 4);
  } else {
    scalar_t t[16 / sizeof(scalar_t)];
    std::memcpy(t, &w, 16);
    lo = static_cast<acc_t>(t[e]);
    hi = static_cast<acc_t>(t[e + 1]);
  }
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t row_block_scale(const void* p, bool is_f32, int64_t i) {
  return is_f32 ? static_cast<acc_t>(static_cast<const float*>(p)[i])
                : static_cast<acc_t>(static_cast<const scalar_t*>(p)[i]);
}

// Shared memory: red[warp][2R] (per-warp sums), then tot[2R] (the block's sums), in acc_t.
template <typename acc_t>
constexpr int row_block_smem_bytes() {
  return static_cast<int>(sizeof(acc_t)) * (kRowBlockMaxWarps + 1) * 2 * kRowBlockLoads;
}

// Registers (sm_90, bf16, CPT 1): the forward fits 64 (62; two 512-thread blocks per SM); the backward
// also holds x for dx and the U accumulators (92), one block per SM, whose 4 x 16-byte loads per
// thread in flight (32 KiB per SM) still cover the memory latency. No spills but 24 bytes in the
// 16-bit CPT 4 forward (rows wider than 8192 elements; 8 before the first row load moved ahead of the
// a[] loads, which took the H100 forward / backward from 72 / 79 % to 74 / 81 % of copy bandwidth).
template <typename scalar_t, typename acc_t, int VN, int CPT, bool kBackward>
__global__ void __launch_bounds__(kRowBlockMaxThreads, kBackward ? 1 : 2)
    gmod_router_logits_rows_kernel(RowBlockParams<acc_t> p) {
  constexpr int R = kRowBlockLoads / CPT;  // rows per step
  static_assert(R * CPT == kRowBlockLoads && R >= 1, "CPT must divide kRowBlockLoads");
  static_assert(VN % 2 == 0 && VN * sizeof(scalar_t) == 16, "16-byte row vectors of element pairs");
  using XV = RowVec<scalar_t, VN>;
  // Dynamic shared memory (row_block_smem_bytes): red[warp][2R], then tot[2R].
  extern __shared__ float4 gmod_router_smem[];
  acc_t* red = reinterpret_cast<acc_t*>(gmod_router_smem);
  acc_t* tot = red + kRowBlockMaxWarps * 2 * R;

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / kRowBlockWarp, lane = tid % kRowBlockWarp;
  const int nwarps = p.threads / kRowBlockWarp;
  const int64_t D = p.D;
  const int64_t ngroups = D / VN;

  bool own[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) own[k] = tid + static_cast<int64_t>(k) * p.threads < ngroups;

  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_chunk;
  const int64_t r_end = r_begin + p.rows_per_chunk < p.rows ? r_begin + p.rows_per_chunk : p.rows;
  const uint4* xrows = static_cast<const uint4*>(p.x);  // 16 bytes = VN elements per vector

  // Step loads: rows r0 .. r0 + R - 1 (zeros past r_end or outside this thread's columns).
  auto load_step = [&](int64_t r0, uint4 (&buf)[R][CPT]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        if (own[k] && r0 + i < r_end) {
          buf[i][k] = xrows[(r0 + i) * ngroups + tid + static_cast<int64_t>(k) * p.threads];
        } else {
          buf[i][k] = make_uint4(0u, 0u, 0u, 0u);  // zero bits: +0 in every element type
        }
      }
  };
  // The first step's rows go out before the a[] loads below, so that their latencies overlap.
  uint4 cur[R][CPT];
  if (r_begin < r_end) load_step(r_begin, cur);

  // a = w * nw for this thread's columns (0 outside D, so that idle lanes add nothing).
  acc_t a[CPT][VN];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int64_t g = tid + static_cast<int64_t>(k) * p.threads;
#pragma unroll
    for (int e = 0; e < VN; ++e) {
      acc_t v = 0;
      if (own[k]) {
        v = row_block_scale<scalar_t, acc_t>(p.w, p.w_f32, g * VN + e);
        if (p.nw != nullptr) v = v * row_block_scale<scalar_t, acc_t>(p.nw, p.nw_f32, g * VN + e);
      }
      a[k][e] = v;
    }
  }
  acc_t u[kBackward ? CPT : 1][kBackward ? VN : 1];
  if constexpr (kBackward) {
#pragma unroll
    for (int k = 0; k < CPT; ++k)
#pragma unroll
      for (int e = 0; e < VN; ++e) u[k][e] = 0;
  }

  for (int64_t r0 = r_begin; r0 < r_end; r0 += R) {
    // This thread's part of x.x and x.a for each row of the step.
    acc_t part[2 * R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      acc_t s = 0, d = 0;
#pragma unroll
      for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int e = 0; e < VN; e += 2) {
          acc_t v0, v1;
          row_block_pair<scalar_t>(cur[i][k], e, v0, v1);
          s += v0 * v0;
          d += v0 * a[k][e];
          s += v1 * v1;
          d += v1 * a[k][e + 1];
        }
      part[i] = s;
      part[R + i] = d;
    }
    // The next step's loads go out before the barriers of this one. (Issued before the row sums, for
    // two steps in flight, ptxas sinks them back below the sums in the 64-register forward anyway, sm_90
    // SASS: holding both steps across the sums would not fit two 512-thread blocks per SM.)
    uint4 nxt[R][CPT];
    if (r0 + R < r_end) load_step(r0 + R, nxt);

    {
      const acc_t sum = row_block_warp_sum_scatter<2 * R>(part, lane);
      if (lane % (kRowBlockWarp / (2 * R)) == 0) red[warp * 2 * R + row_block_scatter_index<2 * R>(lane)] = sum;
    }
    __syncthreads();
    if (warp == 0 && lane < 2 * R) {
      acc_t t = 0;
      for (int w2 = 0; w2 < nwarps; ++w2) t += red[w2 * 2 * R + lane];
      tot[lane] = t;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int64_t row = r0 + i;
      const acc_t ss = tot[i], dot = tot[R + i];
      const acc_t r = acc_t(1) / row_block_sqrt(ss / static_cast<acc_t>(D) + p.eps);
      if constexpr (!kBackward) {
        if (tid == 0 && row < r_end) p.out[row] = dot * r;
      } else {
        if (row < r_end) {
          const acc_t g = p.grad[row];
          const acc_t gr = g * r;
          const acc_t c = g * r * r * r * dot / static_cast<acc_t>(D);
          XV* dxrow = static_cast<XV*>(p.dx) + row * ngroups;
#pragma unroll
          for (int k = 0; k < CPT; ++k) {
            if (!own[k]) continue;
            XV o;
#pragma unroll
            for (int e = 0; e < VN; e += 2) {
              acc_t x0, x1;
              row_block_pair<scalar_t>(cur[i][k], e, x0, x1);
              o.v[e] = static_cast<scalar_t>(gr * a[k][e] - c * x0);
              o.v[e + 1] = static_cast<scalar_t>(gr * a[k][e + 1] - c * x1);
              u[k][e] += gr * x0;
              u[k][e + 1] += gr * x1;
            }
            dxrow[tid + static_cast<int64_t>(k) * p.threads] = o;
          }
        }
      }
    }
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int k = 0; k < CPT; ++k) cur[i][k] = nxt[i][k];
  }

  if constexpr (kBackward) {
    using AV = RowVec<acc_t, VN>;
    AV* prow = reinterpret_cast<AV*>(p.partial + static_cast<int64_t>(blockIdx.x) * D);
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      if (!own[k]) continue;
      AV o;
#pragma unroll
      for (int e = 0; e < VN; ++e) o.v[e] = u[k][e];
      prow[tid + static_cast<int64_t>(k) * p.threads] = o;
    }
  }
}

// The launch shape for D columns of VN elements: the smallest CPT in {1, 2, 4} with at most
// kRowBlockMaxThreads threads, T = that many threads rounded up to a warp. False if D is too wide
// (the caller keeps the warp-per-row kernels then).
struct RowBlockShape {
  int threads = 0, cpt = 0;
};
inline bool row_block_shape(int64_t D, int VN, RowBlockShape& s) {
  const int64_t groups = D / VN;
  for (int cpt = 1; cpt <= kRowBlockLoads; cpt *= 2) {
    const int64_t t = (groups + cpt - 1) / cpt;
    if (t <= kRowBlockMaxThreads) {
      s.cpt = cpt;
      s.threads = static_cast<int>((t + kRowBlockWarp - 1) / kRowBlockWarp * kRowBlockWarp);
      if (s.threads == 0) s.threads = kRowBlockWarp;
      return true;
    }
  }
  return false;
}

// Rows per block. Forward: 32 (a[] is re-read per block from L2; 32 rows keep that under 20 % of
// the traffic; on the H100, 64 rows and one wave of equal chunks ran at the same speed, 2214-2224
// GB/s at B=8, S=2048, D=4096 bf16). Backward: partial[] costs 8 bytes per (chunk, column) against
// ~3 x esize bytes per (row, column) of x / dx traffic, so chunks of >= 64 rows and at most 1024 of
// them. A function of (rows, direction) only: the reduction order, hence the bits, do not depend on
// the device.
inline int64_t row_block_rows_per_chunk(int64_t rows, bool backward) {
  if (!backward) return 32;
  const int64_t by_count = (rows + 1023) / 1024;
  return by_count > 64 ? by_count : 64;
}

}  // namespace gmod::router
