// Backward attention kernels (FlashAttention-2 recomputation from o and lse, SIMT math for now):
//   gmod_attn_bwd_preprocess_kernel  Delta_i = <dO_i, O_i> (fp32), one warp per (b, query, q head);
//   gmod_attn_bwd_dkdv_kernel        one CTA per (key tile, kv head [x part of its GQA group], b):
//                                    dK, dV of BLOCK_N keys in registers, looping over the q heads it
//                                    covers and the query tiles that see the keys; optionally adds dQ
//                                    atomically (fp32) for each (query tile, key tile) pair;
//   gmod_attn_bwd_dq_kernel          deterministic dQ: one CTA per (query tile, q head, b), looping
//                                    over key tiles like the forward.
// With P = exp(S - lse) (S = scale q.k, masked to 0), dP = dO V^T, dS = P * (dP - Delta):
//   dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
// Launchers: attention_bwd.cu.
#pragma once

#include "attention_common.cuh"

namespace gmod::attn {

template <int kHeadDim>
using BwdTraits = TileTraits<kHeadDim, BwdTile<kHeadDim>::kBlockM, BwdTile<kHeadDim>::kBlockN>;

template <typename Tr>
constexpr int bwd_dkdv_smem_bytes() {  // sK, sV, sQ, sdO, sP, sdS
  return static_cast<int>(sizeof(float)) *
         (2 * Tr::kBlockN * Tr::kStrideD + 2 * Tr::kBlockM * Tr::kStrideD + 2 * Tr::kBlockM * Tr::kStrideN);
}
template <typename Tr>
constexpr int bwd_dq_smem_bytes() {  // sQ, sdO, sK, sV, sdS
  return static_cast<int>(sizeof(float)) *
         (2 * Tr::kBlockM * Tr::kStrideD + 2 * Tr::kBlockN * Tr::kStrideD + Tr::kBlockM * Tr::kStrideN);
}

// Delta[b, h, i] = sum_e dO[b, i, h, e] * O[b, i, h, e] for i < q_len[b], else 0.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kNThreads) gmod_attn_bwd_preprocess_kernel(const AttnBwdParams p) {
  constexpr int kWarps = kNThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (row >= static_cast<int64_t>(p.B) * p.Cq * p.Hq) return;  // uniform over the warp
  const int h = static_cast<int>(row % p.Hq);
  const int i = static_cast<int>((row / p.Hq) % p.Cq);
  const int b = static_cast<int>(row / (static_cast<int64_t>(p.Hq) * p.Cq));
  const int ql = iclamp(p.q_len[b], 0, p.Cq);
  float acc = 0.f;
  if (i < ql) {
    const T* o = static_cast<const T*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
    const T* g = static_cast<const T*>(p.dout) + b * p.do_batch_stride + i * p.do_row_stride +
                 h * p.do_head_stride;
    for (int e = lane; e < kHeadDim; e += 32) acc = fmaf(Elem<T>::to_float(g[e]), Elem<T>::to_float(o[e]), acc);
  }
  acc = warp_sum(acc);
  if (lane == 0) p.delta[((int64_t)b * p.Hq + h) * p.Cq + i] = acc;
}

