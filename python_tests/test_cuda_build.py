"""CUDA kernels of router_logits, route, gather_rows, scatter_merge (forward and backward) and
kv_cache_append, checked against the CPU kernels.

* Always (no GPU needed): when the library was built with CUDA, each of these ops has a CUDA
  kernel registered, and so does every op a csrc/cuda/*.cu file registers (when the sources are
  next to this file). Skipped for a CPU-only build.
* With a GPU: every op on random inputs against the CPU op on the same inputs: route's idx/count
  bit-identical (ties, NaN, +-0, +-inf, threshold mode, forced tokens, S up to 32768 with B = 64),
  gather_rows exact, the others close; backward ops too; outputs come from a NaN-poisoned heap so
  an unwritten element shows; bad index values raise the CPU's exact error; GMOD_TRUST_INDICES=1
  skips the device validation without ever touching memory out of bounds.

Self-check of this file without a GPU: GMOD_TEST_DEVICE_UNDER_TEST=cpu runs the GPU tests with
"cpu" as the device under test (CPU against CPU), which exercises the test code itself.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import gmod_ext
from conftest import assert_unchanged, poison_heap, random_route, snapshot

GMOD_OPS = ("router_logits", "router_logits_backward", "route", "gather_rows", "gather_rows_backward",
            "scatter_merge", "scatter_merge_backward", "kv_cache_append", "rope", "rope_backward")

OPS = torch.ops.gmod
DEV = os.environ.get("GMOD_TEST_DEVICE_UNDER_TEST", "cuda")
I32 = torch.int32
LOWP = (torch.bfloat16, torch.float16)


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gmod::{op}", "CUDA")


def _gpu_skip_reason():
    if DEV == "cpu":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device"
    missing = [op for op in GMOD_OPS if not _has_cuda_kernel(op)]
    return f"no CUDA kernel for {missing}" if missing else None


gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
# Every test here is about the CUDA build: `pytest -m cuda` (scripts/gpu_check.sh) selects the file.
pytestmark = pytest.mark.cuda


# ================================================================== (b) build / registration
def test_cuda_kernels_registered():
    if not gmod_ext.BUILD_INFO["cuda"]:
        pytest.skip("library built without CUDA")
    missing = [op for op in GMOD_OPS if not _has_cuda_kernel(op)]
    assert not missing, f"no CUDA kernel registered for {missing}"


def test_every_cuda_source_op_registered():
    """Every op that a csrc/cuda/*.cu file registers for the CUDA key has a CUDA kernel."""
    if not gmod_ext.BUILD_INFO["cuda"]:
        pytest.skip("library built without CUDA")
    src = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    files = sorted(src.glob("*.cu"))
    if not files:
        pytest.skip(f"no CUDA sources at {src}")
    ops = set()
    for f in files:
        text = f.read_text()
        for block in re.findall(r"TORCH_LIBRARY_IMPL\(\s*gmod\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", text, re.S):
            ops.update(re.findall(r'\.impl\(\s*"([\w.]+)"', block))
    assert set(GMOD_OPS) <= ops, f"CUDA sources do not register {sorted(set(GMOD_OPS) - ops)}"
    missing = sorted(op for op in ops if not _has_cuda_kernel(op))
    assert not missing, f"CUDA sources register these ops but the library has no CUDA kernel: {missing}"


# ================================================================== helpers
def cpu(t):
    return None if t is None else t.detach().cpu()


def to_dev(t):
    """A copy on the device under test (a copy even when that is the CPU)."""
    return None if t is None else t.to(DEV, copy=True)


def poison(*shapes_dtypes):
    """NaN-poison the device heap for outputs of these (shape, dtype)s (best effort)."""
    nbytes = max(1, max(math.prod(s) * torch.empty((), dtype=d).element_size() for s, d in shapes_dtypes))
    poison_heap(DEV, nbytes)


def assert_close(out, ref, dtype, what, ulps=2.0, atol_rel=1e-6):
    """|out - ref| <= ulps * ulp(dtype) * |ref| + atol_rel * max|ref| (in float64); NaN pattern equal."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    o, r = out.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.equal(o.isnan(), r.isnan()), f"{what}: NaN pattern differs"
    fin = torch.isfinite(r)
    assert torch.equal(o[~fin & ~r.isnan()], r[~fin & ~r.isnan()]), f"{what}: inf entries differ"
    if not bool(fin.any()):
        return
    eps = torch.finfo(dtype).eps
    peak = r[fin].abs().max().item()
    bound = ulps * eps * r[fin].abs() + atol_rel * peak + 1e-30
    err = (o[fin] - r[fin]).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {int(fin.sum())} elements off, max err {err.max().item():.3g} "
        f"(peak {peak:.3g})"
    )


def raised(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e).split("\n")[0]
    return None


def assert_same_error(fn_dev, fn_cpu):
    """Both calls raise, with the same exception type and the same first message line."""
    e_cpu = raised(fn_cpu)
    e_dev = raised(fn_dev)
    assert e_cpu is not None, "the CPU op accepted the bad input"
    assert e_dev == e_cpu, f"device error {e_dev} != CPU error {e_cpu}"


# ================================================================== router_logits
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
# D: 16-byte rows or not (the warp-per-row fallback), the row-block kernel's 1 / 2 / 4 column groups
# per thread (4096, 5120, 12288 for bf16) and rows too wide for it (16392).
@pytest.mark.parametrize("D", [1, 7, 100, 256, 4096, 5120, 12288, 16392])
@pytest.mark.parametrize("norm", ["none", "f32", "act"])
def test_router_logits(dtype, D, norm):
    B, S = 3, 37
    x = torch.randn(B, S, D, dtype=dtype) * 3
    w = torch.randn(D, dtype=torch.float32 if norm != "act" else dtype)
    nw = None if norm == "none" else (torch.rand(D) + 0.5).to(torch.float32 if norm == "f32" else dtype)
    eps = 1e-6
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ref = OPS.router_logits(x, w, nw, eps)
    poison(((B, S), acc))
    out = OPS.router_logits(to_dev(x), to_dev(w), to_dev(nw), eps)
    assert out.device.type == DEV
    # Same fp32 math, summation order differs: errors at the accumulation dtype's level, times sqrt(D).
    assert_close(out, ref, acc, "logits", ulps=64, atol_rel=64 * torch.finfo(acc).eps * math.sqrt(D))

    g = torch.randn(B, S, dtype=acc)
    ref_b = OPS.router_logits_backward(g, x, w, nw, eps)
    poison((x.shape, dtype), ((256, D), acc))
    out_b = OPS.router_logits_backward(to_dev(g), to_dev(x), to_dev(w), to_dev(nw), eps)
    lowp = dtype in LOWP
    # dx: one rounding to the activation dtype of a value computed in acc (which may differ in
    # the last fp32 bits), so up to one ulp of dtype. With a norm, dx_i = (u_i - xhat_i * mean(u * xhat)) / rms
    # (u = g * w * norm_weight) cancels (at D = 1 almost wholly: xhat = +-1), so the absolute error is set by
    # the terms before the cancellation, |g| * max|u| / rms, not by the result.
    atol = 0.0
    if nw is not None and not lowp:
        xd = x.double()
        rms = (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        term = (g.double().abs()[..., None] * (w.double() * nw.double()).abs().max() / rms).max().item()
        atol = 64 * torch.finfo(acc).eps * math.sqrt(D) * term
    assert_close(out_b[0], ref_b[0], dtype, "dx", ulps=1.0 if lowp else 64,
                 atol_rel=(1e-3 if lowp else 1e-5) + atol / max(ref_b[0].abs().max().item(), 1e-30))
    for i, name in ((1, "dweight"), (2, "dnorm_weight")):
        if i == 2 and nw is None:
            assert out_b[2].numel() == 0 and out_b[2].dtype == ref_b[2].dtype
            continue
        assert_close(out_b[i], ref_b[i], ref_b[i].dtype, name, ulps=64,
                     atol_rel=64 * torch.finfo(acc).eps * math.sqrt(B * S))
    # Deterministic (two-pass reduction, no float atomics): bit-identical on a second run.
    again = OPS.router_logits_backward(to_dev(g), to_dev(x), to_dev(w), to_dev(nw), eps)
    for a, b_ in zip(out_b, again):
        assert torch.equal(a, b_)


@gpu
def test_router_logits_many_rows_deterministic():
    x = torch.randn(8, 1000, 256, dtype=torch.bfloat16)
    w, nw = torch.randn(256), torch.rand(256) + 0.5
    g = torch.randn(8, 1000)
    ref = OPS.router_logits_backward(g, x, w, nw, 1e-5)
    outs = [OPS.router_logits_backward(to_dev(g), to_dev(x), to_dev(w), to_dev(nw), 1e-5) for _ in range(3)]
    for o in outs[1:]:
        for a, b_ in zip(outs[0], o):
            assert torch.equal(a, b_)
    assert_close(outs[0][1], ref[1], torch.float32, "dweight", ulps=64, atol_rel=1e-4)


@gpu
def test_router_logits_empty():
    for shape in [(0, 5, 8), (2, 0, 8), (2, 3, 0)]:
        x = torch.randn(*shape)
        w = torch.randn(shape[2])
        ref = OPS.router_logits(x, w, None, 1e-6)
        out = OPS.router_logits(to_dev(x), to_dev(w), None, 1e-6)
        assert_close(out, ref, torch.float32, f"logits {shape}")
        g = torch.randn(shape[0], shape[1])
        ref_b = OPS.router_logits_backward(g, x, w, w, 1e-6)
        out_b = OPS.router_logits_backward(to_dev(g), to_dev(x), to_dev(w), to_dev(w), 1e-6)
        for a, r, name in zip(out_b, ref_b, ("dx", "dweight", "dnorm")):
            assert_close(a, r, torch.float32, f"{name} {shape}")


# ================================================================== route
def _scores(kind, B, S, dtype):
    if kind == "randn":
        s = torch.randn(B, S)
    elif kind == "ties":
        s = torch.randint(-2, 3, (B, S)).float() * 0.5
    elif kind == "special":  # NaN, +-inf, +-0 and ties
        vals = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 0.5])
        s = vals[torch.randint(0, len(vals), (B, S))]
    elif kind == "const":
        s = torch.full((B, S), 0.25)
    else:
        raise ValueError(kind)
    return s.to(dtype)


def _mask(kind, B, S):
    m = torch.zeros(B, S, dtype=torch.int8)
    if kind == "random":
        r = torch.rand(B, S)
        m[r < 0.2] = 1
        m[r > 0.85] = 2
    elif kind == "forced_heavy":
        r = torch.rand(B, S)
        m[r < 0.7] = 1
        m[r > 0.95] = 2
    return m


def _check_route(scores, mask, nr, C, thr):
    ref = OPS.route(scores, mask, nr, C, thr)
    poison_heap(DEV, max(4, scores.shape[0] * C * 4))
    out = OPS.route(to_dev(scores), to_dev(mask), to_dev(nr), C, thr)
    assert out[0].dtype == I32 and out[1].dtype == I32
    assert out[0].device.type == DEV
    assert torch.equal(out[1].cpu(), ref[1]), f"count differs: {out[1].cpu().tolist()} vs {ref[1].tolist()}"
    assert torch.equal(out[0].cpu(), ref[0]), "idx differs"


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["randn", "ties", "special", "const"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "forced_heavy"])
@pytest.mark.parametrize("thr", [None, 0.0, -0.75])
@pytest.mark.parametrize("S", [1, 17, 513, 1500])
def test_route(dtype, kind, mask_kind, thr, S):
    B = 5
    scores = _scores(kind, B, S, dtype)
    mask = _mask(mask_kind, B, S)
    for C in sorted({0, 1, max(1, S // 3), S, S + 3}):
        nr = torch.randint(0, S + 2, (B,), dtype=I32)
        nr[0] = 0
        nr[1] = S + 5
        _check_route(scores, mask, nr, C, thr)


@gpu
def test_route_large_rows():
    """B = 64 rows of S = 32768, many ties, in one call; some rows all-equal, all-NaN, all-forced."""
    B, S = 64, 32768
    scores = torch.randint(-50, 50, (B, S)).float() / 8
    scores[1] = 0.5
    scores[2] = math.nan
    scores[3, ::7] = math.nan
    scores[4] = torch.randn(S)
    mask = _mask("random", B, S)
    mask[5] = 1
    mask[6] = 2
    nr = torch.randint(0, S, (B,), dtype=I32)
    nr[7] = S
    for C in (S // 2, S // 8, S):
        _check_route(scores, mask, nr, C, None)
    _check_route(scores, mask, nr, S // 2, 1.0)
    _check_route(scores.double(), mask, nr, S // 3, None)


@gpu
def test_route_empty():
    for B, S, C in [(0, 5, 3), (3, 0, 4), (3, 0, 0), (3, 6, 0)]:
        scores = torch.randn(B, S)
        mask = torch.zeros(B, S, dtype=torch.int8)
        nr = torch.full((B,), 2, dtype=I32)
        _check_route(scores, mask, nr, C, None)


@gpu
def test_route_bad_values_raise():
    scores, nr = torch.randn(3, 9), torch.full((3,), 2, dtype=I32)
    mask = torch.zeros(3, 9, dtype=torch.int8)
    bad_mask = mask.clone()
    bad_mask[1, 4] = 3
    bad_mask[2, 0] = -1
    assert_same_error(lambda: OPS.route(to_dev(scores), to_dev(bad_mask), to_dev(nr), 4, None),
                      lambda: OPS.route(scores, bad_mask, nr, 4, None))
    bad_nr = nr.clone()
    bad_nr[2] = -1
    assert_same_error(lambda: OPS.route(to_dev(scores), to_dev(mask), to_dev(bad_nr), 4, None),
                      lambda: OPS.route(scores, mask, bad_nr, 4, None))
    assert_same_error(lambda: OPS.route(to_dev(scores), to_dev(mask), to_dev(nr), 4, math.nan),
                      lambda: OPS.route(scores, mask, nr, 4, math.nan))
    assert_same_error(lambda: OPS.route(to_dev(scores), to_dev(mask), to_dev(nr), -1, None),
                      lambda: OPS.route(scores, mask, nr, -1, None))
    if DEV == "cuda":
        with pytest.raises(RuntimeError, match="one device"):
            OPS.route(to_dev(scores), mask, to_dev(nr), 4, None)


# ================================================================== gather_rows
def _misaligned(t):
    """The same values in a contiguous tensor whose data pointer is off by one element."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("D", [1, 3, 8, 12, 64, 1000])
@pytest.mark.parametrize("misaligned", [False, True])
def test_gather_rows(dtype, D, misaligned):
    B, S, C = 4, 50, 20
    x = torch.randn(B, S, D, dtype=dtype)
    idx, count = random_route(B, S, C, counts=[0, 7, 20, 13])
    ref = OPS.gather_rows(x, idx, count)
    xd = to_dev(x)
    if misaligned:
        xd = _misaligned(xd)
    poison(((B, C, D), dtype))
    before = snapshot(xd, idx, count)
    out = OPS.gather_rows(xd, to_dev(idx), to_dev(count))
    assert_unchanged(before, (xd, idx, count))
    assert torch.equal(out.cpu(), ref)

    g = torch.randn(B, C, D, dtype=dtype)
    gd = _misaligned(to_dev(g)) if misaligned else to_dev(g)
    ref_b = OPS.gather_rows_backward(g, idx, count, S)
    poison(((B, S, D), dtype))
    out_b = OPS.gather_rows_backward(gd, to_dev(idx), to_dev(count), S)
    assert torch.equal(out_b.cpu(), ref_b)


@gpu
def test_gather_rows_empty():
    for B, S, C, D in [(0, 4, 3, 8), (2, 4, 0, 8), (2, 0, 3, 8), (2, 4, 3, 0)]:
        x = torch.randn(B, S, D)
        idx, count = random_route(B, S, C, counts=[0] * B)
        assert torch.equal(OPS.gather_rows(to_dev(x), to_dev(idx), to_dev(count)).cpu(),
                           OPS.gather_rows(x, idx, count))
        g = torch.randn(B, C, D)
        assert torch.equal(OPS.gather_rows_backward(to_dev(g), to_dev(idx), to_dev(count), S).cpu(),
                           OPS.gather_rows_backward(g, idx, count, S))


def _bad_routes(S=10, C=4):
    """(name, idx, count) triples with bad values for a batch of 3."""
    idx, count = random_route(3, S, C, counts=[2, 4, 3])
    cases = []
    i, c = idx.clone(), count.clone()
    i[1, 2] = S
    cases.append(("idx out of range", i, c))
    i, c = idx.clone(), count.clone()
    i[2, 0] = -3
    cases.append(("negative idx", i, c))
    i, c = idx.clone(), count.clone()
    i[1, 3] = i[1, 2]
    cases.append(("idx not increasing", i, c))
    i, c = idx.clone(), count.clone()
    c[0] = C + 1
    cases.append(("count > capacity", i, c))
    i, c = idx.clone(), count.clone()
    c[2] = -1
    cases.append(("negative count", i, c))
    return cases


@gpu
def test_index_ops_bad_values_raise():
    S, C, D = 10, 4, 8
    x = torch.randn(3, S, D)
    g = torch.randn(3, C, D)
    base, delta, gate, skip = torch.randn(3, C, D), torch.randn(3, C, D), torch.rand(3, C), torch.rand(3, S)
    gs = torch.randn(3, S, D)
    for name, idx, count in _bad_routes(S, C):
        di, dc = to_dev(idx), to_dev(count)
        assert_same_error(lambda: OPS.gather_rows(to_dev(x), di, dc), lambda: OPS.gather_rows(x, idx, count))
        assert_same_error(lambda: OPS.gather_rows_backward(to_dev(g), di, dc, S),
                          lambda: OPS.gather_rows_backward(g, idx, count, S))
        assert_same_error(
            lambda: OPS.scatter_merge(to_dev(x), to_dev(base), to_dev(delta), to_dev(gate), di, dc, to_dev(skip)),
            lambda: OPS.scatter_merge(x, base, delta, gate, idx, count, skip))
        assert_same_error(
            lambda: OPS.scatter_merge_backward(to_dev(gs), to_dev(x), to_dev(base), to_dev(delta), to_dev(gate), di,
                                               dc, to_dev(skip)),
            lambda: OPS.scatter_merge_backward(gs, x, base, delta, gate, idx, count, skip))
    if DEV == "cuda":
        idx, count = random_route(3, S, C)
        with pytest.raises(RuntimeError, match="one device"):
            OPS.gather_rows(to_dev(x), idx, to_dev(count))


# ================================================================== scatter_merge
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("D", [5, 64, 1024])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("gate_kind", [None, "f32", "act"])
@pytest.mark.parametrize("skip_kind", [None, "f32", "act"])
def test_scatter_merge(dtype, D, with_delta, gate_kind, skip_kind):
    B, S, C = 3, 40, 16
    x = torch.randn(B, S, D, dtype=dtype)
    base = torch.randn(B, C, D, dtype=dtype)
    delta = torch.randn(B, C, D, dtype=dtype) if with_delta else None

    def scale(kind, shape):
        if kind is None:
            return None
        return (torch.rand(shape) + 0.25).to(torch.float32 if kind == "f32" else dtype)

    gate, skip = scale(gate_kind, (B, C)), scale(skip_kind, (B, S))
    idx, count = random_route(B, S, C, counts=[16, 0, 9])
    args_cpu = (x, base, delta, gate, idx, count, skip)
    args_dev = tuple(to_dev(t) for t in args_cpu)
    before = snapshot(*args_dev)
    ref = OPS.scatter_merge(*args_cpu)
    poison((x.shape, dtype))
    out = OPS.scatter_merge(*args_dev)
    assert_unchanged(before, args_dev)
    lowp = dtype in LOWP
    # One rounding of an fp32 value that may differ by fma contraction: <= 1 ulp of dtype.
    assert_close(out, ref, dtype, "out", ulps=1.0, atol_rel=(1e-3 if lowp else 1e-6))

    grad = torch.randn(B, S, D, dtype=dtype)
    ref_b = OPS.scatter_merge_backward(grad, *args_cpu)
    poison((x.shape, dtype))
    out_b = OPS.scatter_merge_backward(to_dev(grad), *args_dev)
    assert_unchanged(before, args_dev)
    names = ("dx", "dbase", "ddelta", "dgate", "dskip_scale")
    for a, r, name in zip(out_b, ref_b, names):
        assert a.dtype == r.dtype and a.shape == r.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {r.dtype}{tuple(r.shape)}"
        if r.numel() == 0:
            continue
        if name in ("dx", "dbase", "ddelta"):  # one product, one rounding: identical
            assert torch.equal(a.cpu(), r), f"{name} differs"
        else:  # dot products over D: summation order differs
            assert_close(a, r, r.dtype, name, ulps=1.0 if r.dtype in LOWP else 64,
                         atol_rel=(1e-3 if r.dtype in LOWP else 64 * torch.finfo(r.dtype).eps * math.sqrt(D)))


@gpu
def test_scatter_merge_misaligned_and_empty():
    B, S, C, D = 2, 12, 5, 16
    x, base, delta = torch.randn(B, S, D, dtype=torch.bfloat16), torch.randn(B, C, D, dtype=torch.bfloat16), \
        torch.randn(B, C, D, dtype=torch.bfloat16)
    idx, count = random_route(B, S, C, counts=[5, 3])
    ref = OPS.scatter_merge(x, base, delta, None, idx, count, None)
    out = OPS.scatter_merge(_misaligned(to_dev(x)), to_dev(base), to_dev(delta), None, to_dev(idx), to_dev(count),
                            None)
    assert torch.equal(out.cpu(), ref)
    for B, S, C, D in [(0, 4, 3, 8), (2, 4, 0, 8), (2, 0, 3, 8), (2, 4, 3, 0)]:
        x, base = torch.randn(B, S, D), torch.randn(B, C, D)
        gate, skip = torch.rand(B, C), torch.rand(B, S)
        idx, count = random_route(B, S, C, counts=[0] * B)
        args = (x, base, base, gate, idx, count, skip)
        ref = OPS.scatter_merge(*args)
        out = OPS.scatter_merge(*(to_dev(t) for t in args))
        assert torch.equal(out.cpu(), ref)
        g = torch.randn(B, S, D)
        ref_b = OPS.scatter_merge_backward(g, *args)
        out_b = OPS.scatter_merge_backward(to_dev(g), *(to_dev(t) for t in args))
        for a, r, name in zip(out_b, ref_b, ("dx", "dbase", "ddelta", "dgate", "dskip_scale")):
            assert a.shape == r.shape and a.dtype == r.dtype, name
            if name in ("dx", "dbase", "ddelta"):  # one product, one rounding: identical
                assert torch.equal(a.cpu(), r), f"{name} differs"
            else:  # dot products over D (with C = 0, dskip_scale = sum_d g * x): summation order differs
                assert_close(a, r, r.dtype, name, ulps=64, atol_rel=64 * torch.finfo(r.dtype).eps * math.sqrt(D))


# ================================================================== kv_cache_append
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hk,d", [(2, 64), (1, 3), (4, 128)])
def test_kv_cache_append(dtype, Hk, d):
    B, cap, T = 4, 20, 6
    kc, vc = torch.randn(B, cap, Hk, d, dtype=dtype), torch.randn(B, cap, Hk, d, dtype=dtype)
    cl = torch.tensor([0, 5, 14, 20], dtype=I32)
    kn, vn = torch.randn(B, T, Hk, d, dtype=dtype), torch.randn(B, T, Hk, d, dtype=dtype)
    nl = torch.tensor([6, 0, 6, 0], dtype=I32)
    dkc, dvc, dcl = to_dev(kc), to_dev(vc), to_dev(cl)
    OPS.kv_cache_append(kc, vc, cl, kn, vn, nl)
    OPS.kv_cache_append(dkc, dvc, dcl, to_dev(kn), to_dev(vn), to_dev(nl))
    assert torch.equal(dkc.cpu(), kc) and torch.equal(dvc.cpu(), vc) and torch.equal(dcl.cpu(), cl)
    # A second step on top (decode-like, T = 1).
    kn1, vn1, nl1 = kn[:, :1].contiguous(), vn[:, :1].contiguous(), torch.tensor([1, 1, 0, 0], dtype=I32)
    OPS.kv_cache_append(kc, vc, cl, kn1, vn1, nl1)
    OPS.kv_cache_append(dkc, dvc, dcl, to_dev(kn1), to_dev(vn1), to_dev(nl1))
    assert torch.equal(dkc.cpu(), kc) and torch.equal(dvc.cpu(), vc) and torch.equal(dcl.cpu(), cl)


@gpu
def test_kv_cache_append_bad_lengths_leave_cache_untouched():
    B, cap, T, Hk, d = 3, 8, 4, 2, 16
    kc, vc = torch.randn(B, cap, Hk, d), torch.randn(B, cap, Hk, d)
    kn, vn = torch.randn(B, T, Hk, d), torch.randn(B, T, Hk, d)
    for cl_v, nl_v in [([0, 6, 2], [1, 3, 0]),    # overflow in row 1
                       ([0, 9, 2], [1, 0, 0]),    # cache_len > capacity
                       ([0, -1, 2], [1, 0, 0]),   # negative cache_len
                       ([0, 1, 2], [1, 5, 0]),    # new_len > T
                       ([0, 1, 2], [1, -2, 0])]:  # negative new_len
        cl, nl = torch.tensor(cl_v, dtype=I32), torch.tensor(nl_v, dtype=I32)
        dkc, dvc, dcl = to_dev(kc), to_dev(vc), to_dev(cl)
        before = snapshot(dkc, dvc, dcl)
        assert_same_error(lambda: OPS.kv_cache_append(dkc, dvc, dcl, to_dev(kn), to_dev(vn), to_dev(nl)),
                          lambda: OPS.kv_cache_append(kc.clone(), vc.clone(), cl.clone(), kn, vn, nl))
        assert_unchanged(before, (dkc, dvc, dcl), ("k_cache", "v_cache", "cache_len"))


@gpu
def test_kv_cache_append_empty():
    for B, cap, T, Hk, d in [(0, 4, 2, 1, 8), (2, 4, 0, 1, 8), (2, 0, 0, 1, 8), (2, 4, 2, 0, 8)]:
        kc, vc = torch.randn(B, cap, Hk, d), torch.randn(B, cap, Hk, d)
        kn, vn = torch.randn(B, T, Hk, d), torch.randn(B, T, Hk, d)
        cl, nl = torch.zeros(B, dtype=I32), torch.full((B,), min(T, cap), dtype=I32)
        dkc, dvc, dcl = to_dev(kc), to_dev(vc), to_dev(cl)
        OPS.kv_cache_append(kc, vc, cl, kn, vn, nl)
        OPS.kv_cache_append(dkc, dvc, dcl, to_dev(kn), to_dev(vn), to_dev(nl))
        assert torch.equal(dkc.cpu(), kc) and torch.equal(dcl.cpu(), cl)


# ================================================================== GMOD_TRUST_INDICES=1
_TRUST_SCRIPT = textwrap.dedent(
    """
    import torch, gmod_ext
    ops = torch.ops.gmod
    dev = "cuda"
    I32 = torch.int32
    S, C, D = 10, 4, 16
    x = torch.randn(2, S, D, device=dev)
    # Row 0: out-of-range and negative entries; row 1: count > C.
    idx = torch.tensor([[1, 99, -5, 3], [0, 1, 2, 3]], dtype=I32, device=dev)
    count = torch.tensor([4, 7], dtype=I32, device=dev)
    out = ops.gather_rows(x, idx, count)
    torch.cuda.synchronize()
    assert torch.equal(out[0, 0], x[0, 1]) and torch.equal(out[0, 3], x[0, 3])
    assert bool((out[0, 1:3] == 0).all()), "ignored entries give zero rows"
    assert torch.equal(out[1], x[1, :4])
    gb = ops.gather_rows_backward(out, idx, count, S)
    base = torch.randn(2, C, D, device=dev)
    y = ops.scatter_merge(x, base, None, None, idx, count, None)
    grads = ops.scatter_merge_backward(torch.randn_like(x), x, base, base, torch.rand(2, C, device=dev), idx, count,
                                       torch.rand(2, S, device=dev))
    torch.cuda.synchronize()
    assert torch.equal(y[0, 1], base[0, 0]) and torch.equal(y[0, 0], x[0, 0])
    # route: bad mask codes act as "never", negative num_routed as 0.
    m = torch.tensor([[0, 5, 0, 1], [0, 0, 0, 0]], dtype=torch.int8, device=dev)
    i2, c2 = ops.route(torch.randn(2, 4, device=dev), m, torch.tensor([9, -3], dtype=I32, device=dev), 4, None)
    assert i2.cpu().tolist()[1] == [-1] * 4 and c2.cpu().tolist() == [3, 0], (i2, c2)
    # kv_cache_append: a row that would overflow is left untouched, cache_len included.
    kc = torch.zeros(2, 4, 1, 8, device=dev); vc = torch.zeros_like(kc)
    cl = torch.tensor([3, 0], dtype=I32, device=dev)
    kn = torch.ones(2, 2, 1, 8, device=dev)
    ops.kv_cache_append(kc, vc, cl, kn, kn, torch.tensor([2, 2], dtype=I32, device=dev))
    torch.cuda.synchronize()
    assert cl.cpu().tolist() == [3, 2], cl
    assert float(kc[0].abs().sum()) == 0.0 and float(kc[1, :2].sum()) == 16.0
    print("TRUST-OK")
    """
)


@gpu
def test_trust_indices_skips_validation_without_out_of_bounds_access():
    if DEV != "cuda":
        pytest.skip("GMOD_TRUST_INDICES only affects the CUDA kernels")
    env = dict(os.environ, GMOD_TRUST_INDICES="1")
    pkg_root = str(pathlib.Path(gmod_ext.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", _TRUST_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TRUST-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
