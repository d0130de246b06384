// CUDA launchers of gmod.router_logits (fused RMSNorm + router projection) and its backward.
// Semantics: csrc/cpu/router_logits.cpp.
//   logit = r * sum_j x_j a_j,   r = 1 / sqrt(mean(x^2) + eps),   a_j = weight_j * norm_weight_j
//
// Main path (x rows of 16-byte vectors, D <= 4 x 512 vectors): the row-block kernel of
// router_logits_kernel.cuh, forward and backward. It reads x once in both directions; the backward
// writes dx and per-chunk column sums partial[P, D] in the same pass, then
// gmod_router_logits_wgrad_reduce_kernel adds the chunks in order (deterministic, no atomics).
//
// Fallback (rows not 16-byte vectors, or wider D): one warp per row.
//   Forward: a tiny kernel forms a[D] in the accumulation type (as the CPU does), then each warp
//   keeps the sum of squares and the dot with a in registers and reduces both with shuffles.
//   Backward: (1) gmod_router_logits_backward_dx_kernel, one warp per row: recomputes ss, dot, r,
//   writes dx and coef[row] = g r; (2) gmod_router_logits_wgrad_partial_kernel: U_j = sum_rows
//   coef[row] x[row, j] over fixed row chunks into partial[P, D]; (3) the same reduce kernel.
// P depends only on the number of rows, so results are bit-reproducible run to run.
#include <torch/library.h>

#include "gmod/cuda_common.cuh"
#include "gmod/dispatch.h"
#include "gmod/op_checks.h"
#include "router_logits_kernel.cuh"

// c10's bf16 converts to fp32 like cuda_bf16.h's (the upper half of the word): the row-block kernel
// unpacks pairs of them with a shift and a mask.
template <>
struct gmod::router::RowBlockIsBf16<c10::BFloat16> : std::true_type {};

namespace gmod {
namespace {

using namespace gmod::cuda;

constexpr const char* kOp = "router_logits";
constexpr int kRowsPerBlock = 8;  // warps per block, one row each
constexpr int kRowThreads = kRowsPerBlock * kWarpSize;

// a[j] = weight[j] * norm_weight[j] (or weight[j]) in acc_t.
template <typename scalar_t, typename acc_t>
__global__ void gmod_router_combine_weight_kernel(const void* __restrict__ w, bool w_f32, const void* __restrict__ nw,
                                                  bool nw_f32, int64_t D, acc_t* __restrict__ a) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= D) return;
  acc_t v = load_scale<scalar_t, acc_t>(w, w_f32, j);
  if (nw != nullptr) v = v * load_scale<scalar_t, acc_t>(nw, nw_f32, j);
  a[j] = v;
}

// Sum of squares and dot with a over one row, by one warp; every lane gets both totals.
template <typename scalar_t, typename acc_t, int N>
__device__ __forceinline__ void row_ss_dot(const scalar_t* __restrict__ xr, const acc_t* __restrict__ a, int64_t nvec,
                                           int lane, acc_t& ss, acc_t& dot) {
  using XV = Vec<scalar_t, N>;
  using AV = Vec<acc_t, N>;
  const XV* xv = reinterpret_cast<const XV*>(xr);
  const AV* av = reinterpret_cast<const AV*>(a);
  acc_t s0 = 0, d0 = 0;
  for (int64_t i = lane; i < nvec; i += kWarpSize) {
    const XV xi = xv[i];
    const AV ai = av[i];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t v = static_cast<acc_t>(xi.v[e]);
      s0 += v * v;
      d0 += v * ai.v[e];
    }
  }
  ss = warp_sum(s0);
  dot = warp_sum(d0);
}

template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads)
    gmod_router_logits_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ a, int64_t rows, int64_t D,
                              acc_t eps, acc_t* __restrict__ out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  acc_t ss, dot;
  row_ss_dot<scalar_t, acc_t, N>(x + row * D, a, D / N, lane, ss, dot);
  if (lane == 0) {
    const acc_t r = acc_t(1) / device_sqrt(ss / static_cast<acc_t>(D) + eps);
    out[row] = dot * r;
  }
}