// S and dP of one (query tile, key tile) pair for this thread's RM x CN entries, then
// P = exp2(S * scale_log2 - lse2) and dS = scale * P * (dP - Delta), both masked to 0, into sP / sdS
// (sP may be nullptr: the dq pass needs dS only).
// MMA SITES 1 and 2: S = Q K^T and dP = dO V^T are two m16n8k16 / wgmma GEMMs over the same tiles.
template <typename Tr>
GMOD_DEV void bwd_compute_p_ds(const float* sQ, const float* sdO, const float* sK, const float* sV, float* sP,
                               float* sdS, int n0, const int (&row_n)[Tr::kRowsPerThread],
                               const float (&row_lse2)[Tr::kRowsPerThread],
                               const float (&row_delta)[Tr::kRowsPerThread], float scale, float scale_log2) {
  constexpr int D = Tr::kHeadDim, RM = Tr::kRowsPerThread, CN = Tr::kKeysPerThread;
  constexpr int SD = Tr::kStrideD, SN = Tr::kStrideN;
  const int rg = threadIdx.x / kColLanes, lc = threadIdx.x % kColLanes;
  float s[RM][CN], dp[RM][CN];
#pragma unroll
  for (int ii = 0; ii < RM; ++ii)
#pragma unroll
    for (int jj = 0; jj < CN; ++jj) s[ii][jj] = dp[ii][jj] = 0.f;
#pragma unroll 2
  for (int e = 0; e < D; e += 4) {
    float4 qv[RM], gv[RM], kv[CN], vv[CN];
#pragma unroll
    for (int ii = 0; ii < RM; ++ii) {
      qv[ii] = lds4(sQ + (rg + kRowGroups * ii) * SD + e);
      gv[ii] = lds4(sdO + (rg + kRowGroups * ii) * SD + e);
    }
#pragma unroll
    for (int jj = 0; jj < CN; ++jj) {
      kv[jj] = lds4(sK + (lc + kColLanes * jj) * SD + e);
      vv[jj] = lds4(sV + (lc + kColLanes * jj) * SD + e);
    }
#pragma unroll
    for (int ii = 0; ii < RM; ++ii)
#pragma unroll
      for (int jj = 0; jj < CN; ++jj) {
        float a = s[ii][jj], g = dp[ii][jj];
        a = fmaf(qv[ii].x, kv[jj].x, a);
        a = fmaf(qv[ii].y, kv[jj].y, a);
        a = fmaf(qv[ii].z, kv[jj].z, a);
        a = fmaf(qv[ii].w, kv[jj].w, a);
        g = fmaf(gv[ii].x, vv[jj].x, g);
        g = fmaf(gv[ii].y, vv[jj].y, g);
        g = fmaf(gv[ii].z, vv[jj].z, g);
        g = fmaf(gv[ii].w, vv[jj].w, g);
        s[ii][jj] = a;
        dp[ii][jj] = g;
      }
  }
#pragma unroll
  for (int ii = 0; ii < RM; ++ii) {
    const int r = rg + kRowGroups * ii;
#pragma unroll
    for (int jj = 0; jj < CN; ++jj) {
      const int jl = lc + kColLanes * jj;
      // Select, not multiply: a masked entry is exactly 0 whatever S, lse or dP hold.
      const float pv = n0 + jl < row_n[ii] ? exp2f(s[ii][jj] * scale_log2 - row_lse2[ii]) : 0.f;
      const float ds = n0 + jl < row_n[ii] ? pv * (dp[ii][jj] - row_delta[ii]) * scale : 0.f;
      if (sP != nullptr) sP[r * SN + jl] = pv;
      sdS[r * SN + jl] = ds;
    }
  }
}

