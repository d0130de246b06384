// CUDA kernels of gmod.scatter_merge and its backward (semantics: csrc/cpu/scatter_merge.cpp).
//   kept row s = idx[b,c] (c < count[b]):  out = base + gate*delta | gate*base | base
//   other rows:                            out = skip_scale*x | x
// No atomics: a small kernel builds the slot map slot[b, s] (the c that keeps s, or -1), then
// one warp per output row reads its slot and writes the row exactly once. The backward has one
// warp per row of x (dx, dskip_scale) and one warp per slot (dbase, ddelta, dgate); the dot
// products (dgate, dskip_scale) are warp reductions in the accumulation type.
// Element access is 16-byte vectors when D * elem_size % 16 == 0 and every pointer is 16-byte
// aligned, scalar otherwise. gate / skip_scale are float32 or the activation dtype (runtime flag),
// and their gradients are written directly in that dtype.
#include <torch/library.h>

#include "gmod/cuda_route_indices.cuh"
#include "gmod/dispatch.h"
#include "gmod/op_checks.h"

namespace gmod {
namespace {

using namespace gmod::cuda;

// A scale tensor as (pointer, is-float32) for load_scale / store_scale; null when absent.
struct ScaleRef {
  void* ptr = nullptr;
  bool f32 = true;
};
ScaleRef scale_ref(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return {};
  return {t->data_ptr(), t->scalar_type() == at::kFloat};
}
ScaleRef scale_ref(const at::Tensor& t) {
  if (!t.defined() || t.numel() == 0) return {};
  return {t.data_ptr(), t.scalar_type() == at::kFloat};
}

// ---------------------------------------------------------------- forward
// One warp per output row r = b*S + s. Rows are nvec vectors of N elements (D = nvec * N).
template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads)
    gmod_scatter_merge_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ base,
                              const scalar_t* __restrict__ delta, const void* __restrict__ gate, bool gate_f32,
                              const void* __restrict__ skip, bool skip_f32, const int32_t* __restrict__ slot,
                              scalar_t* __restrict__ out, int64_t B, int64_t S, int64_t C, int64_t nvec) {
  using VecT = Vec<scalar_t, N>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= B * S) return;
  const int64_t b = row / S;
  const int64_t c = slot[row];
  VecT* o = reinterpret_cast<VecT*>(out) + row * nvec;
  if (c < 0 || c >= C) {  // skipped row
    const VecT* xr = reinterpret_cast<const VecT*>(x) + row * nvec;
    if (skip == nullptr) {
      for (int64_t i = lane; i < nvec; i += kWarpSize) o[i] = xr[i];
      return;
    }
    const acc_t w = load_scale<scalar_t, acc_t>(skip, skip_f32, row);
    for (int64_t i = lane; i < nvec; i += kWarpSize) {
      const VecT xv = xr[i];
      VecT ov;
#pragma unroll
      for (int e = 0; e < N; ++e) ov.v[e] = static_cast<scalar_t>(w * static_cast<acc_t>(xv.v[e]));
      o[i] = ov;
    }
    return;
  }
  const int64_t k = b * C + c;
  const acc_t g = gate != nullptr ? load_scale<scalar_t, acc_t>(gate, gate_f32, k) : acc_t(1);
  const VecT* br = reinterpret_cast<const VecT*>(base) + k * nvec;
  if (delta != nullptr) {
    const VecT* dr = reinterpret_cast<const VecT*>(delta) + k * nvec;
    for (int64_t i = lane; i < nvec; i += kWarpSize) {
      const VecT bv = br[i], dv = dr[i];
      VecT ov;
#pragma unroll
      for (int e = 0; e < N; ++e)
        ov.v[e] = static_cast<scalar_t>(static_cast<acc_t>(bv.v[e]) + g * static_cast<acc_t>(dv.v[e]));
      o[i] = ov;
    }
  } else {
    for (int64_t i = lane; i < nvec; i += kWarpSize) {
      const VecT bv = br[i];
      VecT ov;
#pragma unroll
      for (int e = 0; e < N; ++e) ov.v[e] = static_cast<scalar_t>(g * static_cast<acc_t>(bv.v[e]));
      o[i] = ov;
    }
  }
}

