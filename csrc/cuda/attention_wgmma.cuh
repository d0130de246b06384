// Hopper warpgroup MMA building blocks (sm_90a only: wgmma.mma_async), used by the wgmma forward and
// backward kernels (attention_fwd_wgmma_kernel.cuh, attention_bwd_wgmma_kernel.cuh):
//   sw128_offset               byte offset of a 16-byte chunk in a 128-byte-swizzled [d / 64][rows][64] tile
//   wgmma_desc_sw128           the 64-bit shared-memory matrix descriptor of such a tile
//   wgmma_ss<T, N, tA, tB>     D[64 x N] (+)= A[64 x 16] B[16 x N], A and B in shared memory, K-major (or
//                              M- / N-major with the transpose flags)
//   wgmma_rs<T, N>             D[64 x N] (+)= A[64 x 16] B[16 x N], A in registers, B N-major in shared memory
//   warpgroup_sync(wg)         a barrier of one warpgroup's 128 threads
//   wgmma_opaque(x)            an optimisation barrier for a shared address
//   wgmma_fence / _commit / _wait<N>, fence_proxy_async, wgmma_keep / wgmma_keep_regs (optimisation
//                              barriers for the accumulator and register A operands, which the compiler
//                              does not know the hardware writes / reads until the wait)
// Warpgroup = 4 consecutive warps (128 threads) issuing together. Fragment layouts (PTX ISA, "Register
// Fragments and Shared Memory Matrix Layouts" of wgmma), for thread t of the warpgroup, w = t / 32,
// l = t % 32, g = l / 4, q = l % 4:
//   D 64 x N (N / 2 fp32): element i = row 16 w + g + 8 ((i / 2) % 2), col 8 (i / 4) + 2 q + i % 2
//   A 64 x 16 (4 regs, 16-bit pairs): reg j = row 16 w + g + 8 (j % 2), cols 2 q + 8 (j / 2) + {0, 1}
// i.e. each warp holds a 16-row slice laid out as mma.m16n8k16's C and A fragments, so the S
// accumulator of two adjacent n8 column groups is the A fragment of one k16 step of P V (as in the
// mma.sync kernel, attention_mma.cuh).
// Shared-memory tiles: 16-bit rows of d elements are stored as d / 64 column blocks of [rows][128 B];
// 16-byte chunk c of row r of a block sits at r * 128 + ((c ^ (r % 8)) * 16) (the 128-byte swizzle:
// address bits [4, 7) xor bits [7, 10), so the block must start 1024-byte aligned). One layout serves
// as a K-major operand (rows = M or N, contiguous = the reduction dim: Q and K in S = Q K^T) and as an
// N-major one (rows = the reduction dim, contiguous = N: V in O = P V; the M-major A of the backward's
// dQ = dS K, dS^T stored key by key, is the same with M for N).
// The host emulation (csrc/cuda/emu/cuda_emu.h) defines the same functions from these layouts, with
// the results delivered at wgmma_wait (so reading an accumulator early reads NaN there).
#pragma once

#include "attention_mma.cuh"

namespace gmod::attn {

GMOD_DEV uint32_t sw128_offset(int row, int chunk, int rows) {
  return static_cast<uint32_t>((chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16));
}

// Matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading- and stride-dimension
// byte offsets (all >> 4, 14 bits), base offset 0 (the tile is 1024-byte aligned), bits 62-63 = 1:
// 128-byte swizzle. For a K-major operand with this swizzle only the stride offset is used (1024: the
// next 8 rows); for an N-major one the leading offset is the next 64-column block and the stride
// offset the next 8 rows of the reduction dim.
GMOD_DEV uint64_t wgmma_desc_sw128(uint32_t smem_addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t desc = static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4);
  desc |= static_cast<uint64_t>((lbo_bytes & 0x3FFFFu) >> 4) << 16;
  desc |= static_cast<uint64_t>((sbo_bytes & 0x3FFFFu) >> 4) << 32;
  desc |= static_cast<uint64_t>(1) << 62;
  return desc;
}

#ifndef GMOD_HOST_EMULATION

// Hides a value from the optimizer: shared addresses made opaque once per loop trip stop ptxas from
// hoisting every descriptor built from them out of the loop (dozens of live 64-bit registers).
GMOD_DEV void wgmma_opaque(uint32_t& x) { asm volatile("" : "+r"(x)); }

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GMOD_SM90A_OR_TRAP(...) __trap()  // compiled only for sm_90a (csrc/cuda/sm90a/CMakeLists.txt)
#else
#define GMOD_SM90A_OR_TRAP(...) __VA_ARGS__
#endif

