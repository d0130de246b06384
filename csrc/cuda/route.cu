// CUDA kernel of gmod.route; bit-identical to the CPU kernel (csrc/cpu/route.cpp). The per-thread
// algorithm below (positions, tiles, scans, radix passes) is modelled step by step in
// scripts/route_model.py, which checks the model against the CPU op on random rows.
//
// One 512-thread block per row b. Every token gets a code (key_t: 32 bits for float32, 64 for float64):
//   forced (mask 1)                                    -> ~0
//   candidate (mask 0, and score > threshold if any)   -> order-preserving key of the score: larger
//       score -> larger key; -0.0 and +0.0 one key (they compare equal on the CPU); every NaN -> 0,
//       below every number (the CPU ranks NaN last, NaNs tie with each other)
//   anything else (padding, routable at or below the threshold, an invalid mask code) -> ~1
// Keys of numbers are <= key(+inf) < ~1, so "code < ~1" tells candidates apart with one compare.
//
// Positions: the row is read in groups of 4 tokens, each one aligned 16-byte load of scores (two for
// float64) plus one 4-byte load of mask codes. Position p = token j + pad, pad in 0..3 chosen so that
// every group starts on an aligned token; positions outside the row code as ~1. A row whose scores and
// mask cannot be aligned together (odd storage offsets) is read token by token, with pad 0.
//   1. One read of the row from global memory, striped over the threads (4 groups per thread in flight,
//      2 for float64): count forced tokens, report invalid mask codes to the error word, histogram the
//      top 8 bits of every candidate's key (ncand = the histogram's sum). When the codes of the row fit
//      in the device's opt-in shared memory per block (H100: ~227 KB, S up to ~56k float32 / ~28k
//      float64) they are kept there, and steps 2 and 3 read shared memory instead of L2.
//      quota = min(num_routed[b], capacity - min(forced, capacity), ncand).
//   2. Radix select of the quota-th best candidate key, 8 bits per pass from the top (the first pass
//      is step 1's histogram; at most 4 passes for float32, 8 for float64). After each pass the
//      selected bin extends `prefix` (the known high bits, under `pmask`) and `need` becomes the rank
//      inside it. Early stop when the whole bin is taken (need == its count): then the bits below do
//      not matter. quota == 0 and quota == ncand skip the select (pmask = 0: every candidate ties,
//      need = quota). Histograms use warp-aggregated shared atomics (__match_any_sync: one atomic per
//      distinct bin per warp; rows of equal scores would otherwise serialize 32 lanes on one bin).
//      Two histogram buffers let the other warps zero the next one while warp 0 picks the bin, so a
//      pass costs two barriers.
//   3. Compaction in index order, tiles of 8192 positions: each thread classifies its 16 consecutive
//      positions into bit masks (forced / masked key above the prefix / masked key equal to it), then
//      ONE block scan (cub warp-scans; the three counts packed in 64 bits; two TempStorage buffers,
//      so no barrier besides the scan's own) gives F, E, G: forced, tied and above tokens before the
//      thread. The keep rule ("score desc, index asc", the CPU's order) is: forced with forced-rank
//      < capacity; above; tied with tie-rank < need; as bits: above | the lowest capacity - F forced
//      bits | the lowest need - E tied bits. The output slot of a kept token is min(F', capacity) +
//      min(E', need) + G' over the tokens before it, so the same scan gives ranks and slots: a
//      thread's kept tokens take consecutive slots, and idx comes out ascending (the old kernel
//      needed two scans and 4+ barriers per 512 tokens). The loop stops once `count` tokens are
//      placed. Shared-memory reads rotate each thread's 16-byte units so a quarter warp hits 8 bank
//      groups.
//   4. Slots [count, C) get -1 (written before step 3, as count is known); count[b] = kept tokens.
// Registers (ptxas, sm_90, __launch_bounds__(512, 2) for two blocks per SM on short rows): 56-64,
// no spills. Not measured on a GPU yet.
// Left to do: one block per row leaves SMs idle when B is small and S large (B = 1, S = 32k runs on
// 1 of 132 SMs): a multi-block variant (per-block histograms and compaction counts, combined by a
// second kernel or a grid-wide step) would spread steps 1-3. Rows longer than shared memory re-read
// global memory / L2 on every pass. Passes 3+ could run on a shared-memory list of the prefix's
// candidates once the selected bin is small, instead of on the whole row. The device-side input
// check costs a host sync (DeviceErrorFlag::fetch) per call unless GMOD_TRUST_INDICES=1.
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "gmod/cuda_common.cuh"
#include "gmod/op_checks.h"
#include "gmod/message.h"

