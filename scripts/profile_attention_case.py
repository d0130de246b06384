"""One attention problem, run a few times, for Nsight Compute (ncu) to profile.

    ncu --clock-control none --kernel-name regex:gmod_attn --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy python scripts/profile_attention_case.py --B 4 --C 2048

Every row of the batch is full (q_len = k_len = C), causal, so the kernels see the shape that
`python -m gmod_ext.bench attention` times. --decode profiles q_len = 1 against a cache of C keys.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

import gmod_ext  # noqa: F401
from gmod_ext import ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--B", type=int, default=4, help="batch rows (default 4)")
    ap.add_argument("--C", type=int, default=2048, help="tokens per row, or cache length with --decode (default 2048)")
    ap.add_argument("--H", type=int, default=32, help="query heads (default 32)")
    ap.add_argument("--Hk", type=int, default=None, help="kv heads (default: H)")
    ap.add_argument("--d", type=int, default=128, help="head dim (default 128)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--bwd", action="store_true", help="also run the backward")
    ap.add_argument("--decode", action="store_true", help="one query per row against C cached keys")
    ap.add_argument("--iters", type=int, default=4, help="calls of each op (default 4)")
    ap.add_argument("--fwd-impl", choices=["mma", "wgmma"], default="mma",
                    help="prefill forward kernel: mma (mma.sync, this script's default) or wgmma (sm_90a, the library's "
                         "default on an H100); sets GMOD_ATTN_FWD_IMPL")
    ap.add_argument("--bwd-impl", choices=["mma", "wgmma"], default="mma",
                    help="backward dk/dv kernel: mma (mma.sync, this script's default) or wgmma (sm_90a, the library's "
                         "default on an H100); sets GMOD_ATTN_BWD_IMPL")
    ap.add_argument("--decode-stages", choices=["2", "3"], default="2",
                    help="K / V buffers of the key-split decode: 2 (the default) or 3 (two key tiles in flight); "
                         "sets GMOD_ATTN_DECODE_STAGES")
    a = ap.parse_args()
    os.environ["GMOD_ATTN_FWD_IMPL"] = a.fwd_impl
    os.environ["GMOD_ATTN_BWD_IMPL"] = a.bwd_impl
    os.environ["GMOD_ATTN_DECODE_STAGES"] = a.decode_stages
    if not torch.cuda.is_available():
        raise SystemExit("profile_attention_case.py needs a CUDA device")
    dt = getattr(torch, a.dtype)
    hk = a.Hk or a.H
    cq = 1 if a.decode else a.C
    q = torch.randn(a.B, cq, a.H, a.d, device="cuda", dtype=dt)
    k = torch.randn(a.B, a.C, hk, a.d, device="cuda", dtype=dt)
    v = torch.randn_like(k)
    q_len = torch.full((a.B,), cq, dtype=torch.int32, device="cuda")
    k_len = torch.full((a.B,), a.C, dtype=torch.int32, device="cuda")
    scale = 1.0 / math.sqrt(a.d)
    for _ in range(a.iters):
        o, lse = ops.attention(q, k, v, q_len, k_len, scale)
        if a.bwd:
            torch.ops.gmod.attention_backward(torch.randn_like(o), q, k, v, o, lse, q_len, k_len, scale)
    torch.cuda.synchronize()
    print(f"ran {a.iters} x attention{' + backward' if a.bwd else ''}: B={a.B} Cq={cq} Ck={a.C} H={a.H} Hk={hk} "
          f"d={a.d} {a.dtype} fwd={a.fwd_impl} bwd={a.bwd_impl} decode stages={a.decode_stages}")


if __name__ == "__main__":
    main()