template <typename scalar_t, typename acc_t, int N>
__global__ void __launch_bounds__(kRowThreads)
    gmod_router_logits_backward_dx_kernel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x,
                                          const acc_t* __restrict__ a, int64_t rows, int64_t D, acc_t eps,
                                          scalar_t* __restrict__ dx, acc_t* __restrict__ coef) {
  using XV = Vec<scalar_t, N>;
  using AV = Vec<acc_t, N>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;
  const int64_t nvec = D / N;
  acc_t ss, dot;
  row_ss_dot<scalar_t, acc_t, N>(x + row * D, a, nvec, lane, ss, dot);
  const acc_t r = acc_t(1) / device_sqrt(ss / static_cast<acc_t>(D) + eps);
  const acc_t g = grad[row];
  const acc_t gr = g * r;
  const acc_t c = g * r * r * r * dot / static_cast<acc_t>(D);
  if (lane == 0) coef[row] = gr;
  const XV* xv = reinterpret_cast<const XV*>(x + row * D);
  const AV* av = reinterpret_cast<const AV*>(a);
  XV* ov = reinterpret_cast<XV*>(dx + row * D);
  for (int64_t i = lane; i < nvec; i += kWarpSize) {  // second read of the row: L1/L2 hits
    const XV xi = xv[i];
    const AV ai = av[i];
    XV o;
#pragma unroll
    for (int e = 0; e < N; ++e) o.v[e] = static_cast<scalar_t>(gr * ai.v[e] - c * static_cast<acc_t>(xi.v[e]));
    ov[i] = o;
  }
}

constexpr int kWgradCols = 64;  // columns per block: 32 lanes x 2
constexpr int kWgradRowGroups = 8;

// partial[p, j] = sum over rows of chunk p of coef[row] * x[row, j], for the block's 64 columns.
// Thread (tx, ty) sums rows r0+ty, r0+ty+8, ... of columns 2tx, 2tx+1; the 8 row groups are then
// added in order ty = 0..7.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWgradCols / 2 * kWgradRowGroups)
    gmod_router_logits_wgrad_partial_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ coef,
                                            int64_t rows, int64_t D, int64_t rows_per_chunk,
                                            acc_t* __restrict__ partial) {
  __shared__ acc_t tile[kWgradRowGroups][kWgradCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kWgradCols + 2 * tx;
  const int64_t p = blockIdx.y;
  const int64_t r0 = p * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  acc_t u0 = 0, u1 = 0;
  for (int64_t r = r0 + ty; r < r1; r += kWgradRowGroups) {
    const acc_t cf = coef[r];
    const scalar_t* xr = x + r * D;
    if (col0 < D) u0 += cf * static_cast<acc_t>(xr[col0]);
    if (col0 + 1 < D) u1 += cf * static_cast<acc_t>(xr[col0 + 1]);
  }
  tile[ty][2 * tx] = u0;
  tile[ty][2 * tx + 1] = u1;
  __syncthreads();
  if (ty == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t col = col0 + h;
      if (col < D) {
        acc_t u = 0;
#pragma unroll
        for (int q = 0; q < kWgradRowGroups; ++q) u += tile[q][2 * tx + h];
        partial[p * D + col] = u;
      }
    }
  }
}

constexpr int kReduceCols = 32;    // columns per block of the chunk reduction (one per lane)
constexpr int kReduceGroups = 8;   // chunk groups per column (one per warp)

// U_j = sum_p partial[p, j]; dweight_j = U_j * norm_weight_j (U_j without norm_weight);
// dnorm_j = U_j * weight_j. Written in the dtypes of weight / norm_weight.
// Thread (lane c, warp q) adds chunks p = q, q + 8, ... of column c (8 loads in flight), then warp 0
// adds the 8 group sums in order q = 0..7: a fixed order, so the bits do not change run to run.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kReduceCols * kReduceGroups)
    gmod_router_logits_wgrad_reduce_kernel(const acc_t* __restrict__ partial, int64_t P, int64_t D,
                                           const void* __restrict__ w, bool w_f32, const void* __restrict__ nw,
                                           bool nw_f32, void* __restrict__ dw, void* __restrict__ dnw) {
  __shared__ acc_t sums[kReduceGroups][kReduceCols];
  const int c = static_cast<int>(threadIdx.x) % kReduceCols, q = static_cast<int>(threadIdx.x) / kReduceCols;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kReduceCols + c;
  acc_t u = 0;
  if (j < D) {
#pragma unroll 8
    for (int64_t p = q; p < P; p += kReduceGroups) u += partial[p * D + j];
  }
  sums[q][c] = u;
  __syncthreads();
  if (q != 0 || j >= D) return;
  u = 0;
#pragma unroll
  for (int g = 0; g < kReduceGroups; ++g) u += sums[g][c];
  if (nw != nullptr) {
    store_scale<scalar_t, acc_t>(dw, w_f32, j, u * load_scale<scalar_t, acc_t>(nw, nw_f32, j));
    store_scale<scalar_t, acc_t>(dnw, nw_f32, j, u * load_scale<scalar_t, acc_t>(w, w_f32, j));
  } else {
    store_scale<scalar_t, acc_t>(dw, w_f32, j, u);
  }
}

