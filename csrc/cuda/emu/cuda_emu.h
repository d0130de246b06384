// Host emulation of the CUDA features the attention and router_logits kernels use, so that the kernel headers compile
// as plain C++ and run on the CPU (csrc/cuda/emu/*_test.cpp). One std::thread per CUDA thread; blocks
// of a grid run one after another and share one "shared memory" array.
//   threadIdx / blockIdx / gridDim      thread_local values
//   __syncthreads / __syncwarp          std::barrier over the block / the warp
//   __shfl_xor_sync, __any_sync         a per-warp exchange array between two warp barriers
//   atomicAdd(float*)                   std::atomic_ref
//   ldmatrix (x4, .trans), mma.sync m16n8k16 (bf16 / fp16 in, fp32 accumulate): the fragment layouts
//                                       of the PTX ISA, rebuilt from what every lane of the warp holds
//   cp.async 16-byte copies             deferred until the cp.async.wait_group that covers them, so a
//                                       kernel that reads shared memory too early reads the poison (or,
//                                       with emu::eager_copies, landing at once: see there)
//   wgmma.mma_async m64nNk16 (sm_90a)   deferred to wgmma.wait_group: the accumulators read NaN until
//                                       then; operands decoded from the matrix descriptors and the
//                                       128-byte swizzle as the PTX ISA's canonical layouts define them
// It checks index math, fragment layouts, masking and synchronisation order; it says nothing about
// speed or bank conflicts. Include it before the kernel headers (it defines GMOD_HOST_EMULATION,
// which makes attention_mma.cuh leave out its inline PTX).
#pragma once

#define GMOD_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace emu {
inline constexpr int kMaxThreads = 512;  // the router_logits row-block kernel runs up to 512
inline constexpr int kMaxWarps = kMaxThreads / 32;
inline thread_local uint3 t_thread;
inline thread_local dim3 t_block, t_grid;
inline std::barrier<>* block_bar = nullptr;
inline std::barrier<>* warp_bar[kMaxWarps] = {};

// Per-warp exchange slots: what each lane contributes to a warp-collective operation.
struct WarpSlots {
  float f[32];
  int i[32];
  const void* ptr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  float c[32][4];
};
inline WarpSlots slots[kMaxWarps];

inline int warp_id() { return static_cast<int>(t_thread.x) / 32; }
inline int lane_id() { return static_cast<int>(t_thread.x) % 32; }
inline void warp_sync() { warp_bar[warp_id()]->arrive_and_wait(); }

// ---- cp.async: per-thread queue of pending 16-byte copies, grouped by commit.
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;  // read from src; the rest of the 16 bytes is zero-filled (cp.async src-size)
};
// Global buffers the kernels may copy from (set by the test; empty: unchecked). A cp.async whose source,
// even a zero-fill one that reads no byte, is outside all of them aborts.
struct Range {
  const void* begin;
  const void* end;
};
inline std::vector<Range> readable;
inline void check_readable(const void* src, int bytes) {
  if (readable.empty()) return;
  const char* p = static_cast<const char*>(src);
  for (const auto& r : readable)
    if (p >= static_cast<const char*>(r.begin) && p + (bytes > 0 ? bytes : 1) <= static_cast<const char*>(r.end)) return;
  std::fprintf(stderr, "emu: cp.async source %p (%d bytes) is outside every input tensor\n", src, bytes);
  std::abort();
}
inline thread_local std::vector<PendingCopy> pending;        // issued, in order
// Eager copies: a cp.async lands at once (a legal order on the device too). The default (deferred to the
// wait) catches reads before the wait; eager catches copies that overwrite a buffer an in-flight wgmma
// still reads (the emulated wgmma reads shared memory at its wait).
inline bool eager_copies = false;
inline thread_local std::vector<size_t> group_ends;          // pending.size() at each commit
}  // namespace emu

#define threadIdx (emu::t_thread)
#define blockIdx (emu::t_block)
#define gridDim (emu::t_grid)
#define __launch_bounds__(...)

inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline float __shfl_xor_sync(unsigned, float v, int m) {
  auto& s = emu::slots[emu::warp_id()];
  s.f[emu::lane_id()] = v;
  emu::warp_sync();
  const float r = s.f[emu::lane_id() ^ m];
  emu::warp_sync();
  return r;
}
inline int __shfl_xor_sync(unsigned, int v, int m) {
  auto& s = emu::slots[emu::warp_id()];
  s.i[emu::lane_id()] = v;
  emu::warp_sync();
  const int r = s.i[emu::lane_id() ^ m];
  emu::warp_sync();
  return r;
}
inline double __shfl_xor_sync(unsigned, double v, int m) {  // two 32-bit exchanges, as on the device
  int half[2];
  std::memcpy(half, &v, 8);
  half[0] = __shfl_xor_sync(0xffffffffu, half[0], m);
  half[1] = __shfl_xor_sync(0xffffffffu, half[1], m);
  double r;
  std::memcpy(&r, half, 8);
  return r;
}
inline int __any_sync(unsigned, int pred) {
  auto& s = emu::slots[emu::warp_id()];
  s.i[emu::lane_id()] = pred != 0;
  emu::warp_sync();
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= s.i[l];
  emu::warp_sync();
  return any;
}
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline float4 atomicAdd(float4* p, float4 v) {  // sm_90: one 16-byte atomic (16-byte aligned address)
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    std::fprintf(stderr, "emu: float4 atomicAdd at %p is not 16-byte aligned\n", static_cast<void*>(p));
    std::abort();
  }
  float* f = reinterpret_cast<float*>(p);
  return make_float4(atomicAdd(f, v.x), atomicAdd(f + 1, v.y), atomicAdd(f + 2, v.z), atomicAdd(f + 3, v.w));
}

namespace gmod::attn {

// ---- ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8; register i of lane l gets, of matrix i, the pair (row l/4, cols 2(l%4), 2(l%4)+1),
// or with .trans the pair (rows 2(l%4), 2(l%4)+1, col l/4). The lower column / row is in the low half.
inline void emu_ldsm_x4(uint32_t (&r)[4], const void* row_addr, bool trans) {
  if (reinterpret_cast<uintptr_t>(row_addr) % 16 != 0) {
    std::fprintf(stderr, "emu: ldmatrix row address %p is not 16-byte aligned\n", row_addr);
    std::abort();
  }
  auto& s = emu::slots[emu::warp_id()];
  const int l = emu::lane_id();
  s.ptr[l] = row_addr;
  emu::warp_sync();
  auto elem = [&](int m, int row, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(s.ptr[8 * m + row]) + 2 * col, 2);
    return static_cast<uint32_t>(v);
  };
  for (int m = 0; m < 4; ++m) {
    if (!trans) r[m] = elem(m, l / 4, 2 * (l % 4)) | (elem(m, l / 4, 2 * (l % 4) + 1) << 16);
    else r[m] = elem(m, 2 * (l % 4), l / 4) | (elem(m, 2 * (l % 4) + 1, l / 4) << 16);
  }
  emu::warp_sync();
}
inline void ldsm_x4(uint32_t (&r)[4], const void* row_addr) { emu_ldsm_x4(r, row_addr, false); }
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* row_addr) { emu_ldsm_x4(r, row_addr, true); }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, d += a * b.
//   A 16x16: reg j of lane l holds rows l/4 + 8 (j % 2), cols 2(l%4) + 8 (j / 2) + {0, 1}
//   B 16x8:  reg j of lane l holds rows (k) 2(l%4) + 8 j + {0, 1}, col l/4
//   C 16x8:  element e of lane l is row l/4 + 8 (e / 2), col 2(l%4) + e % 2
template <typename T>
inline float emu_half_to_float(uint32_t bits16) {
  const uint16_t b = static_cast<uint16_t>(bits16);
  T x;
  std::memcpy(&x, &b, 2);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return __half2float(x);
}
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_16816: 16-bit inputs only");
  auto& s = emu::slots[emu::warp_id()];
  const int l = emu::lane_id();
  for (int j = 0; j < 4; ++j) s.a[l][j] = a[j];
  s.b[l][0] = b0, s.b[l][1] = b1;
  for (int e = 0; e < 4; ++e) s.c[l][e] = d[e];
  emu::warp_sync();
  auto A = [&](int row, int k) {
    const uint32_t w = s.a[(row % 8) * 4 + (k % 8) / 2][(row / 8) + 2 * (k / 8)];
    return emu_half_to_float<T>(k % 2 ? w >> 16 : w & 0xffffu);
  };
  auto B = [&](int k, int col) {
    const uint32_t w = s.b[col * 4 + (k % 8) / 2][k / 8];
    return emu_half_to_float<T>(k % 2 ? w >> 16 : w & 0xffffu);
  };
  float out[4];
  for (int e = 0; e < 4; ++e) {
    const int row = l / 4 + 8 * (e / 2), col = 2 * (l % 4) + e % 2;
    float acc = s.c[l][e];
    for (int k = 0; k < 16; ++k) acc = std::fma(A(row, k), B(k, col), acc);
    out[e] = acc;
  }
  emu::warp_sync();
  for (int e = 0; e < 4; ++e) d[e] = out[e];
}

