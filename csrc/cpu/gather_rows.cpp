// CPU kernels of gmod.gather_rows ([B,S,D] -> [B,C,D] compaction) and its backward
// (scatter into zeros). Row copies, parallel over output rows.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "gmod/op_checks.h"

namespace gmod {
namespace {

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& count) {
  constexpr const char* op = "gather_rows";
  const auto a = check_gather_inputs(op, x, idx, count);
  check_route_values_cpu(idx, count, a.S, op);
  const int64_t B = a.B, S = a.S, C = a.C, D = a.D;
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
  const auto a = check_gather_backward_inputs(op, grad, idx, count, seq_len);
  check_route_values_cpu(idx, count, a.S, op);
  const int64_t B = a.B, S = a.S, C = a.C, D = a.D;
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
