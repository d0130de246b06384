#!/usr/bin/env python3
"""Run every gmod CUDA op (forward and backward) once, for compute-sanitizer and ncu.

    compute-sanitizer --tool memcheck  python3 scripts/sanitize_ops.py
    compute-sanitizer --tool racecheck python3 scripts/sanitize_ops.py
    ncu --kernel-name regex:gmod ... python3 scripts/sanitize_ops.py --large

Default shapes are small and awkward (odd lengths, rows shorter than the capacity, sentinel -1
slots, padding, GQA, q_len < k_len, empty rows) so that out-of-bounds reads and writes show up;
--large uses benchmark sizes (for ncu). Ops without a CUDA kernel are skipped, not failed.
Each CUDA result is compared with the op's CPU kernel on the same inputs (loose tolerance: the
point here is memory safety; python_tests hold the exact correctness tests).
Exit status: 0 every case that ran passed, 1 a case raised or differed, 2 no GPU.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from unittest import mock

import torch

import gmod_ext  # noqa: F401  (loads torch.ops.gmod)

_ops = torch.ops.gmod
DEV = torch.device("cuda")  # --device cpu runs the same cases on the CPU kernels (to test this script)
CASES = []
NO_KERNEL: set = set()
COMPARE = True  # compare with the CPU kernels (off with --large: there only the CUDA kernels matter)


def has_cuda(op: str) -> bool:
    """Whether the op has a kernel for DEV (the CUDA key unless --device cpu)."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"gmod::{op}", DEV.type.upper()))
    except RuntimeError:
        return False


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def case(name: str, *needs: str):
    def deco(fn):
        CASES.append((name, needs, fn))
        return fn
    return deco


def cpu(t):
    if isinstance(t, torch.Tensor):
        return t.detach().cpu()
    if isinstance(t, (list, tuple)):
        return type(t)(cpu(x) for x in t)
    return t


def run_both(op, *args):
    """(CUDA result, CPU-kernel result) of torch.ops.gmod.<op> on the same inputs; (None, None) if
    the op has no CUDA kernel (e.g. a forward whose backward is not written yet)."""
    if not has_cuda(op):
        NO_KERNEL.add(op)
        return None, None
    out = getattr(_ops, op)(*args)
    sync()
    if not COMPARE:
        return out, None
    ref = getattr(_ops, op)(*cpu(args))
    return out, ref


def close(name, out, ref, tol):
    """Raise AssertionError naming the first tensor that differs."""
    if out is None or ref is None:
        return
    outs = out if isinstance(out, (list, tuple)) else [out]
    refs = ref if isinstance(ref, (list, tuple)) else [ref]
    for i, (o, r) in enumerate(zip(outs, refs)):
        o = o.detach().cpu()
        if o.numel() == 0 and r.numel() == 0:
            continue
        if o.shape != r.shape:
            raise AssertionError(f"{name}[{i}]: shape {tuple(o.shape)} vs CPU {tuple(r.shape)}")
        if not o.is_floating_point():
            if not torch.equal(o, r):
                raise AssertionError(f"{name}[{i}]: {(o != r).sum().item()} elements differ from the CPU kernel")
            continue
        o, r = o.double(), r.double()
        fin = torch.isfinite(r)
        if not torch.equal(fin, torch.isfinite(o)):
            raise AssertionError(f"{name}[{i}]: non-finite pattern differs from the CPU kernel")
        if fin.any():
            d = (o[fin] - r[fin]).abs().max().item()
            scale = max(r[fin].abs().max().item(), 1e-6)
            if d > tol * scale:
                raise AssertionError(f"{name}[{i}]: max|diff| {d:.3e} > {tol} * {scale:.3e}")


def tol_of(dt):
    return {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dt]


