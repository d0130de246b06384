// CPU kernels of gmod.scatter_merge and its backward.
//   kept row s = idx[b,c] (c < count[b]):  out = base + gate*delta   (delta given)
//                                          out = gate*base            (no delta, gate given)
//                                          out = base                 (neither)
//   other rows:                            out = skip_scale*x (or x)
// Indices are unique per row, so every output row is written by exactly one task.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gmod/dispatch.h"
#include "gmod/op_checks.h"
#include "gmod/route_indices.h"

namespace gmod {
namespace {

// A [B,C] or [B,S] scale in the accumulation type (float32 scales stay as they are for fp32/bf16/fp16).
at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

at::Tensor scatter_merge_cpu(const at::Tensor& x, const at::Tensor& base, const std::optional<at::Tensor>& delta,
                             const std::optional<at::Tensor>& gate, const at::Tensor& idx,
                             const at::Tensor& count, const std::optional<at::Tensor>& skip_scale) {
  const auto a = check_merge_inputs("scatter_merge", x, base, delta, gate, idx, count, skip_scale);
  check_route_values_cpu(idx, count, a.S, "scatter_merge");
  auto out = at::empty_like(x);
  if (a.B * a.S * a.D == 0) return out;
  const auto slot = slot_map_cpu(idx, count, a.S);
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_scatter_merge_cpu", [&] {
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    auto gate_acc = as_acc(gate, acc_type);
    auto skip_acc = as_acc(skip_scale, acc_type);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = base.data_ptr<scalar_t>();
    const scalar_t* dp = delta.has_value() ? delta->data_ptr<scalar_t>() : nullptr;
    const acc_t* gp = gate_acc.defined() ? gate_acc.data_ptr<acc_t>() : nullptr;
    const acc_t* sp = skip_acc.defined() ? skip_acc.data_ptr<acc_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t S = a.S, C = a.C, D = a.D;
    at::parallel_for(0, a.B * S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / S;
        const int32_t c = slot[r];
        scalar_t* o = op + r * D;
        if (c < 0) {
          const scalar_t* xr = xp + r * D;
          if (sp) {
            const acc_t w = sp[r];
            for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(w * static_cast<acc_t>(xr[j]));
          } else {
            std::copy(xr, xr + D, o);
          }
          continue;
        }
        const int64_t k = b * C + c;
        const scalar_t* br = bp + k * D;
        const acc_t g = gp ? gp[k] : acc_t(1);
        if (dp) {
          const scalar_t* dr = dp + k * D;
          for (int64_t j = 0; j < D; ++j)
            o[j] = static_cast<scalar_t>(static_cast<acc_t>(br[j]) + g * static_cast<acc_t>(dr[j]));
        } else {
          for (int64_t j = 0; j < D; ++j) o[j] = static_cast<scalar_t>(g * static_cast<acc_t>(br[j]));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> scatter_merge_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& base, const std::optional<at::Tensor>& delta,
    const std::optional<at::Tensor>& gate, const at::Tensor& idx, const at::Tensor& count,
    const std::optional<at::Tensor>& skip_scale) {
  constexpr const char* op_name = "scatter_merge_backward";
  const auto a = check_merge_inputs(op_name, x, base, delta, gate, idx, count, skip_scale);
  check_route_values_cpu(idx, count, a.S, op_name);
  check_merge_grad(op_name, grad, x);
  const int64_t B = a.B, S = a.S, C = a.C, D = a.D;
  auto dx = at::empty_like(x);
  auto dbase = at::empty_like(base);
  auto ddelta = delta.has_value() ? at::empty_like(*delta) : at::empty({0}, x.options());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto dgate_acc = gate.has_value() ? at::empty({B, C}, x.options().dtype(acc_type)) : at::Tensor();
  auto dskip_acc = skip_scale.has_value() ? at::empty({B, S}, x.options().dtype(acc_type)) : at::Tensor();
  const auto slot = slot_map_cpu(idx, count, S);
  GMOD_DISPATCH_FLOATING(x.scalar_type(), "gmod_scatter_merge_backward_cpu", [&] {
    auto gate_acc = as_acc(gate, acc_type);
    auto skip_acc = as_acc(skip_scale, acc_type);
    const scalar_t* gp_ = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* bp = base.data_ptr<scalar_t>();
    const scalar_t* dp = delta.has_value() ? delta->data_ptr<scalar_t>() : nullptr;
    const acc_t* gtp = gate_acc.defined() ? gate_acc.data_ptr<acc_t>() : nullptr;
    const acc_t* sp = skip_acc.defined() ? skip_acc.data_ptr<acc_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dbp = dbase.data_ptr<scalar_t>();
    scalar_t* ddp = delta.has_value() ? ddelta.data_ptr<scalar_t>() : nullptr;
    acc_t* dgp = dgate_acc.defined() ? dgate_acc.data_ptr<acc_t>() : nullptr;
    acc_t* dsp = dskip_acc.defined() ? dskip_acc.data_ptr<acc_t>() : nullptr;
    const int32_t* ip = idx.data_ptr<int32_t>();
    const int32_t* cp = count.data_ptr<int32_t>();
    // Skipped rows: dx = skip_scale * grad, dskip = <grad, x>; kept rows: dx = 0, dskip = 0.
    at::parallel_for(0, B * S, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = dxp + r * D;
        if (slot[r] >= 0) {
          std::fill(o, o + D, scalar_t(0));
          if (dsp) dsp[r] = 0;
          continue;
        }
        const scalar_t* g = gp_ + r * D;
        const acc_t w = sp ? sp[r] : acc_t(1);
        acc_t dot = 0;
        for (int64_t j = 0; j < D; ++j) {
          o[j] = static_cast<scalar_t>(w * static_cast<acc_t>(g[j]));
          dot += static_cast<acc_t>(g[j]) * static_cast<acc_t>(xp[r * D + j]);
        }
        if (dsp) dsp[r] = dot;
      }
    });
    // Kept slots: gradients of base, delta and gate; slots past count get zeros.
    at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t b = k / C, c = k % C;
        scalar_t* db = dbp + k * D;
        scalar_t* dd = ddp ? ddp + k * D : nullptr;
        if (c >= cp[b]) {
          std::fill(db, db + D, scalar_t(0));
          if (dd) std::fill(dd, dd + D, scalar_t(0));
          if (dgp) dgp[k] = 0;
          continue;
        }
        const scalar_t* g = gp_ + (b * S + ip[k]) * D;
        const acc_t gt = gtp ? gtp[k] : acc_t(1);
        // d(out)/d(base) is 1 with a delta, gate without one.
        const acc_t base_scale = dp ? acc_t(1) : gt;
        const scalar_t* other = dp ? dp + k * D : bp + k * D;  // what the gate multiplies
        acc_t dot = 0;
        for (int64_t j = 0; j < D; ++j) {
          const acc_t gj = static_cast<acc_t>(g[j]);
          db[j] = static_cast<scalar_t>(base_scale * gj);
          if (dd) dd[j] = static_cast<scalar_t>(gt * gj);
          dot += gj * static_cast<acc_t>(other[j]);
        }
        if (dgp) dgp[k] = dot;
      }
    });
  });
  auto dgate = gate.has_value() ? dgate_acc.to(gate->scalar_type()) : at::empty({0}, x.options().dtype(acc_type));
  auto dskip = skip_scale.has_value() ? dskip_acc.to(skip_scale->scalar_type())
                                      : at::empty({0}, x.options().dtype(acc_type));
  return {dx, dbase, ddelta, dgate, dskip};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) {
  m.impl("scatter_merge", &scatter_merge_cpu);
  m.impl("scatter_merge_backward", &scatter_merge_backward_cpu);
}

}  // namespace gmod
