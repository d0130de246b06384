// Every gmod op schema, in one place. Kernels register themselves from their own files:
// csrc/cpu/*.cpp for the CPU key, csrc/cuda/*.cu for the CUDA key (left out of CPU-only builds).
// Fake (meta) kernels and autograd live in gmod_ext/_registry.py; the Python wrappers in gmod_ext/ops.py.
//
// Conventions (see README "Op reference"):
//   B batch, S sequence, D hidden, C capacity, H heads, d head dim.
//   Index tensors (idx, count, num_routed, q_len, k_len, cache_len, new_len) are int32.
//   Activations are float32 / bfloat16 / float16 (float64 too on CPU, for gradcheck);
//   accumulation is float32 (float64 for float64 inputs).
//   Backward ops return an empty tensor for a gradient whose input was absent (None).
#include <torch/library.h>
#include <torch/version.h>

#include <string>

namespace gmod {

static std::string build_info() {
  std::string s = "torch=" TORCH_VERSION;
#ifdef GMOD_WITH_CUDA
  s += ";cuda=1";
#else
  s += ";cuda=0";
#endif
#ifdef GMOD_WITH_SM90A
  s += ";sm90a=1";  // the wgmma kernels (csrc/cuda/sm90a/) are in
#else
  s += ";sm90a=0";
#endif
  return s;
}

TORCH_LIBRARY(gmod, m) {
  // Fused RMSNorm + router projection: logit[b,s] = sum_j rms(x[b,s])_j * norm_weight_j * weight_j.
  m.def("router_logits(Tensor x, Tensor weight, Tensor? norm_weight, float eps) -> Tensor");
  m.def(
      "router_logits_backward(Tensor grad, Tensor x, Tensor weight, Tensor? norm_weight, float eps)"
      " -> (Tensor, Tensor, Tensor)");

  // Token selection: forced (mask 1) + the num_routed[b] best routable (mask 0) tokens, ascending.
  m.def(
      "route(Tensor scores, Tensor mask, Tensor num_routed, int capacity, float? threshold=None)"
      " -> (Tensor, Tensor)");

  // [B,S,D] -> [B,C,D] compaction of the selected rows; rows past count are zero.
  m.def("gather_rows(Tensor x, Tensor idx, Tensor count) -> Tensor");
  m.def("gather_rows_backward(Tensor grad, Tensor idx, Tensor count, int seq_len) -> Tensor");

  // [B,C,D] -> [B,S,D]: kept rows get base + gate*delta, the others x (or skip_scale*x).
  m.def(
      "scatter_merge(Tensor x, Tensor base, Tensor? delta, Tensor? gate, Tensor idx, Tensor count,"
      " Tensor? skip_scale) -> Tensor");
  m.def(
      "scatter_merge_backward(Tensor grad, Tensor x, Tensor base, Tensor? delta, Tensor? gate,"
      " Tensor idx, Tensor count, Tensor? skip_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Causal attention over per-row lengths, bottom-right aligned, GQA. Returns (o, lse[B,Hq,Cq]).
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor q_len, Tensor k_len, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_backward(Tensor grad_o, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse,"
      " Tensor q_len, Tensor k_len, float scale) -> (Tensor, Tensor, Tensor)");

  // Compact KV cache: append new_len[b] rows of k_new/v_new at cache_len[b], then cache_len += new_len.
  m.def(
      "kv_cache_append(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!) cache_len, Tensor k_new,"
      " Tensor v_new, Tensor new_len) -> ()");

  // Rotary position embedding of q or k [B,C,H,d] on the first r dims (rotate-half layout), cos/sin [B,C,r].
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_backward(Tensor grad, Tensor cos, Tensor sin) -> Tensor");

  // What this library was built against (checked by gmod_ext on import).
  m.def("build_info() -> str", &build_info);
}

}  // namespace gmod
