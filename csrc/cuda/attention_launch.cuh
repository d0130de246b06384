// Host-side launch helper for the attention kernels (torch-aware; not used by the host emulation).
#pragma once

// Only c10 CUDA headers: ATen/cuda/CUDAContext.h needs the cuSPARSE/cuBLAS headers, which a bare
// toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <map>
#include <mutex>
#include <tuple>

#include "gmod/attention_params.h"
#include "gmod/message.h"

namespace gmod::attn {

// The most dynamic shared memory one block of the current device may opt in to (99 KB on sm_86 / sm_89,
// 163 KB on sm_80, 227 KB on sm_90).
inline int smem_optin_bytes() {
  int optin = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  return optin;
}

// Launches kernel<<<grid, threads, smem_bytes, stream>>>(params): raises the dynamic shared-memory
// limit when the kernel needs more than the default 48 KB, and fails with a clear message when the
// device cannot give that much (e.g. head dim 256 on GPUs with 99 KB per block).
// pdl: launch with programmatic stream serialization (sm_90+, the split-k decode's combine kernel,
// GMOD_ATTN_PDL=1): the kernel may start before the previous kernel in the stream has finished and must
// call pdl_wait_prerequisites (attention_common.cuh) before it reads that kernel's output. Where the
// runtime refuses the attribute, a plain launch follows (the same result, without the overlap).
template <typename Kernel, typename Params>
void launch_attn_kernel(Kernel kernel, dim3 grid, int smem_bytes, cudaStream_t stream, const Params& params,
                        const char* what, int threads = kNThreads, bool pdl = false) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  GMOD_CHECK(grid.y <= 65535 && grid.z <= 65535, "gmod.attention: grid ", grid.x, " x ", grid.y, " x ",
              grid.z, " of ", what, " exceeds the CUDA limits (batch and head counts must be <= 65535)");
  if (smem_bytes > 48 * 1024) {
    const int optin = smem_optin_bytes();
    GMOD_CHECK(smem_bytes <= optin, "gmod.attention: ", what, " needs ", smem_bytes,
                " bytes of shared memory per block, but this GPU allows ", optin, "; use a smaller head dim");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  }
  if (pdl) {
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, params) == cudaSuccess) return;
    (void)cudaGetLastError();  // a refused launch configuration is not sticky: launch plainly below
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// CTAs of kernel (kNThreads threads, smem_bytes of dynamic shared memory) one SM holds at once, from
// the CUDA occupancy API (registers, shared memory, the per-SM block limit); at least 1. Cached per
// (kernel, device, smem_bytes): the decode asks on every call, and eager decode steps are short.
template <typename Kernel>
int attn_kernel_ctas_per_sm(Kernel kernel, int smem_bytes) {
  const int device = c10::cuda::current_device();
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, smem_bytes);
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, int>, int> cache;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  int ctas = 1;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem_bytes <= optin) {  // else the launch raises the clear error
    if (smem_bytes > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kNThreads, smem_bytes));
    ctas = n > 0 ? n : 1;
  }
  const std::lock_guard<std::mutex> lock(mutex);
  cache[key] = ctas;
  return ctas;
}

}  // namespace gmod::attn