// ---- cp.async.cg.shared.global (16 bytes), commit_group, wait_group N.
inline void cp_async_16(void* smem_dst, const void* gmem_src) {
  emu::check_readable(gmem_src, 16);
  if (emu::eager_copies) {
    std::memcpy(smem_dst, gmem_src, 16);
    return;
  }
  emu::pending.push_back({smem_dst, gmem_src, 16});
}
// src-size 0 when !pred: zeros land in shared memory when the group completes, as on the GPU. The
// source must still be an address inside an input tensor (checked).
inline void cp_async_16_zfill(void* smem_dst, const void* gmem_src, bool pred) {
  emu::check_readable(gmem_src, pred ? 16 : 0);
  if (emu::eager_copies) {
    if (pred) std::memcpy(smem_dst, gmem_src, 16);
    else std::memset(smem_dst, 0, 16);
    return;
  }
  emu::pending.push_back({smem_dst, gmem_src, pred ? 16 : 0});
}
inline void cp_async_commit() { emu::group_ends.push_back(emu::pending.size()); }
template <int N>
inline void cp_async_wait() {
  // Complete every committed group except the N most recent.
  const int groups = static_cast<int>(emu::group_ends.size());
  if (groups <= N) return;
  const size_t done = emu::group_ends[groups - 1 - N];
  for (size_t t = 0; t < done; ++t) {
    const auto& c = emu::pending[t];
    std::memcpy(c.dst, c.src, c.bytes);
    std::memset(static_cast<char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
  }
  emu::pending.erase(emu::pending.begin(), emu::pending.begin() + static_cast<std::ptrdiff_t>(done));
  emu::group_ends.erase(emu::group_ends.begin(), emu::group_ends.begin() + (groups - N));
  for (auto& e : emu::group_ends) e -= done;
}

// Shared memory of the emulated blocks (the kernels declare `extern __shared__ float4 gmod_attn_smem[]`).
// 1024-byte aligned like a device's shared window, so that the wgmma kernel's swizzle (which works on
// address bits) sees the same addresses.
alignas(1024) inline float4 gmod_attn_smem[1 << 16];  // 1 MiB, reused by each block

// ---- wgmma (sm_90a; attention_wgmma.cuh). "Shared addresses" are byte offsets into gmod_attn_smem.
inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(static_cast<const char*>(p) - reinterpret_cast<const char*>(gmod_attn_smem));
}
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
template <int N> inline void wgmma_keep(float (&)[N]) {}
template <int N, int M> inline void wgmma_keep_regs(uint32_t (&)[N][M]) {}

// One 16-bit element at a shared address, through the 128-byte swizzle: address bits [4, 7) xor [7, 10).
inline float emu_wgmma_elem(uint32_t addr, bool bf16) {
  addr ^= ((addr >> 7) & 7u) << 4;
  uint16_t v;
  std::memcpy(&v, reinterpret_cast<const char*>(gmod_attn_smem) + addr, 2);
  return bf16 ? emu_half_to_float<__nv_bfloat16>(v) : emu_half_to_float<__half>(v);
}
// The matrix descriptor, decoded independently of wgmma_desc_sw128 (PTX ISA "Matrix Descriptor Format").
struct EmuDesc {
  uint32_t start, lbo, sbo;
};
inline EmuDesc emu_wgmma_decode(uint64_t d) {
  if ((d >> 62) != 1u || ((d >> 49) & 7u) != 0u) {
    std::fprintf(stderr, "emu: wgmma descriptor %#llx is not 128-byte swizzle with base offset 0\n",
                 static_cast<unsigned long long>(d));
    std::abort();
  }
  return {static_cast<uint32_t>(d & 0x3FFFu) << 4, static_cast<uint32_t>((d >> 16) & 0x3FFFu) << 4,
          static_cast<uint32_t>((d >> 32) & 0x3FFFu) << 4};
}
// Canonical 128-byte-swizzle layouts (PTX ISA "Shared Memory Matrix Layout", 16-bit elements):
//   K-major,  element (mn, k < 16): start + (mn % 8) 128 + (mn / 8) SBO + 2 k      (LBO unused)
//   MN-major, element (k < 16, n):  start + 2 (n % 64) + (n / 64) LBO + (k % 8) 128 + (k / 8) SBO
inline uint32_t emu_kmajor_addr(const EmuDesc& e, int mn, int k) {
  if (e.start % 128 + 32 > 128) {
    std::fprintf(stderr, "emu: a K-major k16 step at %u crosses its 128-byte row\n", e.start);
    std::abort();
  }
  return e.start + (mn % 8) * 128 + (mn / 8) * e.sbo + 2 * k;
}
inline uint32_t emu_nmajor_addr(const EmuDesc& e, int k, int n) {
  if (e.start % 128 != 0) {
    std::fprintf(stderr, "emu: an N-major operand at %u does not start on a 128-byte row\n", e.start);
    std::abort();
  }
  return e.start + 2 * (n % 64) + (n / 64) * e.lbo + (k % 8) * 128 + (k / 8) * e.sbo;
}
}  // namespace gmod::attn

