// CPU kernels of gmod.rope (rotary position embedding of q or k on the first r dims of each head,
// rotate-half layout) and its backward. One pass over x; parallel over (token, head) rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "gmod/dispatch.h"
#include "gmod/op_checks.h"
#include "gmod/rope_pair.h"

namespace gmod {
namespace {

template <bool kBackward>
at::Tensor rope_cpu_impl(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                         const char* x_name) {
  const auto a = check_rope_inputs(op, x, cos, sin, x_name);
  auto out = at::empty_like(x);
  const int64_t rows = a.B * a.C * a.H, H = a.H, d = a.d, r = a.r, half = r / 2;
  if (rows == 0) return out;
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_rope_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    // chunks of at least 32K elements: the small tensors of a decode step or a test run on the calling thread
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(d, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* xr = xp + n * d;
        const scalar_t* cr = cp + (n / H) * r;  // the token's angles, shared by its heads
        const scalar_t* sr = sp + (n / H) * r;
        scalar_t* yr = yp + n * d;
        for (int64_t j = 0; j < half; ++j) {
          acc_t lo, hi;
          rope_pair<kBackward, acc_t>(static_cast<acc_t>(xr[j]), static_cast<acc_t>(xr[j + half]),
                                      static_cast<acc_t>(cr[j]), static_cast<acc_t>(cr[j + half]),
                                      static_cast<acc_t>(sr[j]), static_cast<acc_t>(sr[j + half]), lo, hi);
          yr[j] = static_cast<scalar_t>(lo);
          yr[j + half] = static_cast<scalar_t>(hi);
        }
        for (int64_t j = r; j < d; ++j) yr[j] = xr[j];  // dims past r pass through
      }
    });
  });
  return out;
}

at::Tensor rope_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_cpu_impl<false>("rope", x, cos, sin, "x");
}

at::Tensor rope_backward_cpu(const at::Tensor& grad, const at::Tensor& cos, const at::Tensor& sin) {
  return rope_cpu_impl<true>("rope_backward", grad, cos, sin, "grad");
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) {
  m.impl("rope", &rope_cpu);
  m.impl("rope_backward", &rope_backward_cpu);
}

}  // namespace gmod
