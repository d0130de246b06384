// CPU kernel of gmod.kv_cache_append: the compact KV cache of a MoD layer. Row b of the step's
// new keys/values holds new_len[b] compact rows (the tokens this layer processed); they go to
// k_cache[b, cache_len[b] : cache_len[b] + new_len[b]] and cache_len[b] grows by new_len[b].
// Everything is checked before anything is written, so a bad call leaves the cache untouched.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "gmod/op_checks.h"
#include "gmod/message.h"

namespace gmod {
namespace {

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_len,
                         const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& new_len) {
  constexpr const char* op = "kv_cache_append";
  const auto a = check_kv_append_inputs(op, k_cache, v_cache, cache_len, k_new, v_new, new_len);
  const int64_t B = a.B, cap = a.cap, Hk = a.Hk, d = a.d, T = a.T;
  check_lengths_cpu(cache_len, cap, op, "cache_len", "k_cache.shape[1]");
  check_lengths_cpu(new_len, T, op, "new_len", "k_new.shape[1]");
  int32_t* clp = cache_len.data_ptr<int32_t>();
  const int32_t* nlp = new_len.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    GMOD_CHECK_VALUE(static_cast<int64_t>(clp[b]) + nlp[b] <= cap, "gmod.", op, ": row ", b,
                      " overflows the cache: cache_len ", clp[b], " + new_len ", nlp[b], " > capacity ", cap,
                      " (allocate a larger cache)");
  const int64_t row_bytes = Hk * d * k_cache.element_size();
  for (auto pair : {std::make_pair(&k_cache, &k_new), std::make_pair(&v_cache, &v_new)}) {
    char* dst = static_cast<char*>(pair.first->data_ptr());
    const char* src = static_cast<const char*>(pair.second->data_ptr());
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        if (nlp[b] > 0)
          std::memcpy(dst + (b * cap + clp[b]) * row_bytes, src + b * T * row_bytes, nlp[b] * row_bytes);
    });
  }
  for (int64_t b = 0; b < B; ++b) clp[b] += nlp[b];
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CPU, m) { m.impl("kv_cache_append", &kv_cache_append_cpu); }

}  // namespace gmod
