// Launcher of the decode / short-chunk forward (Cq <= kDecodeMaxCq): the forward kernel with the q heads
// of a GQA group packed into the tile rows, so that a kv head's keys are read once per group; with
// params.num_splits > 1 the keys are split across CTAs (flash-decoding: grid = (packed tiles, Hk,
// B * splits)) and gmod_attn_decode_combine_kernel (attention_combine_kernel.cuh) merges the fp32
// partials (one CTA per output row); with params.decode_pdl (GMOD_ATTN_PDL=1) it is launched with
// programmatic dependent launch, so its CTAs start as the split kernel's last ones finish their loads.
//   tensor cores (bf16 / fp16 on sm_80+): gmod_attn_fwd_tc_kernel, TcDecodeTile<d> (64 rows x 64 keys),
//     or TcDecodeKeySplitTile<d> (16 rows x 64 keys split over the warps) for <= 16 packed rows, d <= 128,
//     TcDecodeKeySplitDeepTile<d> (the same with 3 K / V buffers) there with params.decode_stages == 3;
//   SIMT: gmod_attn_fwd_kernel, DecodeTraits<d> (16 rows x 32 keys).
// attention_api.cu sizes num_splits with the same plan (decode_block_m / decode_block_n) and the split
// kernel's occupancy (decode_split_ctas_per_sm).
#include <type_traits>

#include "attention_combine_kernel.cuh"
#include "attention_fwd_kernel.cuh"
#include "attention_fwd_tc_kernel.cuh"
#include "attention_launch.cuh"
#include "gmod/message.h"

namespace gmod::attn {

// Calls f(kernel_plain, kernel_split, block_m, smem_bytes) with the kernels of the decode plan for
// these params (the tile choice is made here only, for the launch and for the occupancy query).
template <typename T, int kHeadDim, typename F>
void with_decode_kernels(const AttnFwdParams& params, F&& f) {
  if constexpr (!std::is_same_v<T, float>) {
    if (params.use_tensor_cores) {
      if constexpr (kHeadDim <= 128) {
        if (decode_key_split(true, kHeadDim, static_cast<int64_t>(params.Cq) * params.group)) {
          // Where a block may not have the deep tile's shared memory (109 KB at d = 128 on a 99 KB GPU),
          // the double-buffered tile runs.
          constexpr int kDeepSmem = tc_fwd_smem_bytes<TcDecodeKeySplitDeepTile<kHeadDim>>();
          if (params.decode_stages == 3 && kDeepSmem <= smem_optin_bytes()) {
            using Tr = TcDecodeKeySplitDeepTile<kHeadDim>;
            f(gmod_attn_fwd_tc_kernel<Tr, T, true, false>, gmod_attn_fwd_tc_kernel<Tr, T, true, true>, Tr::kBlockM,
              tc_fwd_smem_bytes<Tr>());
            return;
          }
          using Tr = TcDecodeKeySplitTile<kHeadDim>;
          f(gmod_attn_fwd_tc_kernel<Tr, T, true, false>, gmod_attn_fwd_tc_kernel<Tr, T, true, true>, Tr::kBlockM,
            tc_fwd_smem_bytes<Tr>());
          return;
        }
      }
      using Tr = TcDecodeTile<kHeadDim>;
      f(gmod_attn_fwd_tc_kernel<Tr, T, true, false>, gmod_attn_fwd_tc_kernel<Tr, T, true, true>, Tr::kBlockM,
        tc_fwd_smem_bytes<Tr>());
      return;
    }
  }
  using Tr = DecodeTraits<kHeadDim>;
  f(gmod_attn_fwd_kernel<Tr, T, true, false>, gmod_attn_fwd_kernel<Tr, T, true, true>, Tr::kBlockM,
    fwd_smem_bytes<Tr>());
}

template <typename T, int kHeadDim>
int decode_split_ctas_per_sm(const AttnFwdParams& params) {
  int ctas = 1;
  with_decode_kernels<T, kHeadDim>(params, [&](auto, auto kernel_split, int, int smem_bytes) {
    ctas = attn_kernel_ctas_per_sm(kernel_split, smem_bytes);
  });
  return ctas;
}

template <typename T, int kHeadDim>
void run_attn_decode(const AttnFwdParams& params, cudaStream_t stream) {
  const bool split = params.num_splits > 1;
  GMOD_CHECK(!split || (params.o_part != nullptr && params.lse_part != nullptr),
              "gmod.attention: split-k buffers missing");
  with_decode_kernels<T, kHeadDim>(params, [&](auto kernel_plain, auto kernel_split, int block_m, int smem_bytes) {
    const int m_blocks = ceil_div_host(static_cast<int64_t>(params.Cq) * params.group, block_m);
    if (!split) {
      launch_attn_kernel(kernel_plain, dim3(m_blocks, params.Hk, params.B), smem_bytes, stream, params,
                         "the decode kernel");
    } else {
      launch_attn_kernel(kernel_split, dim3(m_blocks, params.Hk, params.B * params.num_splits), smem_bytes, stream,
                         params, "the split-k decode kernel");
    }
  });
  if (split) {
    const int64_t rows = static_cast<int64_t>(params.B) * params.Cq * params.Hq;
    launch_attn_kernel(gmod_attn_decode_combine_kernel<T, kHeadDim>, dim3(decode_combine_grid(rows)),
                       decode_combine_smem_bytes<kHeadDim>(), stream, params, "the split-k combine kernel",
                       kCombineThreads, params.decode_pdl != 0);
  }
}

#define GMOD_INSTANTIATE_DECODE(T)                                                   \
  template void run_attn_decode<T, 32>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_decode<T, 64>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_decode<T, 96>(const AttnFwdParams&, cudaStream_t);         \
  template void run_attn_decode<T, 128>(const AttnFwdParams&, cudaStream_t);        \
  template void run_attn_decode<T, 256>(const AttnFwdParams&, cudaStream_t);        \
  template int decode_split_ctas_per_sm<T, 32>(const AttnFwdParams&);               \
  template int decode_split_ctas_per_sm<T, 64>(const AttnFwdParams&);               \
  template int decode_split_ctas_per_sm<T, 96>(const AttnFwdParams&);               \
  template int decode_split_ctas_per_sm<T, 128>(const AttnFwdParams&);              \
  template int decode_split_ctas_per_sm<T, 256>(const AttnFwdParams&);

GMOD_INSTANTIATE_DECODE(float)
GMOD_INSTANTIATE_DECODE(__half)
GMOD_INSTANTIATE_DECODE(__nv_bfloat16)

}  // namespace gmod::attn
