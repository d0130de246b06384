// Forward attention kernels (FlashAttention-2 structure, SIMT math for now):
//   gmod_attn_fwd_kernel             one CTA per (query tile, q head, batch row): prefill / training;
//                                    with kPackGQA, one CTA per (packed tile of (query, head-in-group)
//                                    rows, kv head, batch row [, key split]): decode;
// Launchers: attention_fwd.cu (prefill), attention_decode.cu (decode).
#pragma once

#include "attention_common.cuh"

namespace gmod::attn {

template <int kHeadDim>
using FwdTraits = TileTraits<kHeadDim, FwdTile<kHeadDim>::kBlockM, FwdTile<kHeadDim>::kBlockN>;
template <int kHeadDim>
using DecodeTraits = TileTraits<kHeadDim, kDecodeBlockM, kDecodeBlockN>;

template <typename Tr>
constexpr int fwd_smem_bytes() {
  return static_cast<int>(sizeof(float)) *
         (Tr::kBlockM * Tr::kStrideD + 2 * Tr::kBlockN * Tr::kStrideD + Tr::kBlockM * Tr::kStrideN);
}

// kPackGQA = false: blockIdx = (reversed query tile, q head, b); tile row r is query m0 + r.
// kPackGQA = true:  blockIdx = (packed tile, kv head, b * num_splits + split); tile row r is packed
//                   row pr = m0 + r = query * group + head-in-group.
// kSplit: this CTA covers key tiles [split * per, (split + 1) * per) only and writes the fp32 partials
//         o_part (normalised by its own row sums; zeros for rows without keys here) and lse_part; gmod_attn_decode_combine_kernel
//         (attention_combine_kernel.cuh) merges.
// Every row of the tile that exists in the tensor is written: o = 0 and lse = -inf for rows past
// q_len and rows that see no key (in this CTA's key range, for a split).
template <typename Tr, typename T, bool kPackGQA, bool kSplit>
__global__ void __launch_bounds__(kNThreads) gmod_attn_fwd_kernel(const AttnFwdParams p) {
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int RM = Tr::kRowsPerThread, CN = Tr::kKeysPerThread, CD = Tr::kColChunks;
  constexpr int SD = Tr::kStrideD, SN = Tr::kStrideN;

  extern __shared__ float4 gmod_attn_smem[];
  float* sQ = reinterpret_cast<float*>(gmod_attn_smem);  // [BM][SD]
  float* sK = sQ + BM * SD;                               // [BN][SD]
  float* sV = sK + BN * SD;                               // [BN][SD]
  float* sP = sV + BN * SD;                               // [BM][SN]

  const int tid = threadIdx.x;
  const int rg = tid / kColLanes, lc = tid % kColLanes;
  // Prefill: the last query tiles see the most keys; start them first.
  const int m_block = kPackGQA ? blockIdx.x : gridDim.x - 1 - blockIdx.x;
  const int head = blockIdx.y;  // q head, or kv head when packing
  const int b = kSplit ? blockIdx.z / p.num_splits : blockIdx.z;
  const int split = kSplit ? blockIdx.z % p.num_splits : 0;
  const int group = kPackGQA ? p.group : 1;  // rows per query in the tile
  const int hk = kPackGQA ? head : head / p.group;
  const int ql = iclamp(p.q_len[b], 0, p.Cq);  // clamped: never out of bounds, even unvalidated
  const int kl = iclamp(p.k_len[b], 0, p.Ck);
  const int rows_total = p.Cq * group;
  const int m0 = m_block * BM;

  const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // Tile row -> (query, q head); valid: the row exists in the tensor.
  auto row_query = [&](int r) { return (m0 + r) / group; };
  auto row_head = [&](int r) { return kPackGQA ? head * group + (m0 + r) % group : head; };
  auto row_valid = [&](int r) { return m0 + r < rows_total; };

  // This thread's rows: query, head, visible key count (0 past q_len / outside the tensor).
  int row_i[RM], row_h[RM], row_n[RM];
#pragma unroll
  for (int ii = 0; ii < RM; ++ii) {
    const int r = rg + kRowGroups * ii;
    row_i[ii] = row_query(r);
    row_h[ii] = row_head(r);
    row_n[ii] = (row_valid(r) && row_i[ii] < ql) ? visible_keys(row_i[ii], ql, kl) : 0;
  }

  // Key tiles of this CTA: up to the causal limit of its last live query (n is non-decreasing in i).
  const int r_last = imin(BM, rows_total - m0) - 1;
  const int i_first = row_query(0);
  const int i_last = imin(row_query(r_last), ql - 1);
  const int n_max = (r_last >= 0 && i_first < ql) ? visible_keys(i_last, ql, kl) : 0;
  int nb_begin = 0, nb_end = ceil_div(n_max, BN);
  if (kSplit) {
    const int per = ceil_div(ceil_div(p.Ck, BN), p.num_splits);
    nb_begin = split * per;
    nb_end = imin(nb_end, nb_begin + per);
  }

  float acc[RM][CD][4];
  float m_run[RM], l_run[RM];  // running max (log2 domain) and this lane's partial row sum
#pragma unroll
  for (int ii = 0; ii < RM; ++ii) {
    m_run[ii] = -INFINITY;
    l_run[ii] = 0.f;
#pragma unroll
    for (int c = 0; c < CD; ++c)
#pragma unroll
      for (int t = 0; t < 4; ++t) acc[ii][c][t] = 0.f;
  }

  // Fully masked tiles (past q_len, past the causal limit, no key in this split) skip straight to
  // the epilogue, which writes zeros and lse = -inf.
  if (nb_begin < nb_end) {
    load_tile<T, D, BM, SD>(sQ, [&](int r) -> const T* {
      const int i = row_query(r);
      return (row_valid(r) && i < ql) ? qp + i * p.q_row_stride + row_head(r) * p.q_head_stride : nullptr;
    });

    for (int nb = nb_begin; nb < nb_end; ++nb) {
      const int n0 = nb * BN;
      __syncthreads();  // the previous step is done reading sK / sV / sP
      auto key_row = [&](const T* base, int64_t stride) {
        return [=](int r) -> const T* { return n0 + r < kl ? base + (n0 + r) * stride : nullptr; };
      };
      load_tile<T, D, BN, SD>(sK, key_row(kp, p.k_row_stride));
      load_tile<T, D, BN, SD>(sV, key_row(vp, p.v_row_stride));
      __syncthreads();

      // ---- S = Q K^T for this thread's RM x CN entries.
      // MMA SITE 1: mma.sync.m16n8k16 (sm80) / wgmma m64nBNk16 (sm90) over sQ x sK^T, fp32 accumulators.
      float s[RM][CN];
#pragma unroll
      for (int ii = 0; ii < RM; ++ii)
#pragma unroll
        for (int jj = 0; jj < CN; ++jj) s[ii][jj] = 0.f;
#pragma unroll 2
      for (int e = 0; e < D; e += 4) {
        float4 qv[RM], kv[CN];
#pragma unroll
        for (int ii = 0; ii < RM; ++ii) qv[ii] = lds4(sQ + (rg + kRowGroups * ii) * SD + e);
#pragma unroll
        for (int jj = 0; jj < CN; ++jj) kv[jj] = lds4(sK + (lc + kColLanes * jj) * SD + e);
#pragma unroll
        for (int ii = 0; ii < RM; ++ii)
#pragma unroll
          for (int jj = 0; jj < CN; ++jj) {
            float a = s[ii][jj];
            a = fmaf(qv[ii].x, kv[jj].x, a);
            a = fmaf(qv[ii].y, kv[jj].y, a);
            a = fmaf(qv[ii].z, kv[jj].z, a);
            a = fmaf(qv[ii].w, kv[jj].w, a);
            s[ii][jj] = a;
          }
      }

      // ---- Causal / length mask and online softmax (log2 domain). Rows that have seen no key yet
      // keep m = -inf; they use 0 as the reference so that exp2 never sees -inf - (-inf).
#pragma unroll
      for (int ii = 0; ii < RM; ++ii) {
        float mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < CN; ++jj) {
          const int j = n0 + lc + kColLanes * jj;
          s[ii][jj] = j < row_n[ii] ? s[ii][jj] * p.scale_log2 : -INFINITY;
          mx = fmaxf(mx, s[ii][jj]);
        }
        mx = rowgroup_max(mx);
        const float m_new = fmaxf(m_run[ii], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m_run[ii] - m_use);
        m_run[ii] = m_new;
        l_run[ii] *= alpha;
#pragma unroll
        for (int c = 0; c < CD; ++c)
#pragma unroll
          for (int t = 0; t < 4; ++t) acc[ii][c][t] *= alpha;
        float* prow = sP + (rg + kRowGroups * ii) * SN + lc;
#pragma unroll
        for (int jj = 0; jj < CN; ++jj) {
          const float pv = exp2f(s[ii][jj] - m_use);
          l_run[ii] += pv;
          prow[kColLanes * jj] = pv;
        }
      }
      __syncthreads();

      // ---- O += P V for this thread's RM rows x (CD x 4) columns.
      // MMA SITE 2: P converted to 16-bit in registers (mma accumulator layout == A-operand layout,
      // no trip through shared memory) times sV, mma.sync.m16n8k16 / wgmma with V from smem.
#pragma unroll 2
      for (int j = 0; j < BN; j += 4) {
        float4 pv[RM];
#pragma unroll
        for (int ii = 0; ii < RM; ++ii) pv[ii] = lds4(sP + (rg + kRowGroups * ii) * SN + j);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
          float4 vv[CD];
#pragma unroll
          for (int c = 0; c < CD; ++c) vv[c] = lds4(sV + (j + t) * SD + 4 * lc + 32 * c);
#pragma unroll
          for (int ii = 0; ii < RM; ++ii) {
            const float pt = comp(pv[ii], t);
#pragma unroll
            for (int c = 0; c < CD; ++c) {
              acc[ii][c][0] = fmaf(pt, vv[c].x, acc[ii][c][0]);
              acc[ii][c][1] = fmaf(pt, vv[c].y, acc[ii][c][1]);
              acc[ii][c][2] = fmaf(pt, vv[c].z, acc[ii][c][2]);
              acc[ii][c][3] = fmaf(pt, vv[c].w, acc[ii][c][3]);
            }
          }
        }
      }
    }
  }

  if constexpr (kSplit) pdl_launch_dependents();  // every load of this CTA is done: the combine may launch

  // ---- Epilogue: o = acc / l, lse = (m + log2 l) * ln 2; zeros and -inf for rows without keys.
  float l_row[RM];
