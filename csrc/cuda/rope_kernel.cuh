// The CUDA kernel of gmod.rope and its backward, apart from the launcher (csrc/cuda/rope.cu) so that it
// compiles as plain C++ under the host emulation too (csrc/cuda/emu/rope_emu_test.cpp checks its indexing:
// the vector widths, the pairs, the copied tail). No torch headers here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gmod/rope_pair.h"

namespace gmod::rope {

constexpr int kThreads = 256;

// N elements of T in one aligned load / store.
template <typename T, int N>
struct alignas(sizeof(T) * N) RopeVec {
  T v[N];
};

// Work item t of a row n: t < half / V rotates the pairs at j = t V; the rest copy the tail (r + ...).
template <typename scalar_t, typename acc_t, int V, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    gmod_rope_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ cos,
                     const scalar_t* __restrict__ sin, scalar_t* __restrict__ y, int64_t rows, int64_t H, int64_t d,
                     int64_t r) {
  using Vt = RopeVec<scalar_t, V>;
  const int64_t half = r / 2, pair_items = half / V, per_row = pair_items + (d - r) / V;
  const int64_t total = rows * per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; t < total; t += stride) {
    const int64_t n = t / per_row, k = t - n * per_row;
    const scalar_t* xr = x + n * d;
    scalar_t* yr = y + n * d;
    if (k < pair_items) {
      const int64_t j = k * V, tok = n / H;
      const Vt lo = *reinterpret_cast<const Vt*>(xr + j), hi = *reinterpret_cast<const Vt*>(xr + j + half);
      const Vt c_lo = *reinterpret_cast<const Vt*>(cos + tok * r + j);
      const Vt c_hi = *reinterpret_cast<const Vt*>(cos + tok * r + j + half);
      const Vt s_lo = *reinterpret_cast<const Vt*>(sin + tok * r + j);
      const Vt s_hi = *reinterpret_cast<const Vt*>(sin + tok * r + j + half);
      Vt out_lo, out_hi;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        acc_t a, b;
        rope_pair<kBackward, acc_t>(static_cast<acc_t>(lo.v[i]), static_cast<acc_t>(hi.v[i]),
                                    static_cast<acc_t>(c_lo.v[i]), static_cast<acc_t>(c_hi.v[i]),
                                    static_cast<acc_t>(s_lo.v[i]), static_cast<acc_t>(s_hi.v[i]), a, b);
        out_lo.v[i] = static_cast<scalar_t>(a);
        out_hi.v[i] = static_cast<scalar_t>(b);
      }
      *reinterpret_cast<Vt*>(yr + j) = out_lo;
      *reinterpret_cast<Vt*>(yr + j + half) = out_hi;
    } else {
      const int64_t j = r + (k - pair_items) * V;
      *reinterpret_cast<Vt*>(yr + j) = *reinterpret_cast<const Vt*>(xr + j);
    }
  }
}

}  // namespace gmod::rope
