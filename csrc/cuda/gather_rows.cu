// CUDA kernels of gmod.gather_rows ([B,S,D] -> [B,C,D] compaction) and its backward
// ([B,C,D] -> [B,S,D], zeros at the positions that were not kept).
//
// Both are pure row copies, so they move bytes without a dtype dispatch: one warp per output
// row, 16-byte vectors when a row is a multiple of 16 bytes and every pointer is 16-byte aligned,
// else the widest of 8 / 4 / 2 bytes that fits (every activation dtype is at least 2 bytes).
// The backward writes every output row exactly once (copy or zeros) through a slot map
// slot[b, s] (built by a small kernel) instead of zero-filling and scattering.
#include <torch/library.h>

#include "gmod/cuda_route_indices.cuh"
#include "gmod/op_checks.h"

namespace gmod {
namespace {

using namespace gmod::cuda;

// out[b, c] = x[b, idx[b, c]] for c < count[b] (and a valid idx), zeros otherwise.
// Rows are in units of V: nvec vectors per row.
template <typename V>
__global__ void __launch_bounds__(kRowThreads)
    gmod_gather_rows_kernel(const V* __restrict__ x, const int32_t* __restrict__ idx,
                            const int32_t* __restrict__ count, V* __restrict__ out, int64_t B, int64_t S,
                            int64_t C, int64_t nvec) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= B * C) return;
  const int64_t b = row / C, c = row - b * C;
  int64_t src = -1;
  if (c < static_cast<int64_t>(count[b])) {
    const int64_t s = idx[row];
    if (s >= 0 && s < S) src = b * S + s;
  }
  V* dst = out + row * nvec;
  if (src >= 0)
    warp_copy_row(dst, x + src * nvec, nvec, lane);
  else
    warp_zero_row(dst, nvec, lane);
}

// out[b, s] = grad[b, slot[b, s]] where slot >= 0, zeros otherwise.
template <typename V>
__global__ void __launch_bounds__(kRowThreads)
    gmod_gather_rows_backward_kernel(const V* __restrict__ grad, const int32_t* __restrict__ slot,
                                     V* __restrict__ out, int64_t B, int64_t S, int64_t C, int64_t nvec) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= B * S) return;
  const int64_t b = row / S;
  const int64_t c = slot[row];  // in [0, C) or -1 by construction
  V* dst = out + row * nvec;
  if (c >= 0 && c < C)
    warp_copy_row(dst, grad + (b * C + c) * nvec, nvec, lane);
  else
    warp_zero_row(dst, nvec, lane);
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count) {
  constexpr const char* op = "gather_rows";
  const auto a = check_gather_inputs(op, x, idx, count);
  const int64_t B = a.B, S = a.S, C = a.C, D = a.D;
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty({B, C, D}, x.options());
  auto flag = launch_route_validation(idx, count, S, stream);
  const int64_t row_bytes = D * x.element_size();
  if (B * C > 0 && row_bytes > 0) {
    const void* xp = x.data_ptr();
    void* op_ = out.data_ptr();
    with_row_vector(row_bytes, {xp, op_}, [&](auto v) {
      using V = decltype(v);
      const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
      gmod_gather_rows_kernel<V><<<row_blocks(B * C), kRowThreads, 0, stream>>>(
          static_cast<const V*>(xp), idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(), static_cast<V*>(op_), B,
          S, C, nvec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_route_validation(flag, idx, count, S, op);
  return out;
}

at::Tensor gather_rows_backward_cuda(const at::Tensor& grad, const at::Tensor& idx, const at::Tensor& count,
                                     int64_t seq_len) {
  constexpr const char* op = "gather_rows_backward";
  const auto a = check_gather_backward_inputs(op, grad, idx, count, seq_len);
  const int64_t B = a.B, S = a.S, C = a.C, D = a.D;
  const c10::cuda::CUDAGuard guard(grad.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty({B, S, D}, grad.options());
  auto flag = launch_route_validation(idx, count, S, stream);
  const int64_t row_bytes = D * grad.element_size();
  if (B * S > 0 && row_bytes > 0) {
    const auto slot = build_slot_map(idx, count, S, stream);
    const void* gp = grad.data_ptr();
    void* op_ = out.data_ptr();
    with_row_vector(row_bytes, {gp, op_}, [&](auto v) {
      using V = decltype(v);
      const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
      gmod_gather_rows_backward_kernel<V><<<row_blocks(B * S), kRowThreads, 0, stream>>>(
          static_cast<const V*>(gp), slot.data_ptr<int32_t>(), static_cast<V*>(op_), B, S, C, nvec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  finish_route_validation(flag, idx, count, S, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("gather_rows_backward", &gather_rows_backward_cuda);
}

}  // namespace gmod
