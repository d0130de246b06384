// Tensor-core building blocks of the attention kernels (sm_80+; used unchanged on sm_90):
//   ldsm_x4 / ldsm_x4_trans   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16
//   mma_16816<T>              mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32 (T = bf16 or fp16), d += a b
//   cp_async_16 / _commit / _wait<N>   cp.async.cg.shared.global 16-byte copies, grouped
//   cp_async_16_zfill         the same, or 16 zero bytes without reading global memory (src-size 0)
//   pack2<T>                  two floats -> one 32-bit register of two T (the lower index in the low half)
//   exp2_ftz                  ex2.approx.ftz.f32 (the softmax exponential)
//   atomic_add_frag           an mma C fragment atomically added to fp32 global memory (float4 on sm_90)
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), for lane l, g = l / 4, t = l % 4:
//   A 16x16 (4 regs):  reg j = rows g + 8 (j % 2), cols 2t + 8 (j / 2) + {0, 1}
//   B 16x8  (2 regs):  reg j = rows (k) 2t + 8 j + {0, 1}, col g
//   C 16x8  (4 fp32):  element e = row g + 8 (e / 2), col 2t + e % 2
// so the C fragments of two adjacent n8 tiles are exactly the A fragment of a k16 step (FlashAttention-2
// keeps P in registers this way). The host emulation (csrc/cuda/emu/cuda_emu.h) defines the same
// functions from these layouts; under GMOD_HOST_EMULATION this header leaves its PTX out.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#ifndef GMOD_DEV
#define GMOD_DEV __device__ __forceinline__
#endif

namespace gmod::attn {

template <typename T> GMOD_DEV uint32_t pack2(float lo, float hi);
template <> GMOD_DEV uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo goes to the low half
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}
template <> GMOD_DEV uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}

// 2^x with one MUFU.EX2 (ex2.approx.ftz): exp2f without fast-math adds a subnormal range fix-up around
// it, several instructions per softmax element. Results below 2^-126 flush to 0, which a softmax
// whose largest term is 1 cannot see; -inf gives 0 and NaN stays NaN, as with exp2f.
GMOD_DEV float exp2_ftz(float x) {
#ifdef GMOD_HOST_EMULATION
  const float r = exp2f(x);
  return r < 1.17549435e-38f ? 0.f : r;
#else
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}

// Sum / max over the 4 lanes of a quad (the lanes that share the rows of an mma C fragment).
GMOD_DEV float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
GMOD_DEV float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

#ifndef GMOD_HOST_EMULATION

// The tensor-core kernels are launched only on sm_80+ (attention_api.cu); older targets compile a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GMOD_SM80_OR_TRAP(...) __trap()
#else
#define GMOD_SM80_OR_TRAP(...) __VA_ARGS__
#endif

GMOD_DEV uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

GMOD_DEV void ldsm_x4(uint32_t (&r)[4], const void* row_addr) {
  GMOD_SM80_OR_TRAP(asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                                 : "r"(smem_u32(row_addr))));
}
GMOD_DEV void ldsm_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  GMOD_SM80_OR_TRAP(asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                                 : "r"(smem_u32(row_addr))));
}

template <typename T> GMOD_DEV void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
GMOD_DEV void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  GMOD_SM80_OR_TRAP(asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
}
template <>
GMOD_DEV void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  GMOD_SM80_OR_TRAP(asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1)));
}

