// Tensor-core forward attention (bf16 / fp16 in, fp32 accumulate; sm_80+, also the sm_90 path for now):
//   gmod_attn_fwd_tc_kernel   FlashAttention-2 structure on mma.sync.m16n8k16. 4 warps; warp w owns
//                             tile rows [w * 16 * kMAtoms, (w + 1) * 16 * kMAtoms) and keeps its S, P and
//                             O in mma fragments: S = Q K^T (Q and K by ldmatrix), online softmax on the
//                             fragments, P repacked in registers as the A operand of O += P V (V by
//                             ldmatrix.trans). K / V tiles are double-buffered with cp.async.
//                             With Tr::kStages = 3 (the deep decode tile) the K / V tiles are in a ring of
//                             three buffers and two tiles are in flight while one is computed.
// Key-split variant (Tr::kKeySplit, decode with at most 16 packed rows, e.g. one query of a GQA group):
//                             all 4 warps own the same 16 rows and split each key tile (warp w: keys
//                             [16 w, 16 w + 16)), each with its own online softmax; the four (m, l, O)
//                             states are merged through shared memory at the end. Otherwise only warp 0
//                             would have live rows and the CTA's math would run on one warp.
// Same grid, row mapping, masking and outputs as gmod_attn_fwd_kernel (attention_fwd_kernel.cuh, the
// SIMT kernel kept for float32 and pre-sm_80 GPUs): kPackGQA packs the q heads of a GQA group into the
// tile rows (decode), kSplit writes fp32 split-k partials for gmod_attn_decode_combine_kernel.
// Work that is skipped: key tiles past the CTA's causal / length limit are never loaded; a warp whose
// rows see none of a tile's keys (rows past q_len, packed rows that do not exist, the causal diagonal)
// skips that tile's MMAs.
// Shared memory rows are padded by 16 bytes (row stride d + 8 elements): the 8 row addresses of each
// ldmatrix 8x8 matrix then fall in 8 different 16-byte bank groups (no conflicts), with no swizzle.
#pragma once

#include "attention_common.cuh"
#include "attention_mma.cuh"

namespace gmod::attn {

// kMAtoms: 16-row mma atoms per warp (tile rows = 4 warps x 16 x kMAtoms). kKeySplit: the warps share
// their rows (tile rows = 16 x kMAtoms) and split the kBlockN keys of a tile instead.
// Three choices that cost registers, made per tile plan because what fits in 255 registers without
// spills is only known from ptxas (sm_90, checked with scripts/sass_loop_stats.py / -Xptxas -v):
//   kLazyRescale   O and l are rescaled only when a row's max grew (a warp vote per row);
//   kUnrollCopies  the K / V tile copies fully unrolled (cp_async_rows; the decode kernels never do);
//   kFoldScale     the prefill launcher folds a positive scale into the exponent (kPosScale).
// The defaults hold where O is at most 16 n8 tiles per warp (d <= 64 prefill, decode; the folded scale
// up to d = 96); at d = 128 prefill with 64-key tiles (O and S: 192 fp32 registers) each made ptxas spill.
// kStages: K / V buffers in the ring (tiles in flight while one is computed: kStages - 1).
template <int kHeadDim_, int kMAtoms_, int kBlockN_, bool kKeySplit_ = false,
          bool kLazyRescale_ = kMAtoms_ * (kHeadDim_ / 8) <= 16,
          bool kUnrollCopies_ = kMAtoms_ * (kHeadDim_ / 8) <= 16 || kMAtoms_ == 1,
          bool kFoldScale_ = kHeadDim_ <= 96, int kStages_ = 2>
struct TcFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kMAtoms = kMAtoms_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr bool kKeySplit = kKeySplit_;
  static constexpr bool kLazyRescale = kLazyRescale_;
  static constexpr bool kUnrollCopies = kUnrollCopies_;
  static constexpr bool kFoldScale = kFoldScale_;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = kNThreads / 32;
  static constexpr int kRowsPerWarp = 16 * kMAtoms;
  static constexpr int kBlockM = kKeySplit ? kRowsPerWarp : kWarps * kRowsPerWarp;
  static constexpr int kWarpKeys = kKeySplit ? kBlockN / kWarps : kBlockN;  // keys of a tile per warp
  static constexpr int kStride = kHeadDim + 8;   // 16-bit elements per shared-memory row
  static constexpr int kNTiles = kWarpKeys / 8;  // n8 tiles of S per atom (this warp's keys)
  static constexpr int kDTiles = kHeadDim / 8;   // n8 tiles of O per atom
  static constexpr int kChunks = kHeadDim / 8;   // 16-byte chunks per row
  static_assert(kHeadDim % 16 == 0 && kWarpKeys % 16 == 0, "mma.m16n8k16 tiles");
  static_assert(kStages == 2 || kStages == 3, "2 or 3 K / V buffers");
};

