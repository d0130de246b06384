// CUDA kernel of gmod.rope (rotary position embedding of q or k [B,C,H,d] on the first r dims,
// rotate-half layout) and its backward. Semantics and the per-pair formula: csrc/cpu/rope.cpp and
// gmod/rope_pair.h (the same function here).
//
// Why a kernel: written as torch ops (x * cos + cat(-x_hi, x_lo) * sin) RoPE reads and writes q and k
// about five times each way, forward and backward; this reads x (or the gradient) once and writes the
// result once. Memory-bound: each thread rotates V consecutive pairs (lo at j..j+V, hi at j+r/2..), with
// V the widest of 16 / 8 / 4 / 2 bytes that the widths and the pointers allow, and copies the dims past r
// in vectors of the same width.
#include <torch/library.h>

#include <algorithm>

#include "gmod/cuda_common.cuh"
#include "gmod/dispatch.h"
#include "gmod/op_checks.h"
#include "rope_kernel.cuh"

namespace gmod {
namespace {

using namespace gmod::cuda;
using gmod::rope::gmod_rope_kernel;
using gmod::rope::kThreads;

// The widest V (elements per vector, at most 16 bytes) that divides r / 2 and d - r and to which every
// pointer is aligned (then every row and half-row start is too: d and r are multiples of V).
template <typename scalar_t>
int rope_vector(int64_t d, int64_t r, std::initializer_list<const void*> ptrs) {
  for (int v = static_cast<int>(16 / sizeof(scalar_t)); v > 1; v /= 2) {
    bool ok = (r / 2) % v == 0 && (d - r) % v == 0;
    for (const void* p : ptrs) ok = ok && is_aligned(p, v * static_cast<int64_t>(sizeof(scalar_t)));
    if (ok) return v;
  }
  return 1;
}

template <bool kBackward>
at::Tensor rope_cuda_impl(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          const char* x_name) {
  const auto a = check_rope_inputs(op, x, cos, sin, x_name);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto out = at::empty_like(x);
  const int64_t rows = a.B * a.C * a.H;
  if (rows == 0) return out;
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_rope_cuda", [&] {
    const auto* xp = x.data_ptr<scalar_t>();
    const auto* cp = cos.data_ptr<scalar_t>();
    const auto* sp = sin.data_ptr<scalar_t>();
    auto* yp = out.data_ptr<scalar_t>();
    const int v = rope_vector<scalar_t>(a.d, a.r, {xp, cp, sp, yp});
    const int64_t items = rows * (a.r / 2 / v + (a.d - a.r) / v);
    const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(items, kThreads), int64_t{1} << 20));
    auto launch = [&](auto vc) {
      constexpr int V = decltype(vc)::value;
      gmod_rope_kernel<scalar_t, acc_t, V, kBackward>
          <<<blocks, kThreads, 0, stream>>>(xp, cp, sp, yp, rows, a.H, a.d, a.r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (v) {
      case 8: launch(std::integral_constant<int, (sizeof(scalar_t) <= 2 ? 8 : 1)>{}); break;
      case 4: launch(std::integral_constant<int, (sizeof(scalar_t) <= 4 ? 4 : 1)>{}); break;
      case 2: launch(std::integral_constant<int, 2>{}); break;
      default: launch(std::integral_constant<int, 1>{}); break;
    }
  });
  return out;
}

at::Tensor rope_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_cuda_impl<false>("rope", x, cos, sin, "x");
}

at::Tensor rope_backward_cuda(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_cuda_impl<true>("rope_backward", grad, cos, sin, "grad");
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) {
  m.impl("rope", &rope_cuda);
  m.impl("rope_backward", &rope_backward_cuda);
}

}  // namespace gmod
