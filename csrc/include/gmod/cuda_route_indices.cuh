// Device-side handling of the (idx [B,C], count [B]) pair made by gmod.route, shared by the CUDA
// kernels of gather_rows and scatter_merge: value validation (see cuda_common.cuh) and the
// per-position slot map slot[b, s] = c if idx[b, c] == s (c < count[b]), else -1.
#pragma once

#include <optional>

#include "gmod/cuda_common.cuh"
#include "gmod/route_indices.h"
#include "gmod/message.h"

namespace gmod {
namespace cuda {
// The kernels get internal linkage: this header is included by several .cu files.
namespace {

enum RouteErrorCode : unsigned { kErrCount = 1, kErrIdxRange = 2, kErrIdxOrder = 3 };

// One thread per (b, c) of idx (one per row when C == 0). Same rules as check_route_values_cpu:
// 0 <= count[b] <= C, and idx[b, :count[b]] strictly increasing inside [0, S).
__global__ void gmod_validate_route_kernel(const int32_t* __restrict__ idx, const int32_t* __restrict__ count,
                                           int64_t B, int64_t C, int64_t S, unsigned long long* err) {
  const int64_t Cm = C > 0 ? C : 1;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * Cm) return;
  const int64_t b = t / Cm, c = t - b * Cm;
  const int64_t n = count[b];
  if (n < 0 || n > C) {
    if (c == 0) report_error(err, b * Cm, kErrCount);
    return;
  }
  if (c >= n) return;
  const int64_t v = idx[b * C + c];
  if (v < 0 || v >= S)
    report_error(err, t, kErrIdxRange);
  else if (c > 0 && v <= idx[b * C + c - 1])
    report_error(err, t, kErrIdxOrder);
}

// One thread per (b, c): slot[b, idx[b, c]] = c for the valid entries. Entries past count[b] or
// out of [0, S) are ignored. (With validated indices every slot is written at most once.)
__global__ void gmod_slot_map_kernel(const int32_t* __restrict__ idx, const int32_t* __restrict__ count,
                                     int64_t B, int64_t C, int64_t S, int32_t* __restrict__ slot) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= B * C) return;
  const int64_t b = t / C, c = t - b * C;
  if (c >= static_cast<int64_t>(count[b])) return;
  const int64_t v = idx[t];
  if (v < 0 || v >= S) return;
  slot[b * S + v] = static_cast<int32_t>(c);
}

}  // namespace

// Launches the validation of idx/count against sequence length S (nothing when
// GMOD_TRUST_INDICES=1 or B == 0). Call finish_route_validation after the op's own launches:
// the op's kernels ignore bad entries, so they may run before the one sync.
inline std::optional<DeviceErrorFlag> launch_route_validation(const at::Tensor& idx, const at::Tensor& count,
                                                              int64_t S, cudaStream_t stream) {
  const int64_t B = idx.size(0), C = idx.size(1);
  if (skip_index_validation() || B == 0) return std::nullopt;
  std::optional<DeviceErrorFlag> flag;
  flag.emplace(idx.device(), stream);
  const int64_t n = B * (C > 0 ? C : 1);
  constexpr int kThreads = 256;
  gmod_validate_route_kernel<<<static_cast<unsigned>(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
      idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(), B, C, S, flag->ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return flag;
}

// The one sync of the validation; raises the CPU checker's exact message on a bad value.
inline void finish_route_validation(std::optional<DeviceErrorFlag>& flag, const at::Tensor& idx,
                                    const at::Tensor& count, int64_t S, const char* op) {
  if (!flag.has_value()) return;
  const unsigned long long e = flag->fetch();
  if (e == kNoError) return;
  check_route_values_cpu(idx.cpu(), count.cpu(), S, op);  // throws with the CPU message
  const int64_t C = idx.size(1), Cm = C > 0 ? C : 1;
  const int64_t loc = static_cast<int64_t>(e >> 8);
  GMOD_CHECK_VALUE(false, "gmod.", op, ": invalid idx/count values (device check code ", (e & 0xff),
                    " at idx[", loc / Cm, ", ", loc % Cm, "])");
}

// slot [B, S] int32 on idx's device: -1 everywhere, then c at each kept position.
inline at::Tensor build_slot_map(const at::Tensor& idx, const at::Tensor& count, int64_t S, cudaStream_t stream) {
  const int64_t B = idx.size(0), C = idx.size(1);
  auto slot = at::empty({B, S}, idx.options());
  if (B * S == 0) return slot;
  C10_CUDA_CHECK(cudaMemsetAsync(slot.data_ptr(), 0xff, static_cast<size_t>(B * S) * sizeof(int32_t), stream));
  if (B * C == 0) return slot;
  constexpr int kThreads = 256;
  gmod_slot_map_kernel<<<static_cast<unsigned>(ceil_div(B * C, kThreads)), kThreads, 0, stream>>>(
      idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(), B, C, S, slot.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return slot;
}

// Blocks of 8 warps, one warp per row.
constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = kRowsPerBlock * kWarpSize;
inline unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(ceil_div(rows, kRowsPerBlock)); }

}  // namespace cuda
}  // namespace gmod
