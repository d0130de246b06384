// Launcher of the prefill / training forward (gmod_attn_fwd_kernel without GQA packing or splits):
// grid = (query tiles, Hq, B), 128 threads, tiles of FwdTile<d> (64 x 64 for d <= 64, 64 x 32 for
// d = 96/128, 32 x 32 for d = 256).
#include "attention_fwd_kernel.cuh"
#include "attention_launch.cuh"

namespace gmod::attn {

template <typename T, int kHeadDim>
void run_attn_fwd(const AttnFwdParams& params, cudaStream_t stream) {
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