// ---------------------------------------------------------------- backward
// One warp per row r = b*S + s of x. Skipped rows: dx = skip_scale*grad, dskip = <grad, x>;
// kept rows: dx = 0, dskip = 0.
template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads)
    gmod_scatter_merge_backward_rows_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                            const void* __restrict__ skip, bool skip_f32,
                                            const int32_t* __restrict__ slot, scalar_t* __restrict__ dx,
                                            void* __restrict__ dskip, int64_t B, int64_t S, int64_t C,
                                            int64_t nvec) {
  using VecT = Vec<scalar_t, N>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= B * S) return;
  const int64_t c = slot[row];
  VecT* o = reinterpret_cast<VecT*>(dx) + row * nvec;
  if (c >= 0 && c < C) {  // kept row
    VecT z;
#pragma unroll
    for (int e = 0; e < N; ++e) z.v[e] = scalar_t(0);
    for (int64_t i = lane; i < nvec; i += kWarpSize) o[i] = z;
    if (dskip != nullptr && lane == 0) store_scale<scalar_t, acc_t>(dskip, skip_f32, row, acc_t(0));
    return;
  }
  const VecT* gr = reinterpret_cast<const VecT*>(grad) + row * nvec;
  const VecT* xr = reinterpret_cast<const VecT*>(x) + row * nvec;
  const acc_t w = skip != nullptr ? load_scale<scalar_t, acc_t>(skip, skip_f32, row) : acc_t(1);
  acc_t dot = 0;
  for (int64_t i = lane; i < nvec; i += kWarpSize) {
    const VecT gv = gr[i];
    VecT ov;
#pragma unroll
    for (int e = 0; e < N; ++e) ov.v[e] = static_cast<scalar_t>(w * static_cast<acc_t>(gv.v[e]));
    o[i] = ov;
    if (dskip != nullptr) {
      const VecT xv = xr[i];
#pragma unroll
      for (int e = 0; e < N; ++e) dot += static_cast<acc_t>(gv.v[e]) * static_cast<acc_t>(xv.v[e]);
    }
  }
  if (dskip != nullptr) {
    dot = warp_sum(dot);
    if (lane == 0) store_scale<scalar_t, acc_t>(dskip, skip_f32, row, dot);
  }
}

// One warp per slot k = b*C + c. Kept slots: dbase = (delta ? 1 : gate)*g, ddelta = gate*g,
// dgate = <g, delta ? delta : base> with g = grad[b, idx[b,c]]; slots past count: zeros.
template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads)
    gmod_scatter_merge_backward_slots_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ base,
                                             const scalar_t* __restrict__ delta, const void* __restrict__ gate,
                                             bool gate_f32, const int32_t* __restrict__ idx,
                                             const int32_t* __restrict__ count, scalar_t* __restrict__ dbase,
                                             scalar_t* __restrict__ ddelta, void* __restrict__ dgate, int64_t B,
                                             int64_t S, int64_t C, int64_t nvec) {
  using VecT = Vec<scalar_t, N>;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (k >= B * C) return;
  const int64_t b = k / C, c = k - b * C;
  int64_t s = -1;
  if (c < static_cast<int64_t>(count[b])) {
    const int64_t v = idx[k];
    if (v >= 0 && v < S) s = v;
  }
  VecT* db = reinterpret_cast<VecT*>(dbase) + k * nvec;
  VecT* dd = ddelta != nullptr ? reinterpret_cast<VecT*>(ddelta) + k * nvec : nullptr;
  if (s < 0) {
    VecT z;
#pragma unroll
    for (int e = 0; e < N; ++e) z.v[e] = scalar_t(0);
    for (int64_t i = lane; i < nvec; i += kWarpSize) {
      db[i] = z;
      if (dd != nullptr) dd[i] = z;
    }
    if (dgate != nullptr && lane == 0) store_scale<scalar_t, acc_t>(dgate, gate_f32, k, acc_t(0));
    return;
  }
  const VecT* gr = reinterpret_cast<const VecT*>(grad) + (b * S + s) * nvec;
  const acc_t gt = gate != nullptr ? load_scale<scalar_t, acc_t>(gate, gate_f32, k) : acc_t(1);
  const acc_t base_scale = delta != nullptr ? acc_t(1) : gt;
  // What the gate multiplies: delta if given, else base.
  const VecT* other = reinterpret_cast<const VecT*>(delta != nullptr ? delta : base) + k * nvec;
  acc_t dot = 0;
  for (int64_t i = lane; i < nvec; i += kWarpSize) {
    const VecT gv = gr[i];
    VecT bv;
#pragma unroll
    for (int e = 0; e < N; ++e) bv.v[e] = static_cast<scalar_t>(base_scale * static_cast<acc_t>(gv.v[e]));
    db[i] = bv;
    if (dd != nullptr) {
      VecT dv;
#pragma unroll
      for (int e = 0; e < N; ++e) dv.v[e] = static_cast<scalar_t>(gt * static_cast<acc_t>(gv.v[e]));
      dd[i] = dv;
    }
    if (dgate != nullptr) {
      const VecT ov = other[i];
#pragma unroll
      for (int e = 0; e < N; ++e) dot += static_cast<acc_t>(gv.v[e]) * static_cast<acc_t>(ov.v[e]);
    }
  }
  if (dgate != nullptr) {
    dot = warp_sum(dot);
    if (lane == 0) store_scale<scalar_t, acc_t>(dgate, gate_f32, k, dot);
  }
}

// Calls f(std::integral_constant<int, N>) with N = 16-byte vector width or 1.
template <typename scalar_t, typename F>
void with_vec_width(bool vec16, F&& f) {
  if (vec16)
    f(std::integral_constant<int, vec16_elems<scalar_t>()>{});
  else
    f(std::integral_constant<int, 1>{});
}

