// CUDA implementations of gmod.attention and gmod.attention_backward (schemas in torch_bindings.cpp,
// semantics defined by csrc/cpu/attention.cpp): input checks with the CPU kernel's messages,
// q_len / k_len validation on the device, workspaces, and dispatch on dtype x head dim to
//   attention_fwd.cu     prefill / training forward (Cq > 16),
//   attention_decode.cu  decode and short chunks (Cq <= 16): GQA-packed rows, split-k over the keys,
//   attention_bwd.cu     backward (deterministic or atomic dq).
// Environment (read once): GMOD_TRUST_INDICES=1 skips the length validation (one small kernel and one
// device sync per call; also skipped while a CUDA graph is being captured) - the kernels clamp the
// lengths to [0, Cq] / [0, Ck], so bad lengths give wrong numbers, never out-of-bounds accesses.
// GMOD_DETERMINISTIC=1 (or torch.use_deterministic_algorithms(True)) selects the deterministic backward.
// GMOD_ATTN_SIMT=1 runs the SIMT kernels for bf16 / fp16 too (they always run for float32 and on GPUs
// older than sm_80); by default bf16 / fp16 forward runs on tensor cores (attention_fwd_tc_kernel.cuh).
// Read at every call (benchmark comparisons in one process): GMOD_ATTN_FWD_BLOCK_N=32 (the d = 128
// prefill forward on 32-key tiles), GMOD_ATTN_BWD_BLOCK_N=128 (the tensor-core dk/dv kernel on 128 keys x
// 8 warps per CTA), GMOD_ATTN_DECODE_SPLITS=N (the decode's key-split count), GMOD_ATTN_FWD_IMPL and
// GMOD_ATTN_BWD_IMPL = auto (the default: the d = 64 / 128 prefill forward and non-deterministic backward on
// the sm_90a wgmma kernels where they can run) / mma / wgmma, GMOD_ATTN_PDL = 1 (the default) / 0,
// GMOD_ATTN_DECODE_STAGES = 2 (the default) / 3.
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "gmod/attention_params.h"
#include "gmod/op_checks.h"
#include "gmod/static_switch.h"
#include "gmod/message.h"

namespace gmod {
namespace {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

bool trust_indices() {
  static const bool value = env_flag("GMOD_TRUST_INDICES");
  return value;
}

bool force_simt() {
  static const bool value = env_flag("GMOD_ATTN_SIMT");
  return value;
}

// The tile experiments below are read at every call (a getenv is ~0.1 us), so that one benchmark
// process can time the default and the experiment side by side (`gmod_ext.bench attention --experiments`).
// GMOD_ATTN_FWD_BLOCK_N=32: the d = 128 tensor-core prefill forward with 32-key tiles
// (attention_fwd_tc_kernel.cuh; opt-in: 0.94-0.96x the 64-key default on the H100, 2026-11-24);
// anything else keeps the 64-key default.
int fwd_block_n() {
  const char* v = std::getenv("GMOD_ATTN_FWD_BLOCK_N");
  return v != nullptr && std::strcmp(v, "32") == 0 ? 32 : 64;
}

// GMOD_ATTN_FWD_IMPL: the bf16 / fp16 prefill forward at d = 64 / 128. Unset or "auto" (the default): the
// sm_90a wgmma kernel (attention_fwd_wgmma_kernel.cuh, 3 K / V stages) where this build has it and the GPU
// is compute capability 9.0, else the mma.sync kernels. On the H100 (gpu_check, 2026-11-26) it ran
// 1.06-1.49x the mma.sync kernel (1.01-1.38x SDPA's flash backend) at B x C = 8x1024, 4x2048, 2x4096,
// H = 32, d = 64 / 128, bf16. "mma": the mma.sync kernels everywhere; "wgmma" / "wgmma-2stage" (2
// stages, each P V waited in place): the wgmma kernel, and where it cannot run (no sm_90a kernels in this
// build, or not a compute capability 9.0 GPU) an error, so that a benchmark never times the wrong kernel.
// Returns the stages, or 0.
int fwd_wgmma(bool tensor_cores, int64_t head_dim);

// GMOD_ATTN_DECODE_SPLITS=N: the split-k decode uses N key splits (clamped to what the cache allows)
// instead of the wave model's choice (decode_num_splits). Read at every call, unlike the other flags,
// so that one process can sweep it (scripts/decode_split_sweep.py); a getenv per call is ~0.1 us.
int forced_decode_splits() {
  const char* v = std::getenv("GMOD_ATTN_DECODE_SPLITS");
  const int n = v != nullptr ? std::atoi(v) : 0;
  return n > 0 ? n : 0;
}

bool deterministic_mode() {
  static const bool env = env_flag("GMOD_DETERMINISTIC");
  return env || at::globalContext().deterministicAlgorithms();
}

// A device attribute of the current device, queried once per device (cudaDeviceGetAttribute:
// at::cuda::getCurrentDeviceProperties lives in ATen/cuda/CUDAContext.h, which needs the cuSPARSE /
// cuBLAS headers that a bare toolkit may lack).
template <cudaDeviceAttr kAttr>
int device_attribute() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  const int dev = c10::cuda::current_device();
  auto query = [dev] {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, kAttr, dev));
    return n;
  };
  if (dev < 0 || dev >= kMaxDevices) return query();
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    n = query();
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

