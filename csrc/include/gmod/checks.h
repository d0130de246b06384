// Input checks shared by the CPU and CUDA kernels. Every failure names the op and the argument,
// and raises a Python exception (TypeError for dtypes, ValueError for shapes and values,
// RuntimeError for devices), never a crash.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

#include "gmod/message.h"

namespace gmod {

inline std::string dtypes_str(std::initializer_list<at::ScalarType> ok) {
  std::string s;
  for (auto t : ok) {
    if (!s.empty()) s += ", ";
    s += c10::toString(t);
  }
  return s;
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name,
                        std::initializer_list<at::ScalarType> ok) {
  for (auto d : ok)
    if (t.scalar_type() == d) return;
  GMOD_CHECK_TYPE(false, "gmod.", op, ": ", name, " must have dtype in {", dtypes_str(ok), "}, got ",
                   t.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t ndim,
                      const char* layout) {
  GMOD_CHECK_VALUE(t.dim() == ndim, "gmod.", op, ": ", name, " must be ", ndim, "-D ", layout,
                    ", got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                       int64_t expected, const char* what) {
  GMOD_CHECK_VALUE(t.size(dim) == expected, "gmod.", op, ": ", name, ".shape[", dim, "] must equal ",
                    what, " (", expected, "), got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  GMOD_CHECK_VALUE(t.is_contiguous(), "gmod.", op, ": ", name,
                    " must be contiguous (call .contiguous() first), got strides ", t.strides());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                         const char* ref_name) {
  GMOD_CHECK(t.device() == ref.device(), "gmod.", op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

// The common case: right device, dtype, rank, contiguity.
inline void check_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                         const char* ref_name, int64_t ndim, const char* layout,
                         std::initializer_list<at::ScalarType> ok) {
  GMOD_CHECK_VALUE(t.defined(), "gmod.", op, ": ", name, " is undefined");
  check_device(t, ref, op, name, ref_name);
  check_dtype(t, op, name, ok);
  check_dim(t, op, name, ndim, layout);
  check_contiguous(t, op, name);
}

inline bool is_float_activation(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_activation(const at::Tensor& t, const char* op, const char* name, int64_t ndim,
                             const char* layout) {
  GMOD_CHECK_VALUE(t.defined(), "gmod.", op, ": ", name, " is undefined");
  check_dtype(t, op, name, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  check_dim(t, op, name, ndim, layout);
  check_contiguous(t, op, name);
}

// Small per-element scales (router gate, skip scale, router weight): float32, or the
// activation dtype, or float64 when the activation is float64.
inline void check_scale_dtype(const at::Tensor& t, at::ScalarType act, const char* op, const char* name) {
  auto d = t.scalar_type();
  GMOD_CHECK_TYPE(d == at::kFloat || d == act || (act == at::kDouble && d == at::kDouble), "gmod.", op,
                   ": ", name, " must be float32 or ", act, " (the activation dtype), got ", d);
}

}  // namespace gmod