// One CTA: keys [n0, n0 + BLOCK_N) of kv head hk, q heads [h_begin, h_begin + heads_per_cta).
// heads_per_cta == group: the CTA owns the whole group and writes dK / dV in the input dtype (zeros
// for keys nobody sees); otherwise it atomically adds into the fp32 dk_accum / dv_accum.
// kAtomicDq: also dQ += dS K into the fp32 dq_accum (non-deterministic summation order).
// __launch_bounds__(128, 1): shared memory already limits this kernel to 1-3 CTAs per SM; without the
// hint ptxas aims at 3-4 CTAs' worth of registers (128-168) and spills a few bytes for some head dims.
template <typename Tr, typename T, bool kAtomicDq>
__global__ void __launch_bounds__(kNThreads, 1) gmod_attn_bwd_dkdv_kernel(const AttnBwdParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int RM = Tr::kRowsPerThread, RN = Tr::kKeyRowsPerThread, CD = Tr::kColChunks;
  constexpr int SD = Tr::kStrideD, SN = Tr::kStrideN;

  extern __shared__ float4 gmod_attn_smem[];
  float* sK = reinterpret_cast<float*>(gmod_attn_smem);  // [BN][SD]
  float* sV = sK + BN * SD;                               // [BN][SD]
  float* sQ = sV + BN * SD;                               // [BM][SD]
  float* sdO = sQ + BM * SD;                              // [BM][SD]
  float* sP = sdO + BM * SD;                              // [BM][SN]
  float* sdS = sP + BM * SN;                              // [BM][SN]

  const int tid = threadIdx.x;
  const int rg = tid / kColLanes, lc = tid % kColLanes;
  const DkdvCta cta = dkdv_cta(p);
  const int hk = cta.hk, h_begin = cta.h_begin, b = cta.b, ql = cta.ql, kl = cta.kl;
  const int n0 = static_cast<int>(blockIdx.x) * BN;

  // dK / dV of keys n0 + rg + 16 * ii, columns 4 * lc + 32 * c + t.
  float dk[RN][CD][4], dv[RN][CD][4];
#pragma unroll
  for (int ii = 0; ii < RN; ++ii)
#pragma unroll
    for (int c = 0; c < CD; ++c)
#pragma unroll
      for (int t = 0; t < 4; ++t) dk[ii][c][t] = dv[ii][c][t] = 0.f;

  // Key n0 is seen by queries i >= n0 - (kl - ql); every key j < kl is seen by the last query.
  if (n0 < kl && ql > 0) {
    const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
    load_tile<T, D, BN, SD>(sK, [&](int r) -> const T* { return n0 + r < kl ? kp + (n0 + r) * p.k_row_stride : nullptr; });
    load_tile<T, D, BN, SD>(sV, [&](int r) -> const T* { return n0 + r < kl ? vp + (n0 + r) * p.v_row_stride : nullptr; });
    const int m_begin = imax(0, n0 - (kl - ql)) / BM;
    const int m_end = ceil_div(ql, BM);

    for (int h = h_begin; h < h_begin + p.heads_per_cta; ++h) {
      const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const T* gp = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
      const float* lse = p.lse + ((int64_t)b * p.Hq + h) * p.Cq;
      const float* delta = p.delta + ((int64_t)b * p.Hq + h) * p.Cq;
      for (int mb = m_begin; mb < m_end; ++mb) {
        const int m0 = mb * BM;
        __syncthreads();  // the previous step is done reading sQ / sdO / sP / sdS
        load_tile<T, D, BM, SD>(sQ, [&](int r) -> const T* { return m0 + r < ql ? qp + (m0 + r) * p.q_row_stride : nullptr; });
        load_tile<T, D, BM, SD>(sdO, [&](int r) -> const T* { return m0 + r < ql ? gp + (m0 + r) * p.do_row_stride : nullptr; });
        int row_n[RM];
        float row_lse2[RM], row_delta[RM];
#pragma unroll
        for (int ii = 0; ii < RM; ++ii) {
          const int i = m0 + rg + kRowGroups * ii;
          row_n[ii] = i < ql ? visible_keys(i, ql, kl) : 0;
          row_lse2[ii] = row_n[ii] > 0 ? lse[i] * kLog2e : 0.f;
          row_delta[ii] = row_n[ii] > 0 ? delta[i] : 0.f;
        }
        __syncthreads();

        bwd_compute_p_ds<Tr>(sQ, sdO, sK, sV, sP, sdS, n0, row_n, row_lse2, row_delta, p.scale, p.scale_log2);
        __syncthreads();

        // ---- dV += P^T dO, dK += dS^T Q for keys rg + 16 * ii.
        // MMA SITES 3 and 4: two GEMMs with the transposed P / dS tiles as the A operand
        // (ldmatrix.trans from smem), dO / Q as B.
#pragma unroll 2
        for (int i = 0; i < BM; ++i) {
          float pr[RN], dsr[RN];
#pragma unroll
          for (int ii = 0; ii < RN; ++ii) {
            pr[ii] = sP[i * SN + rg + kRowGroups * ii];
            dsr[ii] = sdS[i * SN + rg + kRowGroups * ii];
          }
#pragma unroll
          for (int c = 0; c < CD; ++c) {
            const float4 gv = lds4(sdO + i * SD + 4 * lc + 32 * c);
            const float4 qv = lds4(sQ + i * SD + 4 * lc + 32 * c);
#pragma unroll
            for (int ii = 0; ii < RN; ++ii) {
              dv[ii][c][0] = fmaf(pr[ii], gv.x, dv[ii][c][0]);
              dv[ii][c][1] = fmaf(pr[ii], gv.y, dv[ii][c][1]);
              dv[ii][c][2] = fmaf(pr[ii], gv.z, dv[ii][c][2]);
              dv[ii][c][3] = fmaf(pr[ii], gv.w, dv[ii][c][3]);
              dk[ii][c][0] = fmaf(dsr[ii], qv.x, dk[ii][c][0]);
              dk[ii][c][1] = fmaf(dsr[ii], qv.y, dk[ii][c][1]);
              dk[ii][c][2] = fmaf(dsr[ii], qv.z, dk[ii][c][2]);
              dk[ii][c][3] = fmaf(dsr[ii], qv.w, dk[ii][c][3]);
            }
          }
        }

        if constexpr (kAtomicDq) {
          // ---- dQ += dS K for rows rg + 16 * ii, one 32-column chunk at a time (few live registers).
          // MMA SITE 5: dS (A, from smem) x K (B), then fp32 red.global.add of the accumulator fragment.
#pragma unroll 1
          for (int c = 0; c < CD; ++c) {
            float a[RM][4];
#pragma unroll
            for (int ii = 0; ii < RM; ++ii) a[ii][0] = a[ii][1] = a[ii][2] = a[ii][3] = 0.f;
#pragma unroll 2
            for (int j = 0; j < BN; j += 4) {
              float4 dsv[RM];
#pragma unroll
              for (int ii = 0; ii < RM; ++ii) dsv[ii] = lds4(sdS + (rg + kRowGroups * ii) * SN + j);
#pragma unroll
              for (int t = 0; t < 4; ++t) {
                const float4 kv = lds4(sK + (j + t) * SD + 4 * lc + 32 * c);
#pragma unroll
                for (int ii = 0; ii < RM; ++ii) {
                  const float ds = comp(dsv[ii], t);
                  a[ii][0] = fmaf(ds, kv.x, a[ii][0]);
                  a[ii][1] = fmaf(ds, kv.y, a[ii][1]);
                  a[ii][2] = fmaf(ds, kv.z, a[ii][2]);
                  a[ii][3] = fmaf(ds, kv.w, a[ii][3]);
                }
              }
            }
#pragma unroll
            for (int ii = 0; ii < RM; ++ii) {
              const int i = m0 + rg + kRowGroups * ii;
              if (i >= ql) continue;
              float* dst = p.dq_accum + (((int64_t)b * p.Cq + i) * p.Hq + h) * D + 4 * lc + 32 * c;
#pragma unroll
              for (int t = 0; t < 4; ++t) atomicAdd(dst + t, a[ii][t]);
            }
          }
        }
      }
    }
  }

  // ---- Epilogue: dK / dV rows n0 + rg + 16 * ii.
  const bool whole_group = p.heads_per_cta == p.group;
#pragma unroll
  for (int ii = 0; ii < RN; ++ii) {
    const int j = n0 + rg + kRowGroups * ii;
    if (j >= p.Ck) continue;
    if (whole_group) {
      T* dkp = static_cast<T*>(p.dk) + b * p.dk_batch_stride + j * p.dk_row_stride + hk * p.dk_head_stride;
      T* dvp = static_cast<T*>(p.dv) + b * p.dv_batch_stride + j * p.dv_row_stride + hk * p.dv_head_stride;
#pragma unroll
      for (int c = 0; c < CD; ++c) {
        const float xk[4] = {dk[ii][c][0], dk[ii][c][1], dk[ii][c][2], dk[ii][c][3]};
        const float xv[4] = {dv[ii][c][0], dv[ii][c][1], dv[ii][c][2], dv[ii][c][3]};
        Elem<T>::store4(dkp + 4 * lc + 32 * c, xk);
        Elem<T>::store4(dvp + 4 * lc + 32 * c, xv);
      }
    } else if (j < kl) {
      const int64_t off = (((int64_t)b * p.Ck + j) * p.Hk + hk) * D + 4 * lc;
#pragma unroll
      for (int c = 0; c < CD; ++c)
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          atomicAdd(p.dk_accum + off + 32 * c + t, dk[ii][c][t]);
          atomicAdd(p.dv_accum + off + 32 * c + t, dv[ii][c][t]);
        }
    }
  }
}