int num_sms() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// GMOD_ATTN_PDL: the split-k decode launches its combine kernel with programmatic dependent launch
// (sm_90+: the combine's CTAs are scheduled while the split kernel's last CTAs finish, and wait on
// griddepcontrol.wait for their partials), taking the combine's launch latency out of a ~20 us batch-1
// call. The default (unset or 1) since the H100 benchmark (gpu_check, 2026-11-26, two runs): 1.00-1.07x
// the plain launch over B = 1 / 8 / 32 and caches of 4k-32k, none slower (`bench attention --experiments`:
// decode gmod-exp rows; scripts/decode_timeline.py). =0: a plain launch. Read at every call; has no
// effect below compute capability 9.0 (the instructions compile to nothing there).
int decode_pdl() {
  const char* v = std::getenv("GMOD_ATTN_PDL");
  if (v != nullptr && std::strcmp(v, "0") == 0) return 0;
  GMOD_CHECK_VALUE(v == nullptr || v[0] == '\0' || std::strcmp(v, "1") == 0, "GMOD_ATTN_PDL=", v,
                   " is not 0 or 1");
  return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9 ? 1 : 0;
}

// GMOD_ATTN_DECODE_STAGES: K / V buffers of the key-split tensor-core decode (<= 16 packed rows, i.e. q_len
// x GQA group, d <= 128). Unset or 2 (the default): double buffers, one tile in flight while one is
// computed. 3: a ring of three, two in flight (TcDecodeKeySplitDeepTile, attention_fwd_tc_kernel.cuh), for
// the batch-1 decode whose split kernel ran at 36 % of DRAM bandwidth on the H100 with one tile in flight
// (2026-11-26). Opt-in until `bench attention --experiments` has timed it (its decode gmod-exp rows).
// Read at every call; other decode plans and the prefill ignore it.
int decode_stages() {
  const char* v = std::getenv("GMOD_ATTN_DECODE_STAGES");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "2") == 0) return 2;
  GMOD_CHECK_VALUE(std::strcmp(v, "3") == 0, "GMOD_ATTN_DECODE_STAGES=", v, " is not 2 or 3");
  return 3;
}

// Keys per CTA of the tensor-core dk/dv kernel. 8 warps x 128 keys (TcBwdWideTile) halve the fp32 dQ
// atomics per key and let each Q/dO tile in shared memory serve twice the keys: on the H100 (gpu_check,
// 2026-11-24, two runs) it ran the backward 1.01-1.12x faster than 4 warps x 64 keys at B x C =
// 8x1024, 4x2048, 2x4096, H = 32, d = 64 and 128. It also halves the CTA count, so it is the default
// only where the grid still fills at least two waves (ceil(Ck / 128) x B x Hq CTAs >= 2 x SMs); small
// problems keep the 64-key tile. GMOD_ATTN_BWD_BLOCK_N=128 / =64 forces one (read at every call: the benchmark's
// --experiments row and the tests time and check both in one process).
int tc_bwd_keys_per_cta(int64_t B, int64_t Hq, int64_t Ck) {
  const char* v = std::getenv("GMOD_ATTN_BWD_BLOCK_N");
  if (v != nullptr && std::strcmp(v, "128") == 0) return attn::kTcBwdWideBlockN;
  if (v != nullptr && std::strcmp(v, "64") == 0) return attn::kTcBwdBlockN;
  const int64_t wide_ctas = (Ck + attn::kTcBwdWideBlockN - 1) / attn::kTcBwdWideBlockN * B * Hq;
  return wide_ctas >= 2 * static_cast<int64_t>(num_sms()) ? attn::kTcBwdWideBlockN : attn::kTcBwdBlockN;
}

