"""Where a decode call's time goes, kernel by kernel (CUDA profiler timestamps).

    python scripts/decode_timeline.py                        # B 1 / 8 x L 4096 / 16384, GQA 32/8, d 128
    python scripts/decode_timeline.py --B 1 --L 4096 --pdl 0 1 --json out.json

At batch 1 the decode is far from a copy of the same bytes (stop 15, H100: 19.8 us at 4k tokens where
the copy takes 8.7 us, and about the same ~15 us more than the cache read at copy speed at 16k and
32k): a fixed cost per call. This script splits that cost. For each shape and GMOD_ATTN_PDL setting it
times gmod.attention (q_len = 1) with CUDA events exactly as `gmod_ext.bench attention` does (L2
flushed before each call, median), then runs the same calls under torch.profiler and prints medians of:

  event us     the CUDA-event time of one call (the benchmark's number)
  split us     the split-k kernel (or the only kernel, when the cache is not split)
  gap us       from the split kernel's end to the combine kernel's start (< 0: they overlap, PDL)
  combine us   the combine kernel
  kernels us   first kernel start to last kernel end
  ideal us     the K / V bytes at the copy bandwidth measured in the same run (1 GiB copy)

event - kernels is time outside the kernels (the start event to the first kernel's start, the last
kernel's end to the end event); split - ideal is the split kernel's own excess over streaming the cache.
"""
from __future__ import annotations

import argparse
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
    ap.add_argument("--pdl", type=int, nargs="+", default=[0, 1], choices=[0, 1],
                    help="GMOD_ATTN_PDL settings to run (default 0 1)")
    ap.add_argument("--calls", type=int, default=20, help="profiled calls per setting (default 20)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_timeline.py needs a CUDA device (the kernel timestamps come from the CUDA profiler)",
              file=sys.stderr)
        return 3
    os.environ.setdefault("GMOD_TRUST_INDICES", "1")  # as the benchmark: no validation sync per call
    import gmod_ext  # noqa: F401
    from gmod_ext.bench import common

    ctx = common.Ctx(device=torch.device("cuda"), dtype=torch.bfloat16, quick=False, budget_ms=60.0)
    copy_GBps = common.copy_bandwidth(ctx)["GBps"]
    print(f"{torch.cuda.get_device_name(0)}, copy bandwidth {copy_GBps:.0f} GB/s, bf16, Hq/Hk {a.Hq}/{a.Hk}, "
          f"d {a.d}\n")
    head = f"{'B':>3} {'L':>6} {'PDL':>3} {'event us':>9} {'split us':>9} {'gap us':>7} {'combine us':>10} " \
           f"{'kernels us':>10} {'ideal us':>9}"
    print(head)
    print("-" * len(head))
    rows = []
    for B in a.B:
        for L in a.L:
            q, k, v, ql, kl = common.decode_inputs(B, L, a.Hq, a.Hk, a.d, "cuda")
            scale = 1.0 / math.sqrt(a.d)
            ideal = 2 * B * L * a.Hk * a.d * 2 / (copy_GBps * 1e9) * 1e6

            def call():
                return torch.ops.gmod.attention(q, k, v, ql, kl, scale)

            for pdl in a.pdl:
                os.environ["GMOD_ATTN_PDL"] = str(pdl)
                event_us = common.measure(call, ctx).ms * 1e3
                call()
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(a.calls):
                        ctx.flush_l2()
                        call()
                    torch.cuda.synchronize()
                calls = split_calls(_kernels(prof))
                r = {"B": B, "L": L, "pdl": pdl, "event_us": event_us, "ideal_us": ideal, "calls": len(calls)}
                for key in ("split", "gap", "combine", "span"):
                    r[f"{key}_us"] = _median([c[key] for c in calls])
                rows.append(r)

                def f(x, w):
                    return f"{x:>{w}.1f}" if isinstance(x, float) else f"{'-':>{w}}"

                print(f"{B:>3} {L:>6} {pdl:>3} {f(event_us, 9)} {f(r['split_us'], 9)} {f(r['gap_us'], 7)} "
                      f"{f(r['combine_us'], 10)} {f(r['span_us'], 10)} {f(ideal, 9)}")
            del q, k, v
    os.environ.pop("GMOD_ATTN_PDL", None)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"copy_GBps": copy_GBps, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
