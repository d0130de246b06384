// Tensor-core backward attention (bf16 / fp16 in, fp32 accumulate; sm_80+, also the sm_90 path for now):
//   gmod_attn_bwd_dkdv_tc_kernel  one CTA per (64-key tile, kv head [x part of its GQA group], b), as
//                                 gmod_attn_bwd_dkdv_kernel (128 keys on 8 warps: TcBwdWideTile):
//                                 4 warps, warp w owns keys [16 w, 16 w + 16)
//                                 of the tile and keeps their dK / dV in mma accumulators. Per query tile
//                                 it computes S^T = K Q^T and dP^T = V dO^T directly (keys are the mma
//                                 rows), so P^T and dS^T come out in the accumulator layout and are
//                                 repacked in registers as the A operand of dV += P^T dO and
//                                 dK += dS^T Q (dO / Q as B operands by ldmatrix.trans). kAtomicDq:
//                                 dS^T also goes to shared memory (16-bit) and dQ = dS K is computed
//                                 from it (A operand by ldmatrix.trans) and red.global.add'ed into the
//                                 fp32 dq_accum. Q / dO tiles (and their lse / Delta) are
//                                 double-buffered with cp.async.
//   gmod_attn_bwd_dq_tc_kernel    deterministic dQ: one CTA per (64-query tile, q head, b), the forward's
//                                 structure: S = Q K^T and dP = dO V^T per key tile, dS repacked in
//                                 registers as the A operand of dQ += dS K (K by ldmatrix.trans);
//                                 K / V tiles double-buffered with cp.async.
// Math (FlashAttention-2): P = exp2(S scale_log2 - lse log2 e), dS = scale P (dP - Delta), both set to
// exactly 0 by a select where a key is not visible; dV = P^T dO, dK = dS^T Q, dQ = dS K. P and dS are
// rounded to T for the second GEMMs (as FlashAttention does), the accumulators stay fp32.
// Same launch contract as the SIMT kernels (attention_bwd_kernel.cuh): same params, Delta from
// gmod_attn_bwd_preprocess_kernel, dK / dV written in T by a CTA that owns the whole GQA group (zeros
// for keys nobody sees) or atomically added into dk_accum / dv_accum for keys < k_len, dQ into dq_accum
// (atomic) or written in T for every row < Cq (deterministic kernel).
// Work that is skipped: query tiles that see none of the CTA's keys (before the causal diagonal, past
// q_len) are never loaded; key tiles past the query tile's reach are never loaded; a warp whose keys
// no query of a register pass sees (dk/dv), or whose rows see no key of a tile (dq), skips its MMAs; the
// atomic dQ skips rows past q_len and k16 steps of keys its rows do not see.
// Head dim 256 stays on the SIMT kernels: dK + dV of one 16-key atom are 256 fp32 registers per
// thread on their own, more than the 255 a thread can have (kTcBwdHeadDim).
// Shared memory rows are padded by 16 bytes (row stride = row length + 8 elements), so the 8 row
// addresses of every ldmatrix 8x8 matrix fall in 8 different 16-byte bank groups (no conflicts).
#pragma once

#include <type_traits>

#include "attention_common.cuh"
#include "attention_fwd_tc_kernel.cuh"  // cp_async_rows
#include "attention_mma.cuh"

