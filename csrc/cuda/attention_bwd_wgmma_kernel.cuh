// Hopper (sm_90a) backward dk/dv kernel on warpgroup MMAs: gmod_attn_bwd_dkdv_wgmma_kernel.
// Why: the mma.sync dk/dv kernel (attention_bwd_tc_kernel.cuh) ran the backward at 0.73-0.77x SDPA's
// flash backend on the H100 (ncu: 33 % tensor pipe, `wait` stalls); wgmma reads its B operand (and A
// for the recomputed S^T / dP^T and for dQ) straight from shared memory, asynchronously.
// One CTA = 128 keys of one kv head [x part of its GQA group] of one batch row, 2 warpgroups x 64 keys
// (256 threads); it loops over (q head, 64-query tile) steps, Q / dO (+ lse, Delta) double-buffered
// with cp.async, as gmod_attn_bwd_dkdv_tc_kernel. Per step and warpgroup (its 64 keys):
//   S^T  = K Q^T,  dP^T = V dO^T     m64n64k16, both operands K-major in shared memory (d / 16 steps)
//   P^T  = exp2(S^T scale_log2 - lse log2 e),  dS^T = scale P^T (dP^T - Delta)   (0 where not visible)
//   dV  += P^T dO, dK += dS^T Q      m64n{d}k16, P^T / dS^T as register A operands (the accumulator
//                                    layout of two n8 column groups is the A fragment of a k16 step),
//                                    dO / Q N-major (imm-trans-b)
//   dQ   = dS K (this warpgroup's 64 keys)  m64n64k16 per 64 head-dim columns: dS^T is also stored 16-bit, key-major, in the
//                                    warpgroup's own shared tile and read back as an M-major A
//                                    (imm-trans-a), K N-major; then red.global.add into fp32 dq_accum.
// Each warpgroup adds its own keys' share of dQ (a split over the reduction, so the warpgroups never
// wait for each other inside a step; twice the dQ atomics of one 128-key sum, which the H100 has to say
// whether it matters). Non-deterministic path only (the deterministic mode keeps the mma.sync kernels).
// Same launch contract as gmod_attn_bwd_dkdv_tc_kernel<.., kAtomicDq = true>: same params, grid, Delta
// from gmod_attn_bwd_preprocess_kernel, dK / dV written in T for a whole GQA group (zeros for keys nobody
// sees) or added into dk_accum / dv_accum for keys < k_len.
// Skipped work: query tiles that see none of the CTA's keys are never loaded; a warpgroup none of whose
// keys a step's queries see skips the step; rows that see none of a warpgroup's keys add no dQ.
// Head dims 64 and 128. Opt-in (GMOD_ATTN_BWD_IMPL=wgmma, attention_api.cu); checked in the host
// emulation (csrc/cuda/emu/, `attention_emu_test wgmmabwd`), not yet on a GPU.
#pragma once

#include <type_traits>

#include "attention_common.cuh"
#include "attention_mma.cuh"
#include "attention_wgmma.cuh"

namespace gmod::attn {

template <int kHeadDim_>
struct WgmmaBwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kBlockN = 128;   // keys per CTA: 64 per warpgroup (the wgmma M)
  static constexpr int kBlockM = 64;    // queries per step (the N of S^T = K Q^T, the K of dV += P^T dO)
  static constexpr int kChunks = kHeadDim / 8;                // 16-byte chunks per row
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;     // K or V: [d / 64][BN][128 B], swizzled
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;      // Q or dO, one buffer: [d / 64][BM][128 B]
  static constexpr int kDsBytes = 64 * kBlockM * 2;           // one warpgroup's dS^T: [64 keys][BM = 64 queries]
  // K, V, 2 x (Q, dO), 2 x dS^T, 2 x (lse, Delta) floats, + 1024 to align the base (the swizzle works on
  // address bits): 146 KB at d = 128, 82 KB at d = 64.
  static constexpr int kSmemBytes = 2 * kKVBytes + 4 * kQBytes + 2 * kDsBytes + 4 * kBlockM * 4 + 1024;
  static constexpr int kSRegs = kBlockM / 2;   // S^T / dP^T fragment registers per thread (64 x BM / 128)
  static constexpr int kAccRegs = kHeadDim / 2;  // dK / dV fragment registers per thread (64 x d / 128)
  // Steps off the causal diagonal skip the per-entry visibility test (a second, unmasked copy of the P /
  // dS code). Off at d = 128, where that copy made ptxas spill (sm_90a, nvcc 13.0).
  static constexpr bool kUnmaskedSteps = kHeadDim != 128;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma backward: head dim 64 or 128");
  static_assert(kBlockM == 64, "one 128-byte swizzled row of dS^T per key; S^T = K Q^T is one m64n64k16 per step");
};

