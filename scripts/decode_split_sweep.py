"""Sweep the decode's key-split count and compare the wave model's choice with the fastest forced one.

    python scripts/decode_split_sweep.py                 # the decode shapes of `gmod_ext.bench attention`
    python scripts/decode_split_sweep.py --B 1 8 --L 4096 --splits 8 16 32 47 64 --stages 3

gmod.attention picks the number of key splits of a q_len <= 16 call with a wave model
(decode_num_splits in csrc/include/gmod/attention_params.h). GMOD_ATTN_DECODE_SPLITS=N, read at every
call, forces N instead; this script times each N (CUDA events, L2 flushed before each call, median,
as the benchmarks do) and prints, per shape, the model's time, the best forced count and the ratio
model / best (1.00: the model picked as well as the sweep). Each shape is swept once per K / V buffer
count of the key-split decode (--stages, GMOD_ATTN_DECODE_STAGES: 2, the default, and 3, two key tiles in
flight per CTA; the wave model sees each one's occupancy). Writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

import gmod_ext  # noqa: F401  (loads torch.ops.gmod)
from gmod_ext.bench import common

DEFAULT_SPLITS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 47, 64, 96, 128]


def _time(fn, ctx) -> float:
    return common.measure(fn, ctx).ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, nargs="+", default=[1, 8, 32], help="batch sizes (default 1 8 32)")
    ap.add_argument("--L", type=int, nargs="+", default=[4096, 16384, 32768], help="cache lengths")
    ap.add_argument("--Hq", type=int, default=32)
    ap.add_argument("--Hk", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--splits", type=int, nargs="+", default=DEFAULT_SPLITS, help="forced counts to time")
    ap.add_argument("--stages", type=int, nargs="+", choices=(2, 3), default=[2, 3],
                    help="GMOD_ATTN_DECODE_STAGES values to sweep under (default 2 3)")
    ap.add_argument("--budget-ms", type=float, default=40.0, help="repeats of one measurement (default 40 ms)")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_split_sweep.py needs a CUDA device", file=sys.stderr)
        return 3
    os.environ["GMOD_TRUST_INDICES"] = "1"  # read once by the extension: before the first call
    ctx = common.make_ctx(argparse.Namespace(device="cuda", quick=False, dtype="bf16", graph=False, no_flush=False,
                                             seed=0, budget_ms=a.budget_ms))
    copy = common.copy_bandwidth(ctx)["GBps"]
    scale = 1.0 / math.sqrt(a.d)
    rows = []
    print(f"{'B':>3} {'cache':>6} {'stages':>6} {'MB':>7} {'model ms':>9} {'%copy':>6} {'best N':>6} {'best ms':>8} "
          f"{'%copy':>6} {'model/best':>10}")
    for B in a.B:
        for L in a.L:
            q, k, v, q_len, k_len = common.decode_inputs(B, L, a.Hq, a.Hk, a.d, "cuda")
            nbytes = 2 * B * L * a.Hk * a.d * 2 + 2 * B * a.Hq * a.d * 2
            fn = lambda: torch.ops.gmod.attention(q, k, v, q_len, k_len, scale)  # noqa: E731
            os.environ.pop("GMOD_ATTN_DECODE_SPLITS", None)
            os.environ.pop("GMOD_ATTN_DECODE_STAGES", None)
            ref, _ = fn()  # the default plan's output: every other plan must agree with it
            for stages in a.stages:
                os.environ["GMOD_ATTN_DECODE_STAGES"] = str(stages)
                os.environ.pop("GMOD_ATTN_DECODE_SPLITS", None)
                t_model = _time(fn, ctx)
                forced = {}
                for n in [None] + a.splits:  # None: the model's split, checked like the forced ones
                    if n is not None:
                        os.environ["GMOD_ATTN_DECODE_SPLITS"] = str(n)
                    o, _ = fn()
                    err = (o.float() - ref.float()).abs().max().item()
                    if not err < 2e-2:
                        print(f"B={B} L={L} stages={stages} N={n or 'model'}: output differs from the default "
                              f"plan's by {err}", file=sys.stderr)
                        return 2
                    if n is not None:
                        forced[n] = _time(fn, ctx)
                os.environ.pop("GMOD_ATTN_DECODE_SPLITS", None)
                best = min(forced, key=forced.get)
                pct = lambda ms: 100.0 * common.gbps(nbytes, ms) / copy  # noqa: E731
                print(f"{B:>3} {L:>6} {stages:>6} {nbytes / 1e6:>7.1f} {t_model:>9.4f} {pct(t_model):>6.1f} {best:>6} "
                      f"{forced[best]:>8.4f} {pct(forced[best]):>6.1f} {t_model / forced[best]:>10.2f}", flush=True)
                rows.append(dict(B=B, L=L, stages=stages, bytes=nbytes, model_ms=t_model, forced_ms=forced, best=best,
                                 model_over_best=t_model / forced[best]))
            os.environ.pop("GMOD_ATTN_DECODE_STAGES", None)
            del q, k, v, ref
            torch.cuda.empty_cache()
    print(f"copy bandwidth {copy:.0f} GB/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(copy_GBps=copy, Hq=a.Hq, Hk=a.Hk, d=a.d, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
