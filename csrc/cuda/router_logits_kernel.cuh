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
// before this step's reduction. Per step the 2R row sums (x.x and x.a) go warp shuffle -> shared
// memory -> warp 0 adds the warps in order -> shared memory, two block barriers per step.
// Every summation order is fixed, so results are bit-reproducible run to run; the backward's
// partial[chunk, D] is reduced over chunks in order by gmod_router_logits_wgrad_reduce_kernel.
//
// Torch-free (raw pointers, scalar_t = c10 or CUDA 16-bit types) so that csrc/cuda/emu can run it
// on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
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

template <typename acc_t>
__device__ __forceinline__ acc_t row_block_warp_sum(acc_t v) {
#pragma unroll
  for (int off = kRowBlockWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
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

// Registers (sm_90, bf16, CPT 1): the forward fits 64 (two 512-thread blocks per SM); the backward
// also holds x for dx and the U accumulators (~120), one block per SM, whose 4 x 16-byte loads per
// thread in flight (32 KiB per SM) still cover the memory latency.
template <typename scalar_t, typename acc_t, int VN, int CPT, bool kBackward>
__global__ void __launch_bounds__(kRowBlockMaxThreads, kBackward ? 1 : 2)
    gmod_router_logits_rows_kernel(RowBlockParams<acc_t> p) {
  constexpr int R = kRowBlockLoads / CPT;  // rows per step
  static_assert(R * CPT == kRowBlockLoads && R >= 1, "CPT must divide kRowBlockLoads");
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

  // a = w * nw for this thread's columns (0 outside D, so that idle lanes add nothing).
  acc_t a[CPT][VN];
  bool own[CPT];
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    const int64_t g = tid + static_cast<int64_t>(k) * p.threads;
    own[k] = g < ngroups;
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

  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * p.rows_per_chunk;
  const int64_t r_end = r_begin + p.rows_per_chunk < p.rows ? r_begin + p.rows_per_chunk : p.rows;
  const XV* xrows = static_cast<const XV*>(p.x);

  // Step loads: rows r0 .. r0 + R - 1 (zeros past r_end or outside this thread's columns).
  auto load_step = [&](int64_t r0, XV (&buf)[R][CPT]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        if (own[k] && r0 + i < r_end) {
          buf[i][k] = xrows[(r0 + i) * ngroups + tid + static_cast<int64_t>(k) * p.threads];
        } else {
#pragma unroll
          for (int e = 0; e < VN; ++e) buf[i][k].v[e] = static_cast<scalar_t>(0.0f);
        }
      }
  };

  XV cur[R][CPT];
  if (r_begin < r_end) load_step(r_begin, cur);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += R) {
    // This thread's part of x.x and x.a for each row of the step.
    acc_t part[2 * R];
#pragma unroll
    for (int i = 0; i < R; ++i) {
      acc_t s = 0, d = 0;
#pragma unroll
      for (int k = 0; k < CPT; ++k)
#pragma unroll
        for (int e = 0; e < VN; ++e) {
          const acc_t v = static_cast<acc_t>(cur[i][k].v[e]);
          s += v * v;
          d += v * a[k][e];
        }
      part[i] = s;
      part[R + i] = d;
    }
    // The next step's loads go out before the barriers of this one.
    XV nxt[R][CPT];
    if (r0 + R < r_end) load_step(r0 + R, nxt);

#pragma unroll
    for (int j = 0; j < 2 * R; ++j) part[j] = row_block_warp_sum(part[j]);
    if (lane == 0) {
#pragma unroll
      for (int j = 0; j < 2 * R; ++j) red[warp * 2 * R + j] = part[j];
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
            for (int e = 0; e < VN; ++e) {
              const acc_t xv = static_cast<acc_t>(cur[i][k].v[e]);
              o.v[e] = static_cast<scalar_t>(gr * a[k][e] - c * xv);
              u[k][e] += gr * xv;
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
// the traffic). Backward: partial[] costs 8 bytes per (chunk, column) against ~3 x esize bytes per
// (row, column) of x / dx traffic, so chunks of >= 64 rows and at most 1024 of them. A function of
// (rows, direction) only: the reduction order, hence the bits, do not depend on the device.
inline int64_t row_block_rows_per_chunk(int64_t rows, bool backward) {
  if (!backward) return 32;
  const int64_t by_count = (rows + 1023) / 1024;
  return by_count > 64 ? by_count : 64;
}

}  // namespace gmod::router
