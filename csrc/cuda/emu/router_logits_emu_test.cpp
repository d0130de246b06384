// Host emulation of the router_logits row-block kernel (csrc/cuda/router_logits_kernel.cuh), forward
// and backward, against a float64 reference of csrc/cpu/router_logits.cpp's math. Every output is
// poisoned with NaN first. Covers CPT 1 / 2 / 4, partial warps, one-lane blocks, several row chunks
// with a partial last one, norm weight absent / float32 / activation dtype, and fp32 / bf16 / fp16 /
// fp64 activations. Not part of the CMake build. Run:
//   g++ -std=c++20 -O2 -pthread -I csrc/include -I /usr/local/cuda/include \
//       csrc/cuda/emu/router_logits_emu_test.cpp -o /tmp/router_emu && /tmp/router_emu
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"  // first: the CUDA emulation the kernel header compiles against

#include "../router_logits_kernel.cuh"

using namespace gmod::router;

template <typename T> double to_d(T x) { return static_cast<double>(static_cast<float>(x)); }
template <> double to_d(double x) { return x; }
template <typename T> T from_d(double x) { return static_cast<T>(static_cast<float>(x)); }
template <> double from_d(double x) { return x; }
template <typename T> const char* tname();
template <> const char* tname<float>() { return "fp32"; }
template <> const char* tname<double>() { return "fp64"; }
template <> const char* tname<__half>() { return "fp16"; }
template <> const char* tname<__nv_bfloat16>() { return "bf16"; }
template <typename T> double eps_of();
template <> double eps_of<float>() { return 1.1920929e-7; }
template <> double eps_of<double>() { return 2.220446049250313e-16; }
template <> double eps_of<__half>() { return 9.765625e-4; }
template <> double eps_of<__nv_bfloat16>() { return 7.8125e-3; }
// The spacing of the subnormals: the absolute error floor of one rounding.
template <typename T> double subnormal_step() { return 0.0; }
template <> double subnormal_step<__half>() { return 5.960464477539063e-8; }  // 2^-24
template <> double subnormal_step<__nv_bfloat16>() { return 9.183549615799121e-41; }  // 2^-133
template <> double subnormal_step<float>() { return 1.401298464324817e-45; }  // 2^-149

enum class Norm { kNone, kF32, kAct };

static int g_failures = 0, g_cases = 0;

static void fail(const std::string& what) {
  ++g_failures;
  std::printf("  FAIL %s\n", what.c_str());
}

// |out - ref| <= bound, element by element; the first offender is printed.
static void check(const std::string& what, const std::vector<double>& out, const std::vector<double>& ref,
                  const std::vector<double>& bound) {
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(out[i] - ref[i]);
    if (!(err <= bound[i])) {  // NaN (poison never overwritten) fails too
      char buf[256];
      std::snprintf(buf, sizeof(buf), "%s[%zu]: got %.9g, want %.9g (err %.3g > %.3g)", what.c_str(), i, out[i],
                    ref[i], err, bound[i]);
      fail(buf);
      return;
    }
  }
}