// This build has the sm_90a kernels and the GPU is compute capability 9.0 (wgmma has no other encoding).
bool sm90a_here() {
#ifdef GMOD_WITH_SM90A
  return device_attribute<cudaDevAttrComputeCapabilityMajor>() == 9 &&
         device_attribute<cudaDevAttrComputeCapabilityMinor>() == 0;
#else
  return false;
#endif
}

// The sm_90a kernels asked for by `flag` can run: this build has them and the GPU is compute capability
// 9.0 (wgmma has no other encoding). Raises saying which is missing.
void require_sm90a(const char* flag) {
#ifdef GMOD_WITH_SM90A
  constexpr bool built = true;
#else
  constexpr bool built = false;
#endif
  GMOD_CHECK(built, flag, ": this build of gmod_ext has no sm_90a kernels (rebuild with TORCH_CUDA_ARCH_LIST "
             "containing 9.0)");
  const int major = device_attribute<cudaDevAttrComputeCapabilityMajor>();
  const int minor = device_attribute<cudaDevAttrComputeCapabilityMinor>();
  GMOD_CHECK(major == 9 && minor == 0, flag, " needs a compute capability 9.0 GPU (H100 / H200); this one is ",
             major, ".", minor);
}

int fwd_wgmma(bool tensor_cores, int64_t head_dim) {
  const bool fits = tensor_cores && attn::wgmma_fwd_supports_head_dim(head_dim);
  const char* v = std::getenv("GMOD_ATTN_FWD_IMPL");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return fits && sm90a_here() ? 3 : 0;
  if (std::strcmp(v, "mma") == 0) return 0;
  const int stages = std::strcmp(v, "wgmma") == 0 ? 3 : std::strcmp(v, "wgmma-2stage") == 0 ? 2 : 0;
  GMOD_CHECK_VALUE(stages > 0, "GMOD_ATTN_FWD_IMPL=", v,
                   " is not a forward implementation; use wgmma or wgmma-2stage (sm_90a), mma (the mma.sync "
                   "kernels) or auto (the default: wgmma where it can run)");
  require_sm90a("GMOD_ATTN_FWD_IMPL=wgmma");
  return fits ? stages : 0;
}

// GMOD_ATTN_BWD_IMPL: the non-deterministic bf16 / fp16 backward at d = 64 / 128. Unset or "auto" (the
// default): its dk/dv (+ atomic dQ) on the sm_90a wgmma kernel (attention_bwd_wgmma_kernel.cuh) where it
// can run, else the mma.sync kernels; on the H100 (gpu_check, 2026-11-26) 1.14-1.20x the mma.sync
// kernels (0.87-0.91x SDPA's flash backend) on the forward's shapes. "mma": the mma.sync kernels;
// "wgmma": as GMOD_ATTN_FWD_IMPL=wgmma, an error (never a silent fallback) where that kernel cannot run.
// Read at every call. The deterministic mode keeps the mma.sync kernels (its dQ is a separate pass).
int bwd_wgmma(bool tensor_cores, int64_t head_dim) {
  const bool fits = tensor_cores && attn::wgmma_fwd_supports_head_dim(head_dim);
  const char* v = std::getenv("GMOD_ATTN_BWD_IMPL");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return fits && sm90a_here() ? 1 : 0;
  if (std::strcmp(v, "mma") == 0) return 0;
  GMOD_CHECK_VALUE(std::strcmp(v, "wgmma") == 0, "GMOD_ATTN_BWD_IMPL=", v,
                   " is not a backward implementation; use wgmma (sm_90a), mma (the mma.sync kernels) or auto "
                   "(the default: wgmma where it can run)");
  require_sm90a("GMOD_ATTN_BWD_IMPL=wgmma");
  return fits ? 1 : 0;
}

