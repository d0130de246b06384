"""`python -m gmod_ext.bench attention`: gmod.attention against torch SDPA.

prefill  causal self-attention on full rows (q_len = k_len = S), forward and backward, against
         SDPA's flash and cuDNN backends on CUDA (math backend on CPU). FLOPs as flash-attention's
         benchmark counts them: forward 4*B*H*S*S*d / 2 for causal, backward 2.5x forward.
decode   one query token (q_len = 1) against KV caches of 4k-32k tokens, GQA 32/8 heads, batch 1-32:
         bytes moved (K and V cache read once, q read, o written) over the time, against the copy
         bandwidth (a 1 GiB copy), against a copy of the same bytes timed the same way (the "copy" row:
         what any one kernel moving that much reaches, launch and ramp included), and SDPA.

--experiments adds gmod-exp rows to prefill: the same call with the opt-in tile plan of that pass
(EXPERIMENTS: an environment flag the extension reads at every call), timed in the same process; and
to decode: the key-split decode with three K / V buffers (DECODE_EXPERIMENT).

Layouts: gmod takes q/k/v as [B, S, H, d]; SDPA is given transposed views [B, H, S, d] of the same
tensors (what flash-attention reads natively), so neither side pays for a copy.
"""
from __future__ import annotations

import math
import os
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

from .common import Col, Ctx, Section, check_all, copy_bandwidth, decode_inputs, esize, gbps, measure, missing, \
    record_check, record_error

_ops = torch.ops.gmod

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # very old torch
    SDPBackend = sdpa_kernel = None

SIZES = {
    "full": dict(prefill=[(8, 1024), (4, 2048), (2, 4096)], H=32, dims=[128, 64],
                 decode_B=[1, 8, 32], decode_L=[4096, 16384, 32768], Hq=32, Hk=8, decode_d=128),
    "quick": dict(prefill=[(2, 512), (1, 1024)], H=8, dims=[128, 64],
                  decode_B=[1, 8], decode_L=[2048, 8192], Hq=32, Hk=8, decode_d=128),
    "cpu": dict(prefill=[(2, 64), (1, 128)], H=2, dims=[64, 128],
                decode_B=[1, 2], decode_L=[256, 1024], Hq=4, Hk=2, decode_d=64),
}

PREFILL_COLS = [
    Col("shape", "B x S", help="batch x sequence (q_len = k_len = S in every row), causal"),
    Col("H", "H", help="heads (query = key/value heads)"),
    Col("d", "d", help="head dim"),
    Col("pass", "pass", help="fwd = attention; bwd = its backward alone (gmod: attention_backward op; "
        "SDPA: autograd.grad of its forward)"),
    Col("impl", "impl", help="gmod = torch.ops.gmod.attention; gmod-exp (--experiments) = the same with the opt-in "
        "tile plan of that pass (EXPERIMENTS); sdpa-flash / sdpa-cudnn / sdpa-math = "
        "F.scaled_dot_product_attention(is_causal=True) under sdpa_kernel(<that backend>)"),
    Col("ms", "ms", "ms", "median time; 'n/a (...)' when there is no kernel for this device/shape"),
    Col("TFLOPs", "TFLOP/s", ".4g", "causal FLOPs (fwd 4*B*H*S^2*d/2, bwd 2.5x fwd) / time, 10^12 per second"),
    Col("vs_flash", "vs flash", ".2f", "this row's TFLOP/s / the SDPA flash row's (sdpa-math on CPU) of the same pass"),
    Col("vs_default", "vs gmod", ".3f", "--experiments: this gmod-exp row's TFLOP/s / the gmod row's"),
    Col("check", "check", help="gmod o (fwd) or dq, dk, dv (bwd) vs the baseline's, once before timing"),
]
DECODE_COLS = [
    Col("B", "B", help="batch"),
    Col("L", "cache", help="tokens in each row's KV cache (k_len); one query token (q_len = 1)"),
    Col("heads", "Hq/Hk", help="query heads / key-value heads (GQA), head dim in the title"),
    Col("impl", "impl", help="gmod = torch.ops.gmod.attention; sdpa-* = SDPA (enable_gqa=True) under that backend; "
        "copy = a device copy of MB bytes in all (MB/2 read, MB/2 written), the same-size reference"),
    Col("ms", "ms", "ms", "median time of one decode step's attention"),
    Col("MB", "MB", ".1f", "bytes that must move: K and V caches 2*B*L*Hk*d*e + q + o, 10^6 bytes"),
    Col("GBps", "GB/s", ".0f", "MB / ms: cache read bandwidth"),
    Col("pct_copy", "% copy", ".0f", "GB/s over the measured copy bandwidth (1 GiB copy), in %"),
    Col("pct_copy_size", "% copy@MB", ".0f", "the copy row's ms / this row's ms, in %: GB/s against a copy moving "
        "the same bytes, whose launch and ramp-up weigh as much as this row's"),
    Col("vs_flash", "vs flash", ".2f", "SDPA flash ms / this row's ms (> 1: faster than flash)"),
    Col("vs_default", "vs gmod", ".3f", "--experiments: the gmod row's ms / this gmod-exp row's ms (> 1: faster)"),
    Col("check", "check", help="gmod o vs the baseline's, once before timing"),
]
TABLES = [("prefill", PREFILL_COLS), ("decode", DECODE_COLS)]


