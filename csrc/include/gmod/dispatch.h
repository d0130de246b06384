// dtype dispatch for activations. Inside the body, `scalar_t` is the storage type and
// `acc_t` the accumulation type (float for fp32/bf16/fp16, double for fp64).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#define GMOD_DISPATCH_FLOATING(TYPE, NAME, ...)                                     \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, [&] {       \
    using acc_t = at::opmath_type<scalar_t>;                                        \
    __VA_ARGS__();                                                                  \
  })
