// Launchers of the attention backward: Delta preprocess, then either
//   deterministic:     dk/dv kernel (grid = key tiles x Hk x B, each CTA sums its whole GQA group)
//                      + dq kernel (grid = query tiles x Hq x B, loops over key tiles); or
//   non-deterministic: dk/dv kernel that also atomically adds dq into fp32 dq_accum; with
//                      heads_per_cta == 1 (small grids) one CTA per q head and atomic fp32 dk/dv.
// Kernels and tiles, 128 threads:
//   tensor cores (bf16 / fp16 on sm_80+, head dim <= 128): attention_bwd_tc_kernel.cuh, TcBwdTile<d>
//                      (dk/dv: 64 keys x 64-query steps; dq: 64 queries x 64-key steps); with
//                      params.tc_bwd_block_n == 128 (the default on grids of two waves or more,
//                      tc_bwd_keys_per_cta in attention_api.cu) the dk/dv kernel runs TcBwdWideTile<d>
//                      (256 threads, 128 keys x 64-query steps);
//   wgmma (sm_90a, d = 64 / 128, non-deterministic, GMOD_ATTN_BWD_IMPL=wgmma): run_attn_bwd_dkdv_wgmma
//                      (sm90a/attention_bwd_wgmma.cu; 256 threads, 128 keys x 64-query steps, atomic dQ);
//   SIMT (float32, head dim 256, older GPUs, GMOD_ATTN_SIMT=1): attention_bwd_kernel.cuh, BwdTile<d>
//                      (64 queries x 32 keys for d <= 128, 32 x 16 for d = 256).
#include <type_traits>

#include "attention_bwd_kernel.cuh"
#include "attention_bwd_tc_kernel.cuh"
#include "attention_launch.cuh"
#include "gmod/message.h"

namespace gmod::attn {

template <typename T, int kHeadDim>
void run_attn_bwd(const AttnBwdParams& params, bool deterministic, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(params.B) * params.Cq * params.Hq;
  launch_attn_kernel(gmod_attn_bwd_preprocess_kernel<T, kHeadDim>, dim3(ceil_div_host(rows, kNThreads / 32)), 0,
                     stream, params, "the backward preprocess kernel");
  const int kv_parts = params.Hk * (params.group / params.heads_per_cta);
  GMOD_CHECK(!deterministic || params.heads_per_cta == params.group,
              "gmod.attention_backward: deterministic mode sums a GQA group in one CTA");
#ifdef GMOD_WITH_SM90A
  if constexpr (!std::is_same_v<T, float> && wgmma_fwd_supports_head_dim(kHeadDim)) {
    if (params.use_tensor_cores && params.bwd_wgmma && !deterministic)
      return run_attn_bwd_dkdv_wgmma<T, kHeadDim>(params, stream);
  }
#endif
  if constexpr (!std::is_same_v<T, float> && kTcBwdHeadDim<kHeadDim>) {
    if (params.use_tensor_cores) {
      // attention_api.cu (attention_backward_cuda) picks heads_per_cta from the key tile set here.
      static_assert(TcBwdTile<kHeadDim>::kBlockN == kTcBwdBlockN && TcBwdWideTile<kHeadDim>::kBlockN == kTcBwdWideBlockN &&
                        tc_bwd_supports_head_dim(kHeadDim),
                    "attention_api.cu sizes heads_per_cta with kTcBwdBlockN / tc_bwd_supports_head_dim");
      auto launch_dkdv = [&](auto traits) {
        using Tr = decltype(traits);
        const dim3 grid_dkdv(ceil_div_host(params.Ck, Tr::kBlockN), kv_parts, params.B);
        if (deterministic)
          launch_attn_kernel(gmod_attn_bwd_dkdv_tc_kernel<Tr, T, /*kAtomicDq=*/false>, grid_dkdv,
                             tc_bwd_dkdv_smem_bytes<Tr>(), stream, params, "the tensor-core backward dk/dv kernel",
                             Tr::kThreads);
        else
          launch_attn_kernel(gmod_attn_bwd_dkdv_tc_kernel<Tr, T, /*kAtomicDq=*/true>, grid_dkdv,
                             tc_bwd_dkdv_smem_bytes<Tr>(), stream, params, "the tensor-core backward dk/dv kernel",
                             Tr::kThreads);
      };
      if (params.tc_bwd_block_n == kTcBwdWideBlockN)
        launch_dkdv(TcBwdWideTile<kHeadDim>{});
      else
        launch_dkdv(TcBwdTile<kHeadDim>{});
      if (deterministic) {
        using Tq = TcBwdTile<kHeadDim>;
        launch_attn_kernel(gmod_attn_bwd_dq_tc_kernel<Tq, T>,
                           dim3(ceil_div_host(params.Cq, Tq::kDqBlockM), params.Hq, params.B),
                           tc_bwd_dq_smem_bytes<Tq>(), stream, params, "the tensor-core backward dq kernel");
      }
      return;
    }
  }
  using Tr = BwdTraits<kHeadDim>;
  const dim3 grid_dkdv(ceil_div_host(params.Ck, Tr::kBlockN), kv_parts, params.B);
  if (deterministic) {
    launch_attn_kernel(gmod_attn_bwd_dkdv_kernel<Tr, T, /*kAtomicDq=*/false>, grid_dkdv, bwd_dkdv_smem_bytes<Tr>(),
                       stream, params, "the backward dk/dv kernel");
    launch_attn_kernel(gmod_attn_bwd_dq_kernel<Tr, T>, dim3(ceil_div_host(params.Cq, Tr::kBlockM), params.Hq, params.B),
                       bwd_dq_smem_bytes<Tr>(), stream, params, "the backward dq kernel");
  } else {
    launch_attn_kernel(gmod_attn_bwd_dkdv_kernel<Tr, T, /*kAtomicDq=*/true>, grid_dkdv, bwd_dkdv_smem_bytes<Tr>(),
                       stream, params, "the backward dk/dv kernel");
  }
}

#define GMOD_INSTANTIATE_BWD(T)                                                          \
  template void run_attn_bwd<T, 32>(const AttnBwdParams&, bool, cudaStream_t);          \
  template void run_attn_bwd<T, 64>(const AttnBwdParams&, bool, cudaStream_t);          \
  template void run_attn_bwd<T, 96>(const AttnBwdParams&, bool, cudaStream_t);          \
  template void run_attn_bwd<T, 128>(const AttnBwdParams&, bool, cudaStream_t);         \
  template void run_attn_bwd<T, 256>(const AttnBwdParams&, bool, cudaStream_t);

GMOD_INSTANTIATE_BWD(float)
GMOD_INSTANTIATE_BWD(__half)
GMOD_INSTANTIATE_BWD(__nv_bfloat16)

}  // namespace gmod::attn