namespace emu {
// A wgmma issued by this thread and not yet waited for: its results land at wgmma_wait, computed
// from shared memory as it is then (so a kernel that overwrites an operand tile too early sees it).
struct PendingWgmma {
  float* d;
  int n;          // accumulator registers (N / 2)
  bool chain;     // accumulate onto an earlier pending wgmma's result (read d at completion)
  float c[64];    // else: the accumulator at issue (zeros when scale-d = 0)
  bool a_smem, trans_a, trans_b, bf16;
  uint64_t desc_a, desc_b;
  float a_rows[2][16];  // register A: this thread's rows 16 w + g and + 8
};
inline thread_local std::vector<PendingWgmma> wgmma_pending;
inline thread_local std::vector<size_t> wgmma_group_ends;
inline std::barrier<>* wg_bar[kMaxWarps / 4] = {};
inline uint32_t wg_slots[kMaxWarps / 4][128][4];
inline void wg_sync() { wg_bar[t_thread.x / 128]->arrive_and_wait(); }
}  // namespace emu

namespace gmod::attn {
template <typename T>
inline void emu_wgmma_issue(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, bool trans_b,
                            bool accumulate, bool trans_a = false) {
  const int t = static_cast<int>(threadIdx.x) % 128, wg = static_cast<int>(threadIdx.x) / 128;
  emu::PendingWgmma w{};
  w.d = d, w.n = n, w.a_smem = a == nullptr, w.trans_b = trans_b, w.desc_a = desc_a, w.desc_b = desc_b;
  w.trans_a = trans_a;
  w.bf16 = std::is_same_v<T, __nv_bfloat16>;
  w.chain = false;
  if (accumulate)
    for (const auto& q : emu::wgmma_pending) w.chain |= q.d == d;
  for (int i = 0; i < n; ++i) {
    if (!w.chain) w.c[i] = accumulate ? d[i] : 0.f;
    d[i] = NAN;  // undefined until the wait
  }
  if (a != nullptr) {  // register A: gather this thread's two rows from the warpgroup's fragments
    for (int j = 0; j < 4; ++j) emu::wg_slots[wg][t][j] = a[j];
  }
  emu::wg_sync();
  if (a != nullptr) {
    const int warp = t / 32, g = (t % 32) / 4;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 16; ++k) {
        const int row = 16 * warp + g + 8 * h;  // reg j holds rows + 8 (j % 2), cols 2 q + 8 (j / 2) + {0, 1}
        const int owner = (row / 16) * 32 + (row % 8) * 4 + (k % 8) / 2;
        const uint32_t word = emu::wg_slots[wg][owner][((row % 16) / 8) + 2 * (k / 8)];
        w.a_rows[h][k] = emu_half_to_float<T>(k % 2 ? word >> 16 : word & 0xffffu);
      }
  }
  emu::wg_sync();
  emu::wgmma_pending.push_back(w);
}
template <typename T, int N = 128, bool kTransA = false, bool kTransB = false>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N = 64 or 128");
  emu_wgmma_issue<T>(d, N / 2, nullptr, desc_a, desc_b, kTransB, accumulate, kTransA);
}
inline void warpgroup_sync(int) { emu::wg_sync(); }
inline void wgmma_opaque(uint32_t&) {}
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N = 64 or 128");
  emu_wgmma_issue<T>(d, N / 2, a, 0, desc_b, true, accumulate);
}
inline void wgmma_commit() { emu::wgmma_group_ends.push_back(emu::wgmma_pending.size()); }
template <int N>
inline void wgmma_wait() {
  emu::wg_sync();  // .sync.aligned
  const int groups = static_cast<int>(emu::wgmma_group_ends.size());
  if (groups <= N) return;
  const size_t done = emu::wgmma_group_ends[groups - 1 - N];
  const int t = static_cast<int>(threadIdx.x) % 128, warp = t / 32, g = (t % 32) / 4, q = t % 4;
  for (size_t u = 0; u < done; ++u) {
    const auto& w = emu::wgmma_pending[u];
    const EmuDesc eb = emu_wgmma_decode(w.desc_b);
    const EmuDesc ea = w.a_smem ? emu_wgmma_decode(w.desc_a) : EmuDesc{};
    float out[64];
    for (int i = 0; i < w.n; ++i) {
      const int h = (i / 2) % 2, row = 16 * warp + g + 8 * h, col = 8 * (i / 4) + 2 * q + i % 2;
      float acc = w.chain ? w.d[i] : w.c[i];
      for (int k = 0; k < 16; ++k) {
        const float a = !w.a_smem   ? w.a_rows[h][k]
                        : w.trans_a ? emu_wgmma_elem(emu_nmajor_addr(ea, k, row), w.bf16)
                                    : emu_wgmma_elem(emu_kmajor_addr(ea, row, k), w.bf16);
        const float b = w.trans_b ? emu_wgmma_elem(emu_nmajor_addr(eb, k, col), w.bf16)
                                  : emu_wgmma_elem(emu_kmajor_addr(eb, col, k), w.bf16);
        acc = std::fma(a, b, acc);
      }
      out[i] = acc;
    }
    for (int i = 0; i < w.n; ++i) w.d[i] = out[i];
  }
  emu::wgmma_pending.erase(emu::wgmma_pending.begin(), emu::wgmma_pending.begin() + static_cast<std::ptrdiff_t>(done));
  emu::wgmma_group_ends.erase(emu::wgmma_group_ends.begin(), emu::wgmma_group_ends.begin() + (groups - N));
  for (auto& e : emu::wgmma_group_ends) e -= done;
  emu::wg_sync();
}
}  // namespace gmod::attn

