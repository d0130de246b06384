// Runtime value -> compile-time constant switches for the CUDA kernels (flash-attention's
// static_switch.h pattern). Each macro runs the lambda given as its last argument with a constexpr
// name in scope:
//   GMOD_BOOL_SWITCH(cond, kFlag, [&] { launch<kFlag>(); });
//   GMOD_HEADDIM_SWITCH(d, "attention", [&] { launch<kHeadDim>(); });
//   GMOD_ATTN_DTYPE_SWITCH(q.scalar_type(), "attention", [&] { launch<elem_t>(); });
// elem_t is the CUDA storage type: float, __half or __nv_bfloat16.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gmod/attention_params.h"
#include "gmod/message.h"

#define GMOD_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// The head dims listed in GMOD_ATTN_HEADDIMS_STR (attention_params.h). Anything else raises a
// ValueError naming d and the supported list.
#define GMOD_HEADDIM_SWITCH(HEADDIM, OP_NAME, ...)                                                        \
  [&] {                                                                                                  \
    switch (HEADDIM) {                                                                                   \
      case 32: {                                                                                         \
        constexpr static int kHeadDim = 32;                                                              \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case 64: {                                                                                         \
        constexpr static int kHeadDim = 64;                                                              \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case 96: {                                                                                         \
        constexpr static int kHeadDim = 96;                                                              \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case 128: {                                                                                        \
        constexpr static int kHeadDim = 128;                                                             \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      case 256: {                                                                                        \
        constexpr static int kHeadDim = 256;                                                             \
        return __VA_ARGS__();                                                                            \
      }                                                                                                  \
      default:                                                                                           \
        GMOD_CHECK_VALUE(false, "gmod.", OP_NAME, ": head dim d = ", HEADDIM,                           \
                          " is not supported by the CUDA kernels; supported: " GMOD_ATTN_HEADDIMS_STR); \
    }                                                                                                    \
  }()

#define GMOD_ATTN_DTYPE_SWITCH(DTYPE, OP_NAME, ...)                                                   \
  [&] {                                                                                              \
    const auto _gmod_dt = (DTYPE);                                                                   \
    if (_gmod_dt == at::kBFloat16) {                                                                 \
      using elem_t = __nv_bfloat16;                                                                  \
      return __VA_ARGS__();                                                                          \
    } else if (_gmod_dt == at::kHalf) {                                                              \
      using elem_t = __half;                                                                         \
      return __VA_ARGS__();                                                                          \
    } else if (_gmod_dt == at::kFloat) {                                                             \
      using elem_t = float;                                                                          \
      return __VA_ARGS__();                                                                          \
    } else {                                                                                         \
      GMOD_CHECK_TYPE(false, "gmod.", OP_NAME, ": the CUDA kernels support float32, bfloat16 and ", \
                       "float16 inputs, got ", _gmod_dt);                                            \
    }                                                                                                \
  }()