namespace gmod {
namespace {

using namespace gmod::cuda;

constexpr int kRouteThreads = 512;
constexpr int kGroup = 4;          // tokens per group: one 16-byte (float32) or 2x16-byte (float64) load
constexpr int kTileGroups = 4;     // compaction: consecutive groups per thread -> 16 tokens, bits 0..15
constexpr int kScanUnroll = 4;     // cached passes: 16-byte units per thread per iteration
constexpr unsigned long long kField = (1ull << 21) - 1;  // one of three counts packed in a 64-bit scan
enum RouteErr : unsigned { kErrNumRouted = 1, kErrMask = 2 };

// Order-preserving keys: a > b (as numbers) <=> key(a) > key(b); -0 == +0; NaN -> 0 (lowest).
__device__ __forceinline__ uint32_t order_key(float s) {
  if (isnan(s)) return 0u;
  uint32_t u = __float_as_uint(s);
  if (u == 0x80000000u) u = 0u;  // -0.0 -> +0.0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long order_key(double s) {
  if (isnan(s)) return 0ull;
  unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(s));
  if (u == 0x8000000000000000ull) u = 0ull;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

template <typename scalar_t>
using key_type = std::conditional_t<std::is_same<scalar_t, double>::value, unsigned long long, uint32_t>;

template <typename K>
__device__ __forceinline__ constexpr K code_forced() {
  return ~K(0);
}
template <typename K>
__device__ __forceinline__ constexpr K code_none() {
  return ~K(1);
}

template <typename scalar_t>
__device__ __forceinline__ key_type<scalar_t> token_code(int8_t m, scalar_t s, bool has_thr, scalar_t thr) {
  using K = key_type<scalar_t>;
  if (m == 1) return code_forced<K>();
  if (m == 0 && (!has_thr || s > thr)) return order_key(s);
  return code_none<K>();
}

// Four tokens as loaded: scores and the four mask bytes (byte k = token k; 2 = "never" off the row).
template <typename scalar_t>
struct RawGroup {
  scalar_t s[kGroup];
  uint32_t m;
};

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = a.x;
  v[1] = a.y;
  v[2] = a.z;
  v[3] = a.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = __ldg(reinterpret_cast<const double2*>(p));
  const double2 c = __ldg(reinterpret_cast<const double2*>(p + 2));
  v[0] = a.x;
  v[1] = a.y;
  v[2] = c.x;
  v[3] = c.y;
}

// One row in global memory, read by groups of positions (see the header: position = token + pad).
template <typename scalar_t>
struct RowIn {
  const scalar_t* s;
  const int8_t* m;
  int64_t S;
  int pad;
  bool vec;
  bool has_thr;
  scalar_t thr;

  __device__ __forceinline__ RawGroup<scalar_t> load(int g) const {
    RawGroup<scalar_t> r;
    const int64_t j0 = static_cast<int64_t>(g) * kGroup - pad;  // S + 6 may pass INT32_MAX
    if (vec && j0 >= 0 && j0 + kGroup <= S) {  // aligned by the choice of pad
      load4(s + j0, r.s);
      r.m = __ldg(reinterpret_cast<const unsigned int*>(m + j0));
    } else {  // row edges, or a row that cannot be aligned
      r.m = 0x02020202u;
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        const int64_t j = j0 + k;
        r.s[k] = scalar_t(0);
        if (j >= 0 && j < S) {
          r.s[k] = s[j];
          r.m = (r.m & ~(0xffu << (8 * k))) | (static_cast<uint32_t>(static_cast<uint8_t>(m[j])) << (8 * k));
        }
      }
    }
    return r;
  }
  __device__ __forceinline__ key_type<scalar_t> code(const RawGroup<scalar_t>& r, int k) const {
    return token_code(static_cast<int8_t>(r.m >> (8 * k)), r.s[k], has_thr, thr);
  }
};