// The tile plans of the launchers (attention_fwd.cu, attention_decode.cu) and of the host emulation.
// Prefill: 128 x 64 tiles for d <= 128 (O: 128 fp32 registers per thread at d = 128), 64 x 32 for d = 256.
template <int kHeadDim>
using TcFwdTile = TcFwdTraits<kHeadDim, kHeadDim <= 128 ? 2 : 1, kHeadDim <= 128 ? 64 : 32>;
// Prefill at d = 128 with 128 x 32 tiles (GMOD_ATTN_FWD_BLOCK_N=32, attention_api.cu): S takes 32
// registers instead of 64, which leaves room for the lazy rescale, fully unrolled copies and the
// positive scale in the exponent (no spills, sm_90), for ~18 % fewer instructions per key than the
// 64-key tile (static SASS counts, mask and rescale branches not taken) but 20 % more ldmatrix
// traffic (Q is re-read per key tile) and twice the barriers. On the H100 it ran at 0.94-0.96x the
// 64-key tile (bench attention --experiments, 2026-11-24, two runs), so the 64-key tile stays the default.
using TcFwdNarrowTile128 =
    TcFwdTraits<128, 2, 32, false, /*kLazyRescale=*/true, /*kUnrollCopies=*/true, /*kFoldScale=*/true>;
// Decode: 64 packed rows (one atom per warp) x kTcDecodeBlockN keys; with at most 16 packed rows and
// d <= 128 (decode_key_split), 16 rows x 64 keys split over the warps.
template <int kHeadDim>
using TcDecodeTile = TcFwdTraits<kHeadDim, 1, kHeadDim <= 128 ? kTcDecodeBlockN : kTcDecodeBlockN / 2>;
template <int kHeadDim>
using TcDecodeKeySplitTile = TcFwdTraits<kHeadDim, 1, kTcDecodeBlockN, true>;
// The key-split decode with a ring of 3 K / V buffers (GMOD_ATTN_DECODE_STAGES=3, opt-in until timed on
// a GPU): a CTA keeps two 64-key tiles in flight instead of one. Why: on the H100 (2026-11-26) the
// batch-1 decode over 4k keys ran its split kernel at 36 % of DRAM bandwidth, 10 % achieved occupancy,
// stalled on long_scoreboard; the wave model gives each of its 256 CTAs 2 key tiles, and with one tile in
// flight a CTA waits for two DRAM round trips in a row. With three buffers it issues both tiles at once.
// Shared memory: 109 KB at d = 128 (2 CTAs per SM instead of 3; the wave model sees that), 57 KB at d = 64.
template <int kHeadDim>
using TcDecodeKeySplitDeepTile =
    TcFwdTraits<kHeadDim, 1, kTcDecodeBlockN, true, TcDecodeKeySplitTile<kHeadDim>::kLazyRescale,
                TcDecodeKeySplitTile<kHeadDim>::kUnrollCopies, TcDecodeKeySplitTile<kHeadDim>::kFoldScale, 3>;

