// CUDA kernel of gmod.kv_cache_append (semantics: csrc/cpu/kv_cache.cpp): row b of k_new / v_new
// holds new_len[b] compact rows that go to k_cache / v_cache[b, cache_len[b] :
// cache_len[b] + new_len[b]], then cache_len[b] += new_len[b], all on the device.
//
// Every check runs before anything is written: the shape checks on the host, the length checks
// (0 <= cache_len <= capacity, 0 <= new_len <= T, cache_len + new_len <= capacity) in a small
// validation kernel followed by one sync (skipped with GMOD_TRUST_INDICES=1, as it costs a sync
// per decode step; a row that breaks them is then left untouched, cache_len included).
// The copy is one warp per (k or v, b, t) source row, 16-byte vectors when the row size and all
// pointers allow it; then a second tiny kernel advances cache_len (the copy kernel reads it).
#include <torch/library.h>

#include "gmod/cuda_common.cuh"
#include "gmod/op_checks.h"
#include "gmod/message.h"

namespace gmod {
namespace {

using namespace gmod::cuda;

constexpr const char* kOp = "kv_cache_append";
constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = kRowsPerBlock * kWarpSize;
enum KvErr : unsigned { kErrCacheLen = 1, kErrNewLen = 2, kErrOverflow = 3 };

__device__ __forceinline__ bool lengths_ok(int64_t L, int64_t n, int64_t T, int64_t cap) {
  return L >= 0 && L <= cap && n >= 0 && n <= T && L + n <= cap;
}

__global__ void gmod_kv_cache_validate_kernel(const int32_t* __restrict__ cache_len,
                                              const int32_t* __restrict__ new_len, int64_t B, int64_t T,
                                              int64_t cap, unsigned long long* err) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t L = cache_len[b], n = new_len[b];
  if (L < 0 || L > cap)
    report_error(err, b, kErrCacheLen);
  else if (n < 0 || n > T)
    report_error(err, b, kErrNewLen);
  else if (L + n > cap)
    report_error(err, b, kErrOverflow);
}

// One warp per source row: rows 0..B*T-1 are keys, B*T..2*B*T-1 values.
template <typename V>
__global__ void __launch_bounds__(kRowThreads)
    gmod_kv_cache_append_kernel(V* __restrict__ k_cache, V* __restrict__ v_cache, const V* __restrict__ k_new,
                                const V* __restrict__ v_new, const int32_t* __restrict__ cache_len,
                                const int32_t* __restrict__ new_len, int64_t B, int64_t T, int64_t cap,
                                int64_t nvec) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= 2 * B * T) return;
  const bool is_v = row >= B * T;
  const int64_t r = is_v ? row - B * T : row;
  const int64_t b = r / T, t = r - b * T;
  const int64_t L = cache_len[b], n = new_len[b];
  if (!lengths_ok(L, n, T, cap) || t >= n) return;
  V* dst = (is_v ? v_cache : k_cache) + (b * cap + L + t) * nvec;
  const V* src = (is_v ? v_new : k_new) + (b * T + t) * nvec;
  warp_copy_row(dst, src, nvec, lane);
}

__global__ void gmod_kv_cache_len_kernel(int32_t* __restrict__ cache_len, const int32_t* __restrict__ new_len,
                                         int64_t B, int64_t T, int64_t cap) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int64_t L = cache_len[b], n = new_len[b];
  if (lengths_ok(L, n, T, cap)) cache_len[b] = static_cast<int32_t>(L + n);
}

// The CPU kernel's length checks (same messages and order), on host copies after a device error.
void check_lengths_host(const at::Tensor& cache_len_h, const at::Tensor& new_len_h, int64_t cap, int64_t T) {
  check_lengths_cpu(cache_len_h, cap, kOp, "cache_len", "k_cache.shape[1]");
  check_lengths_cpu(new_len_h, T, kOp, "new_len", "k_new.shape[1]");
  const int32_t* clp = cache_len_h.data_ptr<int32_t>();
  const int32_t* nlp = new_len_h.data_ptr<int32_t>();
  for (int64_t b = 0; b < cache_len_h.size(0); ++b)
    GMOD_CHECK_VALUE(static_cast<int64_t>(clp[b]) + nlp[b] <= cap, "gmod.", kOp, ": row ", b,
                      " overflows the cache: cache_len ", clp[b], " + new_len ", nlp[b], " > capacity ", cap,
                      " (allocate a larger cache)");
}

void kv_cache_append_cuda(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_len,
                          const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& new_len) {
  constexpr const char* op = kOp;
  const auto a = check_kv_append_inputs(op, k_cache, v_cache, cache_len, k_new, v_new, new_len);
  const int64_t B = a.B, cap = a.cap, Hk = a.Hk, d = a.d, T = a.T;
  if (B == 0) return;

  const c10::cuda::CUDAGuard guard(k_cache.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const unsigned len_blocks = static_cast<unsigned>(ceil_div(B, kThreads));
  if (!skip_index_validation()) {
    DeviceErrorFlag flag(k_cache.device(), stream);
    gmod_kv_cache_validate_kernel<<<len_blocks, kThreads, 0, stream>>>(
        cache_len.data_ptr<int32_t>(), new_len.data_ptr<int32_t>(), B, T, cap, flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const unsigned long long e = flag.fetch();
    if (e != kNoError) {
      check_lengths_host(cache_len.cpu(), new_len.cpu(), cap, T);  // throws with the CPU message
      GMOD_CHECK_VALUE(false, "gmod.", op, ": invalid cache_len / new_len (device check code ", (e & 0xff),
                        " at row ", (e >> 8), ")");
    }
  }
  const int64_t row_bytes = Hk * d * k_cache.element_size();
  if (T > 0 && row_bytes > 0) {
    void* kc = k_cache.data_ptr();
    void* vc = v_cache.data_ptr();
    const void* kn = k_new.data_ptr();
    const void* vn = v_new.data_ptr();
    with_row_vector(row_bytes, {kc, vc, kn, vn}, [&](auto v) {
      using V = decltype(v);
      const int64_t nvec = row_bytes / static_cast<int64_t>(sizeof(V));
      gmod_kv_cache_append_kernel<V>
          <<<static_cast<unsigned>(ceil_div(2 * B * T, kRowsPerBlock)), kRowThreads, 0, stream>>>(
              static_cast<V*>(kc), static_cast<V*>(vc), static_cast<const V*>(kn), static_cast<const V*>(vn),
              cache_len.data_ptr<int32_t>(), new_len.data_ptr<int32_t>(), B, T, cap, nvec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  gmod_kv_cache_len_kernel<<<len_blocks, kThreads, 0, stream>>>(cache_len.data_ptr<int32_t>(),
                                                                 new_len.data_ptr<int32_t>(), B, T, cap);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) { m.impl("kv_cache_append", &kv_cache_append_cuda); }

}  // namespace gmod
