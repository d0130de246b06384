// Launcher of the prefill / training forward (no GQA packing, no key splits): grid = (query tiles, Hq, B),
// 128 threads.
//   tensor cores (bf16 / fp16 on sm_80+): gmod_attn_fwd_tc_kernel, tiles TcFwdTile<d>
//                                          (128 x 64 for d <= 128, 64 x 32 for d = 256), or
//                                          TcFwdNarrowTile128 (128 x 32) at d = 128 when
//                                          GMOD_ATTN_FWD_BLOCK_N=32;
//   SIMT (float32, older GPUs, GMOD_ATTN_SIMT=1): gmod_attn_fwd_kernel, tiles FwdTile<d>.
#include <type_traits>

#include "attention_fwd_kernel.cuh"
#include "attention_fwd_tc_kernel.cuh"
#include "attention_launch.cuh"

namespace gmod::attn {

template <typename T, int kHeadDim>
void run_attn_fwd(const AttnFwdParams& params, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (params.use_tensor_cores) {
      if constexpr (kHeadDim == 128) {
        if (params.tc_fwd_block_n == 32) {  // 128 x 32 tiles; positive scale folded in as below
          using Tr = TcFwdNarrowTile128;
          const dim3 grid(ceil_div_host(params.Cq, Tr::kBlockM), params.Hq, params.B);
          if (params.scale_log2 > 0.f)
            launch_attn_kernel(gmod_attn_fwd_tc_kernel<Tr, T, false, false, /*kPosScale=*/true>, grid,
                               tc_fwd_smem_bytes<Tr>(), stream, params, "the tensor-core forward kernel");
          else
            launch_attn_kernel(gmod_attn_fwd_tc_kernel<Tr, T, false, false>, grid, tc_fwd_smem_bytes<Tr>(), stream,
                               params, "the tensor-core forward kernel");
          return;
        }
      }
      using Tr = TcFwdTile<kHeadDim>;
      const dim3 grid(ceil_div_host(params.Cq, Tr::kBlockM), params.Hq, params.B);
      // scale > 0 (every real model): the scale is folded into the exponent's FFMA. Not at d = 128 / 256,
      // where the kernel sits at 255 registers and this variant spilled (ptxas, sm_90).
      if constexpr (kHeadDim <= 96) {
        if (params.scale_log2 > 0.f) {
          launch_attn_kernel(gmod_attn_fwd_tc_kernel<Tr, T, /*kPackGQA=*/false, /*kSplit=*/false, /*kPosScale=*/true>,
                             grid, tc_fwd_smem_bytes<Tr>(), stream, params, "the tensor-core forward kernel");
          return;
        }
      }
      launch_attn_kernel(gmod_attn_fwd_tc_kernel<Tr, T, /*kPackGQA=*/false, /*kSplit=*/false>, grid,
                         tc_fwd_smem_bytes<Tr>(), stream, params, "the tensor-core forward kernel");
      return;
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
