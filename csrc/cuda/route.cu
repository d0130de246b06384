// CUDA kernel of gmod.route; bit-identical to the CPU kernel (csrc/cpu/route.cpp).
//
// One block per row b (512 threads), in four steps over the row (any S; the row is re-read from
// global memory / L2 on every step):
//   1. Count forced tokens (mask 1) and candidates (mask 0, and score > threshold in threshold
//      mode); invalid mask codes are reported to the error word and otherwise act like 2 (never).
//      quota = min(num_routed[b], capacity - min(forced, capacity), candidates).
//   2. If 0 < quota < candidates: radix select on an order-preserving key of the score (8 bits
//      per pass from the top; 4 passes for float32, 8 for float64) finds K, the key of the
//      quota-th best candidate, and need_eq, how many candidates with key == K are taken.
//      The key maps larger scores to larger keys, -0.0 and +0.0 to one key (they compare equal on
//      the CPU) and every NaN to 0, below every number (CPU: NaN ranks last, NaNs tie).
//      quota == candidates takes every candidate (K = 0, need_eq = all); quota == 0 takes none.
//   3. One pass in index order, a block of 512 tokens at a time, with block-wide exclusive scans
//      (cub::BlockScan): a token is kept if it is forced with forced-rank < capacity, or a
//      candidate with key > K, or a candidate with key == K whose rank among those (in index order)
//      is < need_eq; that is "score desc, index asc" exactly, the CPU's order. A second scan
//      gives each kept token its output slot, so idx comes out ascending.
//   4. Slots past count[b] get -1; count[b] = number kept.
// Speed work left: rows are re-read once per radix pass (S = 32k float32: 128 KB per pass, L2
// resident); keys could be cached in shared memory for S up to ~40k; the shared histogram
// uses plain atomics (many equal scores serialize on one bin; warp-aggregation would help);
// small B with large S leaves SMs idle (a multi-block-per-row variant would fix that).
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "gmod/cuda_common.cuh"
#include "gmod/op_checks.h"

namespace gmod {
namespace {

using namespace gmod::cuda;

constexpr int kRouteThreads = 512;
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

template <typename scalar_t>
__device__ __forceinline__ bool is_candidate(int8_t m, scalar_t s, bool has_thr, scalar_t thr) {
  return m == 0 && (!has_thr || s > thr);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRouteThreads)
    gmod_route_kernel(const scalar_t* __restrict__ scores, const int8_t* __restrict__ mask,
                      const int32_t* __restrict__ num_routed, int64_t S, int64_t C, bool has_thr, scalar_t thr,
                      int32_t* __restrict__ idx, int32_t* __restrict__ count, unsigned long long* err) {
  using key_t = key_type<scalar_t>;
  using BlockScan = cub::BlockScan<int, kRouteThreads>;
  __shared__ typename BlockScan::TempStorage scan_tmp;
  __shared__ int hist[256];
  __shared__ int s_nforced, s_ncand, s_digit, s_k;

  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* s = scores + b * S;
  const int8_t* m = mask + b * S;
  int32_t* out = idx + b * C;

  // ---- 1. counts
  if (tid == 0) {
    s_nforced = 0;
    s_ncand = 0;
  }
  __syncthreads();
  int nf = 0, nc = 0;
  for (int64_t j = tid; j < S; j += kRouteThreads) {
    const int8_t mj = m[j];
    if (mj == 1)
      ++nf;
    else if (mj == 0)
      nc += is_candidate(mj, s[j], has_thr, thr) ? 1 : 0;
    else if (mj != 2)
      report_error(err, b * S + j, kErrMask);
  }
  atomicAdd(&s_nforced, nf);  // integer sums: order does not matter
  atomicAdd(&s_ncand, nc);
  const int32_t nr_raw = num_routed[b];
  if (tid == 0 && nr_raw < 0) report_error(err, b, kErrNumRouted);
  __syncthreads();
  const int64_t nforced = s_nforced, ncand = s_ncand;
  const int64_t forced_kept = nforced < C ? nforced : C;
  const int64_t room = C - forced_kept;
  int64_t quota = nr_raw < 0 ? 0 : static_cast<int64_t>(nr_raw);
  if (quota > room) quota = room;
  if (quota > ncand) quota = ncand;

  // ---- 2. selection threshold (kth key, need_eq)
  key_t kth;
  int64_t need_eq;
  if (quota == 0) {
    kth = ~key_t(0);  // nothing is above it, and need_eq = 0 takes no tie
    need_eq = 0;
  } else if (quota == ncand) {
    kth = 0;  // every candidate: key > 0, or key == 0 (NaN) with rank < ncand
    need_eq = ncand;
  } else {
    key_t prefix = 0, pmask = 0;
    int k = static_cast<int>(quota);  // rank (1-based) still to find among keys matching prefix
    for (int shift = static_cast<int>(sizeof(key_t) * 8) - 8; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += kRouteThreads) hist[i] = 0;
      __syncthreads();
      for (int64_t j = tid; j < S; j += kRouteThreads) {
        const int8_t mj = m[j];
        if (mj != 0) continue;
        const scalar_t sj = s[j];
        if (!is_candidate(mj, sj, has_thr, thr)) continue;
        const key_t key = order_key(sj);
        if ((key & pmask) == prefix) atomicAdd(&hist[static_cast<int>((key >> shift) & 0xff)], 1);
      }
      __syncthreads();
      if (tid < kWarpSize) {
        // Bins in descending order: lane l owns bins 255-8l .. 248-8l. Find the bin holding the
        // k-th largest key: (count in higher bins) < k <= (that + count in the bin).
        const int lane = tid;
        int local[8];
        int sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          local[i] = hist[255 - (lane * 8 + i)];
          sum += local[i];
        }
        int incl = sum;
#pragma unroll
        for (int off = 1; off < kWarpSize; off <<= 1) {
          const int v = __shfl_up_sync(kFullMask, incl, off);
          if (lane >= off) incl += v;
        }
        const int excl = incl - sum;
        if (excl < k && k <= incl) {  // exactly one lane
          int run = excl;
          bool found = false;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (!found && run + local[i] >= k) {
              s_digit = 255 - (lane * 8 + i);
              s_k = k - run;
              found = true;
            }
            run += local[i];
          }
        }
      }
      __syncthreads();
      prefix |= static_cast<key_t>(s_digit) << shift;
      pmask |= static_cast<key_t>(0xff) << shift;
      k = s_k;
      __syncthreads();  // s_digit / s_k / hist are rewritten by the next pass
    }
    kth = prefix;
    need_eq = k;
  }

  // ---- 3. compaction in index order
  int64_t carry_f = 0, carry_e = 0, carry_s = 0;
  for (int64_t base = 0; base < S; base += kRouteThreads) {
    const int64_t j = base + tid;
    bool forced = false, gt = false, eq = false;
    if (j < S) {
      const int8_t mj = m[j];
      if (mj == 1) {
        forced = true;
      } else if (mj == 0) {
        const scalar_t sj = s[j];
        if (is_candidate(mj, sj, has_thr, thr)) {
          const key_t key = order_key(sj);
          gt = key > kth;
          eq = key == kth;
        }
      }
    }
    // Per-tile counts are <= 512, so forced (low 16 bits) and ties (high bits) share one scan.
    int pre, tot;
    BlockScan(scan_tmp).ExclusiveSum((forced ? 1 : 0) | (eq ? (1 << 16) : 0), pre, tot);
    __syncthreads();
    const int64_t frank = carry_f + (pre & 0xffff);
    const int64_t erank = carry_e + (pre >> 16);
    const bool keep = (forced && frank < C) || gt || (eq && erank < need_eq);
    int pos, nkeep;
    BlockScan(scan_tmp).ExclusiveSum(keep ? 1 : 0, pos, nkeep);
    __syncthreads();
    if (keep) {
      const int64_t o = carry_s + pos;
      if (o < C) out[o] = static_cast<int32_t>(j);  // o < C holds by construction; guard anyway
    }
    carry_f += tot & 0xffff;
    carry_e += tot >> 16;
    carry_s += nkeep;
  }

  // ---- 4. sentinel slots and count
  const int64_t n = carry_s < C ? carry_s : C;
  for (int64_t c = n + tid; c < C; c += kRouteThreads) out[c] = -1;
  if (tid == 0) count[b] = static_cast<int32_t>(n);
}