// 16 bytes global -> shared, bypassing L1 (.cg). Both addresses 16-byte aligned.
GMOD_DEV void cp_async_16(void* smem_dst, const void* gmem_src) {
  GMOD_SM80_OR_TRAP(asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem_dst)),
                                 "l"(gmem_src)
                                 : "memory"));
}
// pred ? 16 bytes global -> shared : 16 zero bytes into shared (src-size 0: no global byte is read).
// A predicated form, so that a tile's edge rows cost no branch; gmem_src must still be an address of the
// tensor (the callers pass the tile's first row when pred is false).
GMOD_DEV void cp_async_16_zfill(void* smem_dst, const void* gmem_src, bool pred) {
  GMOD_SM80_OR_TRAP(asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)),
                                 "l"(gmem_src), "r"(pred ? 16 : 0)
                                 : "memory"));
}
GMOD_DEV void cp_async_commit() { GMOD_SM80_OR_TRAP(asm volatile("cp.async.commit_group;\n" ::: "memory")); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> GMOD_DEV void cp_async_wait() {
  GMOD_SM80_OR_TRAP(asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"));
}

#endif  // GMOD_HOST_EMULATION


// acc += A x B for the rows of one warp, where
//   A [16 kMAtoms x kK] is given as mma C fragments c[a][kK / 8] (fp32, e.g. P or dS): the C fragments
//     of n8 tiles (2 kk, 2 kk + 1) are exactly the A fragment of k16 step kk, so A never leaves the
//     registers (rounded to T here);
//   B [kK x kN] is rows [0, kK) x cols [0, kN) of a row-major 16-bit shared tile with row stride
//     kStride elements (B(k, n) = tile[k * kStride + n], e.g. V or K), read with ldmatrix.trans;
//   acc [16 kMAtoms x kN] in C fragments acc[a][kN / 8].
template <typename T, int kMAtoms, int kK, int kN, int kStride>
GMOD_DEV void mma_frag_x_smem(float (&acc)[kMAtoms][kN / 8][4], const float (&c)[kMAtoms][kK / 8][4], const T* tile,
                              int lane) {
  static_assert(kK % 16 == 0 && kN % 16 == 0, "k16 steps, pairs of n8 tiles");
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t fa[kMAtoms][4];
#pragma unroll
    for (int a = 0; a < kMAtoms; ++a) {
      fa[a][0] = pack2<T>(c[a][2 * kk][0], c[a][2 * kk][1]);
      fa[a][1] = pack2<T>(c[a][2 * kk][2], c[a][2 * kk][3]);
      fa[a][2] = pack2<T>(c[a][2 * kk + 1][0], c[a][2 * kk + 1][1]);
      fa[a][3] = pack2<T>(c[a][2 * kk + 1][2], c[a][2 * kk + 1][3]);
    }
#pragma unroll
    for (int n2 = 0; n2 < kN / 16; ++n2) {
      uint32_t fb[4];  // (fb0, fb1): cols 16 n2 + 0..7; (fb2, fb3): cols 16 n2 + 8..15
      ldsm_x4_trans(fb, tile + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride + n2 * 16 + (lane / 16) * 8);
#pragma unroll
      for (int a = 0; a < kMAtoms; ++a) {
        mma_16816<T>(acc[a][2 * n2], fa[a], fb[0], fb[1]);
        mma_16816<T>(acc[a][2 * n2 + 1], fa[a], fb[2], fb[3]);
      }
    }
  }
}

// Atomically adds one n8 C fragment c (rows g and g + 8, columns 2t, 2t + 1 of an 8-column tile) to
// fp32 global memory: row_g / row_g8 point at the tile's first column in rows g / g + 8 (16-byte
// aligned), ok_g / ok_g8 say whether those rows take the add. Every lane of the warp must call it.
// sm_90: one float4 atomic per lane instead of four scalar ones. Quad neighbours trade halves with a
// shuffle, so even-t lanes hold 4 consecutive columns of row g and odd-t lanes 4 of row g + 8.
GMOD_DEV void atomic_add_frag(float* row_g, float* row_g8, const float (&c)[4], int t, bool ok_g, bool ok_g8) {
#if defined(GMOD_HOST_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  const bool even = (t & 1) == 0;
  const float r0 = __shfl_xor_sync(0xffffffffu, even ? c[2] : c[0], 1);
  const float r1 = __shfl_xor_sync(0xffffffffu, even ? c[3] : c[1], 1);
  if (even) {
    if (ok_g) atomicAdd(reinterpret_cast<float4*>(row_g + 2 * t), make_float4(c[0], c[1], r0, r1));
  } else {
    if (ok_g8) atomicAdd(reinterpret_cast<float4*>(row_g8 + 2 * (t - 1)), make_float4(r0, r1, c[2], c[3]));
  }
#else
  if (ok_g) atomicAdd(row_g + 2 * t, c[0]), atomicAdd(row_g + 2 * t + 1, c[1]);
  if (ok_g8) atomicAdd(row_g8 + 2 * t, c[2]), atomicAdd(row_g8 + 2 * t + 1, c[3]);
#endif
}

}  // namespace gmod::attn