def _backends(ctx: Ctx) -> list:
    if sdpa_kernel is None:
        return [("sdpa", None)]
    if ctx.cuda:
        return [("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)]
    return [("sdpa-math", SDPBackend.MATH)]


def _ctxmgr(backend):
    return sdpa_kernel([backend]) if backend is not None else nullcontext()


def causal_flops(B: int, H: int, S: int, d: int, bwd: bool = False) -> float:
    f = 4.0 * B * H * S * S * d / 2
    return 2.5 * f if bwd else f


def _short(err: BaseException) -> str:
    s = str(err).strip().splitlines()
    return f"n/a ({type(err).__name__}: {(s[0] if s else '')[:50]})"


# --experiments: per pass, the environment flag of the opt-in tile plan (read by the extension at every
# call) and the head dims it changes; timed as gmod-exp rows next to the default gmod rows.
EXPERIMENTS = {
    # the d = 64 / 128 forward on the mma.sync kernel, the default before the sm_90a wgmma kernel (the
    # default on an H100 since 2026-11-26, 1.06-1.49x faster there); elsewhere both rows run mma.sync.
    # (The 128 x 32 tile of GMOD_ATTN_FWD_BLOCK_N=32 was the experiment before; it ran at 0.94-0.96x.)
    "fwd": ("GMOD_ATTN_FWD_IMPL", "mma", (64, 128)),
    # the non-deterministic d = 64 / 128 backward on the mma.sync kernels, the default before the wgmma
    # dk/dv + dQ kernel (1.14-1.20x faster on the H100). (The 4-warp 64-key dk/dv tile,
    # GMOD_ATTN_BWD_BLOCK_N=64, was an experiment before: 0.90-0.99x the 8-warp 128-key tile.)
    "bwd": ("GMOD_ATTN_BWD_IMPL", "mma", (64, 128)),
}


# --experiments in decode: the key-split tensor-core decode (at most 16 packed rows, d <= 128) with a ring of
# three K / V buffers, two tiles in flight per CTA instead of one (opt-in, not yet timed on a GPU). The
# experiment before it, the combine kernel's plain launch (GMOD_ATTN_PDL=0), ran 0.93-1.00x the PDL launch,
# the default since 2026-11-26. On float32, the SIMT kernels and other decode plans the flag changes nothing.
DECODE_EXPERIMENT = ("GMOD_ATTN_DECODE_STAGES", "3")


def _env(name: str, value: str):
    """os.environ[name] = value inside the with block, restored after."""
    return mock.patch.dict(os.environ, {name: value})


def _experiment_applies(ctx: Ctx, p: str, d: int) -> bool:
    """The experiments change the tensor-core kernels (bf16 / fp16 on CUDA). On CPU the flags change
    nothing; the rows still run there, so that CI runs this code path."""
    lowp = ctx.dtype in (torch.bfloat16, torch.float16)
    return ctx.experiments and (lowp or not ctx.cuda) and d in EXPERIMENTS[p][2]


_PROBE_CODE = """
import torch, gmod_ext
q = torch.randn(2, 200, 4, {d}, device="{device}", dtype=torch.bfloat16)
k, v = torch.randn_like(q), torch.randn_like(q)
n = torch.tensor([200, 77], dtype=torch.int32, device="{device}")
o, lse = torch.ops.gmod.attention(q, k, v, n, n, 0.1)
dq, dk, dv = torch.ops.gmod.attention_backward(torch.randn_like(o), q, k, v, o, lse, n, n, 0.1)
if q.is_cuda:
    torch.cuda.synchronize()
print("OK")
"""
_probes: dict = {}


def _probe_error(ctx: Ctx, experiment) -> str | None:
    """On CUDA, an experiment's kernel first runs once in a fresh process (cached per flag): a kernel that
    faults would leave this process's CUDA context unusable and lose every row after it. None if it ran."""
    if not ctx.cuda:
        return None
    key = experiment[:2]
    if key not in _probes:
        import subprocess
        import sys

        import gmod_ext

        env = dict(os.environ, **{experiment[0]: experiment[1]})
        env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(gmod_ext.__file__))) + os.pathsep + \
            env.get("PYTHONPATH", "")
        try:
            # 90 s: a fresh process with two small calls takes ~10 s; a hung kernel must not eat the step
            code = _PROBE_CODE.format(d=max(experiment[2]), device="cuda")
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
            ok = res.returncode == 0 and "OK" in res.stdout
            err = (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1][:80]
        except Exception as e:  # noqa: BLE001
            ok, err = False, f"{type(e).__name__}: {e}"[:80]
        _probes[key] = None if ok else err
    return _probes[key]