#pragma unroll
  for (int ii = 0; ii < RM; ++ii) l_row[ii] = rowgroup_sum(l_run[ii]);  // all lanes, before any branch
#pragma unroll
  for (int ii = 0; ii < RM; ++ii) {
    const int r = rg + kRowGroups * ii;
    if (!row_valid(r)) continue;
    const int i = row_i[ii], h = row_h[ii];
    // The row saw at least one key in [nb_begin * BN, nb_end * BN); then l >= 1 (NaN inputs propagate).
    const bool has_keys = nb_begin < nb_end && row_n[ii] > nb_begin * BN;
    const float inv_l = has_keys ? 1.f / l_row[ii] : 0.f;
    const float lse = has_keys ? (m_run[ii] + log2f(l_row[ii])) * kLn2 : -INFINITY;
    if (kSplit) {
      // Every o_part row is written, zeros for a split without keys (weight 0 in the combine), so that
      // the combine's loads need no predicate.
      if (lc == 0) p.lse_part[(((int64_t)split * p.B + b) * p.Hq + h) * p.Cq + i] = lse;
      float* dst = p.o_part + ((((int64_t)split * p.B + b) * p.Cq + i) * p.Hq + h) * D;
#pragma unroll
      for (int c = 0; c < CD; ++c) {
        float x[4];
#pragma unroll
        for (int t = 0; t < 4; ++t) x[t] = has_keys ? acc[ii][c][t] * inv_l : 0.f;
        Elem<float>::store4(dst + 4 * lc + 32 * c, x);
      }
    } else {
      T* dst = static_cast<T*>(p.o) + b * p.o_batch_stride + i * p.o_row_stride + h * p.o_head_stride;
#pragma unroll
      for (int c = 0; c < CD; ++c) {
        const float x[4] = {acc[ii][c][0] * inv_l, acc[ii][c][1] * inv_l, acc[ii][c][2] * inv_l,
                            acc[ii][c][3] * inv_l};
        Elem<T>::store4(dst + 4 * lc + 32 * c, x);
      }
      if (lc == 0) p.lse[((int64_t)b * p.Hq + h) * p.Cq + i] = lse;
    }
  }
}

}  // namespace gmod::attn