at::Tensor scatter_merge_cuda(const at::Tensor& x, const at::Tensor& base, const std::optional<at::Tensor>& delta,
                              const std::optional<at::Tensor>& gate, const at::Tensor& idx, const at::Tensor& count,
                              const std::optional<at::Tensor>& skip_scale) {
  constexpr const char* op = "scatter_merge";
  const auto a = check_merge_inputs(op, x, base, delta, gate, idx, count, skip_scale);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty_like(x);
  auto flag = launch_route_validation(idx, count, a.S, stream);
  if (a.B * a.S * a.D > 0) {
    const auto slot = build_slot_map(idx, count, a.S, stream);
    const ScaleRef g = scale_ref(gate), sk = scale_ref(skip_scale);
    const void* dptr = delta.has_value() ? delta->data_ptr() : nullptr;
    const bool vec16 = can_use_vec16(a.D * x.element_size(), {x.data_ptr(), base.data_ptr(), dptr, out.data_ptr()});
    GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_scatter_merge_cuda", [&] {
      with_vec_width<scalar_t>(vec16, [&](auto n) {
        constexpr int N = decltype(n)::value;
        gmod_scatter_merge_kernel<scalar_t, acc_t, N><<<row_blocks(a.B * a.S), kRowThreads, 0, stream>>>(
            x.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), static_cast<const scalar_t*>(dptr), g.ptr, g.f32,
            sk.ptr, sk.f32, slot.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), a.B, a.S, a.C, a.D / N);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  finish_route_validation(flag, idx, count, a.S, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scatter_merge_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& base, const std::optional<at::Tensor>& delta,
    const std::optional<at::Tensor>& gate, const at::Tensor& idx, const at::Tensor& count,
    const std::optional<at::Tensor>& skip_scale) {
  constexpr const char* op = "scatter_merge_backward";
  const auto a = check_merge_inputs(op, x, base, delta, gate, idx, count, skip_scale);
  check_merge_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = a.B, S = a.S, C = a.C, D = a.D;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dx = at::empty_like(x);
  auto dbase = at::empty_like(base);
  auto ddelta = delta.has_value() ? at::empty_like(*delta) : at::empty({0}, x.options());
  // Gradients of the scales in their own dtype (the kernels convert from acc_t on the store).
  auto dgate = gate.has_value() ? at::empty_like(*gate) : at::empty({0}, x.options().dtype(acc_type));
  auto dskip = skip_scale.has_value() ? at::empty_like(*skip_scale) : at::empty({0}, x.options().dtype(acc_type));
  auto flag = launch_route_validation(idx, count, S, stream);
  const void* dptr = delta.has_value() ? delta->data_ptr() : nullptr;
  void* ddptr = delta.has_value() ? ddelta.data_ptr() : nullptr;
  const ScaleRef g = scale_ref(gate), sk = scale_ref(skip_scale);
  const ScaleRef dg = scale_ref(dgate), dsk = scale_ref(dskip);  // null when absent (numel 0)
  const bool vec16 = can_use_vec16(D * x.element_size(), {grad.data_ptr(), x.data_ptr(), base.data_ptr(), dptr,
                                                          dx.data_ptr(), dbase.data_ptr(), ddptr});
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_scatter_merge_backward_cuda", [&] {
    with_vec_width<scalar_t>(vec16, [&](auto n) {
      constexpr int N = decltype(n)::value;
      const int64_t nvec = D / N;
      // Rows of x. With D == 0 the only outputs are dskip (zeros, as <grad, x> over nothing).
      if (B * S > 0) {
        const auto slot = build_slot_map(idx, count, S, stream);
        gmod_scatter_merge_backward_rows_kernel<scalar_t, acc_t, N><<<row_blocks(B * S), kRowThreads, 0, stream>>>(
            grad.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), sk.ptr, sk.f32, slot.data_ptr<int32_t>(),
            dx.data_ptr<scalar_t>(), dsk.ptr, B, S, C, nvec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (B * C > 0) {
        gmod_scatter_merge_backward_slots_kernel<scalar_t, acc_t, N>
            <<<row_blocks(B * C), kRowThreads, 0, stream>>>(
                grad.data_ptr<scalar_t>(), base.data_ptr<scalar_t>(), static_cast<const scalar_t*>(dptr), g.ptr,
                g.f32, idx.data_ptr<int32_t>(), count.data_ptr<int32_t>(), dbase.data_ptr<scalar_t>(),
                static_cast<scalar_t*>(ddptr), dg.ptr, B, S, C, nvec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  finish_route_validation(flag, idx, count, S, op);
  return {dx, dbase, ddelta, dgate, dskip};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) {
  m.impl("scatter_merge", &scatter_merge_cuda);
  m.impl("scatter_merge_backward", &scatter_merge_backward_cuda);
}

}  // namespace gmod