def _run_gmod(ctx: Ctx, row: dict, what: str, fn, refs, flops: float, experiment=None):
    """One gmod row: fn() once, its outputs checked against refs [(name, baseline tensor)] (in order,
    None: unchecked), then timed; with `experiment`, under that tile plan's environment flag. Returns
    fn's result, or None when it raised (the row then holds the error)."""
    if experiment and (err := _probe_error(ctx, experiment)) is not None:
        row["ms"] = record_error(ctx, what, RuntimeError(f"{experiment[0]}={experiment[1]} failed in a probe "
                                                         f"process: {err}"))
        return None
    with _env(*experiment[:2]) if experiment else nullcontext():
        try:
            out = fn()
            ctx.sync()
            row["check"] = (record_check(ctx, what, check_all([(n, got, ref) for (n, ref), got in zip(refs, out)],
                                                               ctx.dtype))
                            if refs is not None else "unchecked")
            t = measure(fn, ctx)
        except Exception as err:  # noqa: BLE001
            row["ms"] = record_error(ctx, what, err)
            return None
    row.update(ms=t.ms, TFLOPs=flops / (t.ms * 1e-3) / 1e12, timing=t.as_json())
    return out


def bench_prefill(ctx: Ctx) -> Section:
    z = SIZES[ctx.size_mode]
    H, dt, dev = z["H"], ctx.dtype, ctx.device
    sec = Section("prefill", f"attention prefill, causal, {str(dt)[6:]}", PREFILL_COLS)
    for d in z["dims"]:
        for B, S in z["prefill"]:
            scale = 1.0 / math.sqrt(d)
            q, k, v = (torch.randn(B, S, H, d, dtype=dt, device=dev) for _ in range(3))
            do = torch.randn(B, S, H, d, dtype=dt, device=dev)
            lens = torch.full((B,), S, dtype=torch.int32, device=dev)
            label = f"{B}x{S} H{H} d{d}"
            base = dict(shape=f"{B}x{S}", H=H, d=d)
            ref_fwd = ref_bwd = None
            flops_f, flops_b = causal_flops(B, H, S, d), causal_flops(B, H, S, d, bwd=True)
            rows = {(p, name): sec.add(**base, **{"pass": p}, impl=name)
                    for p in ("fwd", "bwd")
                    for name in ["gmod"] + (["gmod-exp"] if _experiment_applies(ctx, p, d) else [])
                    + [n for n, _ in _backends(ctx)]}
            # --- SDPA baselines
            for name, backend in _backends(ctx):
                qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
                fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
                    qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), is_causal=True, scale=scale)
                rf, rb = rows[("fwd", name)], rows[("bwd", name)]
                try:
                    with _ctxmgr(backend):
                        out = fn()
                        t = measure(fn, ctx)
                    rf.update(ms=t.ms, TFLOPs=flops_f / (t.ms * 1e-3) / 1e12, timing=t.as_json())
                    if ref_fwd is None:
                        ref_fwd = out.detach().transpose(1, 2)
                    grads = lambda: torch.autograd.grad(out, (qs, ks, vs), do.transpose(1, 2), retain_graph=True)  # noqa: E731
                    gr = grads()
                    if ref_bwd is None:
                        ref_bwd = [g_.detach() for g_ in gr]
                    del gr
                    t = measure(grads, ctx)
                    rb.update(ms=t.ms, TFLOPs=flops_b / (t.ms * 1e-3) / 1e12, timing=t.as_json())
                    del out
                except Exception as err:  # noqa: BLE001  (backend not available for this shape/dtype)
                    ctx.sync()
                    for r in (rf, rb):
                        if r.get("ms") is None:
                            r["ms"] = _short(err)
                del qs, ks, vs
            # --- gmod (and the experiments' gmod-exp rows)
            gf, gb = rows[("fwd", "gmod")], rows[("bwd", "gmod")]
            ef, eb = rows.get(("fwd", "gmod-exp")), rows.get(("bwd", "gmod-exp"))
            na = missing(["attention"], ctx)
            o = lse = None
            if na:
                gf["ms"] = gb["ms"] = na
            else:
                fw = lambda: _ops.attention(q, k, v, lens, lens, scale)  # noqa: E731
                refs_f = [("o", ref_fwd)] if ref_fwd is not None else None
                o, lse = _run_gmod(ctx, gf, f"attention fwd {label}", fw, refs_f, flops_f) or (None, None)
                if ef is not None:
                    _run_gmod(ctx, ef, f"attention fwd (experiment) {label}", fw, refs_f, flops_f, EXPERIMENTS["fwd"])
                na_b = missing(["attention_backward"], ctx)
                if na_b:
                    gb["ms"] = na_b
                elif o is None:
                    gb["ms"] = "n/a (forward failed)"
                else:
                    bw = lambda: _ops.attention_backward(do, q, k, v, o, lse, lens, lens, scale)  # noqa: E731
                    refs_b = list(zip(("dq", "dk", "dv"), ref_bwd)) if ref_bwd is not None else None
                    _run_gmod(ctx, gb, f"attention bwd {label}", bw, refs_b, flops_b)
                    if eb is not None:
                        _run_gmod(ctx, eb, f"attention bwd (experiment) {label}", bw, refs_b, flops_b,
                                  EXPERIMENTS["bwd"])
            ref_name = _backends(ctx)[0][0]
            for p in ("fwd", "bwd"):
                ref_t = rows[(p, ref_name)].get("TFLOPs")
                for (pp, _), r in rows.items():
                    if pp == p and ref_t and r.get("TFLOPs"):
                        r["vs_flash"] = r["TFLOPs"] / ref_t
                exp, dflt = rows.get((p, "gmod-exp")), rows[(p, "gmod")]
                if exp is not None and exp.get("TFLOPs") and dflt.get("TFLOPs"):
                    exp["vs_default"] = exp["TFLOPs"] / dflt["TFLOPs"]
            del q, k, v, do, o, lse, ref_fwd, ref_bwd
            if ctx.cuda:
                torch.cuda.empty_cache()
    return sec