// The CPU kernel's value checks (same messages), run on host copies after a device error.
void check_route_inputs_host(const at::Tensor& mask_h, const at::Tensor& num_routed_h) {
  const int64_t B = mask_h.size(0), S = mask_h.size(1);
  const int8_t* mp = mask_h.data_ptr<int8_t>();
  const int32_t* np = num_routed_h.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(np[b] >= 0, "gmod.route: num_routed[", b, "] = ", np[b], " must be >= 0");
  for (int64_t i = 0; i < B * S; ++i)
    TORCH_CHECK_VALUE(mp[i] >= 0 && mp[i] <= 2, "gmod.route: mask[", i / S, ", ", i % S, "] = ",
                      static_cast<int>(mp[i]), " is not a mask code (0 routable, 1 forced, 2 never)");
}

std::tuple<at::Tensor, at::Tensor> route_cuda(const at::Tensor& scores, const at::Tensor& mask,
                                              const at::Tensor& num_routed, int64_t capacity,
                                              std::optional<double> threshold) {
  check_route_inputs(scores, mask, num_routed, capacity, threshold);
  TORCH_CHECK_VALUE(scores.size(1) <= std::numeric_limits<int32_t>::max(),
                    "gmod.route: sequence length ", scores.size(1), " does not fit int32 indices");

  const c10::cuda::CUDAGuard guard(scores.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = scores.size(0), S = scores.size(1), C = capacity;
  auto idx = at::empty({B, C}, scores.options().dtype(at::kInt));
  auto count = at::empty({B}, scores.options().dtype(at::kInt));
  if (B == 0) return {idx, count};
  std::optional<DeviceErrorFlag> flag;
  if (!trust_indices()) flag.emplace(scores.device(), stream);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "gmod_route_cuda", [&] {
    const scalar_t thr = threshold.has_value() ? static_cast<scalar_t>(*threshold) : scalar_t(0);
    gmod_route_kernel<scalar_t><<<static_cast<unsigned>(B), kRouteThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), mask.data_ptr<int8_t>(), num_routed.data_ptr<int32_t>(), S, C,
        threshold.has_value(), thr, idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(),
        flag.has_value() ? flag->ptr() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (flag.has_value()) {
    const unsigned long long e = flag->fetch();
    if (e != kNoError) {
      check_route_inputs_host(mask.cpu(), num_routed.cpu());  // throws with the CPU message
      TORCH_CHECK_VALUE(false, "gmod.route: invalid mask / num_routed values (device check code ", (e & 0xff),
                        " at flat position ", (e >> 8), ")");
    }
  }
  return {idx, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) { m.impl("route", &route_cuda); }

}  // namespace gmod
