#!/usr/bin/env python3
"""Static instruction counts of the gmod_ kernels' main loops, from their SASS (no GPU needed).

For every kernel in a CUDA object file or shared library, finds its main loop (the largest loop, by
instruction count, that issues tensor-core MMAs, or the largest loop when none does) and prints how many
instructions one trip through it issues per warp, split into the ones that matter for a FlashAttention-
style kernel: HMMA (tensor-core math; HGMMA, the sm_90a warpgroup MMA, counts here too), LDSM (ldmatrix), LDGSTS (cp.async), MUFU (exp2), local-memory
spill traffic (LDL / STL) and everything else. Instructions per HMMA is the number to drive down when a
kernel is issue-bound: with two warps per scheduler, each instruction that is not an HMMA takes an issue
slot from the tensor pipe.

Counts are static: a loop's branches (e.g. the causal mask, taken only on diagonal tiles) are counted
once whether or not they run, and nested loops are counted once, not per trip. Compare builds of the
same kernel (--compare), not different kernels; kernels are matched by their exact (mangled) name, so a
changed template signature shows as "-" in the old column.

Examples:
  # after scripts/dev_build.sh with a CUDA torch (see README, "Development"):
  python scripts/sass_loop_stats.py /tmp/build/CMakeFiles/gmod_ext.dir/csrc/cuda/attention_fwd.cu.o
  python scripts/sass_loop_stats.py new.o --compare old.o --kernel 'fwd_tc.*128'
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys

_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"0x([0-9a-f]+)")


def find_cuobjdump() -> str:
    """cuobjdump from CUDA_HOME, PATH, or the copy that ships inside the triton wheel."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(found)
    try:
        import triton  # noqa: F401  (only to locate its bundled binaries)

        base = os.path.dirname(triton.__file__)
        candidates += glob.glob(os.path.join(base, "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    sys.exit("sass_loop_stats: no cuobjdump found (set CUDA_HOME, put it on PATH, or install triton)")


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)  # predicate guard
    return text.split()[0].split(".")[0]


def parse(path: str, cuobjdump: str) -> dict[str, list[tuple[int, str]]]:
    """Kernel name -> [(address, instruction text)]."""
    out = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"sass_loop_stats: cuobjdump failed on {path}: {out.stderr.strip()}")
    kernels: dict[str, list[tuple[int, str]]] = {}
    for chunk in re.split(r"\n\s+Function : ", out.stdout)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        kernels[name] = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, chunk.split("\n")) if m]
    return kernels


_MMA_OPS = ("HMMA", "HGMMA")  # mma.sync, wgmma


def main_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """Body of the largest backward-branch loop that contains an HMMA (else the largest loop)."""
    best, best_mma = [], []
    for addr, text in instrs:
        if "BRA" not in text:
            continue
        m = _TARGET.search(text)
        if not m or int(m.group(1), 16) >= addr:
            continue
        lo = int(m.group(1), 16)
        body = [t for a, t in instrs if lo <= a <= addr]
        if len(body) > len(best):
            best = body
        if any(opcode(t) in _MMA_OPS for t in body) and len(body) > len(best_mma):
            best_mma = body
    return best_mma or best


def stats(body: list[str]) -> dict[str, int]:
    c = collections.Counter(opcode(t) for t in body)
    s = {k: c.get(k, 0) for k in ("HMMA", "LDSM", "LDGSTS", "MUFU")}
    s["HMMA"] += c.get("HGMMA", 0)  # Hopper warpgroup MMAs (one HGMMA does the work of 32-64 HMMAs)
    s["spill"] = c.get("LDL", 0) + c.get("STL", 0)
    s["total"] = len(body)
    s["other"] = s["total"] - sum(s[k] for k in ("HMMA", "LDSM", "LDGSTS", "MUFU", "spill"))
    return s


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return [re.sub(r"\(.*\)$", "", d) for d in out[: len(names)]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary", help="CUDA object file (.cu.o) or shared library with sm_80/sm_90 SASS")
    ap.add_argument("--compare", metavar="OLD", help="a second build of the same sources: print old -> new")
    ap.add_argument("--kernel", default="gmod_", help="regex on the demangled kernel name (default: gmod_)")
    args = ap.parse_args()
    tool = find_cuobjdump()
    new = parse(args.binary, tool)
    old = parse(args.compare, tool) if args.compare else {}
    names = sorted(new)
    pretty = dict(zip(names, demangle(names)))
    rows = [n for n in names if re.search(args.kernel, pretty[n])]
    if not rows:
        sys.exit(f"sass_loop_stats: no kernel matches {args.kernel!r} in {args.binary}")
    print(f"{'total':>6} {'HMMA':>5} {'LDSM':>5} {'LDGSTS':>6} {'MUFU':>5} {'spill':>5} {'other':>6} {'/HMMA':>6}  "
          + ("old total  change  " if old else "") + "kernel (main loop, instructions per warp per trip)")
    for n in rows:
        s = stats(main_loop(new[n]))
        per = f"{s['total'] / s['HMMA']:.2f}" if s["HMMA"] else "-"
        line = (f"{s['total']:6d} {s['HMMA']:5d} {s['LDSM']:5d} {s['LDGSTS']:6d} {s['MUFU']:5d} {s['spill']:5d} "
                f"{s['other']:6d} {per:>6}  ")
        if old:
            if n in old:
                o = stats(main_loop(old[n]))["total"]
                line += f"{o:9d} {100.0 * (s['total'] - o) / max(o, 1):+6.1f}%  "
            else:
                line += f"{'-':>9} {'':>7}  "
        print(line + pretty[n][-120:])


if __name__ == "__main__":
    main()
