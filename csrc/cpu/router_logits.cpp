// CPU kernel of gmod.router_logits: logit = sum_j (x_j * r) * norm_weight_j * weight_j,
// r = rsqrt(mean(x^2) + eps). One pass over each row of x; parallel over rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "gmod/dispatch.h"
#include "gmod/op_checks.h"

namespace gmod {
namespace {

// One row of x: r = rsqrt(mean(x^2) + eps) and dot = sum_j x_j a_j.
template <typename scalar_t, typename acc_t>
inline void row_r_dot(const scalar_t* xr, const acc_t* ap, int64_t D, double eps, acc_t& r, acc_t& dot) {
  acc_t ss = 0;
  dot = 0;
  for (int64_t j = 0; j < D; ++j) {
    const acc_t v = static_cast<acc_t>(xr[j]);
    ss += v * v;
    dot += v * ap[j];
  }
  r = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(D) + static_cast<acc_t>(eps));
}

// a_j = norm_weight_j * weight_j in the accumulation type.
at::Tensor combined_weight(const at::Tensor& weight, const std::optional<at::Tensor>& norm_weight,
                           at::ScalarType acc) {
  auto a = weight.to(acc);
  if (norm_weight.has_value()) a = a * norm_weight->to(acc);
  return a.contiguous();
}

at::Tensor router_logits_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& norm_weight, double eps) {
  check_router_inputs("router_logits", x, weight, norm_weight, eps);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), N = B * S;
  const auto acc_type = router_out_dtype(x);
  auto out = at::empty({B, S}, x.options().dtype(acc_type));
  if (N == 0) return out;
  auto a = combined_weight(weight, norm_weight, acc_type);
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_router_logits_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const acc_t* ap = a.data_ptr<acc_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        acc_t r, dot;
        row_r_dot(xp + row * D, ap, D, eps, r, dot);
        op[row] = dot * r;
      }
    });
  });
  return out;
}

// dx_i = g * (r a_i - r^3 x_i (x.a) / D); dweight = norm_weight * U; dnorm_weight = weight * U,
// with U_j = sum_rows g r x_j (reduced per thread chunk, then summed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> router_logits_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& norm_weight, double eps) {
  constexpr const char* op = "router_logits_backward";
  check_router_inputs(op, x, weight, norm_weight, eps);
  check_router_grad(op, grad, x);
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2), N = B * S;
  const auto acc_type = router_out_dtype(x);
  auto dx = at::empty_like(x);
  auto a = combined_weight(weight, norm_weight, acc_type);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N));
  auto partial = at::zeros({chunks, D}, x.options().dtype(acc_type));
  if (N > 0) {
    GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_router_logits_backward_cpu", [&] {
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const acc_t* ap = a.data_ptr<acc_t>();
      const acc_t* gp = grad.data_ptr<acc_t>();
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      acc_t* pp = partial.data_ptr<acc_t>();
      const int64_t per = (N + chunks - 1) / chunks;
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t ch = cb; ch < ce; ++ch) {
          acc_t* u = pp + ch * D;
          for (int64_t row = ch * per; row < std::min(N, (ch + 1) * per); ++row) {
            const scalar_t* xr = xp + row * D;
            acc_t r, dot;
            row_r_dot(xr, ap, D, eps, r, dot);
            const acc_t g = gp[row];
            const acc_t c = g * r * r * r * dot / static_cast<acc_t>(D);
            for (int64_t j = 0; j < D; ++j) {
              const acc_t v = static_cast<acc_t>(xr[j]);
              dxp[row * D + j] = static_cast<scalar_t>(g * r * ap[j] - c * v);
              u[j] += g * r * v;
            }
          }
        }
      });
    });
  }
  auto U = partial.sum(0);
  auto dweight = (norm_weight.has_value() ? U * norm_weight->to(acc_type) : U).to(weight.scalar_type());
  at::Tensor dnorm;
  if (norm_weight.has_value())
    dnorm = (U * weight.to(acc_type)).to(norm_weight->scalar_type());
  else
    dnorm = at::empty({0}, x.options().dtype(acc_type));
  return {dx, dweight, dnorm};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) {
  m.impl("router_logits", &router_logits_cpu);
  m.impl("router_logits_backward", &router_logits_backward_cpu);
}

}  // namespace gmod
