"""Where a decode call's time goes, kernel by kernel (CUDA profiler timestamps).

    python scripts/decode_timeline.py                        # B 1 / 8 x L 4096 / 16384, GQA 32/8, d 128
    python scripts/decode_timeline.py --B 1 --L 4096 --pdl 0 1 --stages 2 --json out.json

At batch 1 the decode is far from a copy of the same bytes (stop 15, H100: 19.8 us at 4k tokens where
the copy takes 8.7 us, and about the same ~15 us more than the cache read at copy speed at 16k and
32k): a fixed cost per call. This script splits that cost. For each shape, GMOD_ATTN_PDL setting (default
1, the library's default) and GMOD_ATTN_DECODE_STAGES setting (default 2 and 3: the key-split decode's
K / V buffers, 3 = two key tiles in flight per CTA) it
times gmod.attention (q_len = 1) with CUDA events exactly as `gmod_ext.bench attention` does (L2
flushed before each call, median), then runs the same calls under torch.profiler and prints medians of:

  event us     the CUDA-event time of one call (the benchmark's number)
  split us     the split-k kernel (or the only kernel, when the cache is not split)
  gap us       from the split kernel's end to the combine kernel's start (< 0: they overlap, PDL)
  combine us   the combine kernel
  kernels us   first kernel start to last kernel end
  ideal us     the K / V bytes at the copy bandwidth measured in the same run (1 GiB copy)

  copy us      a same-size copy (dst.copy_(src) moving the cache's bytes), timed the same way

event - kernels is time outside the kernels (the start event to the first kernel's start, the last
kernel's end to the end event); split - ideal is the split kernel's own excess over streaming the cache.

Two ways to keep the cache out of L2 (--modes, default both):
  flush    the benchmark's way: a 256 MiB read before each call. The call then follows a reduction
           kernel that uses little shared memory, while the split kernel asks for ~200 KB per SM; if the
           SMs must change their L1 / shared-memory split (and drain) first, that is billed to the call.
  rotate   no flush: calls round-robin over enough distinct caches (together >= 4x the L2) that each one
           comes from DRAM, as in a real decode step where each layer reads its own cache. A copy has no
           shared memory either way, so if `event us` drops from flush to rotate much more than
           `copy us` does, part of the fixed cost is the benchmark's, not the kernels'.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys

import torch


def _kernels(prof) -> list:
    """(name, start_us, end_us) of the gmod_attn kernels in the profile, in start order."""
    out = []
    for e in prof.events():
        if "cuda" not in str(getattr(e, "device_type", "")).lower() or "gmod_attn" not in e.name:
            continue
        out.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    return sorted(out, key=lambda k: k[1])


def split_calls(kernels: list) -> list:
    """Group a profile's gmod_attn kernels into calls: a call is its split kernel plus, when split, the
    combine kernel after it ({split, combine (or None), gap, span} in us, the kernels' own durations)."""
    calls, i = [], 0
    while i < len(kernels):
        name, s0, e0 = kernels[i]
        if "combine" in name:  # a combine without its split kernel (cut off at the profile's start)
            i += 1
            continue
        call = {"split": e0 - s0, "combine": None, "gap": None, "span": e0 - s0}
        if i + 1 < len(kernels) and "combine" in kernels[i + 1][0]:
            _, s1, e1 = kernels[i + 1]
            call.update(combine=e1 - s1, gap=s1 - e0, span=max(e0, e1) - s0)
            i += 1
        calls.append(call)
        i += 1
    return calls


def rotation_count(cache_bytes: int, l2_bytes: int, budget_bytes: int, most: int = 256) -> int:
    """Distinct caches for the rotate mode: together at least 4x the L2 (so the one a call reads has
    been evicted by the others since its last turn), at least 2, at most `most`, and within
    budget_bytes if that allows 2."""
    want = max(2, math.ceil(4 * l2_bytes / max(cache_bytes, 1)))
    fit = budget_bytes // max(cache_bytes, 1)
    return int(max(2, min(want, fit, most)))


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    ap.add_argument("--L", type=int, nargs="+", default=[4096, 16384], help="cache lengths (default 4096 16384)")
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hk", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--pdl", type=int, nargs="+", default=[1], choices=[0, 1],
                    help="GMOD_ATTN_PDL settings to run (default 1)")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=[2, 3],
                    help="GMOD_ATTN_DECODE_STAGES settings to run (default 2 3)")
    ap.add_argument("--modes", nargs="+", default=["flush", "rotate"], choices=["flush", "rotate"],
                    help="how each call finds the cache out of L2 (default both; see above)")
    ap.add_argument("--calls", type=int, default=20, help="profiled calls per setting (default 20)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of this script on the CPU kernels, for its tests (no kernel times)")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("decode_timeline.py needs a CUDA device (the kernel timestamps come from the CUDA profiler)",
              file=sys.stderr)
        return 3
    os.environ.setdefault("GMOD_TRUST_INDICES", "1")  # as the benchmark: no validation sync per call
    import gmod_ext  # noqa: F401
    from gmod_ext.bench import common

    dev = torch.device(a.device)
    ctx = common.Ctx(device=dev, dtype=torch.bfloat16, quick=not cuda, budget_ms=60.0 if cuda else 5.0,
                     min_reps=10 if cuda else 2)
    no_flush = dataclasses.replace(ctx, flush=False)
    copy_GBps = common.copy_bandwidth(ctx)["GBps"]
    props = torch.cuda.get_device_properties(0) if cuda else None
    l2 = int(getattr(props, "L2_cache_size", 50 * 2**20))
    print(f"{props.name if cuda else 'CPU (dry run)'}, copy bandwidth {copy_GBps:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB, bf16, "
          f"Hq/Hk {a.Hq}/{a.Hk}, d {a.d}\n")
    head = f"{'B':>3} {'L':>6} {'mode':>6} {'PDL':>3} {'stg':>3} {'event us':>9} {'copy us':>8} {'split us':>9} " \
           f"{'gap us':>7} {'combine us':>10} {'kernels us':>10} {'ideal us':>9}"
    print(head)
    print("-" * len(head))

    def f(x, w):
        return f"{x:>{w}.1f}" if isinstance(x, float) else f"{'-':>{w}}"

    rows = []
    for B in a.B:
        for L in a.L:
            cache_bytes = 2 * B * L * a.Hk * a.d * 2
            ideal = cache_bytes / (copy_GBps * 1e9) * 1e6
            scale = 1.0 / math.sqrt(a.d)
            for mode in a.modes:
                free = torch.cuda.mem_get_info()[0] if cuda else 2**30
                n = 1 if mode == "flush" else rotation_count(cache_bytes, l2, int(free * 0.5))
                inputs = [common.decode_inputs(B, L, a.Hq, a.Hk, a.d, dev) for _ in range(n)]
                calls = [lambda t=t: torch.ops.gmod.attention(*t, scale) for t in inputs]
                srcs = [torch.empty(cache_bytes // 2, dtype=torch.uint8, device=dev) for _ in range(n)]
                dsts = [torch.empty_like(x) for x in srcs]
                copies = [lambda s=s_, d=d_: d.copy_(s) for s_, d_ in zip(srcs, dsts)]
                tctx = ctx if mode == "flush" else no_flush
                copy_us = common.measure(copies, tctx).ms * 1e3
                del srcs, dsts, copies
                for pdl, stages in [(p, s) for p in a.pdl for s in a.stages]:
                    os.environ["GMOD_ATTN_PDL"] = str(pdl)
                    os.environ["GMOD_ATTN_DECODE_STAGES"] = str(stages)
                    event_us = common.measure(calls, tctx).ms * 1e3
                    for c in calls:
                        c()
                    ctx.sync()
                    act = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
                    with torch.profiler.profile(activities=[act]) as prof:
                        for i in range(a.calls):
                            if mode == "flush":
                                ctx.flush_l2()
                            calls[i % n]()
                        ctx.sync()
                    found = split_calls(_kernels(prof))
                    r = {"B": B, "L": L, "mode": mode, "caches": n, "pdl": pdl, "stages": stages, "event_us": event_us,
                         "copy_us": copy_us, "ideal_us": ideal, "calls": len(found)}
                    for key in ("split", "gap", "combine", "span"):
                        r[f"{key}_us"] = _median([c[key] for c in found])
                    rows.append(r)
                    print(f"{B:>3} {L:>6} {mode:>6} {pdl:>3} {stages:>3} {f(event_us, 9)} {f(copy_us, 8)} {f(r['split_us'], 9)} "
                          f"{f(r['gap_us'], 7)} {f(r['combine_us'], 10)} {f(r['span_us'], 10)} {f(ideal, 9)}",
                          flush=True)
                del inputs, calls
                if cuda:
                    torch.cuda.empty_cache()
    os.environ.pop("GMOD_ATTN_PDL", None)
    os.environ.pop("GMOD_ATTN_DECODE_STAGES", None)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"copy_GBps": copy_GBps, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