template <typename Tr>
constexpr int tc_fwd_smem_bytes() {  // sQ [BM][stride], sK / sV [kStages][BN][stride], 16-bit
  constexpr int tiles = 2 * Tr::kStride * (Tr::kBlockM + 2 * Tr::kStages * Tr::kBlockN);
  // Key split: the warps' (m, l, O) states, fp32, merged in the K / V buffers at the end.
  constexpr int merge = Tr::kKeySplit ? 2 * Tr::kStride * Tr::kBlockM +
                                            4 * Tr::kWarps * Tr::kBlockM * (Tr::kHeadDim + 2)
                                      : 0;
  return tiles > merge ? tiles : merge;
}

// Rows [0, kRows) of a 16-bit tile into shared memory (row stride kStride elements) with cp.async;
// row_ptr(r) == nullptr: the row is zero-filled with a plain store (never read from global memory).
template <typename T, int kHeadDim, int kRows, int kStride, typename RowPtr>
GMOD_DEV void cp_async_tile(T* smem, RowPtr row_ptr) {
  constexpr int kChunks = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kNThreads) {
    const int r = idx / kChunks;
    const int c = (idx % kChunks) * 8;
    const T* src = row_ptr(r);
    T* dst = smem + r * kStride + c;
    if (src != nullptr) {
      cp_async_16(dst, src + c);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Rows [0, kRows) of a 16-bit tile whose row r starts at src + r * row_stride (elements) into shared
// memory (row stride kStride) with cp.async; rows r >= rows_valid are zero-filled by the copy itself
// (src-size 0: nothing is read; the address passed is the tile's first row, so rows_valid >= 1).
// The K / V (and backward Q / dO) tiles of the main loops, so it must be cheap: offsets inside a tile
// are 32-bit (row_stride <= 65535 heads x 256 elements and kRows <= kMaxTileRows, checked on the host)
// and there is no branch. kUnroll: fully unrolled, every copy's address computed up front (fewest
// instructions); off, a loop whose unrolling is left to the compiler, for the kernels at 255 registers
// (d = 96 / 128 prefill), where the unrolled form made ptxas spill. The old per-row pointer callback
// with 64-bit math and a zero-store branch cost ~30 instructions per copy, 15-35 % of the main loops'
// instructions (scripts/sass_loop_stats.py, sm_90).
template <typename T, int kChunks, int kStride>
GMOD_DEV void cp_async_row_chunk(T* smem, const T* src, int row_stride, int rows_valid, int idx) {
  const int r = idx / kChunks, c = (idx % kChunks) * 8;
  const bool pred = r < rows_valid;
  cp_async_16_zfill(smem + r * kStride + c, src + ((pred ? r * row_stride : 0) + c), pred);
}
// kThreads: the CTA's threads, which share the copies (128, or 256 for the 8-warp backward).
template <typename T, int kHeadDim, int kRows, int kStride, bool kUnroll = true, int kThreads = kNThreads>
GMOD_DEV void cp_async_rows(T* smem, const T* src, int row_stride, int rows_valid) {
  constexpr int kChunks = kHeadDim / 8, kCopies = kRows * kChunks;
  static_assert(kRows <= kMaxTileRows, "32-bit tile offsets (see check_attention_inputs_cuda)");
  if constexpr (kUnroll) {
#pragma unroll
    for (int i = 0; i < (kCopies + kThreads - 1) / kThreads; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      if (kCopies % kThreads == 0 || idx < kCopies)
        cp_async_row_chunk<T, kChunks, kStride>(smem, src, row_stride, rows_valid, idx);
    }
  } else {
    for (int idx = threadIdx.x; idx < kCopies; idx += kThreads)
      cp_async_row_chunk<T, kChunks, kStride>(smem, src, row_stride, rows_valid, idx);
  }
}

// kPosScale (the prefill launcher, when scale > 0): S stays unscaled; its row max times scale_log2 is the
// scaled max (true only for a positive scale), and each exponent is one FFMA, s * scale_log2 - m,
// instead of a separate scaling pass over S (one multiply per score).
template <typename Tr, typename T, bool kPackGQA, bool kSplit, bool kPosScale = false>
__global__ void __launch_bounds__(kNThreads) gmod_attn_fwd_tc_kernel(const AttnFwdParams p) {
  static_assert(sizeof(T) == 2, "the tensor-core kernel takes bf16 / fp16");
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, SD = Tr::kStride;
  constexpr int MA = Tr::kMAtoms, NT = Tr::kNTiles, DT = Tr::kDTiles, RW = Tr::kRowsPerWarp;
  constexpr int WK = Tr::kWarpKeys;
  constexpr bool KS = Tr::kKeySplit;
  constexpr bool kLazyRescale = Tr::kLazyRescale;
  // Fully unrolled K / V copies (cp_async_rows) as the tile plan says, never in the decode kernels
  // (there ptxas spilled across the epilogue's division call).
  constexpr bool kUnrollCopies = !kPackGQA && Tr::kUnrollCopies;

  extern __shared__ float4 gmod_attn_smem[];
  T* sQ = reinterpret_cast<T*>(gmod_attn_smem);  // [BM][SD]; reused by the epilogue for O
  constexpr int NS = Tr::kStages;
  T* sK = sQ + BM * SD;                          // [NS][BN][SD]
  T* sV = sK + NS * BN * SD;                     // [NS][BN][SD]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // fragment row (and row + 8) and column pair of this lane
  const int m_block = kPackGQA ? blockIdx.x : gridDim.x - 1 - blockIdx.x;  // longest query tiles first
  const int head = blockIdx.y;
  const int b = kSplit ? blockIdx.z / p.num_splits : blockIdx.z;
  const int split = kSplit ? blockIdx.z % p.num_splits : 0;
  const int group = kPackGQA ? p.group : 1;
  const int hk = kPackGQA ? head : head / p.group;
  const int ql = iclamp(p.q_len[b], 0, p.Cq);
  const int kl = iclamp(p.k_len[b], 0, p.Ck);
  const int rows_total = p.Cq * group;
  const int m0 = m_block * BM;
  const int wr0 = KS ? 0 : warp * RW;  // this warp's first tile row
  const int wk0 = KS ? warp * WK : 0;  // this warp's first key of each tile

  const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  auto row_query = [&](int r) { return (m0 + r) / group; };
  auto row_head = [&](int r) { return kPackGQA ? head * group + (m0 + r) % group : head; };
  auto row_valid = [&](int r) { return m0 + r < rows_total; };
  // Visible keys of tile row r (0 past q_len or outside the tensor); non-decreasing in r.
  auto row_keys = [&](int r) { return (row_valid(r) && row_query(r) < ql) ? visible_keys(row_query(r), ql, kl) : 0; };
  // Keys seen by the last live row in [r_begin, r_end): the reach of those rows.
  auto rows_reach = [&](int r_begin, int r_end) {
    const int r_last = imin(r_end, rows_total - m0) - 1;
    if (r_last < r_begin || row_query(r_begin) >= ql) return 0;
    return visible_keys(imin(row_query(r_last), ql - 1), ql, kl);
  };

  // This lane's rows: tile row wr0 + 16 a + 8 h + g holds index 2 a + h.
  int row_n[2 * MA];
#pragma unroll
  for (int a = 0; a < MA; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) row_n[2 * a + h] = row_keys(wr0 + 16 * a + 8 * h + g);
  const int n_warp = rows_reach(wr0, wr0 + RW);  // warp-uniform: keys any row of the warp sees
  // Keys every row of the warp sees (row_keys is non-decreasing over live rows): its first row's count
  // when all its rows are live, else 0 (warp-uniform).
  const int n_warp_full = row_keys(wr0 + RW - 1) > 0 ? row_keys(wr0) : 0;

  int nb_begin = 0, nb_end = ceil_div(rows_reach(0, BM), BN);
  if (kSplit) {
    const int per = ceil_div(ceil_div(p.Ck, BN), p.num_splits);
    nb_begin = split * per;
    nb_end = imin(nb_end, nb_begin + per);
  }

  float acc[MA][DT][4];
  float m_run[2 * MA], l_run[2 * MA];  // running max (log2 domain), this lane's partial row sums
  zero_frags(acc);
#pragma unroll
  for (int ri = 0; ri < 2 * MA; ++ri) m_run[ri] = -INFINITY, l_run[ri] = 0.f;

  if (nb_begin < nb_end) {
    cp_async_tile<T, D, BM, SD>(sQ, [&](int r) -> const T* {
      const int i = row_query(r);
      return (row_valid(r) && i < ql) ? qp + i * p.q_row_stride + row_head(r) * p.q_head_stride : nullptr;
    });
    auto load_kv = [&](int nb, int buf) {  // nb < nb_end: key nb * BN < kl
      const int n0 = nb * BN;
      cp_async_rows<T, D, BN, SD, kUnrollCopies>(sK + buf * BN * SD, kp + n0 * p.k_row_stride, int(p.k_row_stride), kl - n0);
      cp_async_rows<T, D, BN, SD, kUnrollCopies>(sV + buf * BN * SD, vp + n0 * p.v_row_stride, int(p.v_row_stride), kl - n0);
    };
    // Tiles nb_begin .. nb_begin + NS - 2 in flight, one commit group each (Q rides in the first); a
    // group is committed even when empty, so that "all but the NS - 2 newest" is always tile nb's.
#pragma unroll
    for (int st = 0; st < NS - 1; ++st) {
      if (nb_begin + st < nb_end) load_kv(nb_begin + st, st);
      cp_async_commit();
    }

    for (int nb = nb_begin; nb < nb_end; ++nb) {
      const unsigned it = nb - nb_begin;  // unsigned: % 2 is a mask, % 3 a multiply
      const int buf = it % NS;
      cp_async_wait<NS - 2>();
      __syncthreads();  // tile nb is in smem for everyone; everyone is done with tile nb - 1's buffer
      // Tile nb + NS - 1 into tile nb - 1's buffer; it overlaps with this tile's math (and, with three
      // buffers, with the wait for tile nb + 1). NS = 2: tile nb + 1 into buffer buf ^ 1.
      if (nb + NS - 1 < nb_end) load_kv(nb + NS - 1, (it + NS - 1) % NS);
      cp_async_commit();
      const int n0 = nb * BN;
      if (n0 + wk0 >= n_warp) continue;  // warp-uniform: none of this warp's rows sees its keys
      const T* tK = sK + buf * BN * SD;
      const T* tV = sV + buf * BN * SD;

      // ---- S = Q K^T: k16 steps over the head dim; one ldmatrix.x4 of K feeds two n8 tiles.
      float s[MA][NT][4];
      zero_frags(s);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[MA][4];
#pragma unroll
        for (int a = 0; a < MA; ++a) ldsm_x4(qa[a], sQ + (wr0 + 16 * a + lane % 16) * SD + kk * 16 + (lane / 16) * 8);
#pragma unroll
        for (int nt2 = 0; nt2 < NT / 2; ++nt2) {
          uint32_t kb[4];  // (kb0, kb1): keys 16 nt2 + 0..7; (kb2, kb3): keys 16 nt2 + 8..15
          ldsm_x4(kb, tK + (wk0 + nt2 * 16 + lane % 8 + (lane / 16) * 8) * SD + kk * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
          for (int a = 0; a < MA; ++a) {
            mma_16816<T>(s[a][2 * nt2], qa[a], kb[0], kb[1]);
            mma_16816<T>(s[a][2 * nt2 + 1], qa[a], kb[2], kb[3]);
          }
        }
      }

      // ---- Mask and online softmax (log2 domain) on the fragments. Rows that have seen no key yet
      // keep m = -inf and use 0 as the reference, so exp2 never sees -inf - (-inf). Tiles that every
      // row of the warp sees whole (all but the causal diagonal and the k_len edge) skip the mask
      // (a warp-uniform branch around the compare-and-select only, so no code is duplicated).
      const float c = p.scale_log2;
      if constexpr (!kPosScale) {
#pragma unroll
        for (int a = 0; a < MA; ++a)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[a][nt][e] *= c;
      }
      if (n0 + wk0 + WK > n_warp_full) {
#pragma unroll
        for (int a = 0; a < MA; ++a)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              if (n0 + wk0 + nt * 8 + 2 * tq + e % 2 >= row_n[2 * a + e / 2]) s[a][nt][e] = -INFINITY;
      }
      // Online softmax, row by row. With kLazyRescale, O and l are rescaled by 2^(m_old - m_new) only
      // when the row's max grew in some lane of the warp (one vote per row): otherwise the factor is
      // exactly 2^0 = 1, or the row still has no keys and O = l = 0, so skipping the 2 DT multiplies
      // is bit-exact. Past the first tiles of a row the max rarely grows. Off where the tile plan says
      // the registers are full (TcFwdTraits: d = 96 / 128 prefill with 64-key tiles, d = 256).
#pragma unroll
      for (int a = 0; a < MA; ++a)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int ri = 2 * a + h;
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[a][nt][2 * h], s[a][nt][2 * h + 1]));
          mx = quad_max(mx);
          if constexpr (kPosScale) mx *= c;  // -inf stays -inf (c > 0)
          const float m_new = fmaxf(m_run[ri], mx);
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          if (!kLazyRescale || __any_sync(0xffffffffu, m_new > m_run[ri])) {
            const float alpha = exp2_ftz(m_run[ri] - m_use);
            l_run[ri] *= alpha;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) acc[a][dt][2 * h] *= alpha, acc[a][dt][2 * h + 1] *= alpha;
          }
          m_run[ri] = m_new;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[a][nt][2 * h + e];
              x = kPosScale ? exp2_ftz(fmaf(x, c, -m_use)) : exp2_ftz(x - m_use);
              l_run[ri] += x;
            }
        }

      // ---- O += P V: P stays in registers as the A operand; V rows by ldmatrix.trans.
      mma_frag_x_smem<T, MA, WK, D, SD>(acc, s, tV + wk0 * SD, lane);
    }
  }
  if constexpr (kSplit) pdl_launch_dependents();  // every load of this CTA is done: the combine may launch

  if constexpr (KS) {
    // ---- Merge the warps' states into warp 0: M = max_w m_w, O = sum_w 2^(m_w - M) O_w, likewise l.
    // A warp that saw none of a row's keys has m_w = -inf, l_w = 0, O_w = 0 and weighs 0.
    __syncthreads();  // every warp is done with sK / sV (the last tile's reads)
    float* sm = reinterpret_cast<float*>(sK);  // [warps][BM] m, [warps][BM] l, [warps][BM][D] O
    float* sl = sm + Tr::kWarps * BM;
    float* so = sl + Tr::kWarps * BM;
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ri = 2 * a + h, r = 16 * a + 8 * h + g;
        const float l = quad_sum(l_run[ri]);
        if (tq == 0) sm[warp * BM + r] = m_run[ri], sl[warp * BM + r] = l;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
          *reinterpret_cast<float2*>(so + (warp * BM + r) * D + dt * 8 + 2 * tq) =
              make_float2(acc[a][dt][2 * h], acc[a][dt][2 * h + 1]);
      }
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ri = 2 * a + h, r = 16 * a + 8 * h + g;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < Tr::kWarps; ++w) mx = fmaxf(mx, sm[w * BM + r]);
        const float m_use = mx == -INFINITY ? 0.f : mx;
        float l = 0.f, f[Tr::kWarps];
