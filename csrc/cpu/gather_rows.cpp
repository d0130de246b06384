// CPU kernels of gmod.gather_rows ([B,S,D] -> [B,C,D] compaction) and its backward
// (scatter into zeros). Row copies, parallel over output rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "gmod/checks.h"
#include "gmod/route_indices.h"

namespace gmod {
namespace {

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count) {
  constexpr const char* op = "gather_rows";
  check_activation(x, op, "x", 3, "[B, S, D]");
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  check_route_shapes(idx, count, x, op, B);
  check_route_values_cpu(idx, count, S, op);
  const int64_t C = idx.size(1);
  auto out = at::empty({B, C, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const char* xp = static_cast<const char*>(x.data_ptr());
  char* op_ = static_cast<char*>(out.data_ptr());
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = count.data_ptr<int32_t>();
  at::parallel_for(0, B * C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / C, c = r % C;
      char* dst = op_ + r * row_bytes;
      if (c < cp[b])
        std::memcpy(dst, xp + (b * S + ip[r]) * row_bytes, row_bytes);
      else
        std::memset(dst, 0, row_bytes);
    }
  });
  return out;
}

at::Tensor gather_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& idx, const at::Tensor& count,
                                    int64_t seq_len) {
  constexpr const char* op = "gather_rows_backward";
  check_activation(grad, op, "grad", 3, "[B, C, D]");
  const int64_t B = grad.size(0), C = grad.size(1), D = grad.size(2), S = seq_len;
  TORCH_CHECK_VALUE(S >= 0, "gmod.", op, ": seq_len must be >= 0, got ", S);
  check_route_shapes(idx, count, grad, op, B);
  check_size(idx, op, "idx", 1, C, "grad.shape[1] (C)");
  check_route_values_cpu(idx, count, S, op);
  auto out = at::zeros({B, S, D}, grad.options());
  const int64_t row_bytes = D * grad.element_size();
  const char* gp = static_cast<const char*>(grad.data_ptr());
  char* op_ = static_cast<char*>(out.data_ptr());
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = count.data_ptr<int32_t>();
  at::parallel_for(0, B * C, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / C, c = r % C;
      if (c < cp[b]) std::memcpy(op_ + (b * S + ip[r]) * row_bytes, gp + r * row_bytes, row_bytes);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("gather_rows_backward", &gather_rows_backward_cpu);
}

}  // namespace gmod
