// Hopper (sm_90a) prefill forward on warpgroup MMAs: gmod_attn_fwd_wgmma_kernel.
// Why a second tensor-core forward: mma.sync on the H100 reaches about half of the tensor pipe (ncu:
// 46.6 % for the d = 128 mma.sync kernel, 0.91-0.94x SDPA's flash backend), while wgmma, which reads
// its B operand (and A for S = Q K^T) straight from shared memory and runs asynchronously, is what the
// cuDNN backend's 438-528 TFLOP/s are made of.
// Structure (one CTA = 128 query rows of one head of one batch row, 2 warpgroups x 64 rows, 256 threads):
//   Q [128 x d] -> shared memory once (cp.async); K / V tiles of 128 keys in 3 (or 2) buffers filled
//   with cp.async by all 256 threads (the next tile's copies are issued before this tile's math);
//   per tile and warpgroup: S = Q K^T as d / 16 wgmma m64n128k16 (both operands from shared memory),
//   mask + online softmax on the S fragments (log2 domain, as the mma.sync kernel), P rounded to T in
//   registers, O += P V as 128 / 16 wgmma m64n{d}k16 with P as the register A operand and V N-major.
//   The two warpgroups only meet at the per-tile barrier, so one's softmax overlaps the other's MMAs.
// Same grid order (longest query tiles first), row semantics (per-row q_len / k_len, bottom-right
// causal, rows past q_len: o = 0, lse = -inf), GQA mapping and outputs as gmod_attn_fwd_tc_kernel.
// Skipped work: key tiles past the CTA's causal / length reach are never loaded; a warpgroup whose rows
// see none of a tile's keys skips its MMAs; tiles every row of a warpgroup sees whole skip the mask.
// Head dims 64 and 128 (whole 128-byte swizzle blocks). Opt-in for now (GMOD_ATTN_FWD_IMPL=wgmma /
// wgmma-2stage, attention_api.cu) until the H100 benchmark says it beats the mma.sync kernel; it has
// been checked only in the host emulation (csrc/cuda/emu/, `attention_emu_test wgmma`) so far.
#pragma once

#include "attention_common.cuh"
#include "attention_wgmma.cuh"

namespace gmod::attn {

// kStages_ = 2: K / V double-buffered, each tile's P V waited for before the next tile (the plain
// order). 3: a third K / V buffer, and the P V of tile j is left running while the loop crosses the
// barrier, issues tile j + 2's copies and tile j + 1's S = Q K^T; one wait then covers both (in order),
// before the softmax touches O. The copies into a buffer start only after the P V that read it (tile
// j - 2's) was waited for by both warpgroups: each waits before the barrier of the next iteration (also
// on the path that skips a tile). d = 128: 225 KB of shared memory (the H100 gives 227 KB).
template <int kHeadDim_, int kStages_ = 3>
struct WgmmaFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kStages = kStages_;
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kBlockM = 128;   // 64 rows per warpgroup (the wgmma M)
  static constexpr int kBlockN = 128;   // keys per tile (the N of S = Q K^T)
  static constexpr int kColBlocks = kHeadDim / 64;  // 128-byte swizzle blocks per row
  static constexpr int kChunks = kHeadDim / 8;      // 16-byte chunks per row
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;
  // Q, kStages K and V buffers, + 1024 bytes to align the base (the swizzle works on address bits).
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 1024;
  static constexpr int kSRegs = kBlockN / 2;   // S fragment registers per thread (64 x kBlockN / 128)
  static constexpr int kORegs = kHeadDim / 2;  // O fragment registers per thread
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma forward: head dim 64 or 128");
  static_assert(kBlockN == 128, "S = Q K^T is one m64n128k16 per k16 step");
  static_assert(kStages == 2 || kStages == 3, "2 or 3 K / V buffers");
};