template <typename scalar_t, typename F>
void with_vec_width(bool vec16, F&& f) {
  if (vec16)
    f(std::integral_constant<int, vec16_elems<scalar_t>()>{});
  else
    f(std::integral_constant<int, 1>{});
}

// The combined weight a[D] in acc_t (a fresh allocation, so 16-byte aligned for the vector path).
template <typename scalar_t, typename acc_t>
at::Tensor combined_weight(const at::Tensor& weight, const std::optional<at::Tensor>& norm_weight,
                           at::ScalarType acc_type, cudaStream_t stream) {
  const int64_t D = weight.size(0);
  auto a = at::empty({D}, weight.options().dtype(acc_type));
  if (D == 0) return a;
  const void* nw = norm_weight.has_value() ? norm_weight->data_ptr() : nullptr;
  const bool nw_f32 = norm_weight.has_value() && norm_weight->scalar_type() == at::kFloat;
  constexpr int kThreads = 256;
  gmod_router_combine_weight_kernel<scalar_t, acc_t><<<static_cast<unsigned>(ceil_div(D, kThreads)), kThreads, 0,
                                                       stream>>>(
      weight.data_ptr(), weight.scalar_type() == at::kFloat, nw, nw_f32, D, a.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a;
}

// The row-block kernel (router_logits_kernel.cuh) for one direction; CPT picked from D.
template <typename scalar_t, typename acc_t, bool kBackward>
void launch_row_block(const router::RowBlockShape& shape, const router::RowBlockParams<acc_t>& p, int64_t chunks,
                      cudaStream_t stream) {
  constexpr int VN = vec16_elems<scalar_t>();
  const auto launch = [&](auto kernel) {
    kernel<<<static_cast<unsigned>(chunks), static_cast<unsigned>(shape.threads),
             router::row_block_smem_bytes<acc_t>(), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  switch (shape.cpt) {
    case 1: launch(router::gmod_router_logits_rows_kernel<scalar_t, acc_t, VN, 1, kBackward>); break;
    case 2: launch(router::gmod_router_logits_rows_kernel<scalar_t, acc_t, VN, 2, kBackward>); break;
    default: launch(router::gmod_router_logits_rows_kernel<scalar_t, acc_t, VN, 4, kBackward>); break;
  }
}

template <typename scalar_t, typename acc_t>
router::RowBlockParams<acc_t> row_block_params(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& norm_weight, double eps,
                                               const router::RowBlockShape& shape, int64_t rows_per_chunk) {
  router::RowBlockParams<acc_t> p{};
  p.x = x.data_ptr();
  p.w = weight.data_ptr();
  p.w_f32 = weight.scalar_type() == at::kFloat;
  p.nw = norm_weight.has_value() ? norm_weight->data_ptr() : nullptr;
  p.nw_f32 = norm_weight.has_value() && norm_weight->scalar_type() == at::kFloat;
  p.rows = x.size(0) * x.size(1);
  p.D = x.size(2);
  p.eps = static_cast<acc_t>(eps);
  p.threads = shape.threads;
  p.rows_per_chunk = rows_per_chunk;
  return p;
}

at::Tensor router_logits_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& norm_weight, double eps) {
  check_router_inputs(kOp, x, weight, norm_weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), N = B * S;
  const auto acc_type = router_out_dtype(x);
  auto out = at::empty({B, S}, x.options().dtype(acc_type));
  if (N == 0) return out;
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_router_logits_cuda", [&] {
    const bool vec16 = can_use_vec16(D * x.element_size(), {x.data_ptr()});
    router::RowBlockShape shape;
    if (vec16 && router::row_block_shape(D, vec16_elems<scalar_t>(), shape)) {
      const int64_t rpc = router::row_block_rows_per_chunk(N, false);
      auto p = row_block_params<scalar_t, acc_t>(x, weight, norm_weight, eps, shape, rpc);
      p.out = out.data_ptr<acc_t>();
      launch_row_block<scalar_t, acc_t, false>(shape, p, ceil_div(N, rpc), stream);
      return;
    }
    const auto a = combined_weight<scalar_t, acc_t>(weight, norm_weight, acc_type, stream);
    with_vec_width<scalar_t>(vec16, [&](auto n) {
      constexpr int VN = decltype(n)::value;
      gmod_router_logits_kernel<scalar_t, acc_t, VN>
          <<<static_cast<unsigned>(ceil_div(N, kRowsPerBlock)), kRowThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), a.data_ptr<acc_t>(), N, D, static_cast<acc_t>(eps), out.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> router_logits_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& norm_weight, double eps) {
  constexpr const char* op = "router_logits_backward";
  check_router_inputs(op, x, weight, norm_weight, eps);
  check_router_grad(op, grad, x);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), N = B * S;
  const auto acc_type = router_out_dtype(x);
  auto dx = at::empty_like(x);
  auto dweight = at::empty_like(weight);
  auto dnorm = norm_weight.has_value() ? at::empty_like(*norm_weight) : at::empty({0}, x.options().dtype(acc_type));
  if (D == 0) return {dx, dweight, dnorm};
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_router_logits_backward_cuda", [&] {
    const bool vec16 = can_use_vec16(D * x.element_size(), {x.data_ptr(), dx.data_ptr()});
    router::RowBlockShape shape;
    at::Tensor partial;
    int64_t P = 0;
    if (N > 0 && vec16 && router::row_block_shape(D, vec16_elems<scalar_t>(), shape)) {
      // One pass: dx and the per-chunk column sums of g r x.
      const int64_t rpc = router::row_block_rows_per_chunk(N, true);
      P = ceil_div(N, rpc);
      partial = at::empty({P, D}, x.options().dtype(acc_type));
      auto p = row_block_params<scalar_t, acc_t>(x, weight, norm_weight, eps, shape, rpc);
      p.grad = grad.data_ptr<acc_t>();
      p.dx = dx.data_ptr();
      p.partial = partial.data_ptr<acc_t>();
      launch_row_block<scalar_t, acc_t, true>(shape, p, P, stream);
    } else if (N > 0) {
      // Fixed row chunks (a function of N only): P <= 256 chunks of >= 32 rows.
      const int64_t P0 = std::min<int64_t>(256, ceil_div(N, 32));
      const int64_t rows_per_chunk = ceil_div(N, P0);
      P = ceil_div(N, rows_per_chunk);
      partial = at::empty({P, D}, x.options().dtype(acc_type));
      const auto a = combined_weight<scalar_t, acc_t>(weight, norm_weight, acc_type, stream);
      auto coef = at::empty({N}, x.options().dtype(acc_type));
      with_vec_width<scalar_t>(vec16, [&](auto n) {
        constexpr int VN = decltype(n)::value;
        gmod_router_logits_backward_dx_kernel<scalar_t, acc_t, VN>
            <<<static_cast<unsigned>(ceil_div(N, kRowsPerBlock)), kRowThreads, 0, stream>>>(
                grad.data_ptr<acc_t>(), x.data_ptr<scalar_t>(), a.data_ptr<acc_t>(), N, D, static_cast<acc_t>(eps),
                dx.data_ptr<scalar_t>(), coef.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      const dim3 grid(static_cast<unsigned>(ceil_div(D, kWgradCols)), static_cast<unsigned>(P));
      const dim3 block(kWgradCols / 2, kWgradRowGroups);
      gmod_router_logits_wgrad_partial_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
          x.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), N, D, rows_per_chunk, partial.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      partial = at::empty({1, D}, x.options().dtype(acc_type));
    }
    // With N == 0, P == 0 and the reduction writes zeros.
    const void* nw = norm_weight.has_value() ? norm_weight->data_ptr() : nullptr;
    const bool nw_f32 = norm_weight.has_value() && norm_weight->scalar_type() == at::kFloat;
    void* dnw = norm_weight.has_value() ? dnorm.data_ptr() : nullptr;
    gmod_router_logits_wgrad_reduce_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(ceil_div(D, kReduceCols)), kReduceCols * kReduceGroups, 0, stream>>>(
            partial.data_ptr<acc_t>(), P, D, weight.data_ptr(), weight.scalar_type() == at::kFloat, nw, nw_f32,
            dweight.data_ptr(), dnw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dweight, dnorm};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) {
  m.impl("router_logits", &router_logits_cuda);
  m.impl("router_logits_backward", &router_logits_backward_cuda);
}

}  // namespace gmod
