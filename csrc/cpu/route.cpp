// CPU kernel of gmod.route. Per row: every forced token (mask 1), then the num_routed[b]
// highest-scoring routable tokens (mask 0; threshold mode: only those with score > threshold),
// padding (mask 2) never. At most `capacity` in all: forced tokens come first, and if they alone
// exceed capacity the lowest-index ones are kept. Ties go to the lower index; NaN scores rank
// below every number. Output indices ascending; unused slots hold -1.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gmod/dispatch.h"
#include "gmod/op_checks.h"
#include "gmod/message.h"

namespace gmod {
namespace {

template <typename T>
inline bool ranks_before(T sa, int32_t ia, T sb, int32_t ib) {
  const bool na = std::isnan(sa), nb = std::isnan(sb);
  if (na != nb) return nb;  // a number ranks before NaN
  if (!na && sa != sb) return sa > sb;
  return ia < ib;
}

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& scores, const at::Tensor& mask,
                                             const at::Tensor& num_routed, int64_t capacity,
                                             std::optional<double> threshold) {
  check_route_inputs(scores, mask, num_routed, capacity, threshold);

  const int64_t B = scores.size(0), S = scores.size(1), C = capacity;
  const int8_t* mp = mask.data_ptr<int8_t>();
  const int32_t* np = num_routed.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    GMOD_CHECK_VALUE(np[b] >= 0, "gmod.route: num_routed[", b, "] = ", np[b], " must be >= 0");
  for (int64_t i = 0; i < B * S; ++i)
    GMOD_CHECK_VALUE(mp[i] >= 0 && mp[i] <= 2, "gmod.route: mask[", i / S, ", ", i % S, "] = ",
                      static_cast<int>(mp[i]), " is not a mask code (0 routable, 1 forced, 2 never)");

  auto idx = at::full({B, C}, -1, scores.options().dtype(at::kInt));
  auto count = at::empty({B}, scores.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "gmod_route_cpu", [&] {
    const scalar_t* sp = scores.data_ptr<scalar_t>();
    int32_t* ip = idx.data_ptr<int32_t>();
    int32_t* cp = count.data_ptr<int32_t>();
    const scalar_t thr = threshold.has_value() ? static_cast<scalar_t>(*threshold) : scalar_t(0);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<int32_t> kept, cand;
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* s = sp + b * S;
        const int8_t* m = mp + b * S;
        kept.clear();
        cand.clear();
        for (int64_t j = 0; j < S; ++j) {
          if (m[j] == 1) {
            if (static_cast<int64_t>(kept.size()) < C) kept.push_back(static_cast<int32_t>(j));
          } else if (m[j] == 0) {
            if (!threshold.has_value() || s[j] > thr) cand.push_back(static_cast<int32_t>(j));
          }
        }
        const int64_t room = C - static_cast<int64_t>(kept.size());
        const int64_t quota = std::min<int64_t>({static_cast<int64_t>(np[b]), room,
                                                 static_cast<int64_t>(cand.size())});
        if (quota > 0) {
          auto before = [&](int32_t a, int32_t c) { return ranks_before(s[a], a, s[c], c); };
          if (quota < static_cast<int64_t>(cand.size()))
            std::nth_element(cand.begin(), cand.begin() + quota, cand.end(), before);
          kept.insert(kept.end(), cand.begin(), cand.begin() + quota);
          std::sort(kept.begin(), kept.end());
        }
        std::copy(kept.begin(), kept.end(), ip + b * C);
        cp[b] = static_cast<int32_t>(kept.size());
      }
    });
  });
  return {idx, count};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) { m.impl("route", &route_cpu); }

}  // namespace gmod