namespace gmod::attn {

// Head dims with a tensor-core backward (the launcher falls back to the SIMT kernels for the others).
template <int kHeadDim>
inline constexpr bool kTcBwdHeadDim = kHeadDim <= 128;

// kBlockM: query rows per step of the dk/dv kernel (its keys: kWarps warps x 16 = kBlockN), handled in
// register passes of kSubM queries. kWarps: 4 (128 threads, 64 keys) or 8 (256 threads, 128 keys: each
// Q / dO tile loaded into shared memory serves twice the keys, and the atomic dQ of a query tile is
// added once per 128 keys instead of once per 64, as FlashAttention-2's d = 128 backward does).
// kDqMAtoms: 16-row atoms per warp of the dq kernel (always 4 warps; its query tile: 64 kDqMAtoms
// rows), kDqBlockN its key tile.
template <int kHeadDim_, int kBlockM_, int kSubM_, int kDqMAtoms_, int kDqBlockN_, int kWarps_ = kNThreads / 32>
struct TcBwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  // dk/dv kernel
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kWarps * 16;
  static constexpr int kSubM = kSubM_;           // queries of one register pass over S^T / dP^T
  static constexpr int kStride = kHeadDim + 8;   // 16-bit elements per Q / dO / K / V smem row
  static constexpr int kDsStride = kBlockM + 8;  // 16-bit elements per dS^T smem row (one key)
  // Head-dim columns of one atomic-dQ work unit (16 query rows x kDqChunk): 64 where that still gives
  // every warp a unit, else 32.
  static constexpr int kDqChunk = kHeadDim % 64 == 0 && (kBlockM / 16) * (kHeadDim / 64) >= kWarps ? 64 : 32;
  // Passes off the causal diagonal skip the per-entry visibility test (a second, unmasked copy of the
  // P / dS code). Off at d = 96 (one pass of 64 queries), where that copy made ptxas spill (sm_90).
  static constexpr bool kUnmaskedPasses = kHeadDim != 96;
  // dq kernel
  static constexpr int kDqMAtoms = kDqMAtoms_;
  static constexpr int kDqRowsPerWarp = 16 * kDqMAtoms;
  static constexpr int kDqBlockM = (kNThreads / 32) * kDqRowsPerWarp;
  static constexpr int kDqBlockN = kDqBlockN_;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static_assert(kHeadDim % 32 == 0 && kSubM % 16 == 0 && kBlockM % kSubM == 0 && kDqBlockN % 16 == 0, "mma.m16n8k16 tiles");
};

// The tile plan of the launcher (attention_bwd.cu) and of the host emulation: 64 keys x 64 queries per
// dk/dv step, 64 queries x 64 keys per dq step. The dk/dv kernel keeps dK + dV (d fp32 registers) and
// S^T + dP^T of one pass (kSubM registers) live: passes of 32 queries at d = 128 keep it within 255
// registers without spills, 64 below (one pass per step).
// Shared memory: dk/dv 40 / 64 / 88 / 112 KiB, dq 30 / 54 / 78 / 102 KiB for d = 32 / 64 / 96 / 128.
// attention_api.cu sizes its heads_per_cta heuristic with the key tile that will run (kTcBwdBlockN or
// kTcBwdWideBlockN, static_assert in attention_bwd.cu).
template <int kHeadDim>
using TcBwdTile = TcBwdTraits<kHeadDim, 64, kHeadDim <= 96 ? 64 : 32, 1, 64>;
// The dk/dv kernel on 8 warps and 128 keys per CTA: the same per-warp work and registers, shared memory
// 158 KiB at d = 128 (one CTA of 8 warps per SM instead of two of 4). The default wherever its grid fills
// two waves (tc_bwd_keys_per_cta, attention_api.cu): 1.01-1.12x faster than TcBwdTile on the H100 at the
// benchmark shapes (two runs). The deterministic path's dq kernel stays TcBwdTile's.
template <int kHeadDim>
using TcBwdWideTile = TcBwdTraits<kHeadDim, 64, kHeadDim <= 96 ? 64 : 32, 1, 64, 8>;

template <typename Tr>
constexpr int tc_bwd_dkdv_smem_bytes() {  // sK, sV [BN][SD]; sQ, sdO [2][BM][SD]; sdS [BN][BM + 8]; lse, Delta [2][BM]
  return 2 * (2 * Tr::kBlockN * Tr::kStride + 4 * Tr::kBlockM * Tr::kStride + Tr::kBlockN * Tr::kDsStride) +
         4 * 4 * Tr::kBlockM;
}
template <typename Tr>
constexpr int tc_bwd_dq_smem_bytes() {  // sQ, sdO [BM][SD]; sK, sV [2][BN][SD]
  return 2 * Tr::kStride * (2 * Tr::kDqBlockM + 4 * Tr::kDqBlockN);
}

