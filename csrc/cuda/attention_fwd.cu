// Launcher of the prefill / training forward (no GQA packing, no key splits): grid = (query tiles, Hq, B),
// 128 threads.
//   tensor cores (bf16 / fp16 on sm_80+): gmod_attn_fwd_tc_kernel, tiles TcFwdTile<d>
//                                          (128 x 64 for d <= 128, 64 x 32 for d = 256), or
//                                          TcFwdNarrowTile128 (128 x 32) at d = 128 when
//                                          GMOD_ATTN_FWD_BLOCK_N=32;
//   SIMT (float32, older GPUs, GMOD_ATTN_SIMT=1): gmod_attn_fwd_kernel, tiles FwdTile<d>;
//   wgmma (sm_90a, d = 64 / 128, GMOD_ATTN_FWD_IMPL=wgmma): run_attn_fwd_wgmma (sm90a/attention_fwd_wgmma.cu).
#include <type_traits>

#include "attention_fwd_kernel.cuh"
#include "attention_fwd_tc_kernel.cuh"
#include "attention_launch.cuh"

namespace gmod::attn {

// The tensor-core prefill forward on tile plan Tr. scale > 0 (every real model): the scale is folded
// into the exponent's FFMA where the plan has the registers for it (Tr::kFoldScale).
template <typename Tr, typename T>
void launch_tc_prefill(const AttnFwdParams& params, cudaStream_t stream) {
  const dim3 grid(ceil_div_host(params.Cq, Tr::kBlockM), params.Hq, params.B);
  if constexpr (Tr::kFoldScale) {
    if (params.scale_log2 > 0.f) {
      launch_attn_kernel(gmod_attn_fwd_tc_kernel<Tr, T, /*kPackGQA=*/false, /*kSplit=*/false, /*kPosScale=*/true>,
                         grid, tc_fwd_smem_bytes<Tr>(), stream, params, "the tensor-core forward kernel");
      return;
    }
  }
  launch_attn_kernel(gmod_attn_fwd_tc_kernel<Tr, T, /*kPackGQA=*/false, /*kSplit=*/false>, grid,
                     tc_fwd_smem_bytes<Tr>(), stream, params, "the tensor-core forward kernel");
}

template <typename T, int kHeadDim>
void run_attn_fwd(const AttnFwdParams& params, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
#ifdef GMOD_WITH_SM90A
    if constexpr (wgmma_fwd_supports_head_dim(kHeadDim)) {
      if (params.use_tensor_cores && params.fwd_wgmma) return run_attn_fwd_wgmma<T, kHeadDim>(params, stream);
    }
#endif
    if (params.use_tensor_cores) {
      if constexpr (kHeadDim == 128) {
        if (params.tc_fwd_block_n == 32) return launch_tc_prefill<TcFwdNarrowTile128, T>(params, stream);
      }
      return launch_tc_prefill<TcFwdTile<kHeadDim>, T>(params, stream);
    }
  }
  using Tr = FwdTraits<kHeadDim>;
  const dim3 grid(ceil_div_host(params.Cq, Tr::kBlockM), params.Hq, params.B);
  launch_attn_kernel(gmod_attn_fwd_kernel<Tr, T, /*kPackGQA=*/false, /*kSplit=*/false>, grid,
                     fwd_smem_bytes<Tr>(), stream, params, "the forward kernel");
}

#define GMOD_INSTANTIATE_FWD(T)                                                    \
  template void run_attn_fwd<T, 32>(const AttnFwdParams&, cudaStream_t);          \
  template void run_attn_fwd<T, 64>(const AttnFwdParams&, cudaStream_t);          \
  template void run_attn_fwd<T, 96>(const AttnFwdParams&, cudaStream_t);          \
  template void run_attn_fwd<T, 128>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_fwd<T, 256>(const AttnFwdParams&, cudaStream_t);

GMOD_INSTANTIATE_FWD(float)
GMOD_INSTANTIATE_FWD(__half)
GMOD_INSTANTIATE_FWD(__nv_bfloat16)

}  // namespace gmod::attn
