// Shared helpers of the CUDA kernels (csrc/cuda/*.cu): vector types, warp reductions, scale
// loads of a runtime dtype, and the device-side error flag used for index validation.
//
// Index validation on CUDA: the CPU kernels check idx / count / length values on the host. The
// CUDA ops run a small validation kernel instead, which records the first bad location into a
// device word (atomicMin of `location << 8 | code`); the host copies that word back once (one
// stream sync). On an error the offending tensors are copied to the host and the CPU checker runs
// on them, so the message is exactly the CPU one. GMOD_TRUST_INDICES=1 (read once per process)
// skips the validation and its sync, and so does CUDA graph capture (a sync would break it); the
// kernels then still never touch memory out of bounds: an out-of-range entry is ignored.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream (ATen/cuda/CUDAContext.h needs cusparse.h)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace gmod {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// GMOD_TRUST_INDICES=1: skip the device-side validation of index / length values (and its sync).
inline bool trust_indices() {
  static const bool trusted = [] {
    const char* v = std::getenv("GMOD_TRUST_INDICES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return trusted;
}

// The device-side index validation runs unless GMOD_TRUST_INDICES=1 or the current stream is being
// captured into a CUDA graph (its host sync is illegal there).
inline bool skip_index_validation() {
  return trust_indices() ||
         c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// N elements of T in one aligned load / store (16 bytes for the vector paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename scalar_t>
constexpr int vec16_elems() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// True when rows of `row_bytes` starting at every (non-null) pointer can move as 16-byte vectors.
inline bool can_use_vec16(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  if (row_bytes % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !is_aligned(p, 16)) return false;
  return true;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarpSize / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;  // every lane holds the sum
}

__device__ __forceinline__ float device_sqrt(float v) { return sqrtf(v); }  // IEEE (no fast math)
__device__ __forceinline__ double device_sqrt(double v) { return sqrt(v); }

// A per-row / per-column scale stored as float32 or as the activation dtype `scalar_t`
// (check_scale_dtype allows exactly these), read in the accumulation type.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_scale(const void* p, bool is_f32, int64_t i) {
  return is_f32 ? static_cast<acc_t>(static_cast<const float*>(p)[i])
                : static_cast<acc_t>(static_cast<const scalar_t*>(p)[i]);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_scale(void* p, bool is_f32, int64_t i, acc_t v) {
  if (is_f32)
    static_cast<float*>(p)[i] = static_cast<float>(v);
  else
    static_cast<scalar_t*>(p)[i] = static_cast<scalar_t>(v);
}

// Copy / zero one row of n vectors with the 32 lanes of a warp (4 loads in flight per lane).
template <typename V>
__device__ __forceinline__ void warp_copy_row(V* __restrict__ dst, const V* __restrict__ src, int64_t n,
                                              int lane) {
  int64_t i = lane;
  for (; i + 3 * kWarpSize < n; i += 4 * kWarpSize) {
    const V a0 = src[i];
    const V a1 = src[i + kWarpSize];
    const V a2 = src[i + 2 * kWarpSize];
    const V a3 = src[i + 3 * kWarpSize];
    dst[i] = a0;
    dst[i + kWarpSize] = a1;
    dst[i + 2 * kWarpSize] = a2;
    dst[i + 3 * kWarpSize] = a3;
  }
  for (; i < n; i += kWarpSize) dst[i] = src[i];
}

template <typename V>
__device__ __forceinline__ void warp_zero_row(V* __restrict__ dst, int64_t n, int lane) {
  const V z{};
  for (int64_t i = lane; i < n; i += kWarpSize) dst[i] = z;
}

// Record an error: the smallest (location, code) wins, so the report is deterministic.
__device__ __forceinline__ void report_error(unsigned long long* err, int64_t location, unsigned code) {
  if (err != nullptr)
    atomicMin(err, (static_cast<unsigned long long>(location) << 8) | static_cast<unsigned long long>(code & 0xffu));
}

constexpr unsigned long long kNoError = ~0ull;

// One device word for report_error; fetch() is the single device->host copy (a stream sync).
class DeviceErrorFlag {
 public:
  DeviceErrorFlag(const at::Device& device, cudaStream_t stream) : stream_(stream) {
    buf_ = at::empty({1}, at::TensorOptions().dtype(at::kLong).device(device));
    C10_CUDA_CHECK(cudaMemsetAsync(buf_.data_ptr(), 0xff, sizeof(unsigned long long), stream_));
  }
  unsigned long long* ptr() { return reinterpret_cast<unsigned long long*>(buf_.data_ptr()); }
  // kNoError, or location << 8 | code of the first error.
  unsigned long long fetch() {
    unsigned long long host = kNoError;
    c10::cuda::memcpy_and_sync(&host, buf_.data_ptr(), sizeof(host), cudaMemcpyDeviceToHost, stream_);
    return host;
  }

 private:
  at::Tensor buf_;
  cudaStream_t stream_;
};

// Byte-copy kernels: calls f(V{}) with the widest of uint4 / uint2 / uint32_t / uint16_t that
// divides the row and the alignment of every (non-null) pointer. Rows of activations are always
// a multiple of 2 bytes.
template <typename F>
void with_row_vector(int64_t row_bytes, std::initializer_list<const void*> ptrs, F&& f) {
  auto fits = [&](int64_t w) {
    if (row_bytes % w != 0) return false;
    for (const void* p : ptrs)
      if (p != nullptr && !is_aligned(p, w)) return false;
    return true;
  };
  if (fits(16))
    f(uint4{});
  else if (fits(8))
    f(uint2{});
  else if (fits(4))
    f(uint32_t{});
  else
    f(uint16_t{});
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace gmod