// Deterministic dQ: one CTA per (query tile, q head, b), key tiles in order, dQ in registers.
template <typename Tr, typename T>
__global__ void __launch_bounds__(kNThreads) gmod_attn_bwd_dq_kernel(const AttnBwdParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int RM = Tr::kRowsPerThread, CD = Tr::kColChunks;
  constexpr int SD = Tr::kStrideD, SN = Tr::kStrideN;

  extern __shared__ float4 gmod_attn_smem[];
  float* sQ = reinterpret_cast<float*>(gmod_attn_smem);  // [BM][SD]
  float* sdO = sQ + BM * SD;                              // [BM][SD]
  float* sK = sdO + BM * SD;                              // [BN][SD]
  float* sV = sK + BN * SD;                               // [BN][SD]
  float* sdS = sV + BN * SD;                              // [BM][SN]

  const int tid = threadIdx.x;
  const int rg = tid / kColLanes, lc = tid % kColLanes;
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int hk = h / p.group;
  const int ql = iclamp(p.q_len[b], 0, p.Cq);
  const int kl = iclamp(p.k_len[b], 0, p.Ck);
  const int m0 = m_block * BM;
  const int n_max = m0 < ql ? visible_keys(imin(m0 + BM, ql) - 1, ql, kl) : 0;

  float acc[RM][CD][4];
  zero_frags(acc);

  if (n_max > 0) {
    const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* gp = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
    const float* lse = p.lse + ((int64_t)b * p.Hq + h) * p.Cq;
    const float* delta = p.delta + ((int64_t)b * p.Hq + h) * p.Cq;
    load_tile<T, D, BM, SD>(sQ, [&](int r) -> const T* { return m0 + r < ql ? qp + (m0 + r) * p.q_row_stride : nullptr; });
    load_tile<T, D, BM, SD>(sdO, [&](int r) -> const T* { return m0 + r < ql ? gp + (m0 + r) * p.do_row_stride : nullptr; });
    int row_n[RM];
    float row_lse2[RM], row_delta[RM];
#pragma unroll
    for (int ii = 0; ii < RM; ++ii) {
      const int i = m0 + rg + kRowGroups * ii;
      row_n[ii] = i < ql ? visible_keys(i, ql, kl) : 0;
      row_lse2[ii] = row_n[ii] > 0 ? lse[i] * kLog2e : 0.f;
      row_delta[ii] = row_n[ii] > 0 ? delta[i] : 0.f;
    }
    const int n_blocks = ceil_div(n_max, BN);
    for (int nb = 0; nb < n_blocks; ++nb) {
      const int n0 = nb * BN;
      __syncthreads();  // the previous step is done reading sK / sV / sdS
      load_tile<T, D, BN, SD>(sK, [&](int r) -> const T* { return n0 + r < kl ? kp + (n0 + r) * p.k_row_stride : nullptr; });
      load_tile<T, D, BN, SD>(sV, [&](int r) -> const T* { return n0 + r < kl ? vp + (n0 + r) * p.v_row_stride : nullptr; });
      __syncthreads();
      bwd_compute_p_ds<Tr>(sQ, sdO, sK, sV, nullptr, sdS, n0, row_n, row_lse2, row_delta, p.scale, p.scale_log2);
      __syncthreads();
      // ---- dQ += dS K.  MMA SITE 5 (deterministic variant): accumulator stays in registers.
#pragma unroll 2
      for (int j = 0; j < BN; j += 4) {
        float4 dsv[RM];
#pragma unroll
        for (int ii = 0; ii < RM; ++ii) dsv[ii] = lds4(sdS + (rg + kRowGroups * ii) * SN + j);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
#pragma unroll
          for (int c = 0; c < CD; ++c) {
            const float4 kv = lds4(sK + (j + t) * SD + 4 * lc + 32 * c);
#pragma unroll
            for (int ii = 0; ii < RM; ++ii) {
              const float ds = comp(dsv[ii], t);
              acc[ii][c][0] = fmaf(ds, kv.x, acc[ii][c][0]);
              acc[ii][c][1] = fmaf(ds, kv.y, acc[ii][c][1]);
              acc[ii][c][2] = fmaf(ds, kv.z, acc[ii][c][2]);
              acc[ii][c][3] = fmaf(ds, kv.w, acc[ii][c][3]);
            }
          }
        }
      }
    }
  }

  // ---- Epilogue: every row of the tile inside the tensor (zeros past q_len).
#pragma unroll
  for (int ii = 0; ii < RM; ++ii) {
    const int i = m0 + rg + kRowGroups * ii;
    if (i >= p.Cq) continue;
    T* dst = static_cast<T*>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride;
#pragma unroll
    for (int c = 0; c < CD; ++c) {
      const float x[4] = {acc[ii][c][0], acc[ii][c][1], acc[ii][c][2], acc[ii][c][3]};
      Elem<T>::store4(dst + 4 * lc + 32 * c, x);
    }
  }
}

}  // namespace gmod::attn
