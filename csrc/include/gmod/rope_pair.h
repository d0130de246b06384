// The arithmetic of gmod.rope on one pair of dims (j, j + r/2), shared by the CPU loop
// (csrc/cpu/rope.cpp) and the CUDA kernel (csrc/cuda/rope.cu), so the CPU tests check the formula
// both run. RoPE in the rotate-half layout (Llama's): with lo = x[j], hi = x[j + r/2],
//   forward:  y_lo = lo cos_lo - hi sin_lo,   y_hi = hi cos_hi + lo sin_hi
//   backward (the transpose, on the output's gradient g):
//             gx_lo = g_lo cos_lo + g_hi sin_hi,   gx_hi = g_hi cos_hi - g_lo sin_lo
// cos / sin are read at both halves, so tables whose halves differ are rotated as written.
#pragma once

#if defined(__CUDACC__)
#define GMOD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GMOD_HOST_DEVICE inline
#endif

namespace gmod {

template <bool kBackward, typename acc_t>
GMOD_HOST_DEVICE void rope_pair(acc_t lo, acc_t hi, acc_t cos_lo, acc_t cos_hi, acc_t sin_lo, acc_t sin_hi,
                                acc_t& out_lo, acc_t& out_hi) {
  if (kBackward) {
    out_lo = lo * cos_lo + hi * sin_hi;
    out_hi = hi * cos_hi - lo * sin_lo;
  } else {
    out_lo = lo * cos_lo - hi * sin_lo;
    out_hi = hi * cos_hi + lo * sin_hi;
  }
}

}  // namespace gmod
