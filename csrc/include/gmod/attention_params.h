// Parameters and tile plans of the CUDA attention kernels (gmod.attention and gmod.attention_backward),
// flash-attention style: one plain struct per pass, filled on the host by csrc/cuda/attention_api.cu and
// passed by value to kernels that are templated on the element type and the head dim.
//
// Layouts (all contiguous, strides in elements):
//   q, o, dout, dq   [B, Cq, Hq, d]      input dtype
//   k, v, dk, dv     [B, Ck, Hk, d]      input dtype
//   lse, delta       [B, Hq, Cq]         float32
//   o_part           [splits, B, Cq, Hq, d] float32   (split-k decode partials)
//   lse_part         [splits, B, Hq, Cq]    float32
//   dq_accum         [B, Cq, Hq, d]      float32   (atomic dq; same layout as dq)
//   dk_accum/dv_accum [B, Ck, Hk, d]     float32   (atomic dk/dv when a CTA covers part of a GQA group)
// Semantics (see csrc/cpu/attention.cpp): query i < q_len[b] sees keys j < n_i,
//   n_i = max(0, min(k_len[b], k_len[b] - q_len[b] + i + 1)); rows past q_len give o = 0, lse = -inf.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace gmod::attn {

// Head dims with a compiled kernel (GMOD_HEADDIM_SWITCH in static_switch.h lists the same set).
#define GMOD_ATTN_HEADDIMS_STR "{32, 64, 96, 128, 256}"
inline constexpr bool is_supported_head_dim(int64_t d) {
  return d == 32 || d == 64 || d == 96 || d == 128 || d == 256;
}

struct AttnFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;           // output (forward) or input (backward), input dtype
  float* lse;        // output (forward) or input (backward)
  const int32_t* q_len;
  const int32_t* k_len;

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;

  int B, Cq, Ck, Hq, Hk;
  int group;         // Hq / Hk: q head h reads kv head h / group
  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): the kernels work with exp2

  // 1: run the tensor-core kernels (bf16 / fp16 on sm_80+, decided by attention_api.cu), 0: the SIMT ones.
  int use_tensor_cores;
  // Keys per tile of the tensor-core prefill forward at d = 128: 64 (default) or 32 (TcFwdNarrowTile128,
  // GMOD_ATTN_FWD_BLOCK_N=32); other head dims ignore it.
  int tc_fwd_block_n;
  // 3 or 2: the prefill forward runs the sm_90a wgmma kernel with that many K / V stages
  // (attention_fwd_wgmma_kernel.cuh; 16-bit inputs, d = 64 / 128, a compute capability 9.0 GPU,
  // GMOD_ATTN_FWD_IMPL=wgmma / wgmma-2stage); 0, and other cases: the mma.sync kernels.
  int fwd_wgmma;

  // Split-k decode (attention_decode.cu): CTA `split` handles key tiles
  // [split * blocks_per_split, (split + 1) * blocks_per_split) and writes fp32 partials.
  int num_splits;
  float* o_part;
  float* lse_part;
  // 1: the combine kernel is launched with programmatic dependent launch (GMOD_ATTN_PDL=1, sm_90+), so it
  // starts while the split kernel drains (attention_common.cuh: pdl_launch_dependents / pdl_wait_prerequisites).
  int decode_pdl;
  // 3: the key-split tensor-core decode (<= 16 packed rows, d <= 128) runs TcDecodeKeySplitDeepTile, a ring
  // of 3 K / V buffers (GMOD_ATTN_DECODE_STAGES=3); 2 (or 0), and every other decode plan: double buffers.
  int decode_stages;
};

struct AttnBwdParams : AttnFwdParams {
  const void* dout;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;
  float* delta;     // [B, Hq, Cq]: <dO_i, O_i>, 0 for rows past q_len
  float* dq_accum;  // fp32 [B, Cq, Hq, d] (non-deterministic path: atomicAdd from the dk/dv kernel)
  float* dk_accum;  // fp32 [B, Ck, Hk, d] when heads_per_cta < group (atomicAdd), else unused
  float* dv_accum;
  int heads_per_cta;  // q heads of one GQA group handled by one dk/dv CTA: group (direct write) or 1
  // Keys per CTA of the tensor-core dk/dv kernel: kTcBwdBlockN (64, 4 warps; default) or
  // kTcBwdWideBlockN (128, 8 warps: TcBwdWideTile, GMOD_ATTN_BWD_BLOCK_N=128).
  int tc_bwd_block_n;
  // 1: the non-deterministic tensor-core backward runs the sm_90a wgmma dk/dv kernel
  // (attention_bwd_wgmma_kernel.cuh; 16-bit inputs, d = 64 / 128, a compute capability 9.0 GPU,
  // GMOD_ATTN_BWD_IMPL=wgmma; 128 keys per CTA like TcBwdWideTile); 0: the mma.sync kernels.
  int bwd_wgmma;
};