// Tensor-core kernels: 16-bit inputs on sm_80+ (mma.sync.m16n8k16 with bf16, ldmatrix, cp.async).
bool use_tensor_cores(at::ScalarType dtype) {
  if (force_simt() || (dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  return device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 8;
}

__global__ void gmod_attn_check_lengths_kernel(const int32_t* q_len, const int32_t* k_len, int64_t B, int64_t Cq,
                                               int64_t Ck, int32_t* bad) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < B;
       b += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int32_t ql = q_len[b], kl = k_len[b];
    if (ql < 0 || ql > Cq) atomicOr(bad, 1);
    if (kl < 0 || kl > Ck) atomicOr(bad, 2);
  }
}

// 0 <= q_len[b] <= Cq and 0 <= k_len[b] <= Ck, checked on the device with one sync; on failure the
// lengths are copied to the host for the CPU kernel's error message (ValueError naming q_len / k_len).
void validate_lengths(const at::Tensor& q_len, const at::Tensor& k_len, int64_t Cq, int64_t Ck, const char* op,
                      cudaStream_t stream) {
  if (trust_indices() || q_len.numel() == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  auto bad = at::zeros({1}, q_len.options());
  const int64_t B = q_len.numel();
  const int blocks = static_cast<int>(std::min<int64_t>((B + 255) / 256, 1024));
  gmod_attn_check_lengths_kernel<<<blocks, 256, 0, stream>>>(q_len.data_ptr<int32_t>(), k_len.data_ptr<int32_t>(),
                                                             B, Cq, Ck, bad.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (bad.item<int32_t>() != 0) {
    check_lengths_cpu(q_len.cpu(), Cq, op, "q_len", "q.shape[1]");
    check_lengths_cpu(k_len.cpu(), Ck, op, "k_len", "k.shape[1]");
    GMOD_CHECK_VALUE(false, "gmod.", op, ": q_len / k_len out of range");
  }
}

// The shared shape checks (after the CUDA-only device / dtype checks of q), then the limits of
// the CUDA kernels. Length values are validated on the device (validate_lengths).
AttnDims check_attention_inputs_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& q_len, const at::Tensor& k_len, double scale) {
  check_activation(q, op, "q", 4, "[B, Cq, Hq, d]");
  GMOD_CHECK(q.is_cuda(), "gmod.", op, ": q is on ", q.device(), ", expected a CUDA tensor");
  // float64 is a CPU-only activation dtype (gradcheck); the CUDA kernels take fp32 / bf16 / fp16.
  check_dtype(q, op, "q", {at::kFloat, at::kBFloat16, at::kHalf});
  const auto a = check_attention_inputs(op, q, k, v, q_len, k_len, scale);
  const int64_t B = a.B, Cq = a.Cq, Ck = a.Ck, Hq = a.Hq, d = a.d;
  GMOD_CHECK_VALUE(attn::is_supported_head_dim(d), "gmod.", op, ": head dim d = ", d,
                    " is not supported by the CUDA kernels; supported: " GMOD_ATTN_HEADDIMS_STR);
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  GMOD_CHECK_VALUE(B <= 65535 && Hq <= 65535, "gmod.", op, ": the CUDA kernels support B <= 65535 and Hq <= 65535, got B = ",
                    B, ", Hq = ", Hq);
  GMOD_CHECK_VALUE(Cq * Hq <= kMaxInt && Ck <= kMaxInt, "gmod.", op, ": sequence too long for the CUDA kernels (Cq * Hq = ",
                    Cq * Hq, ", Ck = ", Ck, ")");
  // Implied by Hq <= 65535 and d <= 256 today; kept next to the kernels' 32-bit in-tile offsets.
  GMOD_CHECK_VALUE(attn::kMaxTileRows * Hq * d <= kMaxInt, "gmod.", op, ": rows of ", Hq * d,
                    " elements are too wide for the CUDA kernels");
  return a;
}

// Tensors from the caching allocator are 256-byte aligned; a contiguous view with an odd storage
// offset is not, and the kernels use 16-byte vector loads.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone(at::MemoryFormat::Contiguous);
}

