// gmod_attn_decode_combine_kernel: merges the fp32 (o, lse) partials of the split-k decode
// (gmod_attn_fwd_kernel / gmod_attn_fwd_tc_kernel with kSplit) into o and lse.
//   o = sum_s w_s o_s,  w_s = exp(lse_s - lse),  lse = log sum_s exp(lse_s).
// Launcher: attention_decode.cu (grid: decode_combine_grid, shared memory: decode_combine_smem_bytes).
//
// One CTA per output row (b, query, q head), so that the splits of a row are read in parallel: the
// stop-9 kernel (one warp per row, the splits in a loop whose lse load decided whether to load o_s)
// spent two dependent memory round trips per split, ~0.7 us per split with 32-64 splits at batch 1
// (modelled from the stop-9 decode numbers: 20-48 % of copy at B = 1, where only 8 kv heads exist).
//   1. thread s < S loads lse_s; block max and sum give lse and the weights w_s (shared memory);
//   2. the threads are (slot, column): column c of kCols float4 columns of the head dim, slot t of
//      kSlots; thread (t, c) sums w_s o_s[c] over s = t, t + kSlots, ..., with loads that depend on
//      nothing but s;
//   3. the kSlots partial sums of each column are added in slot order (shared memory).
// The order of every sum is fixed: bit-identical results run to run. Splits with lse_s = -inf (no key)
// get w_s = 0; the split kernel writes their o_s as zeros, so every load is unconditional.
#pragma once

#include "attention_common.cuh"

namespace gmod::attn {

// 256 threads per CTA: at batch 1 there are only B x Hq = 32 rows (CTAs) for the whole GPU, so each
// needs many loads in flight; 8 slots at d = 128 leave 8 splits per thread at 64 splits.
inline constexpr int kCombineThreads = 256;
template <int kHeadDim>
struct CombinePlan {
  static constexpr int kCols = kHeadDim / 4;                 // float4 columns per row
  static constexpr int kSlots = kCombineThreads / kCols;     // splits summed side by side
  static_assert(kHeadDim % 4 == 0 && kCols <= kCombineThreads, "head dim");
  static_assert(kDecodeMaxSplits <= kCombineThreads, "one lse per thread");
};

// Shared memory: w [kDecodeMaxSplits] floats, the block-reduction scratch [2 x warps] floats, the
// partial sums [kSlots x kCols] float4.
template <int kHeadDim>
constexpr int decode_combine_smem_bytes() {
  using P = CombinePlan<kHeadDim>;
  return static_cast<int>(sizeof(float)) * (kDecodeMaxSplits + 2 * (kCombineThreads / 32)) +
         static_cast<int>(sizeof(float4)) * P::kSlots * P::kCols;
}
// Rows beyond the grid are taken by a grid-stride loop (B x Cq x Hq can exceed gridDim.x's 2^31 - 1).
inline unsigned decode_combine_grid(int64_t rows) {
  return static_cast<unsigned>(rows < (int64_t{1} << 30) ? rows : (int64_t{1} << 30));
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineThreads) gmod_attn_decode_combine_kernel(const AttnFwdParams p) {
  using P = CombinePlan<kHeadDim>;
  constexpr int kWarps = kCombineThreads / 32;
  extern __shared__ float4 gmod_attn_smem[];
  float* sW = reinterpret_cast<float*>(gmod_attn_smem);  // [kDecodeMaxSplits]
  float* sRed = sW + kDecodeMaxSplits;                    // [2][kWarps]
  float4* sAcc = reinterpret_cast<float4*>(sRed + 2 * kWarps);  // [kSlots][kCols], 16-byte aligned
  static_assert((kDecodeMaxSplits + 2 * kWarps) % 4 == 0, "sAcc alignment");

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int S = p.num_splits;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Cq * p.Hq;
  pdl_wait_prerequisites();  // launched early (PDL): the split kernel's partials are complete from here
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {  // uniform over the CTA
    const int h = static_cast<int>(row % p.Hq);
    const int i = static_cast<int>((row / p.Hq) % p.Cq);
    const int b = static_cast<int>(row / (static_cast<int64_t>(p.Hq) * p.Cq));

    // ---- 1. lse and the weights.
    const float ls = tid < S ? p.lse_part[(((int64_t)tid * p.B + b) * p.Hq + h) * p.Cq + i] : -INFINITY;
    const float wmax = warp_max(ls);
    if (lane == 0) sRed[warp] = wmax;
    __syncthreads();
    float mx = sRed[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) mx = fmaxf(mx, sRed[w]);
    const bool has_keys = mx != -INFINITY;  // uniform
    const float e = (has_keys && ls != -INFINITY) ? expf(ls - mx) : 0.f;
    const float wsum = warp_sum(e);
    if (lane == 0) sRed[kWarps + warp] = wsum;
    __syncthreads();
    float sum = sRed[kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) sum += sRed[kWarps + w];
    const float lse = has_keys ? mx + logf(sum) : -INFINITY;
    if (tid < S) sW[tid] = (has_keys && ls != -INFINITY) ? expf(ls - lse) : 0.f;
    __syncthreads();

    // ---- 2. thread (slot, column) sums its splits.
    const int slot = tid / P::kCols, col = tid % P::kCols;
    const float* part = p.o_part + (((int64_t)b * p.Cq + i) * p.Hq + h) * kHeadDim;
    const int64_t split_stride = static_cast<int64_t>(p.B) * p.Cq * p.Hq * kHeadDim;  // floats
    if (slot < P::kSlots) {
      float4 x = make_float4(0.f, 0.f, 0.f, 0.f);
      auto add = [&](float w, const float4& o_s) {
        x.x = fmaf(w, o_s.x, x.x);
        x.y = fmaf(w, o_s.y, x.y);
        x.z = fmaf(w, o_s.z, x.z);
        x.w = fmaf(w, o_s.w, x.w);
      };
      // Every o_s row is written by the split kernel (zeros for a split without keys), so the loads
      // need no predicate and depend on nothing but s. ptxas (CUDA 13, sm_90) keeps about two of them
      // in flight per thread (also with explicit batches of four, or the four in one asm statement),
      // so the 256 threads per row are what give the parallelism.
      if (has_keys) {
#pragma unroll 4
        for (int s = slot; s < S; s += P::kSlots)
          add(sW[s], *reinterpret_cast<const float4*>(part + s * split_stride + 4 * col));
      }
      sAcc[slot * P::kCols + col] = x;
    }
    __syncthreads();

    // ---- 3. the slots' sums in slot order, written as T.
    T* dst = static_cast<T*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    if (tid < P::kCols) {
      const int c4 = tid;
      float4 x = sAcc[c4];
#pragma unroll
      for (int t = 1; t < P::kSlots; ++t) {
        const float4 y = sAcc[t * P::kCols + c4];
        x.x += y.x, x.y += y.y, x.z += y.z, x.w += y.w;
      }
      const float v[4] = {x.x, x.y, x.z, x.w};
      Elem<T>::store4(dst + 4 * c4, v);
    }
    if (tid == 0) p.lse[((int64_t)b * p.Hq + h) * p.Cq + i] = lse;
    __syncthreads();  // sW / sRed / sAcc are rewritten by the next row
  }
}

}  // namespace gmod::attn
