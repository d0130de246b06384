// CPU kernels of gmod.attention and its backward: causal attention over per-row lengths.
// Query i (< q_len[b]) of row b sees keys j < k_len[b] with j <= k_len[b] - q_len[b] + i
// (bottom-right alignment: the last query sees the last key). Rows past q_len give o = 0;
// a query with no visible key gives o = 0 and lse = -inf. GQA: query head h reads kv head
// h / (Hq / Hk). Inputs are upcast once to the accumulation type; the math is the textbook
// softmax, exact in that type.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gmod/dispatch.h"
#include "gmod/op_checks.h"

namespace gmod {
namespace {

// The shared shape checks, then the length values (read on the host).
AttnDims check_attention_inputs_cpu(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& q_len, const at::Tensor& k_len, double scale) {
  const auto a = check_attention_inputs(op, q, k, v, q_len, k_len, scale);
  check_lengths_cpu(q_len, a.Cq, op, "q_len", "q.shape[1]");
  check_lengths_cpu(k_len, a.Ck, op, "k_len", "k.shape[1]");
  return a;
}

// Number of keys query i of a row sees.
inline int64_t visible_keys(int64_t i, int64_t ql, int64_t kl) {
  return std::max<int64_t>(0, std::min<int64_t>(kl, kl - ql + i + 1));
}

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const at::Tensor& q_len, const at::Tensor& k_len, double scale) {
  const auto a = check_attention_inputs_cpu("attention", q, k, v, q_len, k_len, scale);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto o_acc = at::zeros({a.B, a.Cq, a.Hq, a.d}, q.options().dtype(acc_type));
  auto lse = at::full({a.B, a.Hq, a.Cq}, -std::numeric_limits<double>::infinity(), q.options().dtype(acc_type));
  if (a.B * a.Cq * a.Hq * a.d == 0 || a.Ck == 0) return {o_acc.to(q.scalar_type()), lse};
  AT_DISPATCH_FLOATING_TYPES(acc_type, "gmod_attention_cpu", [&] {
    using acc_t = scalar_t;
    auto qa = q.to(acc_type).contiguous(), ka = k.to(acc_type).contiguous(), va = v.to(acc_type).contiguous();
    const acc_t* qp = qa.data_ptr<acc_t>();
    const acc_t* kp = ka.data_ptr<acc_t>();
    const acc_t* vp = va.data_ptr<acc_t>();
    acc_t* op = o_acc.data_ptr<acc_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    const int32_t* qlp = q_len.data_ptr<int32_t>();
    const int32_t* klp = k_len.data_ptr<int32_t>();
    const int64_t Cq = a.Cq, Ck = a.Ck, Hq = a.Hq, Hk = a.Hk, d = a.d, group = Hq / Hk;
    const acc_t sc = static_cast<acc_t>(scale);
    at::parallel_for(0, a.B * Hq * Cq, 8, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> s(Ck);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t i = t % Cq, h = (t / Cq) % Hq, b = t / (Cq * Hq);
        const int64_t n = i < qlp[b] ? visible_keys(i, qlp[b], klp[b]) : 0;
        if (n == 0) continue;
        const int64_t hk = h / group;
        const acc_t* qi = qp + ((b * Cq + i) * Hq + h) * d;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const acc_t* kj = kp + ((b * Ck + j) * Hk + hk) * d;
          acc_t dot = 0;
          for (int64_t e = 0; e < d; ++e) dot += qi[e] * kj[e];
          s[j] = dot * sc;
          mx = std::max(mx, s[j]);
        }
        acc_t l = 0;
        acc_t* oi = op + ((b * Cq + i) * Hq + h) * d;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t p = std::exp(s[j] - mx);
          l += p;
          const acc_t* vj = vp + ((b * Ck + j) * Hk + hk) * d;
          for (int64_t e = 0; e < d; ++e) oi[e] += p * vj[e];
        }
        for (int64_t e = 0; e < d; ++e) oi[e] /= l;
        lp[(b * Hq + h) * Cq + i] = mx + std::log(l);
      }
    });
  });
  return {o_acc.to(q.scalar_type()), lse};
}