// Codes in shared memory: 16-byte units of 4 (float32) or 2 (float64) codes; group g is unit g or
// units 2g, 2g+1.
__device__ __forceinline__ void store_group(uint4* cache, int g, const uint32_t (&c)[kGroup]) {
  cache[g] = make_uint4(c[0], c[1], c[2], c[3]);
}
__device__ __forceinline__ void store_group(uint4* cache, int g, const unsigned long long (&c)[kGroup]) {
  cache[2 * g] = make_uint4(static_cast<uint32_t>(c[0]), static_cast<uint32_t>(c[0] >> 32),
                            static_cast<uint32_t>(c[1]), static_cast<uint32_t>(c[1] >> 32));
  cache[2 * g + 1] = make_uint4(static_cast<uint32_t>(c[2]), static_cast<uint32_t>(c[2] >> 32),
                                static_cast<uint32_t>(c[3]), static_cast<uint32_t>(c[3] >> 32));
}
// A unit of "never" codes (~1), for reads past the cached row.
__device__ __forceinline__ uint4 none_unit(uint32_t) { return make_uint4(~1u, ~1u, ~1u, ~1u); }
__device__ __forceinline__ uint4 none_unit(unsigned long long) { return make_uint4(~1u, ~0u, ~1u, ~0u); }
__device__ __forceinline__ void unit_codes(const uint4& v, uint32_t (&c)[4]) {
  c[0] = v.x;
  c[1] = v.y;
  c[2] = v.z;
  c[3] = v.w;
}
__device__ __forceinline__ void unit_codes(const uint4& v, unsigned long long (&c)[2]) {
  c[0] = static_cast<unsigned long long>(v.x) | (static_cast<unsigned long long>(v.y) << 32);
  c[1] = static_cast<unsigned long long>(v.z) | (static_cast<unsigned long long>(v.w) << 32);
}

// Histogram add, aggregated over the lanes of a warp that hit the same bin: equal scores are common
// (ties, constant rows, and the exponent byte of probabilities), and same-address shared atomics
// serialize. Every lane of the warp must call this (the ballot names the participants).
__device__ __forceinline__ void hist_add(int* hist, bool counted, int digit, unsigned lane_lt) {
  const unsigned act = __ballot_sync(kFullMask, counted);
  if (counted) {
    const unsigned peers = __match_any_sync(act, digit);
    if ((peers & lane_lt) == 0) atomicAdd(&hist[digit], __popc(peers));
  }
}

// Warp 0 reads the 256 bins in descending order: lane l owns bins 255-8l .. 248-8l (local[0..7]);
// incl / excl: inclusive / exclusive count over the lanes.
__device__ __forceinline__ void hist_scan(const int* hist, int lane, int (&local)[8], int& excl, int& incl) {
  const int4 hi = *reinterpret_cast<const int4*>(hist + 252 - 8 * lane);
  const int4 lo = *reinterpret_cast<const int4*>(hist + 248 - 8 * lane);
  local[0] = hi.w;
  local[1] = hi.z;
  local[2] = hi.y;
  local[3] = hi.x;
  local[4] = lo.w;
  local[5] = lo.z;
  local[6] = lo.y;
  local[7] = lo.x;
  int sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += local[i];
  incl = sum;
#pragma unroll
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const int v = __shfl_up_sync(kFullMask, incl, off);
    if (lane >= off) incl += v;
  }
  excl = incl - sum;
}

struct BinPick {
  int digit, rank, count;  // the bin holding the k-th largest key, k's rank inside it, its count
};

// The bin with (count in higher bins) < k <= (that + its count), 1 <= k <= total; all lanes get it.
__device__ __forceinline__ BinPick hist_find(const int (&local)[8], int excl, int incl, int k, int lane) {
  int digit = 0, rank = 0, cnt = 0;
  const bool mine = excl < k && k <= incl;  // exactly one lane
  if (mine) {
    int run = excl;
    bool found = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (!found && run + local[i] >= k) {
        digit = 255 - (lane * 8 + i);
        rank = k - run;
        cnt = local[i];
        found = true;
      }
      run += local[i];
    }
  }
  const unsigned who = __ballot_sync(kFullMask, mine);
  const int src = who ? __ffs(who) - 1 : 0;
  return {__shfl_sync(kFullMask, digit, src), __shfl_sync(kFullMask, rank, src), __shfl_sync(kFullMask, cnt, src)};
}

// The r lowest set bits of m (r <= 0: none; r >= popcount: all).
__device__ __forceinline__ uint32_t lowest_bits(uint32_t m, int r) {
  if (r <= 0) return 0u;
  if (r >= __popc(m)) return m;
  uint32_t low = 0u;
  for (; r > 0; --r) {
    low |= m & (0u - m);
    m &= m - 1u;
  }
  return low;
}

