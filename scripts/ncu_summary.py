#!/usr/bin/env python3
"""Summarise `ncu --csv --page details` output: one line per kernel launch, then stall reasons.

    python scripts/ncu_summary.py ncu.csv

Columns: the kernel (namespaces, `void` and the parameter list dropped; dtype and bool template
arguments shortened, so that the tile plan stays readable: `gmod_attn_fwd_tc_kernel<TcFwdTraits<..>,
bf16,0,0,1>`), duration in us, memory / SM / DRAM throughput in % of peak, the tensor pipe's active
cycles in % (when measured), achieved occupancy in %, registers per thread. Then, for launches with
stall metrics (gpu_check's ncu_attn asks for them), the three largest stall reasons in warps stalled
per issued instruction. Used by scripts/gpu_check.sh (steps ncu, ncu_attn, ncu_nvtx). Input lines
that are not CSV rows (ncu's own log lines) must be filtered out first (grep '^"').
"""
from __future__ import annotations

import csv
import re
import sys

TENSOR = "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
UNIT_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def short_name(name: str, width: int = 64) -> str:
    """`void gmod::attn::k<gmod::attn::T<128, 64>, __nv_bfloat16, false>(gmod::attn::P)` ->
    `k<T<128,64>,bf16,0>`, cut from the left to `width` characters."""
    s = re.sub(r"^void\s+", "", name.strip())
    depth, cut = 0, len(s)  # drop the parameter list: the first '(' outside template brackets
    for i, ch in enumerate(s):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    s = s[:cut]
    for a, b in (("__nv_bfloat16", "bf16"), ("__half", "fp16"), ("c10::BFloat16", "bf16"), ("c10::Half", "fp16")):
        s = s.replace(a, b)
    s = re.sub(r"\b[A-Za-z_]\w*::", "", s)  # namespaces
    s = re.sub(r"\btrue\b", "1", re.sub(r"\bfalse\b", "0", s))
    s = re.sub(r"\(int\)|\(bool\)", "", s).replace(" ", "")
    return s if len(s) <= width else ".." + s[-(width - 2):]


def number(v) -> float | None:
    try:
        return float(str(v).replace(",", ""))
    except (TypeError, ValueError):
        return None


def launches(path: str) -> list[tuple[str, dict]]:
    """[(kernel name, {metric name: (value, unit)})] in launch order."""
    by_id: dict = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = (r.get("ID"), r.get("Kernel Name", "?"))
            by_id.setdefault(key, {})[r.get("Metric Name")] = (r.get("Metric Value"), r.get("Metric Unit"))
    return [(name, m) for (_, name), m in by_id.items()]


def render(rows: list[tuple[str, dict]]) -> str:
    out = [f"{'kernel':<64} {'us':>9} {'mem%':>6} {'SM%':>6} {'DRAM%':>6} {'tensor%':>7} {'occ%':>6} {'regs':>5}"]
    for name, m in rows:
        v, unit = m.get("Duration", (None, ""))
        us = number(v)
        dur = f"{us * UNIT_US.get(unit, 1.0):.1f}" if us is not None else "-"
        g = lambda n: str(m.get(n, ("-",))[0])  # noqa: E731
        out.append(f"{short_name(name):<64} {dur:>9} {g('Memory Throughput'):>6} {g('Compute (SM) Throughput'):>6} "
                   f"{g('DRAM Throughput'):>6} {g(TENSOR):>7} {g('Achieved Occupancy'):>6} "
                   f"{g('Registers Per Thread'):>5}")
    out.append(f"{len(rows)} kernels profiled")
    for name, m in rows:
        st = [(number(v), k[len(STALL_PREFIX):].replace("_per_issue_active.ratio", ""))
              for k, (v, _) in m.items() if k and k.startswith(STALL_PREFIX)]
        st = [(v, n) for v, n in st if v is not None]
        if st:
            top = ", ".join(f"{n} {v:.2f}" for v, n in sorted(st, reverse=True)[:3])
            out.append(f"stalls {short_name(name, 48):<48} {top}")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) == 2 else 2
    print(render(launches(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
