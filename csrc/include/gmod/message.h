// Error messages built without iostream: GMOD_CHECK* format their arguments into one std::string
// here and hand TORCH_CHECK* that single string (which c10::str passes through untouched).
//
// Why: TORCH_CHECK's own formatting instantiates std::ostringstream / ostream::_M_insert<long>
// inside whichever library calls it. On the H100 machine's first build (g++ 13.3, nvcc 13.0,
// torch 2.11) every gmod error message that formatted an integer segfaulted inside such an instance
// in libgmod_ext.so, while messages made only of strings worked. Formatting with std::to_string /
// snprintf keeps our error paths off iostream whatever the toolchain does with those instances.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace gmod::detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  s += buf;
}
inline void append(std::string& s, float v) { append(s, static_cast<double>(v)); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {  // shapes and strides, as torch prints them
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace gmod::detail

// The TORCH_CHECK family with iostream-free messages (same exception types: RuntimeError,
// ValueError, TypeError, IndexError in Python).
#define GMOD_CHECK(cond, ...) TORCH_CHECK(cond, ::gmod::detail::message(__VA_ARGS__))
#define GMOD_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::gmod::detail::message(__VA_ARGS__))
#define GMOD_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::gmod::detail::message(__VA_ARGS__))
#define GMOD_CHECK_INDEX(cond, ...) TORCH_CHECK_INDEX(cond, ::gmod::detail::message(__VA_ARGS__))
