"""CUDA kernels of gmod.attention / gmod.attention_backward (csrc/cuda/attention_*.cu).

Checked against a small float64 reference written here (explicit masks + softmax), with
flash-attention's rule for bf16/fp16: the kernel's max error against the float64 reference must be
at most twice the max error of the same math done in the input dtype, plus a rounding-sized atol.
Covers random per-row q_len/k_len (0 and 1 included, q_len < k_len and q_len > k_len), GQA groups
1/2/4/8, head dims 64 and 128 (plus 32/96/256), the split-k decode path (q_len = 1, caches of 4096+),
exact zeros past q_len / k_len on NaN-poisoned memory, the deterministic backward (bit-identical
reruns), and input errors. Skipped without a GPU or without the CUDA kernels.

GMOD_TEST_DEVICE_UNDER_TEST=cpu runs the same tests on the CPU kernels (as test_cuda_build.py does;
test_attention.py runs both files so, in every CI run): that checks the tests themselves (references, tolerances, shapes, flag handling) on a machine
without a GPU, so that a GPU session's few minutes are not spent on a broken test. Tests of CUDA-only
behaviour (``cuda_only``) are skipped then.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import gmod_ext  # noqa: F401  (loads torch.ops.gmod, fake kernels, autograd)
from gmod_ext import ops

GMOD_OPS = ("attention", "attention_backward")


def _skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    for op in GMOD_OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"gmod::{op}", "CUDA"):
            return f"no CUDA kernel registered for gmod::{op}"
    return None


ON_CPU = os.environ.get("GMOD_TEST_DEVICE_UNDER_TEST", "cuda") == "cpu"
if ON_CPU:
    pytestmark = []
    DEV = "cpu"
else:
    pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]
    DEV = "cuda"
# CUDA-only behaviour: the CUDA kernels' head-dim / device errors, CUDA subprocesses.
cuda_only = pytest.mark.skipif(ON_CPU, reason="CUDA-only behaviour (GMOD_TEST_DEVICE_UNDER_TEST=cpu)")
LOWP = [torch.bfloat16, torch.float16]


# ------------------------------------------------------------------ reference
def visible_mask(Cq, Ck, q_len, k_len, device):
    """allowed[b, i, j]: i < q_len[b], j < k_len[b], j <= k_len[b] - q_len[b] + i."""
    ql = q_len.to(device=device, dtype=torch.int64).view(-1, 1, 1)
    kl = k_len.to(device=device, dtype=torch.int64).view(-1, 1, 1)
    i = torch.arange(Cq, device=device).view(1, -1, 1)
    j = torch.arange(Ck, device=device).view(1, 1, -1)
    return (i < ql) & (j < kl) & (j <= kl - ql + i)


def ref_attention(q, k, v, q_len, k_len, scale, dtype):
    """(o, lse) with the math in ``dtype``; differentiable, no NaN for rows without keys."""
    B, Cq, Hq, d = q.shape
    Hk = k.shape[2]
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    if Hq != Hk:
        kc = kc.repeat_interleave(Hq // Hk, dim=2)
        vc = vc.repeat_interleave(Hq // Hk, dim=2)
    s = torch.einsum("bihe,bjhe->bhij", qc, kc) * scale
    allowed = visible_mask(Cq, k.shape[1], q_len, k_len, q.device).unsqueeze(1)  # [B, 1, Cq, Ck]
    has_key = allowed.any(dim=-1, keepdim=True)
    s = s.masked_fill(~allowed, -math.inf)
    s = torch.where(has_key, s, torch.zeros_like(s))
    p = torch.softmax(s, dim=-1) * allowed
    o = torch.einsum("bhij,bjhe->bihe", p.to(dtype), vc)
    lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key.squeeze(-1), -math.inf)
    return o, lse


def ref_grads(q, k, v, q_len, k_len, scale, dtype, grad_o):
    qr, kr, vr = (t.detach().to(dtype).requires_grad_(True) for t in (q, k, v))
    o, _ = ref_attention(qr, kr, vr, q_len, k_len, scale, dtype)
    o.backward(grad_o.to(dtype))
    return o.detach(), qr.grad, kr.grad, vr.grad


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def assert_flash_close(out, ref, pt, what, factor=2.0):
    """max|out - ref| <= factor * max|pt - ref| + atol, with ref in float64 and pt the same math in
    the input dtype; atol = one rounding of out's dtype at the reference's magnitude. Non-finite
    entries (lse = -inf) must match exactly."""
    out64, ref64, pt64 = (t.detach().double() for t in (out, ref, pt))
    fin = torch.isfinite(ref64)
    assert torch.equal(out64[~fin], ref64[~fin]), f"{what}: non-finite entries differ from the reference"
    assert bool(torch.isfinite(out64[fin]).all()), f"{what}: non-finite values where the reference is finite"
    if not bool(fin.any()):
        return
    err = (out64 - ref64)[fin].abs().max().item()
    pt_err = (pt64 - ref64)[fin].abs().max().item()
    atol = unit_roundoff(out.dtype) * max(ref64[fin].abs().max().item(), 1.0) + 1e-5
    assert err <= factor * pt_err + atol, (
        f"{what}: max error {err:.3g} vs float64 reference exceeds {factor} x {pt_err:.3g} "
        f"(same math in {pt.dtype}) + {atol:.3g}"
    )


def assert_lse_close(lse, ref, what="lse"):
    """lse is accumulated in fp32 from exact input values: a few fp32 roundings of |s|."""
    lse64, ref64 = lse.double(), ref.double()
    fin = torch.isfinite(ref64)
    assert torch.equal(lse64[~fin], ref64[~fin]), f"{what}: -inf pattern differs"
    err = (lse64 - ref64)[fin].abs()
    bound = 1e-4 + 1e-4 * ref64[fin].abs()
    assert bool((err <= bound).all()), f"{what}: max error {err.max().item():.3g}"


# ------------------------------------------------------------------ inputs
def lengths(B, hi, special=(), device=DEV):
    vals = list(special)[:B] + torch.randint(0, hi + 1, (max(0, B - len(special)),)).tolist()
    return torch.tensor([min(max(v, 0), hi) for v in vals], dtype=torch.int32, device=device)


def make_qkv(B, Cq, Ck, Hq, Hk, d, dtype, requires_grad=False):
    q = torch.randn(B, Cq, Hq, d, device=DEV, dtype=dtype)
    k = torch.randn(B, Ck, Hk, d, device=DEV, dtype=dtype)
    v = torch.randn(B, Ck, Hk, d, device=DEV, dtype=dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def poison_heap(nbytes, copies=4):
    """Leave NaN-filled freed blocks of about nbytes in the caching allocator, so that an output the
    kernel forgets to write is likely to hold NaN instead of a lucky zero."""
    n = max(1, nbytes // 4)
    blocks = [torch.full((n,), math.nan, dtype=torch.float32, device=DEV) for _ in range(copies)]
    del blocks


# (B, Cq, Ck, q_len specials, k_len specials): training, q_len < k_len, q_len > k_len, tiny.
SHAPES = [
    (3, 130, 130, (130, 0, 1), (130, 5, 1)),
    (4, 77, 200, (77, 1, 40, 0), (200, 200, 41, 3)),
    (3, 96, 64, (96, 64, 96), (64, 10, 0)),
    (2, 17, 17, (17, 1), (17, 16)),
]
GROUPS = [1, 2, 4, 8]


# The kernel plans the reference tests run: the default ("auto": the sm_90a wgmma kernels at d = 64 / 128
# on an H100 / H200 built with them, mma.sync elsewhere) and, on a GPU, the mma.sync kernels forced, so that
# an H100 run also checks the kernels every other GPU runs. (On CPU the flags change nothing.)
IMPLS = ["auto"] if ON_CPU else ["auto", "mma"]


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_forward_matches_reference(dtype, d, group, shape, impl, monkeypatch):
    monkeypatch.setenv("GMOD_ATTN_FWD_IMPL", impl)
    B, Cq, Ck, qs, ks = shape
    Hq = 8
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hq // group, d, dtype)
    q_len, k_len = lengths(B, Cq, qs), lengths(B, Ck, ks)
    scale = 1.0 / math.sqrt(d)
    o, lse = ops.attention(q, k, v, q_len, k_len)
    assert o.dtype == dtype and o.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (B, Hq, Cq)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("Cq,Ck", [(70, 90), (5, 700), (1, 300)])
def test_forward_float32_all_head_dims(d, Cq, Ck):
    B, Hq, Hk = 3, 4, 2
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, torch.float32)
    q_len, k_len = lengths(B, Cq, (Cq, 1)), lengths(B, Ck, (Ck, 0))
    o, lse = ops.attention(q, k, v, q_len, k_len, 0.3)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, 0.3, torch.float64)
    # The flash rule in fp32 too: a fixed atol (1e-5) was one rounding too tight for d = 256 sums.
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, 0.3, torch.float32)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("scale", [-0.2, 0.0, 0.9])
def test_forward_scale_sign(dtype, d, scale):
    """The prefill kernel folds a positive scale into the exponent (d <= 96); zero and negative scales
    take the plain path. Both must match the reference."""
    B, Cq, Ck, Hq, Hk = 2, 150, 170, 4, 2
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len, k_len = lengths(B, Cq, (Cq, 37)), lengths(B, Ck, (Ck, 90))
    o, lse = ops.attention(q, k, v, q_len, k_len, scale)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("Ck", [4096, 8195])
def test_decode_long_cache(dtype, d, group, Ck):
    """q_len = 1 against long caches: the split-k (flash-decoding) path with its combine kernel."""
    B, Hq = 4, 8
    q, k, v = make_qkv(B, 1, Ck, Hq, Hq // group, d, dtype)
    q_len = torch.tensor([1, 1, 1, 0], dtype=torch.int32, device=DEV)
    k_len = torch.tensor([Ck, Ck - 17, 1, Ck], dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(d)
    o, lse = ops.attention(q, k, v, q_len, k_len)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)
    assert bool((o[3] == 0).all()) and bool(torch.isneginf(lse[3]).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d", [32, 96, 128, 256])
@pytest.mark.parametrize("splits", [2, 7, 64, 500])
def test_decode_forced_split_counts(dtype, d, splits, monkeypatch):
    """GMOD_ATTN_DECODE_SPLITS (read at every call) forces the key-split count: up to the 128 the
    combine takes (500 is clamped), with rows whose short caches leave most splits empty (their o_part
    must be written as zeros, weight 0), at head dims with 8 to 64 float4 columns per combine row.
    Every count must match the reference and give bit-identical results on a second call."""
    B, Hq, Hk, Ck = 3, 8, 2, 8192 + 40
    q, k, v = make_qkv(B, 1, Ck, Hq, Hk, d, dtype)
    q_len = torch.ones(B, dtype=torch.int32, device=DEV)
    k_len = torch.tensor([Ck, 100, 1], dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(d)
    monkeypatch.setenv("GMOD_ATTN_DECODE_SPLITS", str(splits))
    poison_heap(64 << 20)
    o, lse = ops.attention(q, k, v, q_len, k_len, scale)
    o2, lse2 = ops.attention(q, k, v, q_len, k_len, scale)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)
    assert torch.equal(o, o2) and torch.equal(lse, lse2), "the split-k combine must be deterministic"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("Cq,B,Ck,splits", [(1, 1, 4096, None), (1, 3, 16384 + 40, None), (4, 2, 1000, "3"),
                                            (1, 2, 777, "64"), (2, 1, 333, "1")])
def test_decode_three_stages(dtype, d, Cq, B, Ck, splits, monkeypatch):
    """GMOD_ATTN_DECODE_STAGES=3: the key-split decode (here GQA 4, Cq x 4 <= 16 packed rows) on a ring of
    three K / V buffers, two key tiles in flight per CTA. Split by the wave model (which sees the deep
    tile's occupancy) and forced to 3, to one tile per split and to none; rows cut short by k_len, a row
    with no keys, q_len 0. Right against the float64 reference by the flash rule, bit-identical on a
    second call, and the profiler must name the 3-stage kernel (on a GPU whose blocks can have its 109 KB
    at d = 128; elsewhere the double-buffered one). Other values raise. On the CPU kernels
    (GMOD_TEST_DEVICE_UNDER_TEST=cpu) the flags change nothing and the values are checked."""
    Hq, Hk = 8, 2
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len = torch.randint(1, Cq + 1, (B,), dtype=torch.int32, device=DEV)
    k_len = torch.randint(Ck // 3, Ck + 1, (B,), dtype=torch.int32, device=DEV)
    k_len[0] = Ck
    if B > 1:
        q_len[-1], k_len[-1] = 0, 5
    if B > 2:
        k_len[1] = 0
    scale = 1.0 / math.sqrt(d)
    if splits is not None:
        monkeypatch.setenv("GMOD_ATTN_DECODE_SPLITS", splits)
    monkeypatch.setenv("GMOD_ATTN_DECODE_STAGES", "3")
    poison_heap(64 << 20)
    prof = None if ON_CPU else torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    with prof or contextlib.nullcontext():
        o, lse = ops.attention(q, k, v, q_len, k_len, scale)
        if not ON_CPU:
            torch.cuda.synchronize()
    o2, lse2 = ops.attention(q, k, v, q_len, k_len, scale)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    monkeypatch.delenv("GMOD_ATTN_DECODE_STAGES")  # the double-buffered default: the same math, other order
    o_def, lse_def = ops.attention(q, k, v, q_len, k_len, scale)
    assert_flash_close(o_def, o_ref, o_pt, "o (2 stages)")
    if ON_CPU:
        return
    # the stage count is TcFwdTraits' last template argument
    stages = [re.search(r"TcFwdTraits<([^<>]*)>", e.name) for e in prof.events() if "gmod_attn_fwd_tc_kernel" in e.name]
    deep_fits = d == 64 or torch.cuda.get_device_properties(DEV).shared_memory_per_block_optin >= 109 * 1024
    assert stages and all(m is not None and m.group(1).split(",")[-1].strip() == ("3" if deep_fits else "2")
                          for m in stages), [e.name for e in prof.events()]
    monkeypatch.setenv("GMOD_ATTN_DECODE_STAGES", "4")
    with pytest.raises(ValueError, match="GMOD_ATTN_DECODE_STAGES=4 is not 2 or 3"):
        ops.attention(q, k, v, q_len, k_len, scale)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,Ck", [(1, 4096), (2, 16384 + 5), (16, 4096)])
def test_decode_pdl_combine(dtype, B, Ck, monkeypatch):
    """GMOD_ATTN_PDL=1: the split-k decode's combine kernel is launched with programmatic dependent launch
    (sm_90+), so it starts while the split kernel drains and waits on griddepcontrol.wait before reading
    the partials. The same kernels run, so the result must be bit-identical to the plain launch, and
    right against the reference, also for calls queued back to back (a combine that read partials
    before the split kernel wrote them would differ). The profiler must show the split and the combine kernels.
    Other values raise; below compute capability 9.0 the flag changes nothing."""
    Hq, Hk, d = 32, 8, 128
    q, k, v = make_qkv(B, 1, Ck, Hq, Hk, d, dtype)
    q_len = torch.ones(B, dtype=torch.int32, device=DEV)
    k_len = torch.randint(Ck // 2, Ck + 1, (B,), dtype=torch.int32, device=DEV)
    k_len[0] = Ck
    scale = 1.0 / math.sqrt(d)
    monkeypatch.setenv("GMOD_ATTN_PDL", "0")
    o0, lse0 = ops.attention(q, k, v, q_len, k_len, scale)
    monkeypatch.setenv("GMOD_ATTN_PDL", "1")
    poison_heap(64 << 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        o1, lse1 = ops.attention(q, k, v, q_len, k_len, scale)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if "gmod_attn" in e.name]
    assert any("gmod_attn_decode_combine_kernel" in n for n in names), names  # only a split decode combines
    assert any("gmod_attn_fwd" in n for n in names), names
    assert torch.equal(o0, o1) and torch.equal(lse0, lse1), "PDL must not change the result"
    outs = [ops.attention(q, k * (1 + i), v, q_len, k_len, scale) for i in range(4)]  # back to back
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
    assert_flash_close(o1, o_ref, o_pt, "o")
    assert_lse_close(lse1, lse_ref)
    monkeypatch.setenv("GMOD_ATTN_PDL", "0")
    for i, (o, lse) in enumerate(outs):
        o_plain, lse_plain = ops.attention(q, k * (1 + i), v, q_len, k_len, scale)
        assert torch.equal(o, o_plain) and torch.equal(lse, lse_plain), i
    monkeypatch.delenv("GMOD_ATTN_PDL")  # the default launches with PDL (the same numbers)
    o_def, lse_def = ops.attention(q, k, v, q_len, k_len, scale)
    assert torch.equal(o_def, o1) and torch.equal(lse_def, lse1)
    monkeypatch.setenv("GMOD_ATTN_PDL", "yes")
    with pytest.raises(ValueError, match="GMOD_ATTN_PDL=yes is not 0 or 1"):
        ops.attention(q, k, v, q_len, k_len, scale)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("Cq", [1, 4, 16])
@pytest.mark.parametrize("B,Ck", [(1, 5000), (6, 4100), (3, 100)])
def test_decode_chunks(dtype, Cq, B, Ck):
    """Short chunks (Cq <= 16) on caches of several lengths, GQA 4: packed rows, splits or not."""
    Hq, Hk, d = 8, 2, 128
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len = lengths(B, Cq, (Cq, 1, 0))
    k_len = lengths(B, Ck, (Ck, Ck // 2, Cq))
    o, lse = ops.attention(q, k, v, q_len, k_len, 0.1)
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, 0.1, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, 0.1, dtype)
    assert_flash_close(o, o_ref, o_pt, "o")
    assert_lse_close(lse, lse_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("Cq,Ck", [(100, 120), (1, 4096), (8, 300)])
def test_rows_past_q_len_are_exact_zeros(dtype, Cq, Ck):
    B, Hq, Hk, d = 4, 4, 2, 64
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len = lengths(B, Cq, (0, Cq // 2, 1, Cq))
    k_len = lengths(B, Ck, (Ck, 0, Ck, Cq // 3))
    poison_heap(4 * q.numel() * 8)
    o, lse = ops.attention(q, k, v, q_len, k_len)
    allowed = visible_mask(Cq, Ck, q_len, k_len, DEV)  # [B, Cq, Ck]
    no_key = ~allowed.any(-1)  # [B, Cq]: past q_len, or no visible key
    assert not bool(o.isnan().any()) and not bool(lse.isnan().any())
    assert bool((o[no_key] == 0).all()), "rows past q_len / without keys must be exactly 0"
    assert bool(torch.isneginf(lse.transpose(1, 2)[no_key]).all())
    assert bool(torch.isfinite(lse.transpose(1, 2)[~no_key]).all())


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_backward_matches_reference(dtype, d, group, shape, deterministic, impl, monkeypatch):
    monkeypatch.setenv("GMOD_ATTN_FWD_IMPL", impl)
    monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", impl)
    B, Cq, Ck, qs, ks = shape
    Hq = 8
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hq // group, d, dtype, requires_grad=True)
    q_len, k_len = lengths(B, Cq, qs), lengths(B, Ck, ks)
    scale = 1.0 / math.sqrt(d)
    g = torch.randn(B, Cq, Hq, d, device=DEV, dtype=dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        o, _ = ops.attention(q, k, v, q_len, k_len)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), g)
    finally:
        torch.use_deterministic_algorithms(prev)
    _, dq_ref, dk_ref, dv_ref = ref_grads(q, k, v, q_len, k_len, scale, torch.float64, g)
    _, dq_pt, dk_pt, dv_pt = ref_grads(q, k, v, q_len, k_len, scale, dtype, g)
    assert dq.dtype == dtype and dk.shape == k.shape and dv.shape == v.shape
    assert_flash_close(dq, dq_ref, dq_pt, "dq")
    assert_flash_close(dk, dk_ref, dk_pt, "dk")
    assert_flash_close(dv, dv_ref, dv_pt, "dv")


@pytest.mark.parametrize("d", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_float32_all_head_dims(d, deterministic):
    B, Cq, Ck, Hq, Hk = 3, 70, 90, 4, 2
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, torch.float32, requires_grad=True)
    q_len, k_len = lengths(B, Cq, (Cq, 1)), lengths(B, Ck, (Ck, 0))
    g = torch.randn(B, Cq, Hq, d, device=DEV)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        o, _ = ops.attention(q, k, v, q_len, k_len, 0.2)
        grads = torch.autograd.grad(o, (q, k, v), g)
    finally:
        torch.use_deterministic_algorithms(prev)
    _, *ref = ref_grads(q, k, v, q_len, k_len, 0.2, torch.float64, g)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_exact_zeros_past_lengths(deterministic):
    B, Cq, Ck, Hq, Hk, d = 4, 90, 110, 8, 2, 128
    dtype = torch.bfloat16
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len = lengths(B, Cq, (0, 45, 1, Cq))
    k_len = lengths(B, Ck, (Ck, 50, 0, 7))
    o, lse = ops.attention(q, k, v, q_len, k_len)
    g = torch.randn_like(o)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        poison_heap(4 * k.numel() * 4)
        dq, dk, dv = torch.ops.gmod.attention_backward(g, q, k, v, o, lse, q_len, k_len, 1.0 / math.sqrt(d))
    finally:
        torch.use_deterministic_algorithms(prev)
    for t in (dq, dk, dv):
        assert not bool(t.isnan().any())
    for b in range(B):
        assert bool((dq[b, int(q_len[b]):] == 0).all()), "dq rows past q_len must be exactly 0"
        assert bool((dk[b, int(k_len[b]):] == 0).all()), "dk rows past k_len must be exactly 0"
        assert bool((dv[b, int(k_len[b]):] == 0).all()), "dv rows past k_len must be exactly 0"


@pytest.mark.parametrize("shape", [(2, 200, 300, 8, 2, 128), (4, 512, 2048, 8, 2, 64), (3, 64, 64, 8, 1, 64)])
def test_deterministic_backward_is_bitwise_reproducible(shape):
    """Deterministic mode: identical dq/dk/dv on reruns; and it agrees with the atomic path."""
    B, Cq, Ck, Hq, Hk, d = shape
    dtype = torch.bfloat16
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len = lengths(B, Cq, (Cq, 1))
    k_len = lengths(B, Ck, (Ck, Ck))
    k_len = torch.maximum(k_len, q_len)
    o, lse = ops.attention(q, k, v, q_len, k_len)
    g = torch.randn_like(o)
    args = (g, q, k, v, o, lse, q_len, k_len, 1.0 / math.sqrt(d))
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = torch.ops.gmod.attention_backward(*args)
        second = torch.ops.gmod.attention_backward(*args)
        torch.use_deterministic_algorithms(False)
        atomic = torch.ops.gmod.attention_backward(*args)
    finally:
        torch.use_deterministic_algorithms(prev)
    for name, a, b_, c in zip(("dq", "dk", "dv"), first, second, atomic):
        assert torch.equal(a, b_), f"{name} differs between two deterministic runs"
        torch.testing.assert_close(c.float(), a.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")


def test_opcheck():
    from torch.library import opcheck

    q, k, v = make_qkv(2, 33, 40, 4, 2, 64, torch.bfloat16, requires_grad=True)
    q_len = torch.tensor([33, 7], dtype=torch.int32, device=DEV)
    k_len = torch.tensor([40, 3], dtype=torch.int32, device=DEV)
    opcheck(torch.ops.gmod.attention.default, (q, k, v, q_len, k_len, 0.125))


# ------------------------------------------------------------------ errors
@cuda_only
def test_bad_inputs_raise():
    q, k, v = make_qkv(2, 8, 12, 4, 2, 64, torch.bfloat16)
    q_len = torch.tensor([8, 3], dtype=torch.int32, device=DEV)
    k_len = torch.tensor([12, 5], dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"head dim d = 80 .*32, 64, 96, 128, 256"):
        q80, k80, v80 = make_qkv(2, 8, 12, 4, 2, 80, torch.bfloat16)
        ops.attention(q80, k80, v80, q_len, k_len)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention(q.double(), k.double(), v.double(), q_len, k_len)
    with pytest.raises(TypeError, match="dtype"):
        ops.attention(q, k.half(), v.half(), q_len, k_len)
    with pytest.raises(TypeError, match="k_len"):
        ops.attention(q, k, v, q_len, k_len.long())
    with pytest.raises(ValueError, match=r"k_len\[1\] = 13"):
        ops.attention(q, k, v, q_len, torch.tensor([12, 13], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match=r"k_len\[0\] = -1"):
        ops.attention(q, k, v, q_len, torch.tensor([-1, 3], dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match=r"q_len\[0\] = 9"):
        ops.attention(q, k, v, torch.tensor([9, 3], dtype=torch.int32, device=DEV), k_len)
    with pytest.raises(ValueError, match="multiple"):
        q3, _, _ = make_qkv(2, 8, 12, 3, 2, 64, torch.bfloat16)
        ops.attention(q3, k, v, q_len, k_len)
    with pytest.raises(RuntimeError, match="device"):
        ops.attention(q, k, v, q_len.cpu(), k_len)
    with pytest.raises(ValueError, match="contiguous"):
        ops.attention(q.transpose(1, 2), k, v, q_len, k_len)
    o, lse = ops.attention(q, k, v, q_len, k_len)
    with pytest.raises(TypeError, match="lse"):
        torch.ops.gmod.attention_backward(o, q, k, v, o, lse.double(), q_len, k_len, 0.125)
    with pytest.raises(ValueError, match=r"k_len\[1\] = 13"):
        torch.ops.gmod.attention_backward(
            o, q, k, v, o, lse, q_len, torch.tensor([12, 13], dtype=torch.int32, device=DEV), 0.125
        )


def run_in_subprocess(code: str, timeout: float = 300, **env_flags: str) -> None:
    """Runs ``code`` in a fresh interpreter with the given environment flags (the gmod env flags are read
    once per process) and this checkout first on the path; it must exit 0 and print OK within timeout
    seconds (a timeout is an AssertionError too: a hung kernel fails its test, not the session)."""
    env = dict(os.environ, **env_flags)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"timed out after {timeout:.0f} s (a kernel that never finishes?)") from err
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@cuda_only
def test_env_flags_in_subprocess():
    """GMOD_TRUST_INDICES=1 skips validation but the kernels clamp (no crash, no fault);
    GMOD_DETERMINISTIC=1 gives bit-identical gradients."""
    code = textwrap.dedent(
        """
        import torch, gmod_ext
        from gmod_ext import ops
        q = torch.randn(2, 40, 4, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(2, 50, 2, 64, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        bad_q = torch.tensor([41, -3], dtype=torch.int32, device="cuda")
        bad_k = torch.tensor([1000, 50], dtype=torch.int32, device="cuda")
        o, lse = ops.attention(q, k, v, bad_q, bad_k)  # clamped to (40, 0) / (50, 50)
        ok_q = torch.tensor([40, 0], dtype=torch.int32, device="cuda")
        ok_k = torch.tensor([50, 50], dtype=torch.int32, device="cuda")
        o2, lse2 = ops.attention(q, k, v, ok_q, ok_k)
        assert torch.equal(o, o2) and torch.equal(lse, lse2)
        g = torch.randn_like(o)
        a = torch.ops.gmod.attention_backward(g, q, k, v, o, lse, ok_q, ok_k, 0.125)
        b = torch.ops.gmod.attention_backward(g, q, k, v, o, lse, ok_q, ok_k, 0.125)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        torch.cuda.synchronize()
        print("OK")
        """
    )
    run_in_subprocess(code, GMOD_TRUST_INDICES="1", GMOD_DETERMINISTIC="1")


@cuda_only
@pytest.mark.parametrize("dtype", LOWP)
def test_simt_kernels_for_16bit_inputs(dtype, tmp_path):
    """bf16 / fp16 run on the tensor-core kernels by default; GMOD_ATTN_SIMT=1 (read once per process)
    selects the SIMT kernels that pre-sm_80 GPUs use. Both must meet the same accuracy rule: prefill,
    GQA decode with split-k, and the backward."""
    B, Cq, Ck, Hq, Hk, d = 3, 70, 90, 4, 2, 64
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    qd, kd, vd = make_qkv(2, 1, 3000, 8, 2, 128, dtype)
    q_len, k_len = lengths(B, Cq, (70, 1, 0)), lengths(B, Ck, (90, 2, 40))
    qd_len = torch.ones(2, dtype=torch.int32, device=DEV)
    kd_len = torch.tensor([3000, 1777], dtype=torch.int32, device=DEV)
    g = torch.randn_like(q)
    inputs = tmp_path / "inputs.pt"
    torch.save({n: t.cpu() for n, t in dict(q=q, k=k, v=v, q_len=q_len, k_len=k_len, g=g, qd=qd, kd=kd, vd=vd,
                                           qd_len=qd_len, kd_len=kd_len).items()}, inputs)
    code = textwrap.dedent(
        f"""
        import torch, gmod_ext
        from gmod_ext import ops
        t = {{n: x.cuda() for n, x in torch.load({str(inputs)!r}).items()}}
        o, lse = ops.attention(t["q"], t["k"], t["v"], t["q_len"], t["k_len"])
        dq, dk, dv = torch.ops.gmod.attention_backward(t["g"], t["q"], t["k"], t["v"], o, lse, t["q_len"], t["k_len"], 0.125)
        od, lsed = ops.attention(t["qd"], t["kd"], t["vd"], t["qd_len"], t["kd_len"])
        torch.save({{n: x.cpu() for n, x in dict(o=o, lse=lse, dq=dq, dk=dk, dv=dv, od=od, lsed=lsed).items()}},
                   {str(tmp_path / "out.pt")!r})
        print("OK")
        """
    )
    run_in_subprocess(code, GMOD_ATTN_SIMT="1")
    out = {n: x.to(DEV) for n, x in torch.load(tmp_path / "out.pt").items()}
    o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, 0.125, torch.float64)
    o_pt, _ = ref_attention(q, k, v, q_len, k_len, 0.125, dtype)
    assert_flash_close(out["o"], o_ref, o_pt, "simt o")
    assert_lse_close(out["lse"], lse_ref, "simt lse")
    _, dq_ref, dk_ref, dv_ref = ref_grads(q, k, v, q_len, k_len, 0.125, torch.float64, g)
    _, dq_pt, dk_pt, dv_pt = ref_grads(q, k, v, q_len, k_len, 0.125, dtype, g)
    for name, ref, pt in (("dq", dq_ref, dq_pt), ("dk", dk_ref, dk_pt), ("dv", dv_ref, dv_pt)):
        assert_flash_close(out[name], ref, pt, f"simt {name}")
    scale_d = 1.0 / math.sqrt(128)
    od_ref, lsed_ref = ref_attention(qd, kd, vd, qd_len, kd_len, scale_d, torch.float64)
    od_pt, _ = ref_attention(qd, kd, vd, qd_len, kd_len, scale_d, dtype)
    assert_flash_close(out["od"], od_ref, od_pt, "simt decode o")
    assert_lse_close(out["lsed"], lsed_ref, "simt decode lse")


@pytest.mark.parametrize("dtype", LOWP)
def test_forward_narrow_key_tiles_d128(dtype, monkeypatch):
    """GMOD_ATTN_FWD_BLOCK_N=32 (read at every call) runs the d = 128 prefill forward on 128 x 32 tiles
    (lazy rescale, unrolled copies, positive scale folded into the exponent). It must meet the flash
    rule like the default: causal offsets across tiles, ragged and empty rows, GQA, rows long enough
    that the max grows on later tiles, and a negative scale (the unfolded path)."""
    B, Cq, Ck, Hq, Hk, d = 3, 150, 300, 4, 2, 128
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    q_len, k_len = lengths(B, Cq, (150, 1, 0)), lengths(B, Ck, (300, 77, 0))
    monkeypatch.setenv("GMOD_ATTN_FWD_BLOCK_N", "32")
    for name, scale in (("pos", 0.0883883), ("neg", -0.3)):
        o, lse = torch.ops.gmod.attention(q, k, v, q_len, k_len, scale)
        o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
        o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
        assert_flash_close(o, o_ref, o_pt, f"narrow o ({name} scale)")
        assert_lse_close(lse, lse_ref, f"narrow lse ({name} scale)")


def _wgmma_here():
    """The sm_90a wgmma forward can run here: a compute capability 9.0 GPU and a build with sm_90a kernels."""
    return (not ON_CPU and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and gmod_ext.BUILD_INFO.get("sm90a", False))


needs_wgmma = pytest.mark.skipif(not ON_CPU and not _wgmma_here(),
                                 reason="the wgmma forward needs an sm_90 GPU and a build with sm_90a kernels")


_WGMMA_PROBE = {}


def _wgmma_probe_error(flag="GMOD_ATTN_FWD_IMPL"):
    """None if one forward + backward under flag=wgmma (GMOD_ATTN_FWD_IMPL: the wgmma forward,
    GMOD_ATTN_BWD_IMPL: the wgmma backward) runs cleanly in a fresh process, else its error. A kernel fault
    is sticky for the whole CUDA context: the in-process tests below run only after this probe passed, so
    a broken wgmma kernel fails its own tests instead of every CUDA test after them."""
    if flag not in _WGMMA_PROBE:
        code = textwrap.dedent(
            """
            import torch, gmod_ext
            q = torch.randn(2, 200, 4, 128, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            n = torch.tensor([200, 77], dtype=torch.int32, device="cuda")
            o, lse = torch.ops.gmod.attention(q, k, v, n, n, 0.088)
            dq, dk, dv = torch.ops.gmod.attention_backward(torch.randn_like(o), q, k, v, o, lse, n, n, 0.088)
            torch.cuda.synchronize()
            print("OK")
            """
        )
        try:
            # 90 s: a fresh process with two small calls takes ~10 s; a hung kernel must not eat the call
            run_in_subprocess(code, timeout=90, **{flag: "wgmma"})
            _WGMMA_PROBE[flag] = None
        except AssertionError as err:
            _WGMMA_PROBE[flag] = str(err)[-2000:]
    return _WGMMA_PROBE[flag]


def _forward_kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, {e.name for e in prof.events() if "gmod_attn_fwd" in e.name}


@needs_wgmma
@pytest.mark.parametrize("impl", ["wgmma", "wgmma-2stage"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", LOWP)
def test_forward_wgmma(dtype, d, impl, monkeypatch):
    """GMOD_ATTN_FWD_IMPL=wgmma / wgmma-2stage (read at every call) runs the d = 64 / 128 prefill forward on
    the sm_90a wgmma kernel with 3 / 2 K-V stages (128 x 128 tiles, 2 warpgroups; the profiler must show
    gmod_attn_fwd_wgmma_kernel with WgmmaFwdTraits<d, stages>). It
    must meet the flash rule like the default: causal offsets across its 128-row / 128-key tiles, rows
    with 0 / 1 / all keys, q_len > k_len, GQA, rows of 300 keys (the max grows on later tiles), and a
    negative scale (the unfolded exponent). The backward then runs on its o / lse. On CPU
    (GMOD_TEST_DEVICE_UNDER_TEST=cpu) the flag changes nothing and the CPU kernel is checked."""
    if not ON_CPU and _wgmma_probe_error() is not None:
        pytest.fail(f"the wgmma forward failed in a fresh process: {_wgmma_probe_error()}")
    B, Cq, Ck, Hq, Hk = 12, 150, 300, 4, 2
    offsets = [-129, -128, -127, -64, -1, 0, 1, 63, 64, 127, 128, 129]
    ql = [150 - 3 * (b % 4) for b in range(B)]
    ql[0], ql[1] = 1, 0
    kl = [min(Ck, max(0, q + o)) for q, o in zip(ql, offsets)]
    q_len, k_len = lengths(B, Cq, ql), lengths(B, Ck, kl)
    q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
    monkeypatch.setenv("GMOD_ATTN_FWD_IMPL", impl)
    stages = 2 if impl == "wgmma-2stage" else 3
    for name, scale in (("pos", 1.0 / math.sqrt(d)), ("neg", -0.3)):
        fn = lambda: torch.ops.gmod.attention(q, k, v, q_len, k_len, scale)  # noqa: E731
        if ON_CPU:
            o, lse = fn()
        else:
            (o, lse), names = _forward_kernel_names(fn)
            assert names and all("gmod_attn_fwd_wgmma_kernel" in n for n in names), names
            assert all(re.search(rf"WgmmaFwdTraits<{d}, {stages}>", n) for n in names), names
        o_ref, lse_ref = ref_attention(q, k, v, q_len, k_len, scale, torch.float64)
        o_pt, _ = ref_attention(q, k, v, q_len, k_len, scale, dtype)
        assert_flash_close(o, o_ref, o_pt, f"wgmma o ({name} scale)")
        assert_lse_close(lse, lse_ref, f"wgmma lse ({name} scale)")
    g = torch.randn_like(q)
    dq, dk, dv = torch.ops.gmod.attention_backward(g, q, k, v, o, lse, q_len, k_len, -0.3)
    _, *ref = ref_grads(q, k, v, q_len, k_len, -0.3, torch.float64, g)
    _, *ref_pt = ref_grads(q, k, v, q_len, k_len, -0.3, dtype, g)
    for gname, got, want, pt in zip(("dq", "dk", "dv"), (dq, dk, dv), ref, ref_pt):
        assert_flash_close(got, want, pt, f"backward on the wgmma forward's o / lse: {gname}")


@cuda_only
def test_forward_impl_flag_errors(monkeypatch):
    """GMOD_ATTN_FWD_IMPL: an unknown value is a ValueError naming the choices; wgmma where it cannot run
    (not an sm_90 GPU, or no sm_90a kernels in the build) is a RuntimeError saying why, never a silent
    fallback (a benchmark would time the wrong kernel); unset and auto are the default: the wgmma kernel
    where it can run, else mma."""
    q, k, v = make_qkv(1, 40, 40, 2, 2, 64, torch.bfloat16)
    lens = lengths(1, 40, (40,))
    monkeypatch.delenv("GMOD_ATTN_FWD_IMPL", raising=False)
    want, _ = torch.ops.gmod.attention(q, k, v, lens, lens, 0.125)
    for impl in ("auto", "wgmma" if _wgmma_here() and not ON_CPU else "mma"):
        monkeypatch.setenv("GMOD_ATTN_FWD_IMPL", impl)
        assert torch.equal(torch.ops.gmod.attention(q, k, v, lens, lens, 0.125)[0], want), impl
    monkeypatch.setenv("GMOD_ATTN_FWD_IMPL", "tma")
    with pytest.raises(ValueError, match="GMOD_ATTN_FWD_IMPL=tma.*wgmma or wgmma-2stage.*mma"):
        torch.ops.gmod.attention(q, k, v, lens, lens, 0.125)
    monkeypatch.setenv("GMOD_ATTN_FWD_IMPL", "wgmma")
    if _wgmma_here():
        assert _wgmma_probe_error() is None, _wgmma_probe_error()
        o, _ = torch.ops.gmod.attention(q, k, v, lens, lens, 0.125)
        assert o.shape == want.shape
    else:
        with pytest.raises(RuntimeError, match="GMOD_ATTN_FWD_IMPL=wgmma"):
            torch.ops.gmod.attention(q, k, v, lens, lens, 0.125)


@needs_wgmma
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", LOWP)
def test_backward_wgmma(dtype, d, monkeypatch):
    """GMOD_ATTN_BWD_IMPL=wgmma (read at every call) runs the non-deterministic d = 64 / 128 backward's dk/dv
    and dQ on the sm_90a wgmma kernel (128 keys x 64-query steps, 2 warpgroups; the profiler must show
    gmod_attn_bwd_dkdv_wgmma_kernel with WgmmaBwdTraits<d> and no mma.sync dk/dv kernel). The gradients must
    meet the flash rule: causal offsets across its 128-key / 64-query tiles, rows with 0 / 1 keys, q_len >
    k_len, a negative scale, GQA 1 (dK / dV written by the CTA) and GQA 4 on a small grid (one q head per
    CTA: fp32 atomics into dk / dv accumulators). The deterministic mode keeps the mma.sync kernels. On
    CPU (GMOD_TEST_DEVICE_UNDER_TEST=cpu) the flag changes nothing and the CPU kernel is checked."""
    if not ON_CPU and (err := _wgmma_probe_error("GMOD_ATTN_BWD_IMPL")) is not None:
        pytest.fail(f"the wgmma backward failed in a fresh process: {err}")
    B, Cq, Ck = 13, 140, 270
    offsets = [-129, -128, -127, -64, -63, -1, 0, 1, 63, 64, 127, 128, 129]
    ql = [140 - 3 * (b % 4) for b in range(B)]
    ql[0], ql[1] = 1, 0
    kl = [min(Ck, max(0, q + o)) for q, o in zip(ql, offsets)]
    q_len, k_len = lengths(B, Cq, ql), lengths(B, Ck, kl)
    monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", "wgmma")
    for (Hq, Hk), scale in (((2, 2), 1.0 / math.sqrt(d)), ((4, 1), -0.3)):
        q, k, v = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
        o, lse = torch.ops.gmod.attention(q, k, v, q_len, k_len, scale)
        g = torch.randn_like(q)
        fn = lambda: torch.ops.gmod.attention_backward(g, q, k, v, o, lse, q_len, k_len, scale)  # noqa: E731
        if ON_CPU:
            grads = fn()
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                grads = fn()
                torch.cuda.synchronize()
            names = {e.name for e in prof.events() if "gmod_attn_bwd_dkdv" in e.name}
            assert names and all("gmod_attn_bwd_dkdv_wgmma_kernel" in n for n in names), names
            assert all(re.search(rf"WgmmaBwdTraits<{d}>", n) for n in names), names
        _, *ref = ref_grads(q, k, v, q_len, k_len, scale, torch.float64, g)
        _, *ref_pt = ref_grads(q, k, v, q_len, k_len, scale, dtype, g)
        for gname, got, want, pt in zip(("dq", "dk", "dv"), grads, ref, ref_pt):
            assert_flash_close(got, want, pt, f"wgmma backward {gname} (GQA {Hq // Hk}, scale {scale:.3f})")


@cuda_only
def test_backward_impl_flag_errors(monkeypatch):
    """GMOD_ATTN_BWD_IMPL: an unknown value is a ValueError naming the choices; wgmma where it cannot run
    is a RuntimeError saying why (never a silent fallback); unset and auto are the default (the wgmma
    kernel where it can run, else mma); the deterministic mode keeps its mma.sync kernels (bit-identical
    with and without the flag)."""
    q, k, v = make_qkv(1, 40, 40, 2, 2, 64, torch.bfloat16)
    lens = lengths(1, 40, (40,))
    o, lse = torch.ops.gmod.attention(q, k, v, lens, lens, 0.125)
    g = torch.randn_like(q)
    bwd = lambda: torch.ops.gmod.attention_backward(g, q, k, v, o, lse, lens, lens, 0.125)  # noqa: E731
    monkeypatch.delenv("GMOD_ATTN_BWD_IMPL", raising=False)
    want = bwd()
    for impl in ("auto", "wgmma" if _wgmma_here() else "mma"):  # one key tile: the dQ atomics add once
        monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", impl)
        assert all(torch.equal(a, b) for a, b in zip(bwd(), want)), impl
    monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", "tma")
    with pytest.raises(ValueError, match="GMOD_ATTN_BWD_IMPL=tma.*wgmma.*mma"):
        bwd()
    monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", "wgmma")
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        monkeypatch.delenv("GMOD_ATTN_BWD_IMPL")
        det_want = bwd()
        monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", "wgmma")
        assert all(torch.equal(a, b) for a, b in zip(bwd(), det_want))
    finally:
        torch.use_deterministic_algorithms(prev)
    if _wgmma_here():
        err = _wgmma_probe_error("GMOD_ATTN_BWD_IMPL")
        assert err is None, err
        assert all(a.shape == b.shape for a, b in zip(bwd(), want))
    else:
        with pytest.raises(RuntimeError, match="GMOD_ATTN_BWD_IMPL=wgmma"):
            bwd()


@cuda_only
def test_backward_default_tile_on_a_large_grid(monkeypatch):
    """Without GMOD_ATTN_BWD_BLOCK_N, a grid of two waves or more (ceil(1100/128) x B x 16 CTAs >= 2 x SMs,
    B sized from this GPU's SM count: 2 on the H100) takes the 8-warp, 128-key dk/dv tile (seen in the profiler's kernel name:
    TcBwdTraits<..., kWarps = 8>), and its gradients meet the flash rule; with GMOD_ATTN_BWD_BLOCK_N=64 the
    same problem runs the 4-warp kernel. (The mma.sync kernels, forced: on an H100 the default is wgmma.)"""
    monkeypatch.delenv("GMOD_ATTN_BWD_BLOCK_N", raising=False)
    monkeypatch.setenv("GMOD_ATTN_BWD_IMPL", "mma")
    C, Hq, Hk, d, dtype = 1100, 16, 4, 128, torch.bfloat16
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    B = -(-2 * sms // (-(-C // 128) * Hq))  # the smallest batch whose 128-key grid fills two waves
    q_len = lengths(B, C, (1100, 517))
    k_len = q_len.clone()
    q0, k0, v0 = make_qkv(B, C, C, Hq, Hk, d, dtype)
    g = torch.randn(B, C, Hq, d, device=DEV, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    _, *ref = ref_grads(q0, k0, v0, q_len, k_len, scale, torch.float64, g)
    _, *ref_pt = ref_grads(q0, k0, v0, q_len, k_len, scale, dtype, g)

    def grads_and_dkdv_warps():
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q0, k0, v0))
        o, _ = ops.attention(q, k, v, q_len, k_len)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = torch.autograd.grad(o, (q, k, v), g)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if "gmod_attn_bwd_dkdv_tc_kernel" in e.name]
        assert names, "no tensor-core dk/dv kernel ran"
        warps = {re.search(r"TcBwdTraits<([^<>]*)>", n).group(1).split(",")[-1].strip() for n in names}
        return out, warps

    default, warps = grads_and_dkdv_warps()
    assert warps == {"8"}, f"the default dk/dv tile on this grid has {warps} warps, not 8 (128 keys)"
    for name, got, want, pt in zip(("dq", "dk", "dv"), default, ref, ref_pt):
        assert_flash_close(got, want, pt, f"default tile {name}")
    monkeypatch.setenv("GMOD_ATTN_BWD_BLOCK_N", "64")
    assert grads_and_dkdv_warps()[1] == {"4"}


@pytest.mark.parametrize("block_n", ["128", "64"])
@pytest.mark.parametrize("dtype", LOWP)
def test_backward_wide_dkdv_tiles(dtype, block_n, monkeypatch):
    """GMOD_ATTN_BWD_BLOCK_N=128 / =64 (read at every call) forces the tensor-core dk/dv kernel onto 8
    warps x 128 keys / 4 warps x 64 keys per CTA (by default the choice follows the grid size, so a small
    problem would never run the wide tile). The gradients must meet the flash rule both ways: d = 64 and 128, atomic
    and deterministic dQ, GQA 4 with heads_per_cta = group and 1, causal offsets around the 128-key
    tiles, rows with 0 / 1 keys."""
    B, Cq, Ck, Hq, Hk = 4, 200, 330, 8, 2
    q_len = lengths(B, Cq, (200, 73, 1, 0))
    k_len = lengths(B, Ck, (330, 200, 129, 5))
    monkeypatch.setenv("GMOD_ATTN_BWD_BLOCK_N", block_n)
    for d in (64, 128):
        q0, k0, v0 = make_qkv(B, Cq, Ck, Hq, Hk, d, dtype)
        g = torch.randn(B, Cq, Hq, d, device=DEV, dtype=dtype)
        scale = 1.0 / math.sqrt(d)
        _, *ref = ref_grads(q0, k0, v0, q_len, k_len, scale, torch.float64, g)
        _, *ref_pt = ref_grads(q0, k0, v0, q_len, k_len, scale, dtype, g)
        for det in (False, True):
            prev = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(det)
            try:
                q, k, v = (t.detach().clone().requires_grad_(True) for t in (q0, k0, v0))
                o, _ = ops.attention(q, k, v, q_len, k_len)
                grads = torch.autograd.grad(o, (q, k, v), g)
            finally:
                torch.use_deterministic_algorithms(prev)
            for name, got, want, pt in zip(("dq", "dk", "dv"), grads, ref, ref_pt):
                assert_flash_close(got, want, pt, f"block_n {block_n} {name} d={d} det={det}")
