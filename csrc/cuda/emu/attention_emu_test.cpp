// Host emulation of the CUDA attention kernels: compiles attention_fwd_kernel.cuh and
// attention_bwd_kernel.cuh as plain C++ (one std::thread per CUDA thread, std::barrier for
// __syncthreads and warp shuffles, a global array for shared memory, blocks run one after another)
// and compares every output element against a float64 reference of csrc/cpu/attention.cpp's
// semantics. It checks the index math, masking, tile loops, split-k, GQA packing and the backward's
// accumulation without a GPU; it says nothing about speed, and not everything about the device
// memory model. Not part of the CMake build (CMake globs csrc/cuda/*.cu only). Run:
//   g++ -std=c++20 -O2 -pthread -I csrc/include -I /usr/local/cuda/include \
//       csrc/cuda/emu/attention_emu_test.cpp -o /tmp/attn_emu && /tmp/attn_emu
// (add -fsanitize=thread to look for missing __syncthreads; slow). Modes: see main (CI runs ci, wgmma-ci,
// wgmmabwd-ci; GMOD_EMU_TIMES=1 prints each problem's wall time, GMOD_EMU_KERNELS=1 the kernels launched).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"  // first: the CUDA emulation the kernel headers compile against

#include "../attention_bwd_kernel.cuh"
#include "../attention_bwd_tc_kernel.cuh"
#include "../attention_bwd_wgmma_kernel.cuh"
#include "../attention_combine_kernel.cuh"
#include "../attention_fwd_kernel.cuh"
#include "../attention_fwd_tc_kernel.cuh"
#include "../attention_fwd_wgmma_kernel.cuh"

using namespace gmod::attn;

