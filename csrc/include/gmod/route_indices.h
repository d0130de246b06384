// Shape and value checks for the (idx, count) pair produced by gmod.route and consumed by
// gather_rows / scatter_merge. The value checks read the data, so they run on CPU tensors only;
// the CUDA kernels do their own device-side validation.
#pragma once

#include "gmod/checks.h"

namespace gmod {

// idx [B,C] int32, count [B] int32, on ref's device.
inline void check_route_shapes(const at::Tensor& idx, const at::Tensor& count, const at::Tensor& ref,
                               const char* op, int64_t B) {
  check_tensor(idx, ref, op, "idx", "x", 2, "[B, C]", {at::kInt});
  check_tensor(count, ref, op, "count", "x", 1, "[B]", {at::kInt});
  check_size(idx, op, "idx", 0, B, "the batch size B");
  check_size(count, op, "count", 0, B, "the batch size B");
}

// 0 <= count[b] <= C; idx[b, :count[b]] strictly increasing and inside [0, S).
inline void check_route_values_cpu(const at::Tensor& idx, const at::Tensor& count, int64_t S,
                                   const char* op) {
  const int64_t B = idx.size(0), C = idx.size(1);
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = count.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = cp[b];
    GMOD_CHECK_VALUE(n >= 0 && n <= C, "gmod.", op, ": count[", b, "] = ", n,
                      " is outside [0, capacity = idx.shape[1] = ", C, "]");
    int64_t prev = -1;
    for (int64_t c = 0; c < n; ++c) {
      const int64_t v = ip[b * C + c];
      GMOD_CHECK_VALUE(v >= 0 && v < S, "gmod.", op, ": idx[", b, ", ", c, "] = ", v,
                        " is out of range for sequence length ", S);
      GMOD_CHECK_VALUE(v > prev, "gmod.", op, ": idx[", b, "] must be strictly increasing over its first count[",
                        b, "] = ", n, " entries, but idx[", b, ", ", c, "] = ", v, " follows ", prev);
      prev = v;
    }
  }
}

// Per-position slot map: slot[b,s] = c if idx[b,c] == s (c < count[b]), else -1.
inline std::vector<int32_t> slot_map_cpu(const at::Tensor& idx, const at::Tensor& count, int64_t S) {
  const int64_t B = idx.size(0), C = idx.size(1);
  std::vector<int32_t> slot(static_cast<size_t>(B * S), -1);
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = count.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < cp[b]; ++c) slot[b * S + ip[b * C + c]] = static_cast<int32_t>(c);
  return slot;
}

// Lengths like q_len / k_len / new_len: int32 [B] with 0 <= v[b] <= max_len.
inline void check_lengths_cpu(const at::Tensor& len, int64_t max_len, const char* op, const char* name,
                              const char* bound_name) {
  const int32_t* p = len.data_ptr<int32_t>();
  for (int64_t b = 0; b < len.size(0); ++b)
    GMOD_CHECK_VALUE(p[b] >= 0 && p[b] <= max_len, "gmod.", op, ": ", name, "[", b, "] = ", p[b],
                      " is outside [0, ", bound_name, " = ", max_len, "]");
}

}  // namespace gmod