def bench_decode(ctx: Ctx) -> Section:
    z = SIZES[ctx.size_mode]
    Hq, Hk, d, dt, dev = z["Hq"], z["Hk"], z["decode_d"], ctx.dtype, ctx.device
    e = esize(dt)
    scale = 1.0 / math.sqrt(d)
    sec = Section("decode", f"attention decode: q_len=1 vs a KV cache, Hq={Hq} Hk={Hk} d={d} {str(dt)[6:]}",
                  DECODE_COLS)
    for B in z["decode_B"]:
        for L in z["decode_L"]:
            q, k, v, q_len, k_len = decode_inputs(B, L, Hq, Hk, d, dev, dt)
            nbytes = 2 * B * L * Hk * d * e + 2 * B * Hq * d * e
            base = dict(B=B, L=L, heads=f"{Hq}/{Hk}", MB=nbytes / 1e6, bytes=nbytes)
            ref = None
            g = sec.add(**base, impl="gmod")  # gmod row first in its group, filled after the baselines
            fn = lambda: F.scaled_dot_product_attention(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale, enable_gqa=True)
            rows = [g]
            for name, backend in _backends(ctx):
                r = sec.add(**base, impl=name)
                rows.append(r)
                try:
                    with _ctxmgr(backend):
                        out = fn()
                        t = measure(fn, ctx)
                    if ref is None:
                        ref = out.transpose(1, 2)
                    r.update(ms=t.ms, timing=t.as_json())
                except Exception as err:  # noqa: BLE001
                    ctx.sync()
                    r["ms"] = _short(err)
            na = missing(["attention"], ctx)
            if ref is None and not na and sdpa_kernel is not None:
                try:  # no timed backend ran: check against the math backend (untimed)
                    with sdpa_kernel([SDPBackend.MATH]):
                        ref = fn().transpose(1, 2)
                except Exception:  # noqa: BLE001
                    ref = None
            exp = sec.add(**base, impl="gmod-exp") if ctx.experiments else None
            for r, flag in ((g, None), (exp, DECODE_EXPERIMENT)):
                if r is None:
                    continue
                if na:
                    r["ms"] = na
                    continue
                what = f"attention decode{' (experiment)' if flag else ''} B{B} L{L}"
                with _env(*flag) if flag else nullcontext():
                    try:
                        o, _ = _ops.attention(q, k, v, q_len, k_len, scale)
                        ctx.sync()
                        r["check"] = (record_check(ctx, what, check_all([("o", o, ref)], dt))
                                      if ref is not None else "unchecked")
                        del o
                        t = measure(lambda: _ops.attention(q, k, v, q_len, k_len, scale), ctx)
                        r.update(ms=t.ms, timing=t.as_json())
                    except Exception as err:  # noqa: BLE001
                        r["ms"] = record_error(ctx, what, err)
            if exp is not None:
                rows.append(exp)
                if isinstance(exp.get("ms"), float) and isinstance(g.get("ms"), float):
                    exp["vs_default"] = g["ms"] / exp["ms"]
            rows.append(_same_size_copy(ctx, sec, base, nbytes))
            flash = next((r for r in rows if r["impl"] == _backends(ctx)[0][0]), None)
            copy_ms = rows[-1].get("ms")
            for r in rows:
                if isinstance(r.get("ms"), float):
                    r["GBps"] = gbps(nbytes, r["ms"])
                    r["pct_copy"] = 100.0 * r["GBps"] / ctx.copy_GBps if ctx.copy_GBps else None
                    if isinstance(copy_ms, float):
                        r["pct_copy_size"] = 100.0 * copy_ms / r["ms"]
                    if flash is not None and isinstance(flash.get("ms"), float) and r["impl"] != "copy":
                        r["vs_flash"] = flash["ms"] / r["ms"]
            del q, k, v, ref
            if ctx.cuda:
                torch.cuda.empty_cache()
    return sec