extern __shared__ uint4 route_cache[];  // the row's codes (kCached), sized by the launch

template <typename scalar_t, bool kCached>
__global__ void __launch_bounds__(kRouteThreads, 2)
    gmod_route_kernel(const scalar_t* __restrict__ scores, const int8_t* __restrict__ mask,
                      const int32_t* __restrict__ num_routed, int64_t S, int64_t C, bool has_thr, scalar_t thr,
                      int32_t* __restrict__ idx, int32_t* __restrict__ count, unsigned long long* err) {
  using key_t = key_type<scalar_t>;
  constexpr int kTopShift = static_cast<int>(sizeof(key_t) * 8) - 8;
  constexpr int kPerUnit = static_cast<int>(16 / sizeof(key_t));  // codes per 16-byte unit
  constexpr int kUnitsPerGroup = kGroup / kPerUnit;                // 1 or 2
  constexpr int kThreadUnits = kTileGroups * kUnitsPerGroup;       // a thread's units in a tile: 4 or 8
  // Rotation of a thread's units in a tile: 4 units (64 B apart per thread) -> threads t, t+1 share a
  // rotation, 8 units (128 B) -> one each; either way 8 consecutive threads hit 8 distinct bank groups.
  constexpr int kRotShift = kThreadUnits == 4 ? 1 : 0;
  constexpr int kLoadUnroll = sizeof(scalar_t) == 4 ? 4 : 2;       // groups per thread in flight
  using BlockScan = cub::BlockScan<unsigned long long, kRouteThreads, cub::BLOCK_SCAN_WARP_SCANS>;
  __shared__ typename BlockScan::TempStorage scan_tmp[2];
  __shared__ alignas(16) int hist[2][256];
  __shared__ key_t s_prefix, s_pmask;
  __shared__ int s_need, s_done, s_n, s_nforced;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & (kWarpSize - 1), warp = tid / kWarpSize;
  const unsigned lane_lt = (1u << lane) - 1u;
  const scalar_t* s = scores + b * S;
  const int8_t* m = mask + b * S;
  int32_t* out = idx + b * C;
  const key_t none = code_none<key_t>(), forced = code_forced<key_t>();

  // Alignment: h = first token whose mask byte is 4-byte aligned; the scores must be 16-byte aligned
  // there too (always so for untouched torch allocations). pad makes position h + pad a multiple of 4.
  const int h = static_cast<int>((4u - (reinterpret_cast<uintptr_t>(m) & 3u)) & 3u);
  const bool vec = ((reinterpret_cast<uintptr_t>(s) + static_cast<uintptr_t>(h) * sizeof(scalar_t)) & 15u) == 0;
  const int pad = vec ? (kGroup - h) & (kGroup - 1) : 0;
  const int ngroups = static_cast<int>((S + pad + kGroup - 1) / kGroup);  // < 2^29: group indices fit int
  const RowIn<scalar_t> row{s, m, S, pad, vec, has_thr, thr};

  for (int i = tid; i < 256; i += kRouteThreads) hist[0][i] = 0;
  if (tid == 0) s_nforced = 0;
  __syncthreads();

  // ---- 1. the one global read: counts, top-byte histogram, errors, codes to shared memory
  int nf = 0;
  for (int g0 = 0; g0 < ngroups; g0 += kRouteThreads * kLoadUnroll) {
    RawGroup<scalar_t> raw[kLoadUnroll];
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) raw[u] = row.load(g0 + u * kRouteThreads + tid);  // all in flight
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int g = g0 + u * kRouteThreads + tid;
      if (__vcmpgtu4(raw[u].m, 0x02020202u) != 0) {  // a mask byte outside 0..2 (rare): find which
#pragma unroll
        for (int k = 0; k < kGroup; ++k)
          if (((raw[u].m >> (8 * k)) & 0xffu) > 2u)  // then it acts like 2 ("never")
            report_error(err, b * S + static_cast<int64_t>(g) * kGroup + k - pad, kErrMask);
      }
      key_t c[kGroup];
#pragma unroll
      for (int k = 0; k < kGroup; ++k) {
        c[k] = row.code(raw[u], k);
        nf += c[k] == forced ? 1 : 0;
        hist_add(hist[0], c[k] < none, static_cast<int>(c[k] >> kTopShift), lane_lt);
      }
      if constexpr (kCached)
        if (g < ngroups) store_group(route_cache, g, c);
    }
  }
  nf = warp_sum(nf);
  if (lane == 0 && nf != 0) atomicAdd(&s_nforced, nf);  // integer sum: order does not matter
  __syncthreads();

  // ---- quota, and the first digit from step 1's histogram (warp 0); the others clear histogram 1
  if (warp == 0) {
    int local[8], excl, incl;
    hist_scan(hist[0], lane, local, excl, incl);
    const int ncand = __shfl_sync(kFullMask, incl, kWarpSize - 1);
    const int32_t nr_raw = num_routed[b];
    const int64_t nforced = s_nforced;
    const int64_t forced_kept = nforced < C ? nforced : C;
    const int64_t room = C - forced_kept;
    int64_t q = nr_raw < 0 ? 0 : static_cast<int64_t>(nr_raw);
    if (q > room) q = room;
    if (q > ncand) q = ncand;
    const int quota = static_cast<int>(q);
    key_t prefix = 0, pmask = 0;  // quota == 0 or == ncand: every candidate ties, take `quota` of them
    int need = quota;
    bool done = true;
    if (quota > 0 && quota < ncand) {
      const BinPick p = hist_find(local, excl, incl, quota, lane);
      prefix = static_cast<key_t>(p.digit) << kTopShift;
      pmask = static_cast<key_t>(0xff) << kTopShift;
      need = p.rank;
      done = p.rank == p.count;  // the whole bin is taken: lower bits do not matter
    }
    if (lane == 0) {
      s_prefix = prefix;
      s_pmask = pmask;
      s_need = need;
      s_done = done ? 1 : 0;
      s_n = static_cast<int>(forced_kept) + quota;
      if (nr_raw < 0) report_error(err, b, kErrNumRouted);
    }
  } else {
    for (int i = tid - kWarpSize; i < 256; i += kRouteThreads - kWarpSize) hist[1][i] = 0;
  }
  __syncthreads();

  // ---- 2. remaining radix passes
  int cur = 1;
  for (int shift = kTopShift - 8; shift >= 0; shift -= 8, cur ^= 1) {
    if (s_done) break;  // uniform: read after a barrier, rewritten only after the next one
    const key_t prefix = s_prefix, pmask = s_pmask;
    const int need = s_need;
    int* hc = hist[cur];
    if constexpr (kCached) {
      const int nunits = ngroups * kUnitsPerGroup;
      for (int u0 = 0; u0 < nunits; u0 += kRouteThreads * kScanUnroll) {
        uint4 v[kScanUnroll];
#pragma unroll
        for (int r = 0; r < kScanUnroll; ++r) {
          const int u = u0 + r * kRouteThreads + tid;
          v[r] = u < nunits ? route_cache[u] : none_unit(key_t{});
        }
#pragma unroll
        for (int r = 0; r < kScanUnroll; ++r) {
          key_t c[kPerUnit];
          unit_codes(v[r], c);
#pragma unroll
          for (int k = 0; k < kPerUnit; ++k)
            hist_add(hc, c[k] < none && (c[k] & pmask) == prefix, static_cast<int>((c[k] >> shift) & 0xff),
                     lane_lt);
        }
      }
    } else {
      for (int g0 = 0; g0 < ngroups; g0 += kRouteThreads * kLoadUnroll) {
        RawGroup<scalar_t> raw[kLoadUnroll];
#pragma unroll
        for (int u = 0; u < kLoadUnroll; ++u) raw[u] = row.load(g0 + u * kRouteThreads + tid);
#pragma unroll
        for (int u = 0; u < kLoadUnroll; ++u) {
#pragma unroll
          for (int k = 0; k < kGroup; ++k) {
            const key_t c = row.code(raw[u], k);
            hist_add(hc, c < none && (c & pmask) == prefix, static_cast<int>((c >> shift) & 0xff), lane_lt);
          }
        }
      }
    }
    __syncthreads();
    if (warp == 0) {
      int local[8], excl, incl;
      hist_scan(hc, lane, local, excl, incl);
      const BinPick p = hist_find(local, excl, incl, need, lane);
      if (lane == 0) {
        s_prefix = prefix | (static_cast<key_t>(p.digit) << shift);
        s_pmask = pmask | (static_cast<key_t>(0xff) << shift);
        s_need = p.rank;
        s_done = (p.rank == p.count || shift == 0) ? 1 : 0;
      }
    } else {
      int* hn = hist[cur ^ 1];  // last read by warp 0 before the previous barrier
      for (int i = tid - kWarpSize; i < 256; i += kRouteThreads - kWarpSize) hn[i] = 0;
    }
    __syncthreads();
  }

  // ---- 3. compaction in index order
  const key_t prefix = s_prefix, pmask = s_pmask;
  const int need = s_need, n = s_n;
  const int cap = static_cast<int>(C < S ? C : S);  // forced ranks are < S: rank < C <=> rank < cap
  // 4. (before the compaction, which leaves them free) sentinels in slots [n, C), and count
  for (int64_t c = n + tid; c < C; c += kRouteThreads) out[c] = -1;
  if (tid == 0) count[b] = n;
  const int rot = (tid >> kRotShift) & (kThreadUnits - 1);
  int carry_f = 0, carry_e = 0, carry_g = 0, buf = 0;
  auto placed = [&] { return (carry_f < cap ? carry_f : cap) + (carry_e < need ? carry_e : need) + carry_g; };
  // Uniform exit once all n tokens are placed (s_n re-read from shared memory: as a register it spilled).
  for (int t0 = 0; t0 < ngroups && placed() < s_n; t0 += kRouteThreads * kTileGroups) {
    const int gfirst = t0 + tid * kTileGroups;  // the thread's 4 groups
    uint32_t fm = 0, em = 0, gm = 0;  // bit q: the thread's position 4*gfirst + q
    auto classify = [&](key_t c, int q) {
      const uint32_t bit = 1u << q;
      if (c == forced) {
        fm |= bit;
      } else if (c < none) {
        const key_t mk = c & pmask;
        if (mk > prefix)
          gm |= bit;
        else if (mk == prefix)
          em |= bit;
      }
    };
    if constexpr (kCached) {
      const int nunits = ngroups * kUnitsPerGroup;
#pragma unroll
      for (int i = 0; i < kThreadUnits; ++i) {
        const int ui = (i + rot) & (kThreadUnits - 1);
        const int u = gfirst * kUnitsPerGroup + ui;
        const uint4 v = u < nunits ? route_cache[u] : none_unit(key_t{});
        key_t c[kPerUnit];
        unit_codes(v, c);
#pragma unroll
        for (int k = 0; k < kPerUnit; ++k) classify(c[k], ui * kPerUnit + k);
      }
    } else {
      RawGroup<scalar_t> raw[kTileGroups];
#pragma unroll
      for (int i = 0; i < kTileGroups; ++i) raw[i] = row.load(gfirst + i);  // past the row: mask 2
#pragma unroll
      for (int i = 0; i < kTileGroups; ++i)
#pragma unroll
        for (int k = 0; k < kGroup; ++k) classify(row.code(raw[i], k), i * kGroup + k);
    }
    const unsigned long long mine = static_cast<unsigned long long>(__popc(fm)) |
                                    (static_cast<unsigned long long>(__popc(em)) << 21) |
                                    (static_cast<unsigned long long>(__popc(gm)) << 42);
    unsigned long long pre, tot;
    BlockScan(scan_tmp[buf]).ExclusiveSum(mine, pre, tot);
    buf ^= 1;  // the next scan uses the other buffer: its own barrier orders the reuse
    const int f0 = carry_f + static_cast<int>(pre & kField);
    const int e0 = carry_e + static_cast<int>((pre >> 21) & kField);
    const int g0 = carry_g + static_cast<int>(pre >> 42);
    // Kept: every "above" token, the first cap - f0 forced ones and the first need - e0 tied ones of
    // the thread (all or none of them except in the one thread where a count runs out). Each kept
    // token adds one to exactly one term of min(F, cap) + min(E, need) + G and a dropped one to none,
    // so the kept tokens of a thread take consecutive slots from that sum over the tokens before it.
    uint32_t keep = gm | lowest_bits(fm, cap - f0) | lowest_bits(em, need - e0);
    int slot = (f0 < cap ? f0 : cap) + (e0 < need ? e0 : need) + g0;
    const int64_t tok0 = static_cast<int64_t>(gfirst) * kGroup - pad;
    while (keep != 0) {
      const int q = __ffs(keep) - 1;
      if (slot < C) out[slot] = static_cast<int32_t>(tok0 + q);  // slot < count by construction
      ++slot;
      keep &= keep - 1u;
    }
    carry_f += static_cast<int>(tot & kField);
    carry_e += static_cast<int>((tot >> 21) & kField);
    carry_g += static_cast<int>(tot >> 42);
  }
}

