// Launcher of the Hopper wgmma prefill forward (gmod_attn_fwd_wgmma_kernel, attention_fwd_wgmma_kernel.cuh):
// grid = (query tiles of 128, Hq, B), 256 threads; shared memory with 3 K / V stages (the default) 225 KB
// at d = 128 / 113 KB at d = 64, with 2 stages 161 / 81 KB.
// This file is compiled for sm_90a only (csrc/cuda/sm90a/CMakeLists.txt: wgmma has no sm_90 or sm_80
// encoding), and attention_api.cu sends work here only on a compute capability 9.0 GPU.
#include "../attention_fwd_wgmma_kernel.cuh"
#include "../attention_launch.cuh"

namespace gmod::attn {

template <typename Tr, typename T>
void launch_wgmma(const AttnFwdParams& params, cudaStream_t stream) {
  const dim3 grid(ceil_div_host(params.Cq, Tr::kBlockM), params.Hq, params.B);
  if (params.scale_log2 > 0.f)
    launch_attn_kernel(gmod_attn_fwd_wgmma_kernel<Tr, T, /*kPosScale=*/true>, grid, Tr::kSmemBytes, stream, params,
                       "the wgmma forward kernel", Tr::kThreads);
  else
    launch_attn_kernel(gmod_attn_fwd_wgmma_kernel<Tr, T, /*kPosScale=*/false>, grid, Tr::kSmemBytes, stream, params,
                       "the wgmma forward kernel", Tr::kThreads);
}

// params.fwd_wgmma: the K / V stages, 3 (P V left running across the barrier) or 2 (waited in place).
template <typename T, int kHeadDim>
void run_attn_fwd_wgmma(const AttnFwdParams& params, cudaStream_t stream) {
  if (params.fwd_wgmma == 2) return launch_wgmma<WgmmaFwdTraits<kHeadDim, 2>, T>(params, stream);
  launch_wgmma<WgmmaFwdTraits<kHeadDim, 3>, T>(params, stream);
}

template void run_attn_fwd_wgmma<__half, 64>(const AttnFwdParams&, cudaStream_t);
template void run_attn_fwd_wgmma<__half, 128>(const AttnFwdParams&, cudaStream_t);
template void run_attn_fwd_wgmma<__nv_bfloat16, 64>(const AttnFwdParams&, cudaStream_t);
template void run_attn_fwd_wgmma<__nv_bfloat16, 128>(const AttnFwdParams&, cudaStream_t);

}  // namespace gmod::attn
