// Per-op input checks shared by the CPU (.cpp) and CUDA (.cu) kernels: device, dtype, rank,
// shape and contiguity only, nothing that reads tensor data. Value checks (index ranges,
// lengths) stay with each backend: host loops on CPU, device validation on CUDA.
// Plain C++ (no CUDA headers), so it is includable from both.
#pragma once

#include <cmath>
#include <optional>
#include <string>

#include "gmod/checks.h"
#include "gmod/route_indices.h"

namespace gmod {

// ---------------------------------------------------------------- router_logits
// RMSNorm's eps: NaN or a negative value would turn rows into NaN silently (rsqrt of mean(x^2) + eps).
inline void check_eps(const char* op, double eps) {
  GMOD_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "gmod.", op, ": eps must be a finite number >= 0, got ", eps);
}

inline void check_router_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& norm_weight, double eps) {
  check_eps(op, eps);
  check_activation(x, op, "x", 3, "[B, S, D]");
  const int64_t D = x.size(2);
  check_device(weight, x, op, "weight", "x");
  check_scale_dtype(weight, x.scalar_type(), op, "weight");
  check_dim(weight, op, "weight", 1, "[D]");
  check_size(weight, op, "weight", 0, D, "x.shape[2] (D)");
  check_contiguous(weight, op, "weight");
  if (norm_weight.has_value()) {
    const auto& nw = *norm_weight;
    check_device(nw, x, op, "norm_weight", "x");
    check_scale_dtype(nw, x.scalar_type(), op, "norm_weight");
    check_dim(nw, op, "norm_weight", 1, "[D]");
    check_size(nw, op, "norm_weight", 0, D, "x.shape[2] (D)");
    check_contiguous(nw, op, "norm_weight");
  }
}

// The logits' dtype (and the accumulation type): float64 for float64 x, else float32.
inline at::ScalarType router_out_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// grad of router_logits_backward: [B, S] in the logits' dtype.
inline void check_router_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  check_tensor(grad, x, op, "grad", "x", 2, "[B, S]", {router_out_dtype(x)});
  check_size(grad, op, "grad", 0, x.size(0), "x.shape[0] (B)");
  check_size(grad, op, "grad", 1, x.size(1), "x.shape[1] (S)");
}

// ---------------------------------------------------------------- route
inline void check_route_inputs(const at::Tensor& scores, const at::Tensor& mask, const at::Tensor& num_routed,
                               int64_t capacity, std::optional<double> threshold) {
  constexpr const char* op = "route";
  GMOD_CHECK_VALUE(scores.defined(), "gmod.route: scores is undefined");
  check_dtype(scores, op, "scores", {at::kFloat, at::kDouble});
  check_dim(scores, op, "scores", 2, "[B, S]");
  check_contiguous(scores, op, "scores");
  check_tensor(mask, scores, op, "mask", "scores", 2, "[B, S] (codes 0 routable, 1 forced, 2 never)",
               {at::kChar});
  check_size(mask, op, "mask", 0, scores.size(0), "scores.shape[0] (B)");
  check_size(mask, op, "mask", 1, scores.size(1), "scores.shape[1] (S)");
  check_tensor(num_routed, scores, op, "num_routed", "scores", 1, "[B]", {at::kInt});
  check_size(num_routed, op, "num_routed", 0, scores.size(0), "scores.shape[0] (B)");
  GMOD_CHECK_VALUE(capacity >= 0, "gmod.route: capacity must be >= 0, got ", capacity);
  if (threshold.has_value())
    GMOD_CHECK_VALUE(!std::isnan(*threshold), "gmod.route: threshold must not be NaN");
}

// ---------------------------------------------------------------- gather_rows
struct GatherDims {
  int64_t B, S, C, D;
};

// x [B,S,D], idx [B,C], count [B].
inline GatherDims check_gather_inputs(const char* op, const at::Tensor& x, const at::Tensor& idx,
                                      const at::Tensor& count) {
  check_activation(x, op, "x", 3, "[B, S, D]");
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  check_route_shapes(idx, count, x, op, B);
  return {B, S, idx.size(1), D};
}

// grad [B,C,D], idx [B,C], count [B], seq_len S >= 0.
inline GatherDims check_gather_backward_inputs(const char* op, const at::Tensor& grad, const at::Tensor& idx,
                                               const at::Tensor& count, int64_t seq_len) {
  check_activation(grad, op, "grad", 3, "[B, C, D]");
  const int64_t B = grad.size(0), C = grad.size(1), D = grad.size(2), S = seq_len;
  GMOD_CHECK_VALUE(S >= 0, "gmod.", op, ": seq_len must be >= 0, got ", S);
  check_route_shapes(idx, count, grad, op, B);
  check_size(idx, op, "idx", 1, C, "grad.shape[1] (C)");
  return {B, S, C, D};
}