def _same_size_copy(ctx: Ctx, sec: Section, base: dict, nbytes: int) -> dict:
    """The "copy" row of a decode shape: dst.copy_(src) of nbytes / 2 bytes (nbytes moved), timed like
    the attention rows. A 16 MB cache read is far from the 1 GiB copy's bandwidth for any kernel (launch,
    ramp-up, tail); this row says how far."""
    r = sec.add(**base, impl="copy")
    try:
        src = torch.randint(0, 256, (nbytes // 2,), dtype=torch.uint8, device=ctx.device)
        dst = torch.empty_like(src)
        t = measure(lambda: dst.copy_(src), ctx)
        r.update(ms=t.ms, timing=t.as_json(), check="ok" if torch.equal(dst, src) else "MISMATCH")
        if r["check"] != "ok":
            ctx.mismatches.append({"bench": f"decode copy B{base['B']} L{base['L']}", "detail": "dst != src"})
        del src, dst
    except Exception as err:  # noqa: BLE001  (out of memory at the largest shapes: the row says so)
        ctx.sync()
        r["ms"] = _short(err)
    return r


def run(ctx: Ctx):
    """Yield the sections one by one (the caller prints each as soon as it is done)."""
    torch.manual_seed(ctx.seed)
    c = copy_bandwidth(ctx)
    copy = Section("copy", "copy bandwidth (the floor for decode)",
                   [Col("MB", "MB moved", ".0f"), Col("ms", "ms", "ms"), Col("GBps", "GB/s", ".0f"), Col("check", "check")])
    copy.add(MB=c["bytes"] / 1e6, ms=c["timing"]["ms"], GBps=c["GBps"], check=c["check"], timing=c["timing"])
    if c["check"] != "ok":
        ctx.mismatches.append({"bench": "copy", "detail": "dst != src"})
    yield copy
    yield bench_prefill(ctx)
    yield bench_decode(ctx)