// One CTA: keys [n0, n0 + kBlockN) of kv head hk, q heads [h_begin, h_begin + heads_per_cta), looping
// over (head, query tile) pairs. __launch_bounds__(kThreads, 1): dK / dV / S^T / dP^T need up to ~200
// registers at d = 128 and shared memory allows 1-2 CTAs per SM anyway; ptxas must not trade registers
// for spills.
template <typename Tr, typename T, bool kAtomicDq>
__global__ void __launch_bounds__(Tr::kThreads, 1) gmod_attn_bwd_dkdv_tc_kernel(const AttnBwdParams p) {
  static_assert(sizeof(T) == 2, "the tensor-core kernel takes bf16 / fp16");
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, SD = Tr::kStride, SS = Tr::kDsStride;
  constexpr int SM = Tr::kSubM, NT = SM / 8;  // queries per register pass, their n8 tiles of S^T / dP^T
  constexpr int DT = D / 8;   // n8 tiles (head dim) of dK / dV

  extern __shared__ float4 gmod_attn_smem[];
  T* sK = reinterpret_cast<T*>(gmod_attn_smem);  // [BN][SD]; reused by the epilogue for dK
  T* sV = sK + BN * SD;                          // [BN][SD]; reused by the epilogue for dV
  T* sQ = sV + BN * SD;                          // [2][BM][SD]
  T* sdO = sQ + 2 * BM * SD;                     // [2][BM][SD]
  T* sdS = sdO + 2 * BM * SD;                    // [BN][SS]: dS^T, row = key (atomic dQ only)
  float* sLse = reinterpret_cast<float*>(sdS + BN * SS);  // [2][BM]: lse log2 e of the tile's queries
  float* sDelta = sLse + 2 * BM;                          // [2][BM]

  // Fully unrolled Q / dO copies (see cp_async_rows) except at d = 128, where ptxas then spilled (sm_90).
  constexpr bool kUnrollCopies = D < 128;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const DkdvCta cta = dkdv_cta(p);
  const int hk = cta.hk, h_begin = cta.h_begin, b = cta.b, ql = cta.ql, kl = cta.kl;
  const int n0 = static_cast<int>(blockIdx.x) * BN;
  const int wk0 = warp * 16;  // this warp's first key row in the tile

  // dK / dV of keys n0 + wk0 + g + 8 (e / 2), head-dim columns 8 dt + 2 tq + e % 2.
  float dk[DT][4], dv[DT][4];
#pragma unroll
  for (int dt = 0; dt < DT; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  // Key n0 is seen by queries i >= n0 - (kl - ql); every key j < kl is seen by the last query.
  if (n0 < kl && ql > 0) {
    const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
    const int m_begin = imax(0, n0 - (kl - ql)) / BM;
    const int m_tiles = ceil_div(ql, BM) - m_begin;
    const int steps = p.heads_per_cta * m_tiles;  // (head, query tile) pairs, head-major

    cp_async_rows<T, D, BN, SD, true, Tr::kThreads>(sK, kp + n0 * p.k_row_stride, int(p.k_row_stride), kl - n0);
    cp_async_rows<T, D, BN, SD, true, Tr::kThreads>(sV, vp + n0 * p.v_row_stride, int(p.v_row_stride), kl - n0);
    // Q / dO rows of step `it` into buffer `buf` (cp.async; m0 < ql), with the per-query lse log2 e and
    // Delta (plain stores; 0 for queries without keys, whose entries are masked anyway).
    auto load_step = [&](int h, int m0, int buf) {
      const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const T* gp = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
      cp_async_rows<T, D, BM, SD, kUnrollCopies, Tr::kThreads>(sQ + buf * BM * SD, qp + m0 * p.q_row_stride,
                                                              int(p.q_row_stride), ql - m0);
      cp_async_rows<T, D, BM, SD, kUnrollCopies, Tr::kThreads>(sdO + buf * BM * SD, gp + m0 * p.do_row_stride,
                                                              int(p.do_row_stride), ql - m0);
      stage_lse_delta(p, b, h, m0, BM, ql, kl, sLse + buf * BM, sDelta + buf * BM, tid, Tr::kThreads);
    };
    load_step(h_begin, m_begin * BM, 0);
    cp_async_commit();

    // This lane's two keys j = n0 + wk0 + g + 8 hh are seen by queries first_q[hh] <= i < ql
    // (first_q past any query for keys >= kl, which are zero rows).
    int first_q[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int j = n0 + wk0 + g + 8 * hh;
      first_q[hh] = j < kl ? j - (kl - ql) : ql;
    }

    // (head, query tile) of the current step, advanced by counters (no integer division per step).
    int step_h = h_begin, step_mt = 0;
    for (int it = 0; it < steps; ++it) {
      const int next_mt = step_mt + 1 == m_tiles ? 0 : step_mt + 1;
      const int next_h = next_mt == 0 ? step_h + 1 : step_h;
      const int buf = it & 1;
      cp_async_wait<0>();
      __syncthreads();  // step it is in smem for everyone; everyone is done with step it - 1's buffers and sdS
      if (it + 1 < steps) load_step(next_h, (m_begin + next_mt) * BM, buf ^ 1);  // overlaps with this step's math
      cp_async_commit();
      const int h = step_h, m0 = (m_begin + step_mt) * BM;
      step_h = next_h, step_mt = next_mt;
      const T* tQ = sQ + buf * BM * SD;
      const T* tdO = sdO + buf * BM * SD;
      const float* tLse = sLse + buf * BM;
      const float* tDelta = sDelta + buf * BM;
      // The step's queries in register passes of SM columns (S^T / dP^T of SM queries live at a time).
#pragma unroll 1
      for (int c0 = 0; c0 < BM; c0 += SM) {
        // Warp-uniform: some query of the pass (the last live one) sees this warp's first key.
        const bool live = m0 + c0 < ql && n0 + wk0 < visible_keys(imin(m0 + c0 + SM, ql) - 1, ql, kl);
        if (!live) {
          if constexpr (kAtomicDq) {  // their dS^T entries are zeros for the dQ GEMM below
            for (int idx = lane; idx < 16 * (SM / 8); idx += 32)
              *reinterpret_cast<uint4*>(sdS + (wk0 + idx / (SM / 8)) * SS + c0 + (idx % (SM / 8)) * 8) =
                  make_uint4(0u, 0u, 0u, 0u);
          }
          continue;
        }
        const T* pQ = tQ + c0 * SD;  // the pass's Q / dO rows
        const T* pdO = tdO + c0 * SD;

        // ---- S^T = K Q^T, dP^T = V dO^T: k16 steps over the head dim; K / V rows are the A operand,
        // Q / dO rows the B operand (non-transposed ldmatrix: a B column is a Q row).
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t ka[4], va[4];
          ldsm_x4(ka, sK + (wk0 + lane % 16) * SD + kk * 16 + (lane / 16) * 8);
          ldsm_x4(va, sV + (wk0 + lane % 16) * SD + kk * 16 + (lane / 16) * 8);
#pragma unroll
          for (int nt2 = 0; nt2 < NT / 2; ++nt2) {
            // (b0, b1): queries 16 nt2 + 0..7; (b2, b3): queries 16 nt2 + 8..15
            const int off = (nt2 * 16 + lane % 8 + (lane / 16) * 8) * SD + kk * 16 + ((lane / 8) % 2) * 8;
            uint32_t qb[4], gb[4];
            ldsm_x4(qb, pQ + off);
            mma_16816<T>(s[2 * nt2], ka, qb[0], qb[1]);
            mma_16816<T>(s[2 * nt2 + 1], ka, qb[2], qb[3]);
            ldsm_x4(gb, pdO + off);
            mma_16816<T>(dp[2 * nt2], va, gb[0], gb[1]);
            mma_16816<T>(dp[2 * nt2 + 1], va, gb[2], gb[3]);
          }
        }

        // ---- P^T and dS^T in place (s -> P^T, dp -> dS^T). Select, not multiply: a masked entry is
        // exactly 0 whatever S, lse or dP hold. Off the causal diagonal and inside both lengths every
        // (key of this warp, query of the pass) pair is visible (warp-uniform `full`, most passes of a
        // long causal row), and the per-entry visibility test is left out, as the forward leaves out
        // its mask off the diagonal.
        auto p_and_ds = [&](auto masked) {
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int c = c0 + nt * 8 + 2 * tq + e, i = m0 + c;
              const float lse2 = tLse[c], dlt = tDelta[c];
#pragma unroll
              for (int hh = 0; hh < 2; ++hh) {
                const bool vis = !decltype(masked)::value || (i >= first_q[hh] && i < ql);
                float& x = s[nt][2 * hh + e];
                float& y = dp[nt][2 * hh + e];
                const float pv = vis ? exp2_ftz(x * p.scale_log2 - lse2) : 0.f;
                y = vis ? pv * (y - dlt) * p.scale : 0.f;
                x = pv;
              }
            }
        };
        const int j_last = n0 + wk0 + 15;  // this warp's last key
        const bool full = j_last < kl && m0 + c0 + SM <= ql && m0 + c0 >= j_last - (kl - ql);
        if (Tr::kUnmaskedPasses && full)
          p_and_ds(std::false_type{});
        else
          p_and_ds(std::true_type{});

        // ---- dV += P^T dO, dK += dS^T Q: the C fragments of query tiles (2 kk, 2 kk + 1) are the A
        // fragment of k16 step kk; dO / Q rows are B rows (k = query), so ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < SM / 16; ++kk) {
          uint32_t pa[4], da[4];
          pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
          pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
          pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
          da[0] = pack2<T>(dp[2 * kk][0], dp[2 * kk][1]);
          da[1] = pack2<T>(dp[2 * kk][2], dp[2 * kk][3]);
          da[2] = pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
          da[3] = pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
          for (int dt2 = 0; dt2 < D / 16; ++dt2) {
            // (b0, b1): head-dim cols 16 dt2 + 0..7; (b2, b3): + 8..15
            const int off = (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SD + dt2 * 16 + (lane / 16) * 8;
            uint32_t gb[4], qb[4];
            ldsm_x4_trans(gb, pdO + off);
            mma_16816<T>(dv[2 * dt2], pa, gb[0], gb[1]);
            mma_16816<T>(dv[2 * dt2 + 1], pa, gb[2], gb[3]);
            ldsm_x4_trans(qb, pQ + off);
            mma_16816<T>(dk[2 * dt2], da, qb[0], qb[1]);
            mma_16816<T>(dk[2 * dt2 + 1], da, qb[2], qb[3]);
          }
          if constexpr (kAtomicDq) {
            // dS^T rows wk0 + g (+ 8), query cols c0 + 16 kk + 2 tq (+ 8): the A fragment's own layout.
            T* row = sdS + (wk0 + g) * SS + c0 + kk * 16 + 2 * tq;
            *reinterpret_cast<uint32_t*>(row) = da[0];
            *reinterpret_cast<uint32_t*>(row + 8 * SS) = da[1];
            *reinterpret_cast<uint32_t*>(row + 8) = da[2];
            *reinterpret_cast<uint32_t*>(row + 8 * SS + 8) = da[3];
          }
        }
      }

      if constexpr (kAtomicDq) {
        // ---- dQ += dS K for the tile's queries, then fp32 atomics into dq_accum. Work units of
        // 16 query rows x kDqChunk head-dim columns, spread over the warps; A = dS (queries x keys) from
        // the key-major sdS by ldmatrix.trans, B = K rows (k = key) by ldmatrix.trans.
        constexpr int DC = Tr::kDqChunk, CC = D / DC, units = (BM / 16) * CC;
        __syncthreads();  // every warp's dS^T rows are in sdS
#pragma unroll 1
        for (int u = warp; u < units; u += Tr::kWarps) {
          const int r0 = (u / CC) * 16, c0 = (u % CC) * DC;
          if (m0 + r0 >= ql) continue;  // warp-uniform: rows past q_len get nothing
          // Keys seen by the unit's last live query: k16 steps past them hold zeros only.
          const int n_hi = visible_keys(imin(m0 + r0 + 16, ql) - 1, ql, kl);
          const int kk_end = imin(BN / 16, ceil_div(n_hi - n0, 16));
          float acc[DC / 8][4];
          zero_frags(acc);
#pragma unroll 1
          for (int kk = 0; kk < kk_end; ++kk) {
            // Matrix lane / 8: query rows r0 + 8 ((lane / 8) % 2), keys 16 kk + 8 (lane / 16).
            uint32_t a[4];
            ldsm_x4_trans(a, sdS + (kk * 16 + (lane / 16) * 8 + lane % 8) * SS + r0 + ((lane / 8) % 2) * 8);
#pragma unroll
            for (int dc2 = 0; dc2 < DC / 16; ++dc2) {
              uint32_t kb[4];
              ldsm_x4_trans(kb, sK + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SD + c0 + dc2 * 16 + (lane / 16) * 8);
              mma_16816<T>(acc[2 * dc2], a, kb[0], kb[1]);
              mma_16816<T>(acc[2 * dc2 + 1], a, kb[2], kb[3]);
            }
          }
          if (kk_end <= 0) continue;
          const int i0 = m0 + r0 + g, i1 = i0 + 8;
          float* dst0 = p.dq_accum + (((int64_t)b * p.Cq + imin(i0, p.Cq - 1)) * p.Hq + h) * D + c0;
          float* dst1 = p.dq_accum + (((int64_t)b * p.Cq + imin(i1, p.Cq - 1)) * p.Hq + h) * D + c0;
#pragma unroll
          for (int dt = 0; dt < DC / 8; ++dt)
            atomic_add_frag(dst0 + dt * 8, dst1 + dt * 8, acc[dt], tq, i0 < ql, i1 < ql);
        }
      }
    }
  }

  // ---- Epilogue: dK / dV of keys n0 + wk0 + g + 8 hh.
  if (p.heads_per_cta == p.group) {
    // Whole group: stage the warp's rows in its own rows of sK / sV (after everyone's last read of
    // them, incl. the dQ GEMM), then write whole 16-byte chunks; zeros for keys nobody sees.
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      T* krow = sK + (wk0 + g + 8 * hh) * SD + 2 * tq;
      T* vrow = sV + (wk0 + g + 8 * hh) * SD + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        *reinterpret_cast<uint32_t*>(krow + dt * 8) = pack2<T>(dk[dt][2 * hh], dk[dt][2 * hh + 1]);
        *reinterpret_cast<uint32_t*>(vrow + dt * 8) = pack2<T>(dv[dt][2 * hh], dv[dt][2 * hh + 1]);
      }
    }
    __syncwarp();
    for (int idx = lane; idx < 16 * Tr::kChunks; idx += 32) {
      const int r = wk0 + idx / Tr::kChunks, c = (idx % Tr::kChunks) * 8, j = n0 + r;
      if (j >= p.Ck) continue;
      T* dkp = static_cast<T*>(p.dk) + b * p.dk_batch_stride + j * p.dk_row_stride + hk * p.dk_head_stride + c;
      T* dvp = static_cast<T*>(p.dv) + b * p.dv_batch_stride + j * p.dv_row_stride + hk * p.dv_head_stride + c;
      *reinterpret_cast<uint4*>(dkp) = *reinterpret_cast<const uint4*>(sK + r * SD + c);
      *reinterpret_cast<uint4*>(dvp) = *reinterpret_cast<const uint4*>(sV + r * SD + c);
    }
  } else {
    // Part of a group: fp32 atomics straight from the fragments, keys < k_len only.
    const int j0 = n0 + wk0 + g, j1 = j0 + 8;
    const int64_t off0 = (((int64_t)b * p.Ck + imin(j0, p.Ck - 1)) * p.Hk + hk) * D;
    const int64_t off1 = (((int64_t)b * p.Ck + imin(j1, p.Ck - 1)) * p.Hk + hk) * D;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      atomic_add_frag(p.dk_accum + off0 + dt * 8, p.dk_accum + off1 + dt * 8, dk[dt], tq, j0 < kl, j1 < kl);
      atomic_add_frag(p.dv_accum + off0 + dt * 8, p.dv_accum + off1 + dt * 8, dv[dt], tq, j0 < kl, j1 < kl);
    }
  }
}