// ---------------------------------------------------------------- scatter_merge
struct MergeDims {
  int64_t B, S, C, D;
};

inline MergeDims check_merge_inputs(const char* op, const at::Tensor& x, const at::Tensor& base,
                                    const std::optional<at::Tensor>& delta, const std::optional<at::Tensor>& gate,
                                    const at::Tensor& idx, const at::Tensor& count,
                                    const std::optional<at::Tensor>& skip_scale) {
  check_activation(x, op, "x", 3, "[B, S, D]");
  const int64_t B = x.size(0), S = x.size(1), D = x.size(2);
  check_tensor(base, x, op, "base", "x", 3, "[B, C, D]", {x.scalar_type()});
  check_size(base, op, "base", 0, B, "x.shape[0] (B)");
  check_size(base, op, "base", 2, D, "x.shape[2] (D)");
  const int64_t C = base.size(1);
  if (delta.has_value()) {
    check_tensor(*delta, x, op, "delta", "x", 3, "[B, C, D]", {x.scalar_type()});
    GMOD_CHECK_VALUE(delta->sizes() == base.sizes(), "gmod.", op, ": delta must have base's shape ",
                      base.sizes(), ", got ", delta->sizes());
  }
  if (gate.has_value()) {
    check_device(*gate, x, op, "gate", "x");
    check_scale_dtype(*gate, x.scalar_type(), op, "gate");
    check_dim(*gate, op, "gate", 2, "[B, C]");
    check_contiguous(*gate, op, "gate");
    check_size(*gate, op, "gate", 0, B, "x.shape[0] (B)");
    check_size(*gate, op, "gate", 1, C, "base.shape[1] (C)");
  }
  if (skip_scale.has_value()) {
    check_device(*skip_scale, x, op, "skip_scale", "x");
    check_scale_dtype(*skip_scale, x.scalar_type(), op, "skip_scale");
    check_dim(*skip_scale, op, "skip_scale", 2, "[B, S]");
    check_contiguous(*skip_scale, op, "skip_scale");
    check_size(*skip_scale, op, "skip_scale", 0, B, "x.shape[0] (B)");
    check_size(*skip_scale, op, "skip_scale", 1, S, "x.shape[1] (S)");
  }
  check_route_shapes(idx, count, x, op, B);
  check_size(idx, op, "idx", 1, C, "base.shape[1] (C)");
  return {B, S, C, D};
}

// grad of scatter_merge_backward: x's dtype, device and shape.
inline void check_merge_grad(const char* op, const at::Tensor& grad, const at::Tensor& x) {
  check_tensor(grad, x, op, "grad", "x", 3, "[B, S, D]", {x.scalar_type()});
  GMOD_CHECK_VALUE(grad.sizes() == x.sizes(), "gmod.", op, ": grad must have x's shape ", x.sizes(), ", got ",
                    grad.sizes());
}

// ---------------------------------------------------------------- attention
struct AttnDims {
  int64_t B, Cq, Ck, Hq, Hk, d;
};

inline AttnDims check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& q_len, const at::Tensor& k_len, double scale) {
  // Any finite scale is a valid softmax temperature (0: uniform, < 0: reversed); NaN / inf is not.
  GMOD_CHECK_VALUE(std::isfinite(scale), "gmod.", op, ": scale must be finite, got ", scale);
  check_activation(q, op, "q", 4, "[B, Cq, Hq, d]");
  check_tensor(k, q, op, "k", "q", 4, "[B, Ck, Hk, d]", {q.scalar_type()});
  check_tensor(v, q, op, "v", "q", 4, "[B, Ck, Hk, d]", {q.scalar_type()});
  const int64_t B = q.size(0), Cq = q.size(1), Hq = q.size(2), d = q.size(3);
  check_size(k, op, "k", 0, B, "q.shape[0] (B)");
  check_size(k, op, "k", 3, d, "q.shape[3] (d)");
  GMOD_CHECK_VALUE(v.sizes() == k.sizes(), "gmod.", op, ": v must have k's shape ", k.sizes(), ", got ",
                    v.sizes());
  const int64_t Ck = k.size(1), Hk = k.size(2);
  GMOD_CHECK_VALUE(Hk > 0 && Hq % Hk == 0, "gmod.", op, ": q heads (", Hq,
                    ") must be a positive multiple of k/v heads (", Hk, ")");
  check_tensor(q_len, q, op, "q_len", "q", 1, "[B]", {at::kInt});
  check_tensor(k_len, q, op, "k_len", "q", 1, "[B]", {at::kInt});
  check_size(q_len, op, "q_len", 0, B, "q.shape[0] (B)");
  check_size(k_len, op, "k_len", 0, B, "q.shape[0] (B)");
  return {B, Cq, Ck, Hq, Hk, d};
}

