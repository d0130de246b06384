// Launcher of the Hopper wgmma backward dk/dv kernel (gmod_attn_bwd_dkdv_wgmma_kernel,
// attention_bwd_wgmma_kernel.cuh): grid = (key tiles of 128, Hk x parts of a GQA group, B), 256 threads,
// shared memory 146 KB at d = 128 / 82 KB at d = 64. Called by run_attn_bwd (attention_bwd.cu) after
// the Delta preprocess, on the non-deterministic path (dQ atomically added into dq_accum).
// This file is compiled for sm_90a only (csrc/cuda/sm90a/CMakeLists.txt), and attention_api.cu sends
// work here only on a compute capability 9.0 GPU (GMOD_ATTN_BWD_IMPL=wgmma).
#include "../attention_bwd_wgmma_kernel.cuh"
#include "../attention_launch.cuh"

namespace gmod::attn {

template <typename T, int kHeadDim>
void run_attn_bwd_dkdv_wgmma(const AttnBwdParams& params, cudaStream_t stream) {
  using Tr = WgmmaBwdTraits<kHeadDim>;
  static_assert(Tr::kBlockN == kTcBwdWideBlockN, "attention_api.cu sizes heads_per_cta with kTcBwdWideBlockN keys");
  const dim3 grid(ceil_div_host(params.Ck, Tr::kBlockN), params.Hk * (params.group / params.heads_per_cta), params.B);
  launch_attn_kernel(gmod_attn_bwd_dkdv_wgmma_kernel<Tr, T>, grid, Tr::kSmemBytes, stream, params,
                     "the wgmma backward dk/dv kernel", Tr::kThreads);
}

template void run_attn_bwd_dkdv_wgmma<__half, 64>(const AttnBwdParams&, cudaStream_t);
template void run_attn_bwd_dkdv_wgmma<__half, 128>(const AttnBwdParams&, cudaStream_t);
template void run_attn_bwd_dkdv_wgmma<__nv_bfloat16, 64>(const AttnBwdParams&, cudaStream_t);
template void run_attn_bwd_dkdv_wgmma<__nv_bfloat16, 128>(const AttnBwdParams&, cudaStream_t);

}  // namespace gmod::attn