#pragma unroll
        for (int w = 0; w < Tr::kWarps; ++w) {
          f[w] = exp2_ftz(sm[w * BM + r] - m_use);
          l += f[w] * sl[w * BM + r];
        }
        m_run[ri] = mx;
        l_run[ri] = tq == 0 ? l : 0.f;  // the epilogue's quad_sum gives l back
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float o = 0.f;
#pragma unroll
            for (int w = 0; w < Tr::kWarps; ++w) o += f[w] * so[(w * BM + r) * D + dt * 8 + 2 * tq + e];
            acc[a][dt][2 * h + e] = o;
          }
      }
  }

  // ---- Epilogue: o = acc / l, lse = (m + log2 l) ln 2; zeros and -inf for rows without keys.
  float inv_l[2 * MA], lse[2 * MA];
  bool has_keys[2 * MA];
#pragma unroll
  for (int ri = 0; ri < 2 * MA; ++ri) {
    const float l = quad_sum(l_run[ri]);  // every lane, before any branch
    // The row saw a key in [nb_begin * BN, nb_end * BN): then l >= 1 (NaN inputs propagate).
    has_keys[ri] = nb_begin < nb_end && row_n[ri] > nb_begin * BN;
    inv_l[ri] = has_keys[ri] ? 1.f / l : 0.f;
    lse[ri] = has_keys[ri] ? (m_run[ri] + log2f(l)) * kLn2 : -INFINITY;
  }
  if (kSplit) {
    // fp32 partials straight from the fragments: a quad writes 32 contiguous bytes per n8 tile.
#pragma unroll
    for (int a = 0; a < MA; ++a)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int ri = 2 * a + h, r = wr0 + 16 * a + 8 * h + g;
        if (!row_valid(r)) continue;
        const int i = row_query(r), hq = row_head(r);
        // Every o_part row is written, zeros for a split without keys (weight 0 in the combine), so
        // that the combine's loads need no predicate.
        if (tq == 0) p.lse_part[(((int64_t)split * p.B + b) * p.Hq + hq) * p.Cq + i] = lse[ri];
        float* dst = p.o_part + ((((int64_t)split * p.B + b) * p.Cq + i) * p.Hq + hq) * D + 2 * tq;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
          *reinterpret_cast<float2*>(dst + dt * 8) =
              has_keys[ri] ? make_float2(acc[a][dt][2 * h] * inv_l[ri], acc[a][dt][2 * h + 1] * inv_l[ri])
                           : make_float2(0.f, 0.f);
      }
    return;
  }
  // Stage the warp's O rows in its own rows of sQ (only this warp ever read them), then write whole
  // 16-byte chunks: rows of o are contiguous d-element runs.
  __syncwarp();
#pragma unroll
  for (int a = 0; a < MA; ++a)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ri = 2 * a + h;
      T* srow = sQ + (wr0 + 16 * a + 8 * h + g) * SD + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(srow + dt * 8) =
            pack2<T>(acc[a][dt][2 * h] * inv_l[ri], acc[a][dt][2 * h + 1] * inv_l[ri]);
      const int r = wr0 + 16 * a + 8 * h + g;
      if (tq == 0 && row_valid(r)) p.lse[((int64_t)b * p.Hq + row_head(r)) * p.Cq + row_query(r)] = lse[ri];
    }
  __syncwarp();
  for (int idx = lane; idx < RW * Tr::kChunks; idx += 32) {
    const int r = wr0 + idx / Tr::kChunks, c = (idx % Tr::kChunks) * 8;
    if (!row_valid(r)) continue;
    T* dst = static_cast<T*>(p.o) + b * p.o_batch_stride + row_query(r) * p.o_row_stride +
             row_head(r) * p.o_head_stride + c;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sQ + r * SD + c);
  }
}

}  // namespace gmod::attn