// ---------------------------------------------------------------- tile plans (host and device)
// Every kernel runs 128 threads = 16 row groups x 8 lanes (the 8 lanes of a row group are
// consecutive lanes of one warp, so a row's reductions are 3 xor-shuffles).
inline constexpr int kNThreads = 128;
// Most rows of any shared-memory tile the tensor-core kernels copy. Offsets inside a tile are 32-bit:
// attention_api.cu checks that kMaxTileRows rows of q / k / v stay below 2^31 elements.
inline constexpr int kMaxTileRows = 128;

// Forward (prefill / training): BLOCK_M query rows x BLOCK_N keys per step.
template <int kHeadDim> struct FwdTile {
  static constexpr int kBlockM = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kBlockN = kHeadDim <= 64 ? 64 : 32;
};
// Decode (Cq <= kDecodeMaxCq): the q heads of one GQA group are packed into the rows of the tile
// (row = query * group + head-in-group), keys split across CTAs.
inline constexpr int kDecodeMaxCq = 16;
inline constexpr int kDecodeBlockM = 16;
inline constexpr int kDecodeBlockN = 32;
inline constexpr int kDecodeMaxSplits = 128;
// Tensor-core decode (attention_fwd_tc_kernel.cuh): 64 packed rows (16 per warp) x 64 keys (32 for d = 256).
inline constexpr int kTcDecodeBlockM = 64;
inline constexpr int kTcDecodeBlockN = 64;
// Tensor-core backward (attention_bwd_tc_kernel.cuh): 64 keys per dk/dv CTA (4 warps x 16), d <= 128
// (d = 256 would need more than 255 registers for dK + dV; it stays on the SIMT kernels).
inline constexpr int kTcBwdBlockN = 64;
inline constexpr int kTcBwdWideBlockN = 128;  // 8 warps x 16 keys (GMOD_ATTN_BWD_BLOCK_N=128)
inline constexpr bool tc_bwd_supports_head_dim(int64_t head_dim) { return head_dim <= 128; }
// Key-split tensor-core decode (TcDecodeKeySplitTile): at most 16 packed rows (Cq x group) and d <= 128;
// the 4 warps share those rows and split every key tile, instead of 3 of 4 warps having no rows.
inline constexpr int kTcDecodeKeySplitRows = 16;
inline bool decode_key_split(bool tensor_cores, int64_t head_dim, int64_t packed_rows) {
  return tensor_cores && head_dim <= 128 && packed_rows <= kTcDecodeKeySplitRows;
}
inline int decode_block_m(bool tensor_cores, int64_t head_dim, int64_t packed_rows) {
  if (decode_key_split(tensor_cores, head_dim, packed_rows)) return kTcDecodeKeySplitRows;
  return tensor_cores ? kTcDecodeBlockM : kDecodeBlockM;
}
inline int decode_block_n(bool tensor_cores, int64_t head_dim) {
  return tensor_cores ? (head_dim <= 128 ? kTcDecodeBlockN : kTcDecodeBlockN / 2) : kDecodeBlockN;
}
// Backward: BLOCK_M query rows x BLOCK_N keys; dk/dv of BLOCK_N keys live in registers.
template <int kHeadDim> struct BwdTile {
  static constexpr int kBlockM = kHeadDim <= 128 ? 64 : 32;
  static constexpr int kBlockN = kHeadDim <= 128 ? 32 : 16;
};