// The CPU kernel's value checks (same messages), run on host copies after a device error.
void check_route_inputs_host(const at::Tensor& mask_h, const at::Tensor& num_routed_h) {
  const int64_t B = mask_h.size(0), S = mask_h.size(1);
  const int8_t* mp = mask_h.data_ptr<int8_t>();
  const int32_t* np = num_routed_h.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    GMOD_CHECK_VALUE(np[b] >= 0, "gmod.route: num_routed[", b, "] = ", np[b], " must be >= 0");
  for (int64_t i = 0; i < B * S; ++i)
    GMOD_CHECK_VALUE(mp[i] >= 0 && mp[i] <= 2, "gmod.route: mask[", i / S, ", ", i % S, "] = ",
                      static_cast<int>(mp[i]), " is not a mask code (0 routable, 1 forced, 2 never)");
}

// Dynamic shared memory the cached kernel may use on `device`: the opt-in maximum per block less its
// static shared memory. The kernel's opt-in attribute is raised to that once per device.
template <typename scalar_t>
int64_t route_cache_limit(int device) {
  static std::mutex mu;
  static std::unordered_map<int, int64_t> limits;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = limits.find(device);
  if (it != limits.end()) return it->second;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cudaFuncAttributes attr{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, gmod_route_kernel<scalar_t, true>));
  // Without the opt-in a block gets 48 KB of static + dynamic shared memory; above that, ask for it.
  int64_t limit = static_cast<int64_t>(optin) - static_cast<int64_t>(attr.sharedSizeBytes);
  if (limit < 0) limit = 0;
  if (optin > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(gmod_route_kernel<scalar_t, true>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)));
  limits.emplace(device, limit);
  return limit;
}

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& scores, const at::Tensor& mask,
                                              const at::Tensor& num_routed, int64_t capacity,
                                              std::optional<double> threshold) {
  check_route_inputs(scores, mask, num_routed, capacity, threshold);
  GMOD_CHECK_VALUE(scores.size(1) <= std::numeric_limits<int32_t>::max(),
                    "gmod.route: sequence length ", scores.size(1), " does not fit int32 indices");

  const c10::cuda::CUDAGuard guard(scores.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = scores.size(0), S = scores.size(1), C = capacity;
  auto idx = at::empty({B, C}, scores.options().dtype(at::kInt));
  auto count = at::empty({B}, scores.options().dtype(at::kInt));
  if (B == 0) return {idx, count};
  std::optional<DeviceErrorFlag> flag;
  if (!skip_index_validation()) flag.emplace(scores.device(), stream);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "gmod_route_cuda", [&] {
    const scalar_t thr = threshold.has_value() ? static_cast<scalar_t>(*threshold) : scalar_t(0);
    // Codes of up to ceil((S + 3) / 4) groups of 4 (pad <= 3), one key_type each.
    const int64_t cache_bytes =
        (S + 2 * (kGroup - 1)) / kGroup * kGroup * static_cast<int64_t>(sizeof(key_type<scalar_t>));
    const bool cached = S > 0 && cache_bytes <= route_cache_limit<scalar_t>(scores.device().index());
    auto kernel = cached ? gmod_route_kernel<scalar_t, true> : gmod_route_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(B), kRouteThreads, cached ? static_cast<size_t>(cache_bytes) : 0, stream>>>(
        scores.data_ptr<scalar_t>(), mask.data_ptr<int8_t>(), num_routed.data_ptr<int32_t>(), S, C,
        threshold.has_value(), thr, idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(),
        flag.has_value() ? flag->ptr() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (flag.has_value()) {
    const unsigned long long e = flag->fetch();
    if (e != kNoError) {
      check_route_inputs_host(mask.cpu(), num_routed.cpu());  // throws with the CPU message
      GMOD_CHECK_VALUE(false, "gmod.route: invalid mask / num_routed values (device check code ", (e & 0xff),
                        " at flat position ", (e >> 8), ")");
    }
  }
  return {idx, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) { m.impl("route", &route_cuda); }

}  // namespace gmod