template <typename scalar_t, typename acc_t>
void run_case(int64_t N, int64_t D, Norm norm, bool w_f32, uint32_t seed) {
  ++g_cases;
  constexpr int VN = static_cast<int>(16 / sizeof(scalar_t));
  RowBlockShape shape;
  if (!row_block_shape(D, VN, shape)) {
    fail("row_block_shape refused D = " + std::to_string(D));
    return;
  }
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_real_distribution<double> ud(0.5, 1.5);
  // Inputs, quantized to their storage dtypes; the reference uses the quantized values.
  std::vector<scalar_t> x(N * D);
  for (auto& v : x) v = from_d<scalar_t>(3.0 * nd(rng));
  std::vector<float> wf(D), nwf(D);
  std::vector<scalar_t> ws(D), nws(D);
  std::vector<double> w(D), nw(D, 1.0), a(D);
  for (int64_t j = 0; j < D; ++j) {
    const double wv = nd(rng) / std::sqrt(static_cast<double>(D)), nv = ud(rng);
    wf[j] = static_cast<float>(wv);
    ws[j] = from_d<scalar_t>(wv);
    w[j] = w_f32 ? static_cast<double>(wf[j]) : to_d(ws[j]);
    nwf[j] = static_cast<float>(nv);
    nws[j] = from_d<scalar_t>(nv);
    if (norm == Norm::kF32) nw[j] = nwf[j];
    if (norm == Norm::kAct) nw[j] = to_d(nws[j]);
    a[j] = w[j] * nw[j];
  }
  std::vector<acc_t> grad(N);
  for (auto& g : grad) g = static_cast<acc_t>(nd(rng));
  const double eps = 1e-6, eacc = eps_of<acc_t>(), es = eps_of<scalar_t>();

  // float64 reference
  std::vector<double> logit(N), logit_b(N), dx(N * D), dx_b(N * D), gr(N), grx_abs(N * D);
  for (int64_t r = 0; r < N; ++r) {
    double ss = 0, dot = 0, dabs = 0;
    for (int64_t j = 0; j < D; ++j) {
      const double v = to_d(x[r * D + j]);
      ss += v * v;
      dot += v * a[j];
      dabs += std::fabs(v * a[j]);
    }
    const double rr = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    const double sq = 16.0 * std::sqrt(static_cast<double>(D)) * eacc;
    logit[r] = dot * rr;
    logit_b[r] = sq * rr * dabs + 4 * eacc * std::fabs(logit[r]) + 1e-300;
    const double g = static_cast<double>(grad[r]);
    gr[r] = g * rr;
    const double c = g * rr * rr * rr * dot / static_cast<double>(D);
    for (int64_t j = 0; j < D; ++j) {
      const double v = to_d(x[r * D + j]);
      dx[r * D + j] = gr[r] * a[j] - c * v;
      // one rounding to scalar_t, plus the accumulation-type error of gr and c
      dx_b[r * D + j] = es * std::fabs(dx[r * D + j]) + subnormal_step<scalar_t>() +
                        sq * (std::fabs(gr[r] * a[j]) + std::fabs(g * rr * rr * rr * dabs / D * v)) + 1e-300;
      grx_abs[r * D + j] = std::fabs(gr[r] * v);
    }
  }

  RowBlockParams<acc_t> p{};
  p.x = x.data();
  p.w = w_f32 ? static_cast<const void*>(wf.data()) : static_cast<const void*>(ws.data());
  p.w_f32 = w_f32;
  p.nw = norm == Norm::kNone ? nullptr
         : norm == Norm::kF32 ? static_cast<const void*>(nwf.data())
                              : static_cast<const void*>(nws.data());
  p.nw_f32 = norm == Norm::kF32;
  p.rows = N;
  p.D = D;
  p.eps = static_cast<acc_t>(eps);
  p.threads = shape.threads;
  const std::string tag = std::string(tname<scalar_t>()) + " N=" + std::to_string(N) + " D=" + std::to_string(D) +
                          " threads=" + std::to_string(shape.threads) + " cpt=" + std::to_string(shape.cpt) +
                          " norm=" + std::to_string(static_cast<int>(norm)) + (w_f32 ? " w=f32" : " w=act");
  std::printf("case %s\n", tag.c_str());
  const int smem = row_block_smem_bytes<acc_t>();

  auto dispatch = [&](bool backward, const RowBlockParams<acc_t>& pp) {
#define GMOD_EMU_KERNEL(CPT, BWD) gmod_router_logits_rows_kernel<scalar_t, acc_t, VN, CPT, BWD>(pp)
    if (backward) {
      if (shape.cpt == 1) GMOD_EMU_KERNEL(1, true);
      else if (shape.cpt == 2) GMOD_EMU_KERNEL(2, true);
      else GMOD_EMU_KERNEL(4, true);
    } else {
      if (shape.cpt == 1) GMOD_EMU_KERNEL(1, false);
      else if (shape.cpt == 2) GMOD_EMU_KERNEL(2, false);
      else GMOD_EMU_KERNEL(4, false);
    }
#undef GMOD_EMU_KERNEL
  };

  // ---- forward
  {
    const int64_t rpc = row_block_rows_per_chunk(N, false);
    const int64_t chunks = (N + rpc - 1) / rpc;
    std::vector<acc_t> out(N, static_cast<acc_t>(NAN));
    RowBlockParams<acc_t> pf = p;
    pf.rows_per_chunk = rpc;
    pf.out = out.data();
    emu::launch(dim3(static_cast<unsigned>(chunks)), shape.threads, smem, [&] { dispatch(false, pf); });
    std::vector<double> o(N);
    for (int64_t r = 0; r < N; ++r) o[r] = static_cast<double>(out[r]);
    check(tag + " logits", o, logit, logit_b);
  }
  // ---- backward
  {
    const int64_t rpc = row_block_rows_per_chunk(N, true);
    const int64_t P = (N + rpc - 1) / rpc;
    std::vector<scalar_t> dxo(N * D, from_d<scalar_t>(NAN));
    std::vector<acc_t> partial(P * D, static_cast<acc_t>(NAN));
    RowBlockParams<acc_t> pb = p;
    pb.rows_per_chunk = rpc;
    pb.grad = grad.data();
    pb.dx = dxo.data();
    pb.partial = partial.data();
    emu::launch(dim3(static_cast<unsigned>(P)), shape.threads, smem, [&] { dispatch(true, pb); });
    std::vector<double> o(N * D);
    for (int64_t i = 0; i < N * D; ++i) o[i] = to_d(dxo[i]);
    check(tag + " dx", o, dx, dx_b);
    // Each chunk's column sums of g r x over exactly its rows.
    std::vector<double> u(P * D), ub(P * D), po(P * D);
    for (int64_t c = 0; c < P; ++c) {
      const int64_t r0 = c * rpc, r1 = std::min(N, r0 + rpc);
      const double sq = 16.0 * (std::sqrt(static_cast<double>(r1 - r0)) + std::sqrt(static_cast<double>(D))) * eacc;
      for (int64_t j = 0; j < D; ++j) {
        double s = 0, sa = 0;
        for (int64_t r = r0; r < r1; ++r) {
          s += gr[r] * to_d(x[r * D + j]);
          sa += grx_abs[r * D + j];
        }
        u[c * D + j] = s;
        ub[c * D + j] = sq * sa + 1e-300;
        po[c * D + j] = static_cast<double>(partial[c * D + j]);
      }
    }
    check(tag + " partial", po, u, ub);
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "all";
  uint32_t seed = 1234;
  // (N, D): CPT 1 with partial last warp; one lane of one warp; multi-chunk bwd with a partial last
  // chunk; CPT 2 and 4 at up to 384 threads; N = 1.
  run_case<float, float>(111, 200, Norm::kAct, true, seed++);
  run_case<float, float>(300, 64, Norm::kF32, true, seed++);
  run_case<float, float>(5, 6000, Norm::kNone, true, seed++);
  run_case<__nv_bfloat16, float>(70, 1024, Norm::kAct, false, seed++);
  run_case<__nv_bfloat16, float>(9, 8, Norm::kF32, true, seed++);
  run_case<__nv_bfloat16, float>(1, 256, Norm::kNone, true, seed++);
  run_case<__half, float>(10, 4800, Norm::kF32, true, seed++);
  run_case<__half, float>(130, 40, Norm::kAct, false, seed++);
  run_case<double, double>(20, 600, Norm::kAct, true, seed++);
  if (mode == "all") {
    run_case<__nv_bfloat16, float>(4, 8 * 2048, Norm::kF32, true, seed++);  // the widest CPT = 4 shape
    run_case<float, float>(257, 12, Norm::kNone, true, seed++);
  }
  // Too wide for the row-block kernel: the launcher falls back to the warp-per-row kernels.
  RowBlockShape s;
  ++g_cases;
  if (row_block_shape(8 * 2049, 8, s)) fail("row_block_shape accepted 2049 vectors per row");
  std::printf("%d cases, %d failures\n", g_cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