// Adds kGroups n8 column groups of a wgmma accumulator (elements 4 j .. 4 j + 3 of acc: rows g, g + 8 x
// columns 8 j + 2 t, + 1) to fp32 rows of global memory, as atomic_add_frag does one: quad neighbours
// trade halves with a shuffle, then even-t lanes add 4 consecutive columns of row g and odd-t lanes 4 of
// row g + 8, one float4 atomic per group (sm_90). One row pointer per lane and immediate offsets: a
// pointer per group and row, as atomic_add_frag's arguments would be, made ptxas spill here.
template <int kGroups>
GMOD_DEV void atomic_add_groups(float* row_g, float* row_g8, const float* acc, int t, bool ok_g, bool ok_g8) {
  const bool even = (t & 1) == 0;
  float* const dst = even ? row_g + 2 * t : row_g8 + 2 * (t - 1);
  const bool ok = even ? ok_g : ok_g8;
#pragma unroll
  for (int j = 0; j < kGroups; ++j) {
    const float* c = acc + 4 * j;
    const float r0 = __shfl_xor_sync(0xffffffffu, even ? c[2] : c[0], 1);
    const float r1 = __shfl_xor_sync(0xffffffffu, even ? c[3] : c[1], 1);
    if (ok) atomicAdd(reinterpret_cast<float4*>(dst + 8 * j), even ? make_float4(c[0], c[1], r0, r1)
                                                                   : make_float4(r0, r1, c[2], c[3]));
  }
}

