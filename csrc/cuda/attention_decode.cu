// Launcher of the decode / short-chunk forward (Cq <= kDecodeMaxCq): gmod_attn_fwd_kernel with the q
// heads of a GQA group packed into the tile rows (tile 16 rows x 32 keys), so that a kv head's keys
// are read once per group; with params.num_splits > 1 the keys are split across CTAs
// (flash-decoding: grid = (packed tiles, Hk, B * splits)) and gmod_attn_decode_combine_kernel merges
// the fp32 partials (one warp per output row).
#include "attention_fwd_kernel.cuh"
#include "attention_launch.cuh"

namespace gmod::attn {

template <typename T, int kHeadDim>
void run_attn_decode(const AttnFwdParams& params, cudaStream_t stream) {
  using Tr = DecodeTraits<kHeadDim>;
  const int m_blocks = ceil_div_host(static_cast<int64_t>(params.Cq) * params.group, Tr::kBlockM);
  if (params.num_splits <= 1) {
    launch_attn_kernel(gmod_attn_fwd_kernel<Tr, T, /*kPackGQA=*/true, /*kSplit=*/false>,
                       dim3(m_blocks, params.Hk, params.B), fwd_smem_bytes<Tr>(), stream, params,
                       "the decode kernel");
    return;
  }
  TORCH_CHECK(params.o_part != nullptr && params.lse_part != nullptr, "gmod.attention: split-k buffers missing");
  launch_attn_kernel(gmod_attn_fwd_kernel<Tr, T, /*kPackGQA=*/true, /*kSplit=*/true>,
                     dim3(m_blocks, params.Hk, params.B * params.num_splits), fwd_smem_bytes<Tr>(), stream,
                     params, "the split-k decode kernel");
  const int64_t rows = static_cast<int64_t>(params.B) * params.Cq * params.Hq;
  launch_attn_kernel(gmod_attn_decode_combine_kernel<T, kHeadDim>,
                     dim3(ceil_div_host(rows, kNThreads / 32)), 0, stream, params, "the split-k combine kernel");
}

#define GMOD_INSTANTIATE_DECODE(T)                                                   \
  template void run_attn_decode<T, 32>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_decode<T, 64>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_decode<T, 96>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_decode<T, 128>(const AttnFwdParams&, cudaStream_t);        \
  template void run_attn_decode<T, 256>(const AttnFwdParams&, cudaStream_t);

GMOD_INSTANTIATE_DECODE(float)
GMOD_INSTANTIATE_DECODE(__half)
GMOD_INSTANTIATE_DECODE(__nv_bfloat16)

}  // namespace gmod::attn