static void launch(dim3 grid, int smem_bytes, const std::function<void()>& kernel) {
  emu::launch(grid, kNThreads, smem_bytes, kernel);
}
// ---------------------------------------------------------------- element types
template <typename T> float to_f(T x);
template <> float to_f(float x) { return x; }
template <> float to_f(__half x) { return __half2float(x); }
template <> float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> T from_f(float x);
template <> float from_f(float x) { return x; }
template <> __half from_f(float x) { return __float2half_rn(x); }
template <> __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "fp32"; }
template <> const char* tname<__half>() { return "fp16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }

// ---------------------------------------------------------------- reference (float64)
struct Problem {
  int B, Cq, Ck, Hq, Hk, d;
  std::vector<int> ql, kl;
  float scale;
};

static int visible(int i, int ql, int kl) { return std::max(0, std::min(kl, kl - ql + i + 1)); }

struct RefOut {
  std::vector<double> o, lse, dq, dk, dv;
};

// q, k, v, dout: the exact values the kernel sees (already rounded to T).
static RefOut reference(const Problem& P, const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v, const std::vector<float>& dout) {
  const int d = P.d, g = P.Hq / P.Hk;
  RefOut r;
  r.o.assign(q.size(), 0.0);
  r.dq.assign(q.size(), 0.0);
  r.dk.assign(k.size(), 0.0);
  r.dv.assign(k.size(), 0.0);
  r.lse.assign(static_cast<size_t>(P.B) * P.Hq * P.Cq, -INFINITY);
  auto qi = [&](int b, int i, int h) { return ((static_cast<size_t>(b) * P.Cq + i) * P.Hq + h) * d; };
  auto kj = [&](int b, int j, int h) { return ((static_cast<size_t>(b) * P.Ck + j) * P.Hk + h) * d; };
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h)
      for (int i = 0; i < P.ql[b]; ++i) {
        const int n = visible(i, P.ql[b], P.kl[b]);
        if (n == 0) continue;
        const int hk = h / g;
        std::vector<double> s(n), p(n);
        double mx = -INFINITY;
        for (int j = 0; j < n; ++j) {
          double dot = 0;
          for (int e = 0; e < d; ++e) dot += double(q[qi(b, i, h) + e]) * k[kj(b, j, hk) + e];
          s[j] = dot * P.scale;
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        for (int j = 0; j < n; ++j) l += std::exp(s[j] - mx);
        const double lse = mx + std::log(l);
        r.lse[(static_cast<size_t>(b) * P.Hq + h) * P.Cq + i] = lse;
        for (int j = 0; j < n; ++j) {
          p[j] = std::exp(s[j] - lse);
          for (int e = 0; e < d; ++e) r.o[qi(b, i, h) + e] += p[j] * v[kj(b, j, hk) + e];
        }
        double delta = 0;
        for (int e = 0; e < d; ++e) delta += double(dout[qi(b, i, h) + e]) * r.o[qi(b, i, h) + e];
        for (int j = 0; j < n; ++j) {
          double dp = 0;
          for (int e = 0; e < d; ++e) dp += double(dout[qi(b, i, h) + e]) * v[kj(b, j, hk) + e];
          const double ds = p[j] * (dp - delta) * P.scale;
          for (int e = 0; e < d; ++e) {
            r.dv[kj(b, j, hk) + e] += p[j] * dout[qi(b, i, h) + e];
            r.dk[kj(b, j, hk) + e] += ds * q[qi(b, i, h) + e];
            r.dq[qi(b, i, h) + e] += ds * k[kj(b, j, hk) + e];
          }
        }
      }
  return r;
}

// ---------------------------------------------------------------- comparisons
static int g_failures = 0;
static int g_wgmma_bwd_runs = 0;  // problems whose backward ran the wgmma dk/dv kernel

template <typename Out>
static bool compare(const char* what, const std::string& tag, const std::vector<Out>& got,
                    const std::vector<double>& ref, double rtol, double atol_scale) {
  double mag = 0;
  for (double x : ref)
    if (std::isfinite(x)) mag = std::max(mag, std::fabs(x));
  const double atol = atol_scale * std::max(mag, 1.0);  // inputs are O(1)
  size_t bad = 0, first = 0;
  double max_err = 0;
  for (size_t t = 0; t < ref.size(); ++t) {
    const double x = to_f(got[t]);
    const double y = ref[t];
    bool ok;
    if (std::isinf(y)) ok = x == y;
    else ok = std::isfinite(x) && std::fabs(x - y) <= atol + rtol * std::fabs(y);
    if (std::isfinite(y) && std::isfinite(x)) max_err = std::max(max_err, std::fabs(x - y));
    if (!ok && bad++ == 0) first = t;
  }
  if (bad) {
    ++g_failures;
    std::printf("FAIL %-4s %s: %zu/%zu bad, first at %zu: got %.6g ref %.6g (max err %.3g, mag %.3g)\n", what,
                tag.c_str(), bad, ref.size(), first, double(to_f(got[first])), ref[first], max_err, mag);
    return false;
  }
  return true;
}

// ---------------------------------------------------------------- one problem through the emulated kernels
struct Options {
  int num_sms = 132;       // decode split heuristic (num_sms x ctas_per_sm resident CTAs)
  int ctas_per_sm = 3;
  int forced_splits = 0;   // > 0: as GMOD_ATTN_DECODE_SPLITS (decode_clamp_splits)
  bool simt = false;       // bf16 / fp16 forward on the SIMT kernels (as GMOD_ATTN_SIMT=1 / pre-sm_80)
  bool deterministic = false;
  int heads_per_cta = -1;  // -1: group
  float scale = 0.f;       // 0: 1 / sqrt(d)
  bool narrow = false;     // d = 128 prefill on TcFwdNarrowTile128 (GMOD_ATTN_FWD_BLOCK_N=32)
  bool wide_bwd = false;   // dk/dv on TcBwdWideTile: 8 warps x 16 keys (GMOD_ATTN_BWD_BLOCK_N=128)
  int wgmma = 0;           // > 0: d = 64 / 128 prefill on the sm_90a wgmma kernel with this many K / V stages
                           // (GMOD_ATTN_FWD_IMPL=wgmma: 3, =wgmma-2stage: 2)
  bool wgmma_bwd = false;  // d = 64 / 128 atomic-dQ backward on the sm_90a wgmma dk/dv kernel (GMOD_ATTN_BWD_IMPL=wgmma)
  bool fwd_only = false;   // skip the backward (the ci set: where other cases run the same backward kernels, which
                           // cost 5-10x the forward in the emulation)
  int decode_stages = 2;   // 3: the key-split tensor-core decode on TcDecodeKeySplitDeepTile (GMOD_ATTN_DECODE_STAGES=3)
  bool ref_fwd = false;    // no forward kernels: the backward from the float64 reference's o / lse (the ci set,
                           // where the same forward kernels run on the same problems elsewhere)
};

static const bool g_times = std::getenv("GMOD_EMU_TIMES") != nullptr;  // print each problem's wall time

template <typename T, int kHeadDim>
static void run_problem(const Problem& P, const Options& opt, std::mt19937& rng) {
  const auto t_start = std::chrono::steady_clock::now();
  const int d = P.d, group = P.Hq / P.Hk;
  const size_t nq = static_cast<size_t>(P.B) * P.Cq * P.Hq * d, nk = static_cast<size_t>(P.B) * P.Ck * P.Hk * d;
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> q(nq), k(nk), v(nk), dout(nq);
  std::vector<float> qf(nq), kf(nk), vf(nk), dof(nq);
  for (size_t t = 0; t < nq; ++t) q[t] = from_f<T>(nd(rng)), qf[t] = to_f(q[t]);
  for (size_t t = 0; t < nk; ++t) k[t] = from_f<T>(nd(rng)), kf[t] = to_f(k[t]);
  for (size_t t = 0; t < nk; ++t) v[t] = from_f<T>(nd(rng)), vf[t] = to_f(v[t]);
  for (size_t t = 0; t < nq; ++t) dout[t] = from_f<T>(nd(rng)), dof[t] = to_f(dout[t]);
  // Poison the padding of k/v/q/dout (rows past k_len / q_len): the kernels must not read it.
  for (int b = 0; b < P.B; ++b) {
    for (int j = P.kl[b]; j < P.Ck; ++j)
      for (int h = 0; h < P.Hk; ++h)
        for (int e = 0; e < d; ++e) {
          const size_t t = ((static_cast<size_t>(b) * P.Ck + j) * P.Hk + h) * d + e;
          k[t] = v[t] = from_f<T>(NAN);
        }
    for (int i = P.ql[b]; i < P.Cq; ++i)
      for (int h = 0; h < P.Hq; ++h)
        for (int e = 0; e < d; ++e) {
          const size_t t = ((static_cast<size_t>(b) * P.Cq + i) * P.Hq + h) * d + e;
          q[t] = dout[t] = from_f<T>(NAN);
        }
  }
  const RefOut ref = reference(P, qf, kf, vf, dof);

  std::vector<T> o(nq, from_f<T>(NAN));
  std::vector<float> lse(static_cast<size_t>(P.B) * P.Hq * P.Cq, NAN);
  AttnBwdParams p;
  std::memset(&p, 0, sizeof(p));
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.o = o.data(), p.lse = lse.data();
  p.q_len = P.ql.data(), p.k_len = P.kl.data();
  emu::readable = {{q.data(), q.data() + q.size()}, {k.data(), k.data() + k.size()},
                   {v.data(), v.data() + v.size()}, {dout.data(), dout.data() + dout.size()}};
  struct ClearReadable {  // the ranges die with this problem's tensors
    ~ClearReadable() { emu::readable.clear(); }
  } clear_readable;
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = static_cast<int64_t>(P.Cq) * P.Hq * d;
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = static_cast<int64_t>(P.Hq) * d;
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = d;
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = static_cast<int64_t>(P.Ck) * P.Hk * d;
  p.k_row_stride = p.v_row_stride = p.dk_row_stride = p.dv_row_stride = static_cast<int64_t>(P.Hk) * d;
  p.k_head_stride = p.v_head_stride = p.dk_head_stride = p.dv_head_stride = d;
  p.B = P.B, p.Cq = P.Cq, p.Ck = P.Ck, p.Hq = P.Hq, p.Hk = P.Hk, p.group = group;
  p.scale = P.scale, p.scale_log2 = P.scale * 1.4426950408889634f;
  p.num_splits = 1;

  // ---- forward: same plan as attention_api.cu / attention_fwd.cu / attention_decode.cu
  std::vector<float> o_part, lse_part;
  const bool decode = P.Cq <= kDecodeMaxCq;
  const bool tc = !std::is_same_v<T, float> && !opt.simt;
  p.use_tensor_cores = tc;
  // The kernels of one plan: tile traits, plain / split variants, shared memory.
  auto run_fwd = [&](auto traits, auto kernel_plain, auto kernel_split, int smem) {
    using Tr = decltype(traits);
    if (!decode) {
      launch(dim3(ceil_div_host(P.Cq, Tr::kBlockM), P.Hq, P.B), smem, kernel_plain);
      return;
    }
    const int m_blocks = ceil_div_host(static_cast<int64_t>(P.Cq) * group, Tr::kBlockM);
    if (decode_block_m(tc, d, static_cast<int64_t>(P.Cq) * group) != Tr::kBlockM ||
        decode_block_n(tc, d) != Tr::kBlockN) {
      std::printf("decode plan mismatch\n");
      std::abort();
    }
    p.num_splits = opt.forced_splits > 0
                       ? decode_clamp_splits(opt.forced_splits, P.B, P.Ck, Tr::kBlockN)
                       : decode_num_splits(P.B, P.Hk, m_blocks, P.Ck, opt.num_sms, Tr::kBlockN, opt.ctas_per_sm);
    if (p.num_splits <= 1) {
      launch(dim3(m_blocks, P.Hk, P.B), smem, kernel_plain);
    } else {
      o_part.assign(static_cast<size_t>(p.num_splits) * nq, NAN);
      lse_part.assign(static_cast<size_t>(p.num_splits) * P.B * P.Hq * P.Cq, NAN);
      p.o_part = o_part.data(), p.lse_part = lse_part.data();
      launch(dim3(m_blocks, P.Hk, P.B * p.num_splits), smem, kernel_split);
      const int64_t rows = static_cast<int64_t>(P.B) * P.Cq * P.Hq;
      emu::launch(dim3(decode_combine_grid(rows)), kCombineThreads, decode_combine_smem_bytes<kHeadDim>(),
                  [&] { gmod_attn_decode_combine_kernel<T, kHeadDim>(p); });
    }
  };
  if constexpr (!std::is_same_v<T, float>) {
    if (tc && !opt.ref_fwd) {
      bool done = false;
      if constexpr (kHeadDim <= 128) {
        if (decode && decode_key_split(true, d, static_cast<int64_t>(P.Cq) * group)) {
          auto key_split = [&](auto traits) {
            using Tr = decltype(traits);
            run_fwd(Tr{}, [&] { gmod_attn_fwd_tc_kernel<Tr, T, true, false>(p); },
                    [&] { gmod_attn_fwd_tc_kernel<Tr, T, true, true>(p); }, tc_fwd_smem_bytes<Tr>());
          };
          if (opt.decode_stages == 3) key_split(TcDecodeKeySplitDeepTile<kHeadDim>{});
          else key_split(TcDecodeKeySplitTile<kHeadDim>{});
          done = true;
        }
      }
      if (done) {
        // the key-split decode ran
      } else if (decode) {
        using Tr = TcDecodeTile<kHeadDim>;
        run_fwd(Tr{}, [&] { gmod_attn_fwd_tc_kernel<Tr, T, true, false>(p); },
                [&] { gmod_attn_fwd_tc_kernel<Tr, T, true, true>(p); }, tc_fwd_smem_bytes<Tr>());
      } else {
        // As attention_fwd.cu's launch_tc_prefill: a positive scale folded into the exponent where the
        // tile plan says so.
        auto prefill = [&](auto tile) {
          using Tr = decltype(tile);
          if (Tr::kFoldScale && p.scale_log2 > 0.f)
            run_fwd(Tr{}, [&] { gmod_attn_fwd_tc_kernel<Tr, T, false, false, true>(p); }, [] {}, tc_fwd_smem_bytes<Tr>());
          else
            run_fwd(Tr{}, [&] { gmod_attn_fwd_tc_kernel<Tr, T, false, false>(p); }, [] {}, tc_fwd_smem_bytes<Tr>());
        };
        if constexpr (wgmma_fwd_supports_head_dim(kHeadDim)) {
          // as attention_fwd_wgmma.cu: 256 threads, a positive scale in the exponent
          auto run_wgmma = [&](auto traits) {
            using Tr = decltype(traits);
            const dim3 grid(ceil_div_host(P.Cq, Tr::kBlockM), P.Hq, P.B);
            if (p.scale_log2 > 0.f)
              emu::launch(grid, Tr::kThreads, Tr::kSmemBytes, [&] { gmod_attn_fwd_wgmma_kernel<Tr, T, true>(p); });
            else
              emu::launch(grid, Tr::kThreads, Tr::kSmemBytes, [&] { gmod_attn_fwd_wgmma_kernel<Tr, T, false>(p); });
          };
          if (opt.wgmma == 3) run_wgmma(WgmmaFwdTraits<kHeadDim, 3>{});
          if (opt.wgmma == 2) run_wgmma(WgmmaFwdTraits<kHeadDim, 2>{});
        }
        if (opt.wgmma && wgmma_fwd_supports_head_dim(kHeadDim)) {
          // ran above
        } else if (kHeadDim == 128 && opt.narrow)
          prefill(TcFwdNarrowTile128{});
        else
          prefill(TcFwdTile<kHeadDim>{});
      }
    }
  }
  if (!tc && !opt.ref_fwd) {
    if (decode) {
      using Tr = DecodeTraits<kHeadDim>;
      run_fwd(Tr{}, [&] { gmod_attn_fwd_kernel<Tr, T, true, false>(p); },
              [&] { gmod_attn_fwd_kernel<Tr, T, true, true>(p); }, fwd_smem_bytes<Tr>());
    } else {
      using Tr = FwdTraits<kHeadDim>;
      run_fwd(Tr{}, [&] { gmod_attn_fwd_kernel<Tr, T, false, false>(p); }, [] {}, fwd_smem_bytes<Tr>());
    }
  }

  char buf[256];
  std::string lens;
  for (int b = 0; b < P.B; ++b) lens += std::to_string(P.ql[b]) + "/" + std::to_string(P.kl[b]) + " ";
  std::snprintf(buf, sizeof(buf), "%s%s%s d=%d B=%d Cq=%d Ck=%d Hq=%d Hk=%d splits=%d det=%d hpc=%d lens=[%s]", tname<T>(),
                tc ? "/tc" : "", opt.wgmma == 3 ? "/wgmma3" : opt.wgmma == 2 ? "/wgmma2" : "", d, P.B, P.Cq, P.Ck, P.Hq, P.Hk, p.num_splits, int(opt.deterministic), opt.heads_per_cta,
                lens.c_str());
  const std::string tag = buf;
  const bool fp32 = std::is_same_v<T, float>;
  const double rtol = fp32 ? 1e-4 : 2e-2, atol = fp32 ? 1e-5 : 1e-2;
  if (opt.ref_fwd) {  // o / lse as a correct forward would give them, for the backward
    for (size_t t = 0; t < nq; ++t) o[t] = from_f<T>(static_cast<float>(ref.o[t]));
    for (size_t t = 0; t < lse.size(); ++t) lse[t] = static_cast<float>(ref.lse[t]);
  } else {
    compare("o", tag, o, ref.o, rtol, atol);
    compare("lse", tag, lse, ref.lse, fp32 ? 1e-5 : 1e-3, fp32 ? 1e-6 : 1e-3);
  }
  const auto t_fwd = std::chrono::steady_clock::now();
  if (opt.fwd_only) {
    if (g_times)
      std::printf("%7.2f s (fwd only)  %s%s\n", std::chrono::duration<double>(t_fwd - t_start).count(), tag.c_str(),
                  emu::eager_copies ? " eager" : "");
    return;
  }

  // ---- backward: same plan as attention_api.cu / attention_bwd.cu, from the kernel's own o / lse:
  // tensor cores for 16-bit T with d <= 128 (unless opt.simt), else the SIMT kernels.
  const int hpc = opt.deterministic ? group : (opt.heads_per_cta < 0 ? group : opt.heads_per_cta);
  std::vector<T> dq(nq, from_f<T>(NAN)), dk(nk, from_f<T>(NAN)), dv(nk, from_f<T>(NAN));
  std::vector<float> dq_acc(nq, 0.f), dk_acc(nk, 0.f), dv_acc(nk, 0.f), delta(static_cast<size_t>(P.B) * P.Hq * P.Cq, NAN);
  p.dout = dout.data();
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data();
  p.delta = delta.data();
  p.dq_accum = dq_acc.data(), p.dk_accum = dk_acc.data(), p.dv_accum = dv_acc.data();
  p.heads_per_cta = hpc;
  const int64_t rows = static_cast<int64_t>(P.B) * P.Cq * P.Hq;
  launch(dim3(ceil_div_host(rows, kNThreads / 32)), 0, [&] { gmod_attn_bwd_preprocess_kernel<T, kHeadDim>(p); });
  bool tc_bwd = false;
  if constexpr (!std::is_same_v<T, float> && kTcBwdHeadDim<kHeadDim>) {
    if (tc) {
      tc_bwd = true;
      auto run_dkdv = [&](auto traits) {
        using Tt = decltype(traits);
        const dim3 grid_dkdv(ceil_div_host(P.Ck, Tt::kBlockN), P.Hk * (group / hpc), P.B);
        if (opt.deterministic)
          emu::launch(grid_dkdv, Tt::kThreads, tc_bwd_dkdv_smem_bytes<Tt>(),
                      [&] { gmod_attn_bwd_dkdv_tc_kernel<Tt, T, false>(p); });
        else
          emu::launch(grid_dkdv, Tt::kThreads, tc_bwd_dkdv_smem_bytes<Tt>(),
                      [&] { gmod_attn_bwd_dkdv_tc_kernel<Tt, T, true>(p); });
      };
      bool wgmma_ran = false;
      if constexpr (kHeadDim == 64 || kHeadDim == 128) {
        if (opt.wgmma_bwd && !opt.deterministic) {  // as sm90a/attention_bwd_wgmma.cu
          using Tw = WgmmaBwdTraits<kHeadDim>;
          emu::launch(dim3(ceil_div_host(P.Ck, Tw::kBlockN), P.Hk * (group / hpc), P.B), Tw::kThreads, Tw::kSmemBytes,
                      [&] { gmod_attn_bwd_dkdv_wgmma_kernel<Tw, T>(p); });
          wgmma_ran = true;
          ++g_wgmma_bwd_runs;
        }
      }
      if (wgmma_ran) {
        // ran above
      } else if (opt.wide_bwd)
        run_dkdv(TcBwdWideTile<kHeadDim>{});
      else
        run_dkdv(TcBwdTile<kHeadDim>{});
      if (opt.deterministic) {
        using Tq = TcBwdTile<kHeadDim>;
        launch(dim3(ceil_div_host(P.Cq, Tq::kDqBlockM), P.Hq, P.B), tc_bwd_dq_smem_bytes<Tq>(),
               [&] { gmod_attn_bwd_dq_tc_kernel<Tq, T>(p); });
      }
    }
  }
  if (!tc_bwd) {
    using Tb = BwdTraits<kHeadDim>;
    const dim3 grid_dkdv(ceil_div_host(P.Ck, Tb::kBlockN), P.Hk * (group / hpc), P.B);
    if (opt.deterministic) {
      launch(grid_dkdv, bwd_dkdv_smem_bytes<Tb>(), [&] { gmod_attn_bwd_dkdv_kernel<Tb, T, false>(p); });
      launch(dim3(ceil_div_host(P.Cq, Tb::kBlockM), P.Hq, P.B), bwd_dq_smem_bytes<Tb>(),
             [&] { gmod_attn_bwd_dq_kernel<Tb, T>(p); });
    } else {
      launch(grid_dkdv, bwd_dkdv_smem_bytes<Tb>(), [&] { gmod_attn_bwd_dkdv_kernel<Tb, T, true>(p); });
    }
  }
  if (!opt.deterministic) {
    for (size_t t = 0; t < nq; ++t) dq[t] = from_f<T>(dq_acc[t]);
  }
  if (hpc != group) {
    for (size_t t = 0; t < nk; ++t) dk[t] = from_f<T>(dk_acc[t]), dv[t] = from_f<T>(dv_acc[t]);
  }
  // bf16/fp16: o is rounded to T before Delta = <dO, O>, so the gradients carry O(eps) relative errors.
  const double brtol = fp32 ? 2e-4 : 5e-2, batol = fp32 ? 2e-5 : 3e-2;
  const std::string btag =
      tag + (opt.ref_fwd ? " fwd=ref" : "") + (tc_bwd ? (opt.wgmma_bwd ? " bwd=wgmma" : " bwd=tc") : " bwd=simt");
  compare("dq", btag, dq, ref.dq, brtol, batol);
  compare("dk", btag, dk, ref.dk, brtol, batol);
  compare("dv", btag, dv, ref.dv, brtol, batol);
  if (g_times)
    std::printf("%7.2f s (fwd %.2f s)  %s%s\n",
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count(),
                std::chrono::duration<double>(t_fwd - t_start).count(), btag.c_str(), emu::eager_copies ? " eager" : "");
}

template <typename T, int kHeadDim>
static void run_random(std::mt19937& rng, int B, int Cq, int Ck, int Hq, int Hk, const Options& opt,
                       std::vector<int> ql = {}, std::vector<int> kl = {}) {
  Problem P{B, Cq, Ck, Hq, Hk, kHeadDim, ql, kl, opt.scale != 0.f ? opt.scale : 1.f / std::sqrt(float(kHeadDim))};
  std::uniform_int_distribution<int> uq(0, Cq), uk(0, Ck);
  while (static_cast<int>(P.ql.size()) < B) {
    int a = uq(rng), c = uk(rng);
    P.ql.push_back(a);
    P.kl.push_back(c);
  }
  run_problem<T, kHeadDim>(P, opt, rng);
}

// The last lines of every mode: how many distinct kernel launches (emu::launched) its cases reached, and the
// verdict. GMOD_EMU_KERNELS=1 lists them (mangled lambda types: c++filt -t names the kernel and its
// template arguments), to compare what two sets of cases reach.
static int finish(int cases) {
  if (std::getenv("GMOD_EMU_KERNELS"))
    for (const auto& k : emu::launched) std::printf("kernel %s\n", k.c_str());
  std::printf("%zu kernel launch forms\n", emu::launched.size());
  std::printf("%d cases, %d failures\n", cases, g_failures);
  return g_failures ? 1 : 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  // ci, wgmma-ci, wgmmabwd-ci: the CI-sized sets (python_tests/test_kernel_emulation.py; the emulation
  // runs ~2 cores flat out, so CI time is the number of emulated blocks). The same cases as quick / wgmma /
  // wgmmabwd, so that every kernel instantiation, launch form and edge case they reach is still reached, but
  // forward-only where the backward kernels that case would run are exercised by another case with their
  // own edge cases (the backward costs 5-10x the forward here), and with fewer random fuzz problems.
  const bool ci = mode == "ci" || mode == "wgmma-ci" || mode == "wgmmabwd-ci";
  const bool quick = mode == "quick" || mode == "ci";
  // Options as given, forward-only in the ci sets.
  auto fwd = [&](Options o) {
    o.fwd_only = ci;
    return o;
  };
  std::mt19937 rng(1234);
  Options nondet, det, split_heads;
  det.deterministic = true;
  int cases = 0;
  auto count = [&] { ++cases; };
  // Tensor-core backward (bf16 / fp16, d <= 128): every head dim with both dtypes, GQA groups 1 / 2 / 4
  // with heads_per_cta = group and = 1, deterministic and atomic dQ, lengths 0 and 1, q_len > k_len and
  // < k_len, several 64-key / 64-query tiles; then causal offsets k_len - q_len swept across the tile
  // boundaries, and short query chunks. `tcbwd` as the argument runs only these, `widebwd` the same on
  // the 8-warp dk/dv kernel.
  const bool only_tc_bwd = mode == "tcbwd";
  // wide: the same cases with the dk/dv kernel on TcBwdWideTile (8 warps, 128 keys per CTA), and
  // offsets around its 128-key tiles.
  auto tc_bwd_cases = [&](bool short_run, bool wide) {
    Options atomic_dq, det_dq, split;
    det_dq.deterministic = true;
    split.heads_per_cta = 1;
    atomic_dq.wide_bwd = det_dq.wide_bwd = split.wide_bwd = wide;
    // ci: the 128-key tiles' pass from reference o / lse (the 64-key pass runs the same forward kernels on the
    // same problems; a fifth of each case's time)
    atomic_dq.ref_fwd = det_dq.ref_fwd = split.ref_fwd = ci && wide;
    auto per_dim = [&](auto type, auto dim, bool all) {
      using T = typename decltype(type)::type;
      constexpr int D = decltype(dim)::value;
      run_random<T, D>(rng, 3, 70, 90, 4, 2, atomic_dq, {70, 1, 0}, {90, 1, 5});   // group 2, whole group
      run_random<T, D>(rng, 3, 70, 90, 4, 1, det_dq, {33, 70, 17}, {0, 20, 90});   // group 4, k_len 0
      cases += 2;
      if (!all) return;
      run_random<T, D>(rng, 2, 65, 130, 4, 2, split, {65, 40}, {130, 64});         // group 2, hpc 1
      run_random<T, D>(rng, 2, 130, 70, 2, 2, atomic_dq, {130, 129}, {70, 65});    // group 1, q_len > k_len
      run_random<T, D>(rng, 2, 20, 140, 4, 1, split, {20, 1}, {140, 128});         // group 4, hpc 1
      run_random<T, D>(rng, 1, 129, 129, 2, 1, det_dq, {129}, {129});              // group 2, square
      cases += 4;
    };
    using bf16 = std::type_identity<__nv_bfloat16>;
    using fp16 = std::type_identity<__half>;
    // ci: the first two cases (both dK / dV modes, lengths 0 / 1, GQA 2 / 4) for every dtype and head dim,
    // the other four (hpc 1, q_len > k_len, a square multi-tile problem) on fp16 d = 64 of the 64-key tiles.
    per_dim(bf16{}, std::integral_constant<int, 32>{}, !ci);
    per_dim(fp16{}, std::integral_constant<int, 32>{}, !short_run && !ci);
    per_dim(fp16{}, std::integral_constant<int, 64>{}, !ci || !wide);
    per_dim(bf16{}, std::integral_constant<int, 64>{}, !short_run && !ci);
    per_dim(bf16{}, std::integral_constant<int, 96>{}, !ci);
    per_dim(fp16{}, std::integral_constant<int, 96>{}, !short_run && !ci);
    per_dim(fp16{}, std::integral_constant<int, 128>{}, !ci);
    per_dim(bf16{}, std::integral_constant<int, 128>{}, !short_run && !ci);
    // Causal offsets k_len - q_len around the 64-key / 64-query tile and 16-key warp boundaries, with
    // five q_len alignments, one batch row each. A warp's pass (16 keys x a 32- or 64-query step) sees
    // every pair exactly when the offset is >= its boundary, which is 15 mod 16, and the step ends
    // inside q_len exactly when q_len reaches a multiple of 32: so offsets 14 mod 16 (one short of the
    // boundary: an unmasked pass there would be wrong) and q_len 31 mod 32 are in the set, or an
    // off-by-one in the dk/dv kernel's unmasked-pass test goes unseen (it did, until they were).
    std::vector<int> ql, kl;
    const int offsets[] = {-65, -64, -63, -18, -16, -15, -2, -1, 0, 1, 14, 15, 16, 17, 46, 47, 63, 64, 65, 66};
    const int wide_offsets[] = {-129, -128, -127, -65, -64, -18, -16, -2, -1, 0,
                                1, 14, 16, 63, 64, 65, 126, 127, 128, 129};
    const int q_lens[] = {100, 99, 98, 95, 63};
    constexpr int kRows = 20;
    for (int b = 0; b < kRows; ++b) {
      ql.push_back(q_lens[b % 5]);
      kl.push_back(std::max(0, ql.back() + (wide ? wide_offsets[b] : offsets[b])));
    }
    const int ck = wide ? 230 : 166;
    run_random<__nv_bfloat16, 64>(rng, kRows, 100, ck, 2, 1, atomic_dq, ql, kl);
    ++cases;
    if (ci && wide) return;  // ci: the 128-key tiles' offsets once, atomic; hpc 1 and short chunks on 64-key tiles
    run_random<__half, 32>(rng, kRows, 100, ck, 2, 1, split, ql, kl);
    ++cases;
    if (!short_run) {
      run_random<__half, 128>(rng, kRows, 100, ck, 2, 1, det_dq, ql, kl);
      run_random<__nv_bfloat16, 96>(rng, kRows, 100, ck, 4, 2, split, ql, kl);
      cases += 2;
    }
    // Short query chunks (the forward's decode path; the backward runs the same kernels).
    run_random<__half, 96>(rng, 2, 5, 300, 8, 2, split, {5, 3}, {300, 2});
    run_random<__nv_bfloat16, 128>(rng, 2, 16, 200, 4, 1, det_dq, {16, 7}, {200, 70});
    cases += 2;
  };
  // The decode split model (decode_num_splits) on the H100's 132 SMs x 3 resident key-split CTAs
  // (d = 128, 64-key tiles, Hk = 8): whole waves, worked out by hand from the model.
  {
    struct SplitCase { int64_t B, Ck; int want; };
    const SplitCase split_cases[] = {
        {1, 4096, 32},    // 64 tiles: the most splits of 2 tiles, 256 CTAs (< 1 wave)
        {1, 32768, 47},   // 47 x 11 tiles: 376 CTAs, one wave (64 splits would be 512 CTAs, 2 waves)
        {8, 4096, 6},     // 384 CTAs, one wave (8 splits: 512 CTAs, 1.3 waves)
        {8, 32768, 6},    // 6 x 86 tiles, one wave
        {32, 32768, 3},   // 768 CTAs, 1.94 waves
        {64, 4096, 3},    // 1536 CTAs, 3.9 waves (1 split: 512 CTAs, 1.3 waves)
        {1, 256, 2},      // 4 tiles: two splits of the 2-tile minimum
        {1, 150, 1},      // 3 tiles: fewer than 2 x 2, no split
    };
    for (const auto& c : split_cases) {
      const int got = decode_num_splits(c.B, 8, 1, c.Ck, 132, 64, 3);
      if (got != c.want) {
        std::printf("FAIL decode_num_splits(B=%lld, Ck=%lld) = %d, expected %d\n", (long long)c.B,
                    (long long)c.Ck, got, c.want);
        ++g_failures;
      }
    }
    // Forced counts: clamped to 1..128, one tile per split at least, no empty split.
    const int forced[][4] = {{500, 1, 8192, 128}, {40, 2, 1500, 24}, {8, 2, 1500, 8}, {0, 1, 4096, 1}, {7, 1, 64 * 20, 7}};
    for (const auto& f : forced) {
      const int got = decode_clamp_splits(f[0], f[1], f[2], 64);
      if (got != f[3]) {
        std::printf("FAIL decode_clamp_splits(%d, B=%d, Ck=%d) = %d, expected %d\n", f[0], f[1], f[2], got, f[3]);
        ++g_failures;
      }
    }
  }
  // The split-k combine with many splits (as GMOD_ATTN_DECODE_SPLITS): 128 splits of one 64-key tile
  // (the most the combine takes, one lse per thread) with a second row whose 100 keys leave 126 splits
  // empty (lse = -inf, weight 0: their o_part rows must be written as zeros, the buffer is NaN-poisoned
  // here), at d = 32 (8 float4 columns, 32 slots of the 256-thread combine); d = 96 (24 columns, 10
  // slots, 16 idle threads) with 24 and 8 splits; d = 256 on the SIMT kernels (64 columns, 4 slots).
  // `combine` as the argument runs only these (and the split-model checks above).
  auto combine_cases = [&] {
    Options many;
    many.fwd_only = ci;
    many.forced_splits = 500;
    run_random<__nv_bfloat16, 32>(rng, 2, 1, 8192, 2, 1, many, {1, 1}, {8192, 100});
    many.forced_splits = 40;
    run_random<__half, 96>(rng, 2, 2, 1500, 4, 1, many, {2, 1}, {1500, 700});
    many.forced_splits = 8;
    run_random<__nv_bfloat16, 96>(rng, 2, 3, 1500, 2, 1, many, {3, 2}, {1500, 1});
    many.forced_splits = 30;
    run_random<float, 256>(rng, 1, 1, 700, 2, 1, many, {1}, {700});
    cases += 4;
  };
  if (mode == "widebwd") {  // the tensor-core backward cases on TcBwdWideTile
    tc_bwd_cases(false, true);
    return finish(cases);
  }
  // The sm_90a wgmma prefill forward (d = 64 / 128, 128 x 128 tiles, 2 warpgroups): causal offsets
  // across its 128-row / 128-key tiles, rows with 0 / 1 / all keys, q_len > k_len, GQA, both dtypes,
  // a negative scale (the unfused exponent), rows of 300+ keys so that the max grows on later tiles.
  // Each case also runs the backward on the kernel's o / lse. `wgmma` as the argument runs only these;
  // `wgmma-ci` the same forward only (its backward is the mma.sync one, which ci runs on its own cases).
  auto wgmma_cases = [&](int stages) {
    Options wg, wg_neg;
    wg.wgmma = wg_neg.wgmma = stages;
    wg.fwd_only = wg_neg.fwd_only = ci;
    wg_neg.scale = -0.25f;
    run_random<__nv_bfloat16, 128>(rng, 3, 150, 300, 4, 2, wg, {150, 1, 0}, {300, 77, 0});
    run_random<__half, 64>(rng, 3, 200, 330, 2, 1, wg, {200, 129, 64}, {330, 128, 200});
    run_random<__half, 128>(rng, 2, 130, 130, 2, 2, wg, {130, 65}, {130, 129});
    run_random<__nv_bfloat16, 64>(rng, 2, 100, 260, 4, 4, wg_neg, {100, 37}, {260, 37});
    cases += 4;
    std::vector<int> ql, kl;
    const int offsets[] = {-129, -128, -127, -64, -1, 0, 1, 63, 64, 127, 128, 129};
    for (int b = 0; b < 12; ++b) {
      ql.push_back(140 - 3 * (b % 4));
      kl.push_back(std::max(0, ql.back() + offsets[b]));
    }
    run_random<__nv_bfloat16, 128>(rng, 12, 140, 270, 2, 1, wg, ql, kl);
    run_random<__half, 64>(rng, 12, 140, 270, 2, 1, wg, ql, kl);
    cases += 2;
  };
  if (mode == "wgmma" || mode == "wgmma-ci") {  // both pipelines: 3 stages (the default) and 2
    wgmma_cases(3);
    wgmma_cases(2);
    // Copies landing at once: a K / V copy into a buffer that a still-running P V reads shows up.
    emu::eager_copies = true;
    wgmma_cases(3);
    emu::eager_copies = false;
    return finish(cases);
  }
  // The sm_90a wgmma backward dk/dv kernel (d = 64 / 128, 128 keys x 64-query steps, 2 warpgroups of 64
  // keys, dQ atomics per warpgroup): causal offsets across its tiles, rows with 0 / 1 keys, q_len >
  // k_len and < k_len, GQA groups 1 / 2 / 4 with heads_per_cta = group (direct dK / dV) and = 1 (atomic),
  // both dtypes, a negative scale. The forward is the mma.sync one (`wgmmabwd` as the argument). In
  // `wgmmabwd-ci` it is the 3-stage wgmma one (its o / lse are checked the same; it costs a fifth of the
  // mma.sync forward here, which ci runs on its own cases), except on the five small cases with copies
  // landing at once: the only run of the mma.sync forward in that mode.
  auto wgmma_bwd_cases = [&] {
    Options wb, wb_split, wb_neg;
    wb.wgmma_bwd = wb_split.wgmma_bwd = wb_neg.wgmma_bwd = true;
    if (ci && !emu::eager_copies) wb.wgmma = wb_split.wgmma = wb_neg.wgmma = 3;
    wb_split.heads_per_cta = 1;
    wb_neg.scale = -0.3f;
    run_random<__nv_bfloat16, 128>(rng, 3, 150, 300, 4, 2, wb, {150, 1, 0}, {300, 77, 0});
    run_random<__half, 64>(rng, 3, 200, 330, 2, 1, wb, {200, 129, 64}, {330, 128, 200});
    run_random<__half, 128>(rng, 2, 130, 130, 4, 1, wb_split, {130, 65}, {130, 129});
    run_random<__nv_bfloat16, 64>(rng, 2, 100, 260, 4, 4, wb_neg, {100, 37}, {260, 37});
    run_random<__nv_bfloat16, 64>(rng, 2, 70, 200, 4, 2, wb_split, {70, 0}, {200, 5});
    cases += 5;
    if (ci) wb.wgmma = 3;
    std::vector<int> ql, kl;
    const int offsets[] = {-129, -128, -127, -64, -63, -1, 0, 1, 63, 64, 127, 128, 129};
    for (int b = 0; b < 13; ++b) {
      ql.push_back(140 - 3 * (b % 4));
      kl.push_back(std::max(0, ql.back() + offsets[b]));
    }
    run_random<__nv_bfloat16, 128>(rng, 13, 140, 270, 2, 1, wb, ql, kl);
    run_random<__half, 64>(rng, 13, 140, 270, 2, 1, wb, ql, kl);
    cases += 2;
  };
  if (mode == "wgmmabwd" || mode == "wgmmabwd-ci") {
    wgmma_bwd_cases();
    emu::eager_copies = true;  // a Q / dO copy into a buffer a still-running MMA reads shows up
    wgmma_bwd_cases();
    emu::eager_copies = false;
    std::printf("%d wgmma backward runs\n", g_wgmma_bwd_runs);
    return finish(cases);
  }
  if (mode == "combine") {
    combine_cases();
    return finish(cases);
  }
  // The key-split decode with a ring of 3 K / V buffers (TcDecodeKeySplitDeepTile, GMOD_ATTN_DECODE_STAGES=3),
  // forward only (the backward kernels do not depend on it): splits of 1, 2, 3, 4 and 11 key tiles (the
  // prologue's second tile present or not, the ring wrapping), no split with 5 tiles, a last tile cut by
  // k_len, rows with 0 / 1 keys, a causal chunk of 16 packed rows, every head dim of the tile with both
  // dtypes; then again with cp.async copies landing at once (a copy into a buffer still being read shows).
  // `deepdecode` as the argument runs these (a mode of its own, which the CI test runs).
  auto deep_decode_cases = [&] {
    Options deep;
    deep.decode_stages = 3;
    deep.fwd_only = true;
    auto forced = [&](int splits) {
      Options o = deep;
      o.forced_splits = splits;
      return o;
    };
    run_random<__nv_bfloat16, 128>(rng, 3, 1, 700, 8, 2, forced(11), {1, 1, 0}, {700, 1, 0});    // 1 tile per split
    run_random<__half, 128>(rng, 2, 1, 512, 4, 1, forced(4), {1, 1}, {512, 200});                 // 2 tiles, k_len cut
    run_random<__nv_bfloat16, 64>(rng, 2, 2, 768, 8, 1, forced(4), {2, 1}, {768, 700});           // 3 tiles
    run_random<__half, 64>(rng, 1, 1, 1024, 4, 1, forced(4), {1}, {1000});                        // 4 tiles
    run_random<__nv_bfloat16, 96>(rng, 2, 1, 1400, 2, 2, forced(2), {1, 1}, {1400, 650});        // 11 tiles
    run_random<__half, 32>(rng, 2, 3, 300, 4, 1, forced(1), {3, 2}, {300, 100});                  // no split, 5 tiles
    run_random<__half, 96>(rng, 2, 16, 200, 2, 2, forced(3), {16, 5}, {200, 21});                 // 16 rows, causal
    run_random<__nv_bfloat16, 32>(rng, 1, 4, 130, 8, 2, forced(2), {4}, {130});                   // 1 and 2 tiles
    cases += 8;
  };
  if (mode == "deepdecode") {
    deep_decode_cases();
    emu::eager_copies = true;
    deep_decode_cases();
    emu::eager_copies = false;
    return finish(cases);
  }
  if (only_tc_bwd) {
    tc_bwd_cases(false, false);
    return finish(cases);
  }
  if (mode == "tiny") {  // a few cases, for -fsanitize=thread
    Options many_sms;
    many_sms.num_sms = 1000;
    split_heads.heads_per_cta = 1;
    run_random<float, 64>(rng, 2, 40, 70, 2, 1, nondet, {40, 17}, {70, 9});
    run_random<float, 64>(rng, 1, 40, 40, 4, 2, det, {40}, {40});
    run_random<float, 64>(rng, 1, 40, 40, 4, 2, split_heads, {40}, {40});
    run_random<__nv_bfloat16, 64>(rng, 2, 3, 300, 4, 2, many_sms, {3, 1}, {300, 200});
    return finish(4);
  }

  // Prefill / training (Cq > 16): lengths include 0, 1, Cq, q_len > k_len, q_len < k_len.
  for (int hk_ratio : {1, 2, 4}) {
    run_random<float, 64>(rng, 3, 70, 90, 4, 4 / hk_ratio, nondet, {70, 1, 0}, {90, 1, 5});
    count();
    run_random<float, 64>(rng, 3, 70, 90, 4, 4 / hk_ratio, det, {33, 70, 17}, {0, 20, 90});
    count();
    split_heads.heads_per_cta = 1;
    run_random<float, 64>(rng, 2, 65, 64, 4, 4 / hk_ratio, split_heads, {65, 40}, {64, 64});
    count();
  }
  run_random<float, 128>(rng, 2, 100, 100, 2, 1, nondet);
  run_random<float, 128>(rng, 2, 100, 130, 2, 1, det);
  run_random<__nv_bfloat16, 128>(rng, 2, 80, 80, 4, 2, nondet, {80, 64}, {80, 77});
  run_random<__half, 64>(rng, 2, 80, 96, 2, 2, det);
  cases += 4;
  if (!quick) {
    run_random<float, 32>(rng, 2, 50, 70, 2, 1, nondet);
    run_random<float, 96>(rng, 2, 50, 70, 4, 2, det);
    run_random<float, 256>(rng, 2, 40, 50, 2, 1, nondet, {40, 33}, {50, 36});
    run_random<float, 256>(rng, 1, 40, 50, 4, 2, det, {40}, {50});
    run_random<__nv_bfloat16, 256>(rng, 1, 40, 40, 2, 1, det);
    run_random<__half, 96>(rng, 2, 33, 33, 2, 1, nondet);
    cases += 6;
  }

  // Decode / short chunks (Cq <= 16): GQA packing, split-k forced by a large SM count.
  Options many_sms;
  many_sms.num_sms = 1000;
  for (int hk_ratio : {1, 2, 4, 8}) {  // ci: the backward (same kernels for every ratio) on ratio 1
    const auto o_sms = hk_ratio == 1 ? many_sms : fwd(many_sms), o_nd = hk_ratio == 1 ? nondet : fwd(nondet);
    run_random<float, 64>(rng, 3, 1, 600, 8, 8 / hk_ratio, o_sms, {1, 1, 0}, {600, 1, 0});
    run_random<float, 64>(rng, 2, 1, 300, 8, 8 / hk_ratio, o_nd, {1, 1}, {300, 257});
    run_random<float, 64>(rng, 2, 5, 400, 8, 8 / hk_ratio, o_sms, {5, 3}, {400, 2});
    cases += 3;
  }
  run_random<float, 128>(rng, 2, 16, 700, 4, 1, many_sms, {16, 7}, {700, 500});
  run_random<__nv_bfloat16, 128>(rng, 2, 1, 1100, 8, 2, fwd(many_sms), {1, 1}, {1100, 1030});
  run_random<__half, 128>(rng, 1, 4, 333, 4, 4, fwd(many_sms), {4}, {333});
  run_random<float, 128>(rng, 2, 16, 40, 4, 4, det, {16, 9}, {40, 3});
  cases += 4;
  // Tensor-core prefill with a negative scale (the unfused exponent; d <= 96 folds a positive scale
  // into it) and a large positive one. ci: the backward with a negative scale on the first.
  {
    Options neg, big;
    neg.scale = -0.2f;
    big.scale = 0.9f;
    run_random<__nv_bfloat16, 64>(rng, 2, 70, 90, 4, 2, neg, {70, 33}, {90, 40});
    run_random<__half, 96>(rng, 2, 70, 90, 2, 1, fwd(big), {70, 1}, {90, 71});
    run_random<__half, 128>(rng, 1, 40, 60, 2, 2, fwd(neg), {40}, {60});
    cases += 3;
  }
  // d = 128 prefill on 128 x 32 tiles (GMOD_ATTN_FWD_BLOCK_N=32: lazy rescale, unrolled copies, the
  // positive scale in the exponent): causal offsets across tiles, ragged and empty rows, GQA, a
  // negative scale; rows of 300 keys so that the max grows on later tiles too.
  {
    Options nar, nar_neg;
    nar.narrow = nar_neg.narrow = true;
    nar_neg.scale = -0.3f;
    run_random<__nv_bfloat16, 128>(rng, 3, 150, 300, 4, 2, fwd(nar), {150, 1, 0}, {300, 77, 0});
    run_random<__half, 128>(rng, 2, 130, 130, 2, 2, fwd(nar), {130, 65}, {130, 129});
    run_random<__nv_bfloat16, 128>(rng, 1, 40, 100, 2, 1, fwd(nar_neg), {40}, {100});
    cases += 3;
  }
  // Key-split tensor-core decode (<= 16 packed rows, d <= 128: the warps share the rows and split each
  // key tile): 8 and 16 packed rows, with and without splits, rows with 0 / 1 keys, causal chunks whose
  // visible keys end inside a warp's 16-key slice.
  run_random<__nv_bfloat16, 64>(rng, 3, 1, 700, 8, 1, fwd(many_sms), {1, 1, 0}, {700, 1, 0});
  run_random<__half, 32>(rng, 2, 2, 260, 16, 2, fwd(nondet), {2, 1}, {260, 77});
  run_random<__nv_bfloat16, 96>(rng, 2, 16, 90, 2, 2, fwd(many_sms), {16, 5}, {90, 21});
  run_random<__half, 128>(rng, 2, 3, 150, 4, 4, fwd(nondet), {3, 0}, {150, 10});
  cases += 4;
  combine_cases();
  if (!quick) {
    run_random<float, 256>(rng, 2, 2, 300, 4, 2, many_sms, {2, 1}, {300, 299});
    run_random<float, 32>(rng, 2, 3, 300, 4, 1, many_sms, {3, 2}, {300, 100});
    run_random<float, 96>(rng, 2, 1, 300, 2, 1, many_sms, {1, 1}, {300, 0});
    run_random<float, 64>(rng, 1, 16, 16, 16, 1, det);  // 256 packed rows
    cases += 4;
  }
  // Sweep of the causal offset k_len - q_len across tile boundaries (one batch row per offset).
  {
    std::vector<int> ql, kl;
    for (int b = 0; b < 44; ++b) {
      ql.push_back(70 - b % 3);
      kl.push_back(std::min(110, std::max(0, ql.back() + b - 4)));
    }
    Options o1 = split_heads;
    o1.heads_per_cta = 1;
    run_random<float, 64>(rng, 44, 70, 110, 2, 1, fwd(nondet), ql, kl);  // ci: the backward's offsets on det
    run_random<float, 64>(rng, 44, 70, 110, 2, 1, det, ql, kl);
    run_random<float, 64>(rng, 44, 70, 110, 2, 1, fwd(o1), ql, kl);
    cases += 3;
    if (!quick) {
      run_random<float, 256>(rng, 44, 70, 110, 2, 1, det, ql, kl);
      run_random<float, 256>(rng, 44, 70, 110, 2, 1, nondet, ql, kl);
      cases += 2;
    }
  }

  // Random fuzz over shapes, lengths, head dims and backward modes (float32: tight tolerances).
  const int fuzz = quick ? 10 : 60;
  for (int it = 0; it < fuzz; ++it) {
    std::uniform_int_distribution<int> u01(0, 1), uB(1, 3), uHk(1, 2), uG(0, 2), uD(0, 4);
    const int B = uB(rng), Hk = uHk(rng), Hq = Hk * (1 << uG(rng));
    const bool short_q = u01(rng);
    const int Cq = std::uniform_int_distribution<int>(1, short_q ? 16 : 90)(rng);
    const int Ck = std::uniform_int_distribution<int>(0, short_q ? 400 : 150)(rng);
    Options o;
    o.deterministic = u01(rng);
    o.heads_per_cta = (!o.deterministic && u01(rng)) ? 1 : -1;
    o.num_sms = u01(rng) ? 1000 : 8;
    switch (uD(rng)) {
      case 0: run_random<float, 32>(rng, B, Cq, Ck, Hq, Hk, o); break;
      case 1: run_random<float, 64>(rng, B, Cq, Ck, Hq, Hk, o); break;
      case 2: run_random<float, 96>(rng, B, Cq, Ck, Hq, Hk, o); break;
      case 3: run_random<float, 128>(rng, B, Cq, Ck, Hq, Hk, o); break;
      default: run_random<float, 256>(rng, B, Cq, Ck, Hq, Hk, o); break;
    }
    ++cases;
  }
  // Tensor-core forward (bf16 / fp16): causal offsets across the 128-row / 64-key tiles, then a fuzz
  // over head dims, GQA, decode packing and splits. Each case also runs the backward on its o / lse.
  {
    std::vector<int> ql, kl;
    for (int b = 0; b < 24; ++b) {
      ql.push_back(140 - b % 5);
      kl.push_back(std::min(200, std::max(0, ql.back() + 3 * b - 9)));
    }
    run_random<__nv_bfloat16, 64>(rng, 24, 140, 200, 2, 1, fwd(nondet), ql, kl);
    run_random<__half, 128>(rng, 24, 140, 200, 1, 1, fwd(det), ql, kl);
    cases += 2;
  }
  const int tc_fuzz = quick ? 8 : 40;
  for (int it = 0; it < tc_fuzz; ++it) {
    std::uniform_int_distribution<int> u01(0, 1), uB(1, 3), uHk(1, 2), uG(0, 3), uD(0, 4);
    const int B = uB(rng), Hk = uHk(rng), Hq = Hk * (1 << uG(rng));
    const bool short_q = u01(rng);
    const int Cq = std::uniform_int_distribution<int>(1, short_q ? 16 : 200)(rng);
    const int Ck = std::uniform_int_distribution<int>(0, short_q ? 700 : 260)(rng);
    Options o;
    o.deterministic = u01(rng);
    o.num_sms = u01(rng) ? 1000 : 8;
    const bool half = u01(rng);
    switch (uD(rng)) {
      case 0: half ? run_random<__half, 32>(rng, B, Cq, Ck, Hq, Hk, o) : run_random<__nv_bfloat16, 32>(rng, B, Cq, Ck, Hq, Hk, o); break;
      case 1: half ? run_random<__half, 64>(rng, B, Cq, Ck, Hq, Hk, o) : run_random<__nv_bfloat16, 64>(rng, B, Cq, Ck, Hq, Hk, o); break;
      case 2: half ? run_random<__half, 96>(rng, B, Cq, Ck, Hq, Hk, o) : run_random<__nv_bfloat16, 96>(rng, B, Cq, Ck, Hq, Hk, o); break;
      case 3: half ? run_random<__half, 128>(rng, B, Cq, Ck, Hq, Hk, o) : run_random<__nv_bfloat16, 128>(rng, B, Cq, Ck, Hq, Hk, o); break;
      default: half ? run_random<__half, 256>(rng, B, Cq, Ck, Hq, Hk, o) : run_random<__nv_bfloat16, 256>(rng, B, Cq, Ck, Hq, Hk, o); break;
    }
    ++cases;
  }
  tc_bwd_cases(quick, false);
  tc_bwd_cases(true, true);
  // The same 16-bit problems on the SIMT kernels (GMOD_ATTN_SIMT=1, pre-sm_80 GPUs).
  {
    Options simt;
    simt.simt = true;
    run_random<__nv_bfloat16, 128>(rng, 2, 80, 80, 4, 2, simt, {80, 64}, {80, 77});
    Options simt_split = simt;
    simt_split.num_sms = 1000;
    run_random<__half, 64>(rng, 2, 3, 500, 8, 2, simt_split, {3, 1}, {500, 260});
    cases += 2;
  }
  return finish(cases);
}