namespace gmod::router {
// Shared memory of the emulated router_logits row-block kernel (`extern __shared__ float4 gmod_router_smem[]`).
alignas(128) inline float4 gmod_router_smem[1 << 10];
}  // namespace gmod::router

namespace emu {
// Runs kernel() as grid x threads emulated CUDA threads. Shared memory is poisoned (NaN) before the
// grid, so that reads of never-written shared memory show up in the results.
// The kernels launched so far, by the type of the functor that calls them (a lambda: one type per call site
// and template arguments, so one entry per kernel instantiation and launch form) and the copy mode, so that a
// test can show that a smaller set of cases still reaches every kernel a larger one does.
inline std::set<std::string> launched;
inline void launch(dim3 grid, int threads, int smem_bytes, const std::function<void()>& kernel) {
  launched.insert(std::string(kernel.target_type().name()) + (eager_copies ? " eager" : ""));
  if (smem_bytes > static_cast<int>(sizeof(gmod::attn::gmod_attn_smem)) || threads > kMaxThreads ||
      threads % 32 != 0) {
    std::fprintf(stderr, "emu: launch with %d threads and %d bytes of shared memory is not supported\n", threads,
                 smem_bytes);
    std::abort();
  }
  for (auto& x : gmod::attn::gmod_attn_smem) x = make_float4(NAN, NAN, NAN, NAN);
  for (auto& x : gmod::router::gmod_router_smem) x = make_float4(NAN, NAN, NAN, NAN);
  std::barrier<> bar(threads);
  std::vector<std::unique_ptr<std::barrier<>>> wbars;
  for (int w = 0; w < threads / 32; ++w) {
    wbars.push_back(std::make_unique<std::barrier<>>(32));
    warp_bar[w] = wbars.back().get();
  }
  std::vector<std::unique_ptr<std::barrier<>>> wgbars;  // warpgroups (wgmma), when whole ones exist
  for (int w = 0; w < threads / 128; ++w) {
    wgbars.push_back(std::make_unique<std::barrier<>>(128));
    wg_bar[w] = wgbars.back().get();
  }
  block_bar = &bar;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      t_thread = make_uint3(static_cast<unsigned>(t), 0, 0);
      t_grid = grid;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x; ++x) {
            t_block = dim3(x, y, z);
            kernel();
            pending.clear();  // copies never waited for are lost, as on the device at kernel exit
            group_ends.clear();
            wgmma_pending.clear();
            wgmma_group_ends.clear();
            bar.arrive_and_wait();  // the next block reuses shared memory
          }
    });
  }
  for (auto& th : pool) th.join();
}
}  // namespace emu