void set_fwd_params(attn::AttnFwdParams& p, const AttnDims& a, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, const at::Tensor& q_len,
                    const at::Tensor& k_len, double scale) {
  std::memset(&p, 0, sizeof(p));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_len = q_len.data_ptr<int32_t>();
  p.k_len = k_len.data_ptr<int32_t>();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.o_batch_stride = o.stride(0), p.o_row_stride = o.stride(1), p.o_head_stride = o.stride(2);
  p.B = static_cast<int>(a.B), p.Cq = static_cast<int>(a.Cq), p.Ck = static_cast<int>(a.Ck);
  p.Hq = static_cast<int>(a.Hq), p.Hk = static_cast<int>(a.Hk), p.group = static_cast<int>(a.Hq / a.Hk);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.num_splits = 1;
  p.decode_pdl = 0;
  p.decode_stages = 2;
  p.use_tensor_cores = use_tensor_cores(q.scalar_type()) ? 1 : 0;
  p.tc_fwd_block_n = fwd_block_n();
  p.fwd_wgmma = fwd_wgmma(p.use_tensor_cores != 0, a.d);
}

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& v_in, const at::Tensor& q_len,
                                                  const at::Tensor& k_len, double scale) {
  constexpr const char* op = "attention";
  const auto a = check_attention_inputs_cuda(op, q_in, k_in, v_in, q_len, k_len, scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  validate_lengths(q_len, k_len, a.Cq, a.Ck, op, stream);
  auto o = at::empty_like(q_in);
  auto lse = at::empty({a.B, a.Hq, a.Cq}, q_in.options().dtype(at::kFloat));
  if (a.B * a.Cq * a.Hq == 0) return {o, lse};
  const auto q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);

  attn::AttnFwdParams p;
  set_fwd_params(p, a, q, k, v, o, lse, q_len, k_len, scale);
  at::Tensor o_part, lse_part;
  const bool decode = a.Cq <= attn::kDecodeMaxCq;
  GMOD_ATTN_DTYPE_SWITCH(q.scalar_type(), op, [&] {
    GMOD_HEADDIM_SWITCH(a.d, op, [&] {
      if (!decode) {
        attn::run_attn_fwd<elem_t, kHeadDim>(p, stream);
        return;
      }
      const bool tc = p.use_tensor_cores != 0;
      const int block_m = attn::decode_block_m(tc, a.d, a.Cq * p.group);
      const int block_n = attn::decode_block_n(tc, a.d);
      const int64_t m_blocks = (a.Cq * p.group + block_m - 1) / block_m;
      p.decode_stages = decode_stages();  // before the occupancy query: the deep tile holds fewer CTAs
      const int forced = forced_decode_splits();
      p.num_splits = forced > 0
                         ? attn::decode_clamp_splits(forced, a.B, a.Ck, block_n)
                         : attn::decode_num_splits(a.B, a.Hk, m_blocks, a.Ck, num_sms(), block_n,
                                                   attn::decode_split_ctas_per_sm<elem_t, kHeadDim>(p));
      if (p.num_splits > 1) {
        // The split kernel writes every lse_part and o_part entry: no zero fill needed.
        o_part = at::empty({p.num_splits, a.B, a.Cq, a.Hq, a.d}, q.options().dtype(at::kFloat));
        lse_part = at::empty({p.num_splits, a.B, a.Hq, a.Cq}, q.options().dtype(at::kFloat));
        p.o_part = o_part.data_ptr<float>();
        p.lse_part = lse_part.data_ptr<float>();
        p.decode_pdl = decode_pdl();
      }
      attn::run_attn_decode<elem_t, kHeadDim>(p, stream);
    });
  });
  return {o, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_o_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& o_in, const at::Tensor& lse, const at::Tensor& q_len, const at::Tensor& k_len, double scale) {
  constexpr const char* op = "attention_backward";
  const auto a = check_attention_inputs_cuda(op, q_in, k_in, v_in, q_len, k_len, scale);
  check_attention_backward_inputs(op, grad_o_in, o_in, lse, q_in, a, at::kFloat);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  validate_lengths(q_len, k_len, a.Cq, a.Ck, op, stream);
  if (a.B * a.Cq * a.Hq == 0 || a.Ck == 0)
    return {at::zeros_like(q_in), at::zeros_like(k_in), at::zeros_like(v_in)};
  const auto q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  const auto o = aligned16(o_in), grad_o = aligned16(grad_o_in);

  const bool deterministic = deterministic_mode();
  const bool fp32 = q.scalar_type() == at::kFloat;
  const int64_t group = a.Hq / a.Hk;
  const auto f32 = q.options().dtype(at::kFloat);
  // One dk/dv CTA per kv head (summing its GQA group, no atomics) when deterministic or when that grid
  // already fills the GPU twice over; else one per q head with fp32 atomics into dk/dv accumulators.
  // Sized with the key tile of the dk/dv kernel that will run (attention_bwd.cu): kTcBwdBlockN or
  // kTcBwdWideBlockN keys (tc_bwd_keys_per_cta) for the tensor-core kernel (bf16 / fp16 with
  // d <= 128, static_assert'ed there),
  // BwdTile<d>::kBlockN for the SIMT one.
  const bool tc_bwd = use_tensor_cores(q.scalar_type()) && attn::tc_bwd_supports_head_dim(a.d);
  // The wgmma dk/dv kernel (non-deterministic only) has 128 keys per CTA, as TcBwdWideTile.
  const int wgmma_bwd = tc_bwd && !deterministic ? bwd_wgmma(true, a.d) : 0;
  int64_t bwd_block_n = 0;
  GMOD_HEADDIM_SWITCH(a.d, op, [&] {
    bwd_block_n = wgmma_bwd ? attn::kTcBwdWideBlockN
                  : tc_bwd  ? tc_bwd_keys_per_cta(a.B, a.Hq, a.Ck)
                            : attn::BwdTile<kHeadDim>::kBlockN;
  });
  const int64_t kv_ctas = (a.Ck + bwd_block_n - 1) / bwd_block_n * a.B * a.Hk;
  const int64_t heads_per_cta = (deterministic || group == 1 || kv_ctas >= 2 * num_sms()) ? group : 1;

  at::Tensor dq, dk, dv, dq_accum, dk_accum, dv_accum;
  if (deterministic) {
    dq = at::empty_like(q);  // the dq kernel writes every row
  } else if (fp32) {
    dq = dq_accum = at::zeros_like(q);
  } else {
    dq_accum = at::zeros(q.sizes(), f32);
  }
  if (heads_per_cta == group) {
    dk = at::empty_like(k);  // the dk/dv kernel writes every row
    dv = at::empty_like(v);
  } else if (fp32) {
    dk = dk_accum = at::zeros_like(k);
    dv = dv_accum = at::zeros_like(v);
  } else {
    dk_accum = at::zeros(k.sizes(), f32);
    dv_accum = at::zeros(v.sizes(), f32);
  }
  auto delta = at::empty({a.B, a.Hq, a.Cq}, f32);

  attn::AttnBwdParams p;
  std::memset(&p, 0, sizeof(p));
  set_fwd_params(p, a, q, k, v, o, lse, q_len, k_len, scale);
  p.dout = grad_o.data_ptr();
  p.do_batch_stride = grad_o.stride(0), p.do_row_stride = grad_o.stride(1), p.do_head_stride = grad_o.stride(2);
  // dq / dk / dv are fresh contiguous tensors of q's / k's shape; dq_accum etc. share their layout.
  p.dq = dq.defined() ? dq.data_ptr() : nullptr;
  p.dk = dk.defined() ? dk.data_ptr() : nullptr;
  p.dv = dv.defined() ? dv.data_ptr() : nullptr;
  p.dq_batch_stride = a.Cq * a.Hq * a.d, p.dq_row_stride = a.Hq * a.d, p.dq_head_stride = a.d;
  p.dk_batch_stride = a.Ck * a.Hk * a.d, p.dk_row_stride = a.Hk * a.d, p.dk_head_stride = a.d;
  p.dv_batch_stride = p.dk_batch_stride, p.dv_row_stride = p.dk_row_stride, p.dv_head_stride = p.dk_head_stride;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.defined() ? dq_accum.data_ptr<float>() : nullptr;
  p.dk_accum = dk_accum.defined() ? dk_accum.data_ptr<float>() : nullptr;
  p.dv_accum = dv_accum.defined() ? dv_accum.data_ptr<float>() : nullptr;
  p.heads_per_cta = static_cast<int>(heads_per_cta);
  p.tc_bwd_block_n = tc_bwd ? static_cast<int>(bwd_block_n) : 0;
  p.bwd_wgmma = wgmma_bwd;

  GMOD_ATTN_DTYPE_SWITCH(q.scalar_type(), op, [&] {
    GMOD_HEADDIM_SWITCH(a.d, op, [&] { attn::run_attn_bwd<elem_t, kHeadDim>(p, deterministic, stream); });
  });
  if (!dq.defined()) dq = dq_accum.to(q.scalar_type());
  if (!dk.defined()) dk = dk_accum.to(k.scalar_type());
  if (!dv.defined()) dv = dv_accum.to(v.scalar_type());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(gmod, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace gmod