inline int ceil_div_host(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Number of key splits for the decode kernel (flash-decoding), chosen with a wave model: the kernel is
// bound by reading the cache, every CTA of a wave streams at about the same rate, so the time goes as
// waves x (key tiles per CTA + kDecodeCtaOverheadTiles), where waves = ceil(CTAs / resident CTAs) and
// resident CTAs = num_sms x ctas_per_sm (the occupancy of the split kernel, from the CUDA occupancy
// API). The smallest split count of least cost wins. Each split gets at least 128 keys, none is empty,
// and B x splits stays within the grid's z limit. Why not "about 4 CTAs per SM", the stop-9 rule: on
// the H100 the d = 128 key-split kernel holds 3 CTAs per SM (74 KB of shared memory), 396 in all, so
// B = 8 took 512-576 CTAs, 1.3-1.5 waves, and the tail wave ran a few CTAs on a mostly idle GPU (61-78 %
// of copy measured, against 98-100 % at B = 32 with 768 CTAs, 1.94 waves).
inline constexpr int kDecodeCtaOverheadTiles = 1;  // a CTA's prologue / epilogue, in key-tile times
inline int decode_num_splits(int64_t B, int64_t Hk, int64_t m_blocks, int64_t Ck, int num_sms, int block_n,
                             int ctas_per_sm) {
  const int64_t n_blocks = (Ck + block_n - 1) / block_n;
  const int64_t min_blocks = (128 + block_n - 1) / block_n;  // key tiles per split, at least
  const int64_t ctas = B * Hk * m_blocks;
  const int64_t resident = static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * (ctas_per_sm > 0 ? ctas_per_sm : 1);
  if (n_blocks < 2 * min_blocks || ctas <= 0) return 1;
  int64_t max_splits = n_blocks / min_blocks;
  if (max_splits > kDecodeMaxSplits) max_splits = kDecodeMaxSplits;
  if (max_splits > 65535 / B) max_splits = 65535 / B;
  int64_t best = 1, best_cost = -1;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t per = (n_blocks + s - 1) / s;      // key tiles per split
    const int64_t splits = (n_blocks + per - 1) / per;  // no empty split
    const int64_t waves = (ctas * splits + resident - 1) / resident;
    const int64_t cost = waves * (per + kDecodeCtaOverheadTiles);
    if (best_cost < 0 || cost < best_cost) best = splits, best_cost = cost;
  }
  return static_cast<int>(best);
}

// A requested split count (GMOD_ATTN_DECODE_SPLITS) made valid: 1..kDecodeMaxSplits, at most one key
// tile per split and B x splits within the grid's z limit, and no empty split.
inline int decode_clamp_splits(int64_t requested, int64_t B, int64_t Ck, int block_n) {
  const int64_t n_blocks = (Ck + block_n - 1) / block_n;
  int64_t s = requested;
  if (s > kDecodeMaxSplits) s = kDecodeMaxSplits;
  if (s > n_blocks) s = n_blocks;
  if (s > 65535 / B) s = 65535 / B;
  if (s < 1) return 1;
  const int64_t per = (n_blocks + s - 1) / s;
  return static_cast<int>((n_blocks + per - 1) / per);
}

// ---------------------------------------------------------------- launchers
// Defined (and instantiated for float, __half, __nv_bfloat16 x the supported head dims) in
// attention_fwd.cu, attention_decode.cu and attention_bwd.cu. The forward launchers run the tensor-core
// kernel when params.use_tensor_cores (16-bit T only), else the SIMT kernel.
template <typename T, int kHeadDim> void run_attn_fwd(const AttnFwdParams& params, cudaStream_t stream);
// The sm_90a wgmma prefill forward (csrc/cuda/sm90a/attention_fwd_wgmma.cu; only in builds that define
// GMOD_WITH_SM90A), for T = __half / __nv_bfloat16 and the head dims below.
inline constexpr bool wgmma_fwd_supports_head_dim(int64_t d) { return d == 64 || d == 128; }
template <typename T, int kHeadDim> void run_attn_fwd_wgmma(const AttnFwdParams& params, cudaStream_t stream);
// The sm_90a wgmma backward dk/dv kernel with atomic dQ (csrc/cuda/sm90a/attention_bwd_wgmma.cu; only in
// builds that define GMOD_WITH_SM90A), same head dims.
template <typename T, int kHeadDim> void run_attn_bwd_dkdv_wgmma(const AttnBwdParams& params, cudaStream_t stream);
// Cq <= kDecodeMaxCq. params.num_splits > 1: params.o_part / lse_part must be allocated.
template <typename T, int kHeadDim> void run_attn_decode(const AttnFwdParams& params, cudaStream_t stream);
// CTAs per SM of the split-k decode kernel run_attn_decode would launch for params (sizes num_splits).
template <typename T, int kHeadDim> int decode_split_ctas_per_sm(const AttnFwdParams& params);
// deterministic: dq by a separate pass over key tiles, dk/dv of a GQA group summed inside one CTA.
// Otherwise dq is atomically added into params.dq_accum (zeroed by the caller), and dk/dv go to
// dk_accum/dv_accum (zeroed) when heads_per_cta < group.
template <typename T, int kHeadDim>
void run_attn_bwd(const AttnBwdParams& params, bool deterministic, cudaStream_t stream);

}  // namespace gmod::attn