template <typename Tr, typename T>
__global__ void __launch_bounds__(Tr::kThreads, 1) gmod_attn_bwd_dkdv_wgmma_kernel(const AttnBwdParams p) {
  static_assert(sizeof(T) == 2, "the wgmma kernel takes bf16 / fp16");
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NC = Tr::kChunks;
  constexpr int SR = Tr::kSRegs, AR = Tr::kAccRegs;

  extern __shared__ float4 gmod_attn_smem[];
  const uint32_t smem_raw = smem_u32(gmod_attn_smem);
  const uint32_t pad = (1024u - (smem_raw & 1023u)) & 1023u;
  char* const sK = reinterpret_cast<char*>(gmod_attn_smem) + pad;  // [D / 64][BN][128 B]; epilogue: dK
  char* const sV = sK + Tr::kKVBytes;                               // [D / 64][BN][128 B]; epilogue: dV
  char* const sQ = sV + Tr::kKVBytes;                               // [2][D / 64][BM][128 B]
  char* const sdO = sQ + 2 * Tr::kQBytes;                           // [2][D / 64][BM][128 B]
  char* const sdS = sdO + 2 * Tr::kQBytes;                          // [2 warpgroups][64 keys][128 B]
  float* const sLse = reinterpret_cast<float*>(sdS + 2 * Tr::kDsBytes);  // [2][BM]: lse log2 e
  float* const sDelta = sLse + 2 * BM;                                   // [2][BM]
  const uint32_t aK = smem_raw + pad, aV = aK + Tr::kKVBytes, aQ = aV + Tr::kKVBytes;
  const uint32_t adO = aQ + 2 * Tr::kQBytes, adS = adO + 2 * Tr::kQBytes;

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const DkdvCta cta = dkdv_cta(p);
  const int hk = cta.hk, h_begin = cta.h_begin, b = cta.b, ql = cta.ql, kl = cta.kl;
  const int n0 = static_cast<int>(blockIdx.x) * BN;
  const int wk0 = wg * 64;  // this warpgroup's first key row of the tile
  char* const sdS_wg = sdS + wg * Tr::kDsBytes;
  const uint32_t adS_wg = adS + wg * Tr::kDsBytes;

  // dK / dV of keys n0 + wk0 + 16 warp + g + 8 ((i / 2) % 2), head-dim column 8 (i / 4) + 2 tq + i % 2.
  float dk[AR], dv[AR];
#pragma unroll
  for (int i = 0; i < AR; ++i) dk[i] = dv[i] = 0.f;

  if (n0 < kl && ql > 0) {
    const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
    // Key n0 is seen by queries i >= n0 - (kl - ql); every key j < kl is seen by the last query.
    const int m_begin = imax(0, n0 - (kl - ql)) / BM;
    const int m_tiles = ceil_div(ql, BM) - m_begin;
    const int steps = p.heads_per_cta * m_tiles;  // (head, query tile) pairs, head-major

    // Copies as the wgmma forward's: thread tid always moves chunk c0 = tid % NC of rows r0 + i kPassRows
    // (a multiple of 8 rows per pass, so its swizzled shared offset is fixed up to i kPassRows 128);
    // rows past the valid count are zero-filled (the address of the tile's row 0 passed).
    constexpr int kPassRows = Tr::kThreads / NC;
    static_assert(kPassRows % 8 == 0 && BM % kPassRows == 0 && BN % kPassRows == 0 && BN <= kMaxTileRows, "copy passes");
    const int r0 = tid / NC, c0 = tid % NC;
    auto copy_rows = [&](auto rows_tag, char* dst, const T* src, int stride, int valid) {
      constexpr int kRows = decltype(rows_tag)::value;
      const uint32_t s0 = sw128_offset(r0, c0, kRows);
      const T* s = src + c0 * 8;
#pragma unroll
      for (int i = 0; i < kRows / kPassRows; ++i) {
        const int r = r0 + i * kPassRows;
        const bool pred = r < valid;
        cp_async_16_zfill(dst + s0 + i * kPassRows * 128, s + (pred ? r * stride : 0), pred);
      }
    };
    using RowsN = std::integral_constant<int, BN>;
    using RowsM = std::integral_constant<int, BM>;
    copy_rows(RowsN{}, sK, kp + n0 * p.k_row_stride, static_cast<int>(p.k_row_stride), kl - n0);
    copy_rows(RowsN{}, sV, vp + n0 * p.v_row_stride, static_cast<int>(p.v_row_stride), kl - n0);
    // Q / dO rows of a step into buffer buf (m0 < ql), with the per-query lse log2 e and Delta.
    auto load_step = [&](int h, int m0, int buf) {
      const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const T* gp = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
      copy_rows(RowsM{}, sQ + buf * Tr::kQBytes, qp + m0 * p.q_row_stride, static_cast<int>(p.q_row_stride), ql - m0);
      copy_rows(RowsM{}, sdO + buf * Tr::kQBytes, gp + m0 * p.do_row_stride, static_cast<int>(p.do_row_stride), ql - m0);
      stage_lse_delta(p, b, h, m0, BM, ql, kl, sLse + buf * BM, sDelta + buf * BM, tid, Tr::kThreads);
    };
    load_step(h_begin, m_begin * BM, 0);
    cp_async_commit();

    // This thread's two keys j = n0 + wk0 + 16 warp + g + 8 hh are seen by queries first_q[hh] <= i < ql
    // (first_q past any query for keys >= kl, which are zero rows).
    int first_q[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int j = n0 + wk0 + 16 * warp + g + 8 * hh;
      first_q[hh] = j < kl ? j - (kl - ql) : ql;
    }
    const int j_first = n0 + wk0, j_last = n0 + wk0 + 63;  // this warpgroup's keys

    int step_h = h_begin, step_mt = 0;
    for (int it = 0; it < steps; ++it) {
      const int next_mt = step_mt + 1 == m_tiles ? 0 : step_mt + 1;
      const int next_h = next_mt == 0 ? step_h + 1 : step_h;
      const int buf = it & 1;
      cp_async_wait<0>();
      fence_proxy_async();  // this thread's copies, visible to the wgmma (async proxy) reads
      // Step it is in shared memory; everyone's MMAs of step it - 1 (which read buffer buf ^ 1) are done.
      __syncthreads();
      if (it + 1 < steps) load_step(next_h, (m_begin + next_mt) * BM, buf ^ 1);
      cp_async_commit();
      const int h = step_h, m0 = (m_begin + step_mt) * BM;
      step_h = next_h, step_mt = next_mt;
      // Warpgroup-uniform: the step's last live query sees this warpgroup's first key.
      if (j_first >= visible_keys(imin(m0 + BM, ql) - 1, ql, kl)) continue;

      uint32_t tQ = aQ + buf * Tr::kQBytes, tdO = adO + buf * Tr::kQBytes, tK = aK, tV = aV, tdS = adS_wg;
      // Descriptors are rebuilt from these each step (a few integer ops each) rather than kept live
      // across the loop: at d = 128 the hoisted ones made ptxas spill.
      wgmma_opaque(tQ), wgmma_opaque(tdO), wgmma_opaque(tK), wgmma_opaque(tV), wgmma_opaque(tdS);
      const float* tLse = sLse + buf * BM;
      const float* tDelta = sDelta + buf * BM;

      // ---- S^T = K Q^T, dP^T = V dO^T: d / 16 k16 steps along the swizzled rows (32 bytes a step, the
      // next 64-column block every 4), the warpgroup's 64 K / V rows as A, the step's 64 Q / dO rows as B.
      float s[SR], dp[SR];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t kv_off = (kk / 4) * BN * 128 + wk0 * 128 + (kk % 4) * 32u;  // the warpgroup's K / V rows
        const uint32_t q_off = (kk / 4) * BM * 128 + (kk % 4) * 32u;                // the step's Q / dO rows
        wgmma_ss<T, BM>(s, wgmma_desc_sw128(tK + kv_off, 16, 1024), wgmma_desc_sw128(tQ + q_off, 16, 1024), kk > 0);
        wgmma_ss<T, BM>(dp, wgmma_desc_sw128(tV + kv_off, 16, 1024), wgmma_desc_sw128(tdO + q_off, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_keep(s);
      wgmma_keep(dp);

      // ---- P^T and dS^T in place (s -> P^T, dp -> dS^T). Element i: key row 16 warp + g + 8 hh of the
      // warpgroup (hh = (i / 2) % 2), query m0 + c with c = 8 (i / 4) + 2 tq + i % 2. Select, not
      // multiply: a masked entry is exactly 0 whatever S, lse or dP hold. Where every (key, query) pair
      // of the warpgroup and step is visible (off the causal diagonal, inside both lengths) the
      // per-entry test is left out.
      auto p_and_ds = [&](auto masked) {
#pragma unroll
        for (int i = 0; i < SR; ++i) {
          const int c = 8 * (i / 4) + 2 * tq + i % 2, qi = m0 + c, hh = (i / 2) % 2;
          const bool vis = !decltype(masked)::value || (qi >= first_q[hh] && qi < ql);
          const float pv = vis ? exp2_ftz(s[i] * p.scale_log2 - tLse[c]) : 0.f;
          dp[i] = vis ? pv * (dp[i] - tDelta[c]) * p.scale : 0.f;
          s[i] = pv;
        }
      };
      const bool full = j_last < kl && m0 + BM <= ql && m0 >= j_last - (kl - ql);
      if (Tr::kUnmaskedSteps && full)
        p_and_ds(std::false_type{});
      else
        p_and_ds(std::true_type{});

      // ---- Pack P^T / dS^T as the A operands of k16 steps over the step's queries (dS^T also goes into the
      // warpgroup's shared tile, key-major: row = key, 16-byte chunk c = queries 8 c .. 8 c + 7).
      uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          pa[kk][j] = pack2<T>(s[8 * kk + 2 * j], s[8 * kk + 2 * j + 1]);
          da[kk][j] = pack2<T>(dp[8 * kk + 2 * j], dp[8 * kk + 2 * j + 1]);
        }
      // ---- dV += P^T dO, dK += dS^T Q: dO / Q N-major, k16 step kk = 16 query rows (2048 bytes) down,
      // the next 64 head-dim columns BM rows further.
      // At d = 64 the accumulators are pinned to their registers before the fence: without it the
      // compiler's register moves land after the fence and ptxas injects a warpgroup.arrive (C7519). At
      // d = 128 the pin made ptxas spill 132 bytes instead of 60, so there the injected arrive stays.
      if constexpr (D == 64) {
        wgmma_keep(dv);
        wgmma_keep(dk);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
        wgmma_rs<T, D>(dv, pa[kk], wgmma_desc_sw128(tdO + kk * 16 * 128, BM * 128, 1024), true);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
        wgmma_rs<T, D>(dk, da[kk], wgmma_desc_sw128(tQ + kk * 16 * 128, BM * 128, 1024), true);
      wgmma_commit();
      // dS^T into the warpgroup's shared tile while those run.
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // reg j: key row + 8 (j % 2), query chunk 2 kk + j / 2
          const int r = 16 * warp + g + 8 * (j % 2);
          *reinterpret_cast<uint32_t*>(sdS_wg + sw128_offset(r, 2 * kk + j / 2, 64) + 4 * tq) = da[kk][j];
        }


      // ---- dQ = dS K over this warpgroup's 64 keys, 64 head-dim columns at a time (one swizzle block
      // of K; at d = 128 a whole m64n128 dQ next to dK, dV and the in-flight P^T / dS^T made ptxas spill):
      // A = dS (queries x keys) M-major from the key-major dS^T tile (k16 step kk = 16 key rows down),
      // B = K rows wk0 + 16 kk.. N-major. Then fp32 atomics of rows m0 + 16 warp + g (+ 8): n8 column
      // group j is elements 4 j .. 4 j + 3, an mma C fragment. Rows past q_len, or that see none of the
      // warpgroup's keys, add nothing.
      fence_proxy_async();  // this thread's dS^T stores, visible to the async proxy
      warpgroup_sync(wg);   // ... of every thread of the warpgroup
      // dV / dK done before dQ's accumulators are allocated: P^T / dS^T's registers are free then (at
      // d = 128, dK + dV + P^T + dS^T + dQ made ptxas spill). The warpgroup's wgmmas run in order on the
      // tensor cores anyway; the other warpgroup's keep them busy meanwhile.
      wgmma_wait<0>();
      wgmma_keep(dv);
      wgmma_keep(dk);
      wgmma_keep_regs(pa);
      wgmma_keep_regs(da);
      const int i0 = m0 + 16 * warp + g, i1 = i0 + 8;
      const bool ok0 = i0 < ql && visible_keys(i0, ql, kl) > j_first;
      const bool ok1 = i1 < ql && visible_keys(i1, ql, kl) > j_first;
      float* dst0 = p.dq_accum + (((int64_t)b * p.Cq + imin(i0, p.Cq - 1)) * p.Hq + h) * D;
      float* dst1 = p.dq_accum + (((int64_t)b * p.Cq + imin(i1, p.Cq - 1)) * p.Hq + h) * D;
#pragma unroll
      for (int cb = 0; cb < D / 64; ++cb) {
        float dq[32];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < 64 / 16; ++kk) {
          const uint64_t dsa = wgmma_desc_sw128(tdS + kk * 16 * 128, 64 * 128, 1024);
          const uint64_t dkb = wgmma_desc_sw128(tK + cb * BN * 128 + (wk0 + 16 * kk) * 128, BN * 128, 1024);
          wgmma_ss<T, 64, /*kTransA=*/true, /*kTransB=*/true>(dq, dsa, dkb, kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
        wgmma_keep(dq);
        atomic_add_groups<8>(dst0 + cb * 64, dst1 + cb * 64, dq, tq, ok0, ok1);
      }
    }
  }

  // ---- Epilogue: dK / dV of keys n0 + wk0 + 16 warp + g + 8 hh.
  if (p.heads_per_cta == p.group) {
    // Whole group: stage the warpgroup's rows in its own rows of sK / sV (only it ever read them, and
    // its MMAs are done), swizzled like K, then write whole 16-byte chunks; zeros for keys nobody sees.
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = wk0 + 16 * warp + g + 8 * hh;
#pragma unroll
      for (int j = 0; j < AR / 4; ++j) {
        *reinterpret_cast<uint32_t*>(sK + sw128_offset(r, j, BN) + 4 * tq) = pack2<T>(dk[4 * j + 2 * hh], dk[4 * j + 2 * hh + 1]);
        *reinterpret_cast<uint32_t*>(sV + sw128_offset(r, j, BN) + 4 * tq) = pack2<T>(dv[4 * j + 2 * hh], dv[4 * j + 2 * hh + 1]);
      }
    }
    warpgroup_sync(wg);
    for (int idx = tid % 128; idx < 64 * NC; idx += 128) {
      const int r = wk0 + idx / NC, c = idx % NC, j = n0 + r;
      if (j >= p.Ck) continue;
      T* dkp = static_cast<T*>(p.dk) + b * p.dk_batch_stride + j * p.dk_row_stride + hk * p.dk_head_stride + c * 8;
      T* dvp = static_cast<T*>(p.dv) + b * p.dv_batch_stride + j * p.dv_row_stride + hk * p.dv_head_stride + c * 8;
      *reinterpret_cast<uint4*>(dkp) = *reinterpret_cast<const uint4*>(sK + sw128_offset(r, c, BN));
      *reinterpret_cast<uint4*>(dvp) = *reinterpret_cast<const uint4*>(sV + sw128_offset(r, c, BN));
    }
  } else {
    // Part of a group: fp32 atomics straight from the fragments, keys < k_len only.
    const int j0 = n0 + wk0 + 16 * warp + g, j1 = j0 + 8;
    const int64_t off0 = (((int64_t)b * p.Ck + imin(j0, p.Ck - 1)) * p.Hk + hk) * D;
    const int64_t off1 = (((int64_t)b * p.Ck + imin(j1, p.Ck - 1)) * p.Hk + hk) * D;
    atomic_add_groups<D / 8>(p.dk_accum + off0, p.dk_accum + off1, dk, tq, j0 < kl, j1 < kl);
    atomic_add_groups<D / 8>(p.dv_accum + off0, p.dv_accum + off1, dv, tq, j0 < kl, j1 < kl);
  }
}

}  // namespace gmod::attn