GMOD_DEV void wgmma_fence() { GMOD_SM90A_OR_TRAP(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory")); }
GMOD_DEV void wgmma_commit() { GMOD_SM90A_OR_TRAP(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory")); }
template <int N> GMOD_DEV void wgmma_wait() {
  GMOD_SM90A_OR_TRAP(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"));
}
// Makes this thread's generic-proxy writes to shared memory (cp.async, st.shared) visible to the async
// proxy that wgmma reads shared memory through; before the barrier that publishes a tile.
GMOD_DEV void fence_proxy_async() {
  GMOD_SM90A_OR_TRAP(asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"));
}
// Barrier of the 128 threads of warpgroup wg (named barrier 1 + wg; __syncthreads is barrier 0).
GMOD_DEV void warpgroup_sync(int wg) { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); }
// The wgmma asm statements name the accumulators as in-out operands, but the hardware writes them
// until wgmma_wait: this keeps the compiler from moving their uses across the wait.
template <int N> GMOD_DEV void wgmma_keep(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for register A operands: read by the hardware until the wait, so they must stay live (and
// unmodified) until after it.
template <int N, int M> GMOD_DEV void wgmma_keep_regs(uint32_t (&a)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

#define GMOD_WGMMA_D32_STR                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define GMOD_WGMMA_D64_STR                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                 \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "       \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "       \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define GMOD_WGMMA_OPS8(i)                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define GMOD_WGMMA_OPS32 GMOD_WGMMA_OPS8(0), GMOD_WGMMA_OPS8(8), GMOD_WGMMA_OPS8(16), GMOD_WGMMA_OPS8(24)
#define GMOD_WGMMA_OPS64 GMOD_WGMMA_OPS32, GMOD_WGMMA_OPS8(32), GMOD_WGMMA_OPS8(40), GMOD_WGMMA_OPS8(48), GMOD_WGMMA_OPS8(56)

template <typename T> struct WgmmaType;
template <> struct WgmmaType<__nv_bfloat16> { static constexpr bool kBf16 = true; };
template <> struct WgmmaType<__half> { static constexpr bool kBf16 = false; };

// The wgmma instructions below differ between bf16 and fp16 only in the type string TY ("bf16" / "f16"),
// between N = 64 and 128 only in the accumulator count (so the operand numbers after it).
// SS: "wgmma ... d, desc-a, desc-b, scale-d, imm-scale-a, imm-scale-b, imm-trans-a, imm-trans-b"
#define GMOD_WGMMA_SS(SHAPE, TY, DSTR, OPS, A, B, P, TA, TB)                                              \
  GMOD_SM90A_OR_TRAP(asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\n"                        \
                                  "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " DSTR        \
                                  ", %" A ", %" B ", p, 1, 1, %" TA ", %" TB ";\n}\n"                    \
                                  : OPS                                                                  \
                                  : "l"(desc_a), "l"(desc_b), "r"(acc), "n"(ta), "n"(tb)))
// RS: "wgmma ... d, {a0..a3}, desc-b, scale-d, imm-scale-a, imm-scale-b, imm-trans-b" (B N-major)
#define GMOD_WGMMA_RS(SHAPE, TY, DSTR, OPS, A0, A1, A2, A3, B, P)                                         \
  GMOD_SM90A_OR_TRAP(asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" P ", 0;\n"                        \
                                  "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " DSTR        \
                                  ", {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" B ", p, 1, 1, 1;\n}\n"   \
                                  : OPS                                                                  \
                                  : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(acc)))

// D[64 x N] = A B (+ D when accumulate), N = 64 or 128, both operands in shared memory: A (desc_a) K-major,
// or M-major with kTransA (imm-trans-a = 1: dS^T stored key-major as the A of dQ = dS K in the backward);
// B (desc_b) K-major, or N-major with kTransB. The transpose immediates are "n" operands.
template <typename T, int N = 128, bool kTransA = false, bool kTransB = false>
GMOD_DEV void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N = 64 or 128");
  const int acc = accumulate ? 1 : 0;
  constexpr int ta = kTransA ? 1 : 0, tb = kTransB ? 1 : 0;
  constexpr bool bf16 = WgmmaType<T>::kBf16;
  if constexpr (N == 128 && bf16) GMOD_WGMMA_SS("m64n128k16", "bf16", GMOD_WGMMA_D64_STR, GMOD_WGMMA_OPS64, "64", "65", "66", "67", "68");
  if constexpr (N == 128 && !bf16) GMOD_WGMMA_SS("m64n128k16", "f16", GMOD_WGMMA_D64_STR, GMOD_WGMMA_OPS64, "64", "65", "66", "67", "68");
  if constexpr (N == 64 && bf16) GMOD_WGMMA_SS("m64n64k16", "bf16", GMOD_WGMMA_D32_STR, GMOD_WGMMA_OPS32, "32", "33", "34", "35", "36");
  if constexpr (N == 64 && !bf16) GMOD_WGMMA_SS("m64n64k16", "f16", GMOD_WGMMA_D32_STR, GMOD_WGMMA_OPS32, "32", "33", "34", "35", "36");
}

// D[64 x N] = A B (+ D when accumulate), N = 64 or 128: A in registers (the layout above), B N-major
// (transposed, imm-trans-b = 1) through desc_b.
template <typename T, int N>
GMOD_DEV void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N = 64 or 128");
  const int acc = accumulate ? 1 : 0;
  constexpr bool bf16 = WgmmaType<T>::kBf16;
  if constexpr (N == 128 && bf16) GMOD_WGMMA_RS("m64n128k16", "bf16", GMOD_WGMMA_D64_STR, GMOD_WGMMA_OPS64, "64", "65", "66", "67", "68", "69");
  if constexpr (N == 128 && !bf16) GMOD_WGMMA_RS("m64n128k16", "f16", GMOD_WGMMA_D64_STR, GMOD_WGMMA_OPS64, "64", "65", "66", "67", "68", "69");
  if constexpr (N == 64 && bf16) GMOD_WGMMA_RS("m64n64k16", "bf16", GMOD_WGMMA_D32_STR, GMOD_WGMMA_OPS32, "32", "33", "34", "35", "36", "37");
  if constexpr (N == 64 && !bf16) GMOD_WGMMA_RS("m64n64k16", "f16", GMOD_WGMMA_D32_STR, GMOD_WGMMA_OPS32, "32", "33", "34", "35", "36", "37");
}

#endif  // GMOD_HOST_EMULATION

}  // namespace gmod::attn