// Deterministic dQ: one CTA per (query tile, q head, b), key tiles in order, dQ in mma accumulators.
// Warp w owns query rows [w * 16 * kDqMAtoms, (w + 1) * 16 * kDqMAtoms) of the tile.
template <typename Tr, typename T>
__global__ void __launch_bounds__(kNThreads) gmod_attn_bwd_dq_tc_kernel(const AttnBwdParams p) {
  static_assert(sizeof(T) == 2, "the tensor-core kernel takes bf16 / fp16");
  constexpr int D = Tr::kHeadDim, BM = Tr::kDqBlockM, BN = Tr::kDqBlockN, SD = Tr::kStride;
  constexpr int MA = Tr::kDqMAtoms, RW = Tr::kDqRowsPerWarp, NT = BN / 8, DT = D / 8;

  extern __shared__ float4 gmod_attn_smem[];
  T* sQ = reinterpret_cast<T*>(gmod_attn_smem);  // [BM][SD]; reused by the epilogue for dQ
  T* sdO = sQ + BM * SD;                         // [BM][SD]
  T* sK = sdO + BM * SD;                         // [2][BN][SD]
  T* sV = sK + 2 * BN * SD;                      // [2][BN][SD]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest query tiles first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / p.group;
  const int ql = iclamp(p.q_len[b], 0, p.Cq);
  const int kl = iclamp(p.k_len[b], 0, p.Ck);
  const int m0 = m_block * BM;
  const int wr0 = warp * RW;
  const int n_max = m0 < ql ? visible_keys(imin(m0 + BM, ql) - 1, ql, kl) : 0;
  // Keys seen by the warp's last live row (0 when all its rows are past q_len); warp-uniform.
  const int n_warp = m0 + wr0 < ql ? visible_keys(imin(m0 + wr0 + RW, ql) - 1, ql, kl) : 0;

  float acc[MA][DT][4];
  zero_frags(acc);

  if (n_max > 0) {
    const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* gp = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
    const float* lse = p.lse + ((int64_t)b * p.Hq + h) * p.Cq;
    const float* delta = p.delta + ((int64_t)b * p.Hq + h) * p.Cq;

    // This lane's rows m0 + wr0 + 16 a + 8 hh + g: visible keys, lse log2 e, Delta (0 without keys).
    int row_n[2 * MA];
    float row_lse2[2 * MA], row_delta[2 * MA];
#pragma unroll
    for (int ri = 0; ri < 2 * MA; ++ri) {
      const int i = m0 + wr0 + 16 * (ri / 2) + 8 * (ri % 2) + g;
      row_n[ri] = i < ql ? visible_keys(i, ql, kl) : 0;
      row_lse2[ri] = row_n[ri] > 0 ? lse[i] * kLog2e : 0.f;
      row_delta[ri] = row_n[ri] > 0 ? delta[i] : 0.f;
    }

    // n_max > 0: m0 < ql, and every loaded key tile starts below kl.
    cp_async_rows<T, D, BM, SD>(sQ, qp + m0 * p.q_row_stride, int(p.q_row_stride), ql - m0);
    cp_async_rows<T, D, BM, SD>(sdO, gp + m0 * p.do_row_stride, int(p.do_row_stride), ql - m0);
    auto load_kv = [&](int nb, int buf) {
      const int n0 = nb * BN;
      cp_async_rows<T, D, BN, SD>(sK + buf * BN * SD, kp + n0 * p.k_row_stride, int(p.k_row_stride), kl - n0);
      cp_async_rows<T, D, BN, SD>(sV + buf * BN * SD, vp + n0 * p.v_row_stride, int(p.v_row_stride), kl - n0);
    };
    load_kv(0, 0);
    cp_async_commit();

    const int nb_end = ceil_div(n_max, BN);
    for (int nb = 0; nb < nb_end; ++nb) {
      const int buf = nb & 1;
      cp_async_wait<0>();
      __syncthreads();  // tile nb is in smem for everyone; everyone is done with tile nb - 1's buffer
      if (nb + 1 < nb_end) load_kv(nb + 1, buf ^ 1);
      cp_async_commit();
      const int n0 = nb * BN;
      if (n0 >= n_warp) continue;  // warp-uniform: none of this warp's rows sees these keys
      const T* tK = sK + buf * BN * SD;
      const T* tV = sV + buf * BN * SD;

      // ---- S = Q K^T, dP = dO V^T (Q / dO rows: A operand; K / V rows: B operand, non-transposed).
      float s[MA][NT][4], dp[MA][NT][4];
#pragma unroll
      for (int a = 0; a < MA; ++a)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[a][nt][e] = dp[a][nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t qa[MA][4], ga[MA][4];
#pragma unroll
        for (int a = 0; a < MA; ++a) {
          const int off = (wr0 + 16 * a + lane % 16) * SD + kk * 16 + (lane / 16) * 8;
          ldsm_x4(qa[a], sQ + off);
          ldsm_x4(ga[a], sdO + off);
        }
#pragma unroll
        for (int nt2 = 0; nt2 < NT / 2; ++nt2) {
          // (b0, b1): keys 16 nt2 + 0..7; (b2, b3): keys 16 nt2 + 8..15
          const int off = (nt2 * 16 + lane % 8 + (lane / 16) * 8) * SD + kk * 16 + ((lane / 8) % 2) * 8;
          uint32_t kb[4], vb[4];
          ldsm_x4(kb, tK + off);
          ldsm_x4(vb, tV + off);
#pragma unroll
          for (int a = 0; a < MA; ++a) {
            mma_16816<T>(s[a][2 * nt2], qa[a], kb[0], kb[1]);
            mma_16816<T>(s[a][2 * nt2 + 1], qa[a], kb[2], kb[3]);
            mma_16816<T>(dp[a][2 * nt2], ga[a], vb[0], vb[1]);
            mma_16816<T>(dp[a][2 * nt2 + 1], ga[a], vb[2], vb[3]);
          }
        }
      }

      // ---- dS = scale P (dP - Delta) into dp, exactly 0 where the key is not visible (select).
#pragma unroll
      for (int a = 0; a < MA; ++a)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int ri = 2 * a + hh;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = n0 + nt * 8 + 2 * tq + e;
              const bool vis = j < row_n[ri];
              const float pv = vis ? exp2_ftz(s[a][nt][2 * hh + e] * p.scale_log2 - row_lse2[ri]) : 0.f;
              float& y = dp[a][nt][2 * hh + e];
              y = vis ? pv * (y - row_delta[ri]) * p.scale : 0.f;
            }
        }

      // ---- dQ += dS K: dS stays in registers as the A operand; K rows by ldmatrix.trans.
      mma_frag_x_smem<T, MA, BN, D, SD>(acc, dp, tK, lane);
    }
  }

  // ---- Epilogue: stage the warp's dQ rows in its own rows of sQ (only this warp ever read them),
  // then write whole 16-byte chunks of every row < Cq (zeros past q_len).
  __syncwarp();
#pragma unroll
  for (int a = 0; a < MA; ++a)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      T* srow = sQ + (wr0 + 16 * a + 8 * hh + g) * SD + 2 * tq;
#pragma unroll
      for (int dt = 0; dt < DT; ++dt)
        *reinterpret_cast<uint32_t*>(srow + dt * 8) = pack2<T>(acc[a][dt][2 * hh], acc[a][dt][2 * hh + 1]);
    }
  __syncwarp();
  for (int idx = lane; idx < RW * Tr::kChunks; idx += 32) {
    const int r = wr0 + idx / Tr::kChunks, c = (idx % Tr::kChunks) * 8, i = m0 + r;
    if (i >= p.Cq) continue;
    T* dst = static_cast<T*>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride + c;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sQ + r * SD + c);
  }
}

}  // namespace gmod::attn