def mask_for(B, S, g):
    m = torch.zeros(B, S, dtype=torch.int8)
    for b in range(B):
        pad = (b * S) // (2 * B)
        if pad:
            m[b, S - pad:] = 2
        m[b, 1:1 + S // 10] = 1
    return m


# ----------------------------------------------------------------------------------------- cases
def sizes(large):
    return dict(B=8, S=2048, D=4096) if large else dict(B=3, S=77, D=200)


@case("router_logits fwd+bwd", "router_logits", "router_logits_backward")
def _router(large):
    z = sizes(large)
    for dt in ([torch.bfloat16] if large else [torch.float32, torch.bfloat16]):
        for with_norm in (True, False):
            x = torch.randn(z["B"], z["S"], z["D"], dtype=dt, device=DEV)
            w = torch.randn(z["D"], device=DEV) / math.sqrt(z["D"])
            nw = (1 + 0.1 * torch.randn(z["D"], device=DEV)).to(dt) if with_norm else None
            out, ref = run_both("router_logits", x, w, nw, 1e-6)
            close("router_logits", out, ref, tol_of(torch.float32) * 10)
            g = torch.randn(z["B"], z["S"], device=DEV)
            out, ref = run_both("router_logits_backward", g, x, w, nw, 1e-6)
            close("router_logits_backward", out, ref, tol_of(dt))


@case("route (top-k, threshold)", "route")
def _route(large):
    shapes = [(8, 4096), (1, 32768)] if large else [(3, 77), (2, 1000), (1, 5000)]
    for B, S in shapes:
        scores = torch.randn(B, S, device=DEV)
        if not large:
            scores[0, :3] = float("nan")  # NaN ranks last
            scores[-1, 10:20] = 0.25  # ties go to the lower index
        mask = mask_for(B, S, None).to(DEV)
        cases = [(S // 2, [S // 3] * B), (S // 4, [0] + [S] * (B - 1)), (S, [S // 7] * B),
                 (max(1, S // 20), [S // 3] * B)]  # the last: forced tokens alone exceed the capacity
        for C, nr in (cases[:1] if large else cases):
            num_routed = torch.tensor(nr, dtype=torch.int32, device=DEV)
            for thr in (None, 0.5):
                out, ref = run_both("route", scores, mask, num_routed, C, thr)
                close(f"route C={C} thr={thr}", out, ref, 0)


def _route_idx(B, S, C):
    scores = torch.randn(B, S)
    mask = mask_for(B, S, None)
    nr = torch.tensor([max(0, C - 5 * b - 3) for b in range(B)], dtype=torch.int32)  # rows shorter than C
    idx, count = _ops.route(scores, mask, nr, C, None)
    return idx.to(DEV), count.to(DEV)


@case("gather_rows fwd+bwd", "gather_rows", "gather_rows_backward")
def _gather(large):
    z = sizes(large)
    B, S, D = z["B"], z["S"], z["D"]
    C = S // 2 + 1
    idx, count = _route_idx(B, S, C)
    for dt in ([torch.bfloat16] if large else [torch.float32, torch.bfloat16, torch.float16]):
        x = torch.randn(B, S, D, dtype=dt, device=DEV)
        out, ref = run_both("gather_rows", x, idx, count)
        close("gather_rows", out, ref, 0)
        g = torch.randn(B, C, D, dtype=dt, device=DEV)
        out, ref = run_both("gather_rows_backward", g, idx, count, S)
        close("gather_rows_backward", out, ref, 0)


@case("scatter_merge fwd+bwd", "scatter_merge", "scatter_merge_backward")
def _merge(large):
    z = sizes(large)
    B, S, D = z["B"], z["S"], z["D"]
    C = S // 2 + 1
    idx, count = _route_idx(B, S, C)
    for dt in ([torch.bfloat16] if large else [torch.float32, torch.bfloat16]):
        x = torch.randn(B, S, D, dtype=dt, device=DEV)
        base = torch.randn(B, C, D, dtype=dt, device=DEV)
        delta = torch.randn(B, C, D, dtype=dt, device=DEV)
        gate = torch.rand(B, C, device=DEV)
        skip = torch.rand(B, S, device=DEV)
        variants = [(delta, gate, None)] if large else [
            (delta, gate, None), (None, gate, None), (None, None, None), (delta, gate, skip), (None, gate, skip)]
        for dl, gt, sk in variants:
            tag = f"delta={dl is not None} gate={gt is not None} skip={sk is not None}"
            out, ref = run_both("scatter_merge", x, base, dl, gt, idx, count, sk)
            close(f"scatter_merge {tag}", out, ref, tol_of(dt))
            gy = torch.randn(B, S, D, dtype=dt, device=DEV)
            out, ref = run_both("scatter_merge_backward", gy, x, base, dl, gt, idx, count, sk)
            close(f"scatter_merge_backward {tag}", out, ref, tol_of(dt))


@case("rope fwd+bwd", "rope", "rope_backward")
def _rope(large):
    # full rotary at d = 128 (16-byte vectors), partial (a copied tail), an odd layout (the 1-element path)
    shapes = [(8, 1024, 32, 128, 128)] if large else [(3, 77, 4, 128, 128), (2, 19, 3, 64, 32), (2, 9, 2, 10, 6)]
    for B, C, H, d, r in shapes:
        for dt in ([torch.bfloat16] if large else [torch.float32, torch.bfloat16]):
            x = torch.randn(B, C, H, d, dtype=dt, device=DEV)
            ang = torch.rand(B, C, r, device=DEV) * 6.28
            cos, sin = ang.cos().to(dt), ang.sin().to(dt)
            for op in ("rope", "rope_backward"):
                out, ref = run_both(op, x, cos, sin)
                close(f"{op} {tuple(x.shape)} r={r}", out, ref, tol_of(dt))


def _attn_configs(large):
    if large:
        return [  # B, Cq, Ck, Hq, Hk, d, q_len, k_len, backward
            (4, 2048, 2048, 32, 32, 128, [2048] * 4, [2048] * 4, True),
            (8, 1, 16384, 32, 8, 128, [1] * 8, [16384] * 8, False),
        ]
    return [
        (2, 77, 77, 4, 2, 64, [77, 50], [77, 50], True),         # training, GQA, a short row
        (2, 77, 77, 4, 4, 128, [77, 0], [77, 0], True),          # an empty row
        (2, 16, 100, 4, 2, 128, [16, 5], [100, 40], True),       # chunked prefill on a cache
        (3, 1, 300, 8, 2, 64, [1, 1, 0], [300, 17, 5], False),   # decode, one row idle
        (2, 1, 700, 8, 2, 128, [1, 1], [700, 333], False),       # decode, d = 128, 11 key tiles
        (1, 130, 130, 2, 1, 64, [130], [130], True),             # crosses 64/128 tiles
    ]


def _wgmma_here():
    """The sm_90a wgmma kernels can run: a compute capability 9.0 GPU and a build with sm_90a kernels
    (elsewhere GMOD_ATTN_FWD_IMPL / GMOD_ATTN_BWD_IMPL=wgmma raise), or --device cpu (where the flags
    change nothing)."""
    if DEV.type == "cpu":
        return True
    import gmod_ext
    return (torch.cuda.is_available() and torch.cuda.get_device_capability(DEV) == (9, 0)
            and gmod_ext.BUILD_INFO.get("sm90a", False))


# The opt-in kernel plans (flags the extension reads at every call), each on the small configs it
# changes, bf16: the d = 128 prefill forward on 32-key tiles, the wgmma prefill forward (sm_90a; 3 and 2 stages) and
# backward, the
# 8-warp dk/dv kernel (every config
# with a backward), and the decode forced to many key splits (the combine with splits of one tile each).
# config: (B, Cq, Ck, Hq, Hk, d, q_len, k_len, backward)
_ATTN_PLANS = [
    ({"GMOD_ATTN_FWD_BLOCK_N": "32"}, lambda c: c[5] == 128 and c[1] > 16),
    # the sm_90a wgmma forward (prefill, d = 64 / 128); only where it can run (_wgmma_here)
    ({"GMOD_ATTN_FWD_IMPL": "wgmma"}, lambda c: _wgmma_here() and c[5] in (64, 128) and c[1] > 16),
    ({"GMOD_ATTN_FWD_IMPL": "wgmma-2stage"}, lambda c: _wgmma_here() and c[5] in (64, 128) and c[1] > 16),
    # the sm_90a wgmma backward dk/dv kernel (d = 64 / 128, every config with a backward)
    ({"GMOD_ATTN_BWD_IMPL": "wgmma"}, lambda c: _wgmma_here() and c[5] in (64, 128) and c[8]),
    ({"GMOD_ATTN_BWD_BLOCK_N": "128"}, lambda c: c[8] and c[5] <= 128),
    ({"GMOD_ATTN_DECODE_SPLITS": "64"}, lambda c: c[1] <= 16),
    # the split-k decode's combine on programmatic dependent launch (sm_90+; elsewhere a plain launch)
    ({"GMOD_ATTN_DECODE_SPLITS": "64", "GMOD_ATTN_PDL": "1"}, lambda c: c[1] <= 16),
    # the key-split decode with three K / V buffers, with the wave model's splits and with one tile per split
    ({"GMOD_ATTN_DECODE_STAGES": "3"}, lambda c: c[1] <= 16),
    ({"GMOD_ATTN_DECODE_STAGES": "3", "GMOD_ATTN_DECODE_SPLITS": "64"}, lambda c: c[1] <= 16),
]


def _attn_runs(large):
    """(flags, config, dtypes) of every attention run: each config with the default plan, then (small
    shapes only) the configs each opt-in plan changes."""
    dts = [torch.bfloat16] if large else [torch.bfloat16, torch.float16]
    runs = [({}, c, dts) for c in _attn_configs(large)]
    if not large:
        runs += [(flags, c, [torch.bfloat16]) for flags, wants in _ATTN_PLANS for c in _attn_configs(large) if wants(c)]
    return runs


@case("attention fwd+bwd", "attention")
def _attention(large):
    for flags, config, dts in _attn_runs(large):
        for dt in dts:
            with mock.patch.dict(os.environ, flags):
                _attention_once(*config, dt, " ".join(f"{k}={v}" for k, v in flags.items()))


def _attention_once(B, Cq, Ck, Hq, Hk, d, ql, kl, bwd, dt, plan):
    q = torch.randn(B, Cq, Hq, d, dtype=dt, device=DEV)
    k = torch.randn(B, Ck, Hk, d, dtype=dt, device=DEV)
    v = torch.randn(B, Ck, Hk, d, dtype=dt, device=DEV)
    q_len = torch.tensor(ql, dtype=torch.int32, device=DEV)
    k_len = torch.tensor(kl, dtype=torch.int32, device=DEV)
    scale = 1 / math.sqrt(d)
    tag = f"B{B} Cq{Cq} Ck{Ck} H{Hq}/{Hk} d{d} {str(dt)[6:]}" + (f" [{plan}]" if plan else "")
    o, lse = _ops.attention(q, k, v, q_len, k_len, scale)
    sync()
    if COMPARE:  # CPU reference on float32 copies
        ro, rlse = _ops.attention(*cpu((q.float(), k.float(), v.float(), q_len, k_len)), scale)
        close(f"attention {tag}", (o.float(), lse), (ro, rlse), tol_of(dt))
    if bwd and not has_cuda("attention_backward"):
        NO_KERNEL.add("attention_backward")
    elif bwd:
        do = torch.randn_like(o)
        dq, dk, dv = _ops.attention_backward(do, q, k, v, o, lse, q_len, k_len, scale)
        sync()
        if COMPARE:
            ref = _ops.attention_backward(*cpu((do.float(), q.float(), k.float(), v.float(), o.float(),
                                                lse, q_len, k_len)), scale)
            close(f"attention_backward {tag}", (dq.float(), dk.float(), dv.float()), ref, 2 * tol_of(dt))


@case("kv_cache_append", "kv_cache_append")
def _kv(large):
    B, cap, Hk, d, T = (8, 4096, 8, 128, 512) if large else (3, 64, 2, 64, 9)
    for dt in [torch.bfloat16, torch.float32]:
        kc = torch.randn(B, cap, Hk, d, dtype=dt, device=DEV)
        vc = torch.randn(B, cap, Hk, d, dtype=dt, device=DEV)
        cl = torch.tensor([0, cap - T, cap - 3][:B] + [5] * max(0, B - 3), dtype=torch.int32, device=DEV)
        kn = torch.randn(B, T, Hk, d, dtype=dt, device=DEV)
        vn = torch.randn(B, T, Hk, d, dtype=dt, device=DEV)
        nl = torch.tensor([T, T, 3][:B] + [T // 2] * max(0, B - 3), dtype=torch.int32, device=DEV)
        ck, cv, ccl = (t.to("cpu", copy=True) for t in (kc, vc, cl))
        _ops.kv_cache_append(kc, vc, cl, kn, vn, nl)
        sync()
        if COMPARE:
            _ops.kv_cache_append(ck, cv, ccl, kn.cpu(), vn.cpu(), nl.cpu())
            close("kv_cache_append", (kc, vc, cl), (ck, cv, ccl), 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", action="store_true", help="benchmark sizes (for ncu), no CPU comparison")
    ap.add_argument("--only", help="comma-separated substrings of case names to run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: run the cases on the CPU kernels (only to test this script)")
    args = ap.parse_args()
    global DEV, COMPARE
    DEV = torch.device(args.device)
    COMPARE = not args.large
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: no GPU")
        return 2
    torch.manual_seed(0)
    ran = skipped = failed = 0
    for name, needs, fn in CASES:
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        gone = [op for op in needs if not has_cuda(op)]
        if len(gone) == len(needs):
            print(f"SKIP  {name}: no {DEV.type.upper()} kernel", flush=True)
            skipped += 1
            continue
        NO_KERNEL.clear()
        try:
            fn(args.large)
            sync()
            extra = f" (skipped, no kernel: {', '.join(sorted(NO_KERNEL))})" if NO_KERNEL else ""
            print(f"OK    {name}{extra}", flush=True)
            ran += 1
        except NotImplementedError as err:
            print(f"SKIP  {name}: {str(err).splitlines()[0]}", flush=True)
            skipped += 1
        except Exception as err:  # noqa: BLE001
            failed += 1
            print(f"FAIL  {name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
            traceback.print_exc(limit=3)
            if "CUDA error" in str(err) or "illegal" in str(err).lower():
                print("      (the CUDA context is now unusable: stopping)", flush=True)
                break
    print(f"sanitize_ops: {ran} ok, {skipped} skipped, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