// grad_o and o of attention_backward (q's dtype and shape), lse [B, Hq, Cq] in lse_dtype.
inline void check_attention_backward_inputs(const char* op, const at::Tensor& grad_o, const at::Tensor& o,
                                            const at::Tensor& lse, const at::Tensor& q, const AttnDims& a,
                                            at::ScalarType lse_dtype) {
  check_tensor(grad_o, q, op, "grad_o", "q", 4, "[B, Cq, Hq, d]", {q.scalar_type()});
  check_tensor(o, q, op, "o", "q", 4, "[B, Cq, Hq, d]", {q.scalar_type()});
  GMOD_CHECK_VALUE(grad_o.sizes() == q.sizes(), "gmod.", op, ": grad_o must have q's shape");
  GMOD_CHECK_VALUE(o.sizes() == q.sizes(), "gmod.", op, ": o must have q's shape");
  check_tensor(lse, q, op, "lse", "q", 3, "[B, Hq, Cq]", {lse_dtype});
  GMOD_CHECK_VALUE(lse.size(0) == a.B && lse.size(1) == a.Hq && lse.size(2) == a.Cq, "gmod.", op,
                    ": lse must have shape [B, Hq, Cq] = [", a.B, ", ", a.Hq, ", ", a.Cq, "], got ", lse.sizes());
}

// ---------------------------------------------------------------- kv_cache_append
struct KvAppendDims {
  int64_t B, cap, Hk, d, T;
};

inline KvAppendDims check_kv_append_inputs(const char* op, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                           const at::Tensor& cache_len, const at::Tensor& k_new,
                                           const at::Tensor& v_new, const at::Tensor& new_len) {
  check_activation(k_cache, op, "k_cache", 4, "[B, capacity, Hk, d]");
  check_tensor(v_cache, k_cache, op, "v_cache", "k_cache", 4, "[B, capacity, Hk, d]", {k_cache.scalar_type()});
  GMOD_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "gmod.", op, ": v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t B = k_cache.size(0), cap = k_cache.size(1), Hk = k_cache.size(2), d = k_cache.size(3);
  check_tensor(k_new, k_cache, op, "k_new", "k_cache", 4, "[B, T, Hk, d]", {k_cache.scalar_type()});
  check_tensor(v_new, k_cache, op, "v_new", "k_cache", 4, "[B, T, Hk, d]", {k_cache.scalar_type()});
  check_size(k_new, op, "k_new", 0, B, "k_cache.shape[0] (B)");
  check_size(k_new, op, "k_new", 2, Hk, "k_cache.shape[2] (Hk)");
  check_size(k_new, op, "k_new", 3, d, "k_cache.shape[3] (d)");
  GMOD_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "gmod.", op, ": v_new must have k_new's shape ",
                    k_new.sizes(), ", got ", v_new.sizes());
  const int64_t T = k_new.size(1);
  check_tensor(cache_len, k_cache, op, "cache_len", "k_cache", 1, "[B]", {at::kInt});
  check_tensor(new_len, k_cache, op, "new_len", "k_cache", 1, "[B]", {at::kInt});
  check_size(cache_len, op, "cache_len", 0, B, "k_cache.shape[0] (B)");
  check_size(new_len, op, "new_len", 0, B, "k_cache.shape[0] (B)");
  return {B, cap, Hk, d, T};
}

// ---------------------------------------------------------------- rope
struct RopeDims {
  int64_t B, C, H, d, r;
};

// x (or the backward's grad) [B, C, H, d]; cos, sin [B, C, r] in x's dtype, r even, 0 < r <= d.
inline RopeDims check_rope_inputs(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  const char* x_name = "x") {
  check_activation(x, op, x_name, 4, "[B, C, H, d]");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), d = x.size(3);
  check_tensor(cos, x, op, "cos", x_name, 3, "[B, C, r]", {x.scalar_type()});
  check_tensor(sin, x, op, "sin", x_name, 3, "[B, C, r]", {x.scalar_type()});
  check_size(cos, op, "cos", 0, B, (std::string(x_name) + ".shape[0] (B)").c_str());
  check_size(cos, op, "cos", 1, C, (std::string(x_name) + ".shape[1] (C)").c_str());
  GMOD_CHECK_VALUE(sin.sizes() == cos.sizes(), "gmod.", op, ": sin must have cos's shape ", cos.sizes(), ", got ",
                    sin.sizes());
  const int64_t r = cos.size(2);
  GMOD_CHECK_VALUE(r > 0 && r % 2 == 0 && r <= d, "gmod.", op, ": the rotated width r = cos.shape[2] must be even ",
                    "and in [2, d = ", d, "], got ", r);
  return {B, C, H, d, r};
}

}  // namespace gmod