// kPosScale as in gmod_attn_fwd_tc_kernel: S stays unscaled and each exponent is one FFMA.
template <typename Tr, typename T, bool kPosScale>
__global__ void __launch_bounds__(Tr::kThreads, 1) gmod_attn_fwd_wgmma_kernel(const AttnFwdParams p) {
  static_assert(sizeof(T) == 2, "the wgmma kernel takes bf16 / fp16");
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NC = Tr::kChunks;
  constexpr int SR = Tr::kSRegs, OR = Tr::kORegs;

  extern __shared__ float4 gmod_attn_smem[];
  const uint32_t smem_raw = smem_u32(gmod_attn_smem);
  const uint32_t pad = (1024u - (smem_raw & 1023u)) & 1023u;
  char* const sQ = reinterpret_cast<char*>(gmod_attn_smem) + pad;  // [D / 64][BM][128 B], swizzled
  constexpr int NS = Tr::kStages;
  char* const sK = sQ + Tr::kQBytes;                               // [NS][D / 64][BN][128 B]
  char* const sV = sK + NS * Tr::kKVBytes;                         // [NS][D / 64][BN][128 B]
  const uint32_t aQ = smem_raw + pad, aK = aQ + Tr::kQBytes, aV = aK + NS * Tr::kKVBytes;

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest query tiles first
  const int head = blockIdx.y, b = blockIdx.z;
  const int hk = head / p.group;
  const int ql = iclamp(p.q_len[b], 0, p.Cq);
  const int kl = iclamp(p.k_len[b], 0, p.Ck);
  const int m0 = m_block * BM;
  const int wr0 = wg * 64;  // this warpgroup's first tile row

  const T* qp = static_cast<const T*>(p.q) + b * p.q_batch_stride + head * p.q_head_stride;
  const T* kp = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* vp = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  // Visible keys of tile row r (0 past q_len); non-decreasing in r.
  auto row_keys = [&](int r) { return m0 + r < ql ? visible_keys(m0 + r, ql, kl) : 0; };
  // Keys seen by the last live row of [r_begin, r_end): the reach of those rows.
  auto rows_reach = [&](int r_begin, int r_end) {
    if (m0 + r_begin >= ql) return 0;
    return visible_keys(imin(m0 + r_end, ql) - 1, ql, kl);
  };
  int row_n[2];  // this thread's rows: wr0 + 16 warp + g (+ 8)
#pragma unroll
  for (int h = 0; h < 2; ++h) row_n[h] = row_keys(wr0 + 16 * warp + g + 8 * h);
  const int n_wg = rows_reach(wr0, wr0 + 64);                              // warpgroup-uniform
  const int n_wg_full = row_keys(wr0 + 63) > 0 ? row_keys(wr0) : 0;       // keys all its rows see
  const int nb_end = ceil_div(rows_reach(0, BM), BN);

  float o[OR];
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < OR; ++i) o[i] = 0.f;

  if (nb_end > 0) {  // then ql >= 1 and kl >= 1: row 0 of q / k / v is a valid source address
    // Q rows past q_len are zero-filled by the copy (src-size 0, the address of row 0 passed).
    for (int idx = tid; idx < BM * NC; idx += Tr::kThreads) {
      const int r = idx / NC, c = idx % NC;
      const bool pred = m0 + r < ql;
      cp_async_16_zfill(sQ + sw128_offset(r, c, BM), qp + (pred ? (m0 + r) * p.q_row_stride : 0) + c * 8, pred);
    }
    // K / V tile copies, keys past k_len zero-filled. Thread tid always copies chunk c0 = tid % NC of rows
    // r0 + i * kPassRows: a pass moves a multiple of 8 rows, so the swizzle (which depends on r % 8) and
    // hence the shared offset are fixed per thread up to i * kPassRows * 128. Row offsets are 32-bit
    // (kMaxTileRows rows of a tensor stay below 2^31 elements, checked on the host), the 64-bit tile
    // base is formed once per tile: the per-copy 64-bit multiplies cost ~15 instructions per copy.
    constexpr int kPassRows = Tr::kThreads / NC;
    static_assert(kPassRows % 8 == 0 && BN % kPassRows == 0 && BN <= kMaxTileRows, "copy passes");
    const int r0 = tid / NC, c0 = tid % NC;
    const uint32_t s0 = sw128_offset(r0, c0, BN);
    const int ks = static_cast<int>(p.k_row_stride), vs = static_cast<int>(p.v_row_stride);
    auto load_kv = [&](int nb, int buf) {
      const int n0 = nb * BN;
      const T* kt = kp + n0 * p.k_row_stride + c0 * 8;
      const T* vt = vp + n0 * p.v_row_stride + c0 * 8;
      char* dk = sK + buf * Tr::kKVBytes + s0;
      char* dv = sV + buf * Tr::kKVBytes + s0;
      const int rows_valid = kl - n0;
#pragma unroll
      for (int i = 0; i < BN / kPassRows; ++i) {
        const int r = r0 + i * kPassRows;
        const bool pred = r < rows_valid;
        cp_async_16_zfill(dk + i * kPassRows * 128, kt + (pred ? r * ks : 0), pred);
        cp_async_16_zfill(dv + i * kPassRows * 128, vt + (pred ? r * vs : 0), pred);
      }
    };
    load_kv(0, 0);
    cp_async_commit();

    uint32_t pa[BN / 16][4] = {};  // P as the A operand of P V (read by the hardware until that wgmma is waited for)
    for (int nb = 0; nb < nb_end; ++nb) {
      const int buf = nb % NS;
      cp_async_wait<0>();
      fence_proxy_async();  // this thread's copies, visible to the wgmma (async proxy) reads
      // Tile nb is in shared memory; both warpgroups are done with tile nb + 1 - NS's buffer.
      __syncthreads();
      if (nb + 1 < nb_end) load_kv(nb + 1, (nb + 1) % NS);
      cp_async_commit();
      const int n0 = nb * BN;
      if (n0 >= n_wg) {  // warpgroup-uniform: none of its rows sees these keys (nor later ones)
        if constexpr (NS == 3) wgmma_wait<0>();  // the last P V, before the next copies reuse its buffer
        continue;
      }

      // ---- S = Q K^T: D / 16 k16 steps; a step moves 32 bytes along the swizzled rows of Q and K
      // (inside one 128-byte block), and to the next 64-column block every 4 steps.
      float s[SR];
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t col = (kk % 4) * 32u;
        const uint64_t da = wgmma_desc_sw128(aQ + (kk / 4) * BM * 128 + wr0 * 128 + col, 16, 1024);
        const uint64_t db = wgmma_desc_sw128(aK + buf * Tr::kKVBytes + (kk / 4) * BN * 128 + col, 16, 1024);
        wgmma_ss<T>(s, da, db, kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();  // (NS = 3: also the previous tile's P V, committed before)
      wgmma_keep(s);
      if constexpr (NS == 3) {
        wgmma_keep(o);
        wgmma_keep_regs(pa);
      }

      // ---- Mask and online softmax (log2 domain), as gmod_attn_fwd_tc_kernel. Element i of s:
      // row half h = (i / 2) % 2, key n0 + 8 (i / 4) + 2 tq + i % 2.
      const float c = p.scale_log2;
      if constexpr (!kPosScale) {
#pragma unroll
        for (int i = 0; i < SR; ++i) s[i] *= c;
      }
      if (n0 + BN > n_wg_full) {
#pragma unroll
        for (int i = 0; i < SR; ++i)
          if (n0 + 8 * (i / 4) + 2 * tq + i % 2 >= row_n[(i / 2) % 2]) s[i] = -INFINITY;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < SR / 4; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
        mx = quad_max(mx);
        if constexpr (kPosScale) mx *= c;  // -inf stays -inf (c > 0)
        const float m_new = fmaxf(m_run[h], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2_ftz(m_run[h] - m_use);
        l_run[h] *= alpha;
#pragma unroll
        for (int j = 0; j < OR / 4; ++j) o[4 * j + 2 * h] *= alpha, o[4 * j + 2 * h + 1] *= alpha;
        m_run[h] = m_new;
#pragma unroll
        for (int j = 0; j < SR / 4; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[4 * j + 2 * h + e];
            x = kPosScale ? exp2_ftz(fmaf(x, c, -m_use)) : exp2_ftz(x - m_use);
            l_run[h] += x;
          }
      }

      // ---- O += P V: P's fragments of n8 groups (2 kk, 2 kk + 1) are the A operand of k16 step kk;
      // V N-major: step kk starts 16 rows (2048 bytes) down, the next 64 columns are BN rows further.
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
      }
      wgmma_keep(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint64_t db = wgmma_desc_sw128(aV + buf * Tr::kKVBytes + kk * 16 * 128, BN * 128, 1024);
        wgmma_rs<T, D>(o, pa[kk], db, true);
      }
      wgmma_commit();
      if constexpr (NS == 2) {
        wgmma_wait<0>();
        wgmma_keep(o);
      }
    }
    if constexpr (NS == 3) {
      wgmma_wait<0>();
      wgmma_keep(o);
      wgmma_keep_regs(pa);
    }
  }

  // ---- Epilogue: o = acc / l, lse = (m + log2 l) ln 2; zeros and -inf for rows without keys. O is
  // staged in this warpgroup's own rows of sQ (only it read them, and its MMAs are done), swizzled
  // like Q, then written as whole 16-byte chunks.
  float inv_l[2], lse[2];
  bool has_keys[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float l = quad_sum(l_run[h]);
    has_keys[h] = nb_end > 0 && row_n[h] > 0;
    inv_l[h] = has_keys[h] ? 1.f / l : 0.f;
    lse[h] = has_keys[h] ? (m_run[h] + log2f(l)) * kLn2 : -INFINITY;
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = wr0 + 16 * warp + g + 8 * h;
#pragma unroll
    for (int j = 0; j < OR / 4; ++j)
      *reinterpret_cast<uint32_t*>(sQ + sw128_offset(r, j, BM) + 4 * tq) =
          has_keys[h] ? pack2<T>(o[4 * j + 2 * h] * inv_l[h], o[4 * j + 2 * h + 1] * inv_l[h]) : 0u;
    if (tq == 0 && m0 + r < p.Cq) p.lse[((int64_t)b * p.Hq + head) * p.Cq + m0 + r] = lse[h];
  }
  __syncthreads();  // every thread reaches it (no early exits above)
  for (int idx = tid % 128; idx < 64 * NC; idx += 128) {
    const int r = wr0 + idx / NC, c = idx % NC;
    if (m0 + r >= p.Cq) continue;
    T* dst = static_cast<T*>(p.o) + b * p.o_batch_stride + (m0 + r) * p.o_row_stride + head * p.o_head_stride + c * 8;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(sQ + sw128_offset(r, c, BM));
  }
}

}  // namespace gmod::attn