// FlashAttention-2 style backward from o and lse: p = exp(s - lse), dv += p do, dp = do.v,
// ds = p (dp - <do, o>), dq = scale ds k, dk += scale ds q. One task per (b, kv head), so the
// dk/dv of a GQA group are summed by a single thread.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& o,
    const at::Tensor& lse, const at::Tensor& q_len, const at::Tensor& k_len, double scale) {
  constexpr const char* op_name = "attention_backward";
  const auto a = check_attention_inputs_cpu(op_name, q, k, v, q_len, k_len, scale);
  const auto acc_type = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_attention_backward_inputs(op_name, grad_o, o, lse, q, a, acc_type);
  auto dq = at::zeros({a.B, a.Cq, a.Hq, a.d}, q.options().dtype(acc_type));
  auto dk = at::zeros({a.B, a.Ck, a.Hk, a.d}, q.options().dtype(acc_type));
  auto dv = at::zeros({a.B, a.Ck, a.Hk, a.d}, q.options().dtype(acc_type));
  if (a.B * a.Cq * a.Hq * a.d > 0 && a.Ck > 0) {
    AT_DISPATCH_FLOATING_TYPES(acc_type, "gmod_attention_backward_cpu", [&] {
      using acc_t = scalar_t;
      auto qa = q.to(acc_type).contiguous(), ka = k.to(acc_type).contiguous(), va = v.to(acc_type).contiguous();
      auto oa = o.to(acc_type).contiguous(), ga = grad_o.to(acc_type).contiguous();
      const acc_t *qp = qa.data_ptr<acc_t>(), *kp = ka.data_ptr<acc_t>(), *vp = va.data_ptr<acc_t>();
      const acc_t *opp = oa.data_ptr<acc_t>(), *gp = ga.data_ptr<acc_t>(), *lp = lse.data_ptr<acc_t>();
      acc_t *dqp = dq.data_ptr<acc_t>(), *dkp = dk.data_ptr<acc_t>(), *dvp = dv.data_ptr<acc_t>();
      const int32_t* qlp = q_len.data_ptr<int32_t>();
      const int32_t* klp = k_len.data_ptr<int32_t>();
      const int64_t Cq = a.Cq, Ck = a.Ck, Hq = a.Hq, Hk = a.Hk, d = a.d, group = Hq / Hk;
      const acc_t sc = static_cast<acc_t>(scale);
      at::parallel_for(0, a.B * Hk, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> p(Ck);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t hk = t % Hk, b = t / Hk;
          for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            for (int64_t i = 0; i < qlp[b]; ++i) {
              const int64_t n = visible_keys(i, qlp[b], klp[b]);
              if (n == 0) continue;
              const int64_t qi_off = ((b * Cq + i) * Hq + h) * d;
              const acc_t* qi = qp + qi_off;
              const acc_t* doi = gp + qi_off;
              const acc_t* oi = opp + qi_off;
              const acc_t li = lp[(b * Hq + h) * Cq + i];
              acc_t delta = 0;
              for (int64_t e = 0; e < d; ++e) delta += doi[e] * oi[e];
              acc_t* dqi = dqp + qi_off;
              for (int64_t j = 0; j < n; ++j) {
                const int64_t kj_off = ((b * Ck + j) * Hk + hk) * d;
                const acc_t* kj = kp + kj_off;
                const acc_t* vj = vp + kj_off;
                acc_t dot = 0, dp = 0;
                for (int64_t e = 0; e < d; ++e) {
                  dot += qi[e] * kj[e];
                  dp += doi[e] * vj[e];
                }
                const acc_t pj = std::exp(dot * sc - li);
                const acc_t ds = pj * (dp - delta) * sc;
                acc_t* dkj = dkp + kj_off;
                acc_t* dvj = dvp + kj_off;
                for (int64_t e = 0; e < d; ++e) {
                  dvj[e] += pj * doi[e];
                  dkj[e] += ds * qi[e];
                  dqi[e] += ds * kj[e];
                }
              }
            }
          }
        }
      });
    });
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace gmod
