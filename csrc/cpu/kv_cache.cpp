// CPU kernel of gmod.kv_cache_append: the compact KV cache of a MoD layer. Row b of the step's
// new keys/values holds new_len[b] compact rows (the tokens this layer processed); they go to
// k_cache[b, cache_len[b] : cache_len[b] + new_len[b]] and cache_len[b] grows by new_len[b].
// Everything is checked before anything is written, so a bad call leaves the cache untouched.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "gmod/checks.h"
#include "gmod/route_indices.h"

namespace gmod {
namespace {

void kv_cache_append_cpu(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_len,
                         const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& new_len) {
  constexpr const char* op = "kv_cache_append";
  check_activation(k_cache, op, "k_cache", 4, "[B, capacity, Hk, d]");
  check_tensor(v_cache, k_cache, op, "v_cache", "k_cache", 4, "[B, capacity, Hk, d]", {k_cache.scalar_type()});
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), "gmod.", op, ": v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t B = k_cache.size(0), cap = k_cache.size(1), Hk = k_cache.size(2), d = k_cache.size(3);
  check_tensor(k_new, k_cache, op, "k_new", "k_cache", 4, "[B, T, Hk, d]", {k_cache.scalar_type()});
  check_tensor(v_new, k_cache, op, "v_new", "k_cache", 4, "[B, T, Hk, d]", {k_cache.scalar_type()});
  check_size(k_new, op, "k_new", 0, B, "k_cache.shape[0] (B)");
  check_size(k_new, op, "k_new", 2, Hk, "k_cache.shape[2] (Hk)");
  check_size(k_new, op, "k_new", 3, d, "k_cache.shape[3] (d)");
  TORCH_CHECK_VALUE(v_new.sizes() == k_new.sizes(), "gmod.", op, ": v_new must have k_new's shape ",
                    k_new.sizes(), ", got ", v_new.sizes());
  const int64_t T = k_new.size(1);
  check_tensor(cache_len, k_cache, op, "cache_len", "k_cache", 1, "[B]", {at::kInt});
  check_tensor(new_len, k_cache, op, "new_len", "k_cache", 1, "[B]", {at::kInt});
  check_size(cache_len, op, "cache_len", 0, B, "k_cache.shape[0] (B)");
  check_size(new_len, op, "new_len", 0, B, "k_cache.shape[0] (B)");
  check_lengths_cpu(cache_len, cap, op, "cache_len", "k_cache.shape[1]");
  check_lengths_cpu(new_len, T, op, "new_len", "k_new.shape[1]");
  int32_t* clp = cache_len.data_ptr<int32_t>();
  const int32_t* nlp = new_len.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(static_cast<int64_t>(clp[b]) + nlp[b] <= cap, "gmod.", op, ": row ", b,
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
