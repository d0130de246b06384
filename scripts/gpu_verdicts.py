"""The decisions a GPU check's numbers settle, one line each (read from its JSON files).

    python scripts/gpu_verdicts.py out/gpu_check

gpu_check.sh appends this to its summary. Each line states the rule it applies, so that the next
step (flip a default, revert one, or keep looking) follows from the line alone:

  attention fwd / bwd   issue 4's targets (gmod >= 1.0x SDPA flash forward, >= 0.8x backward, at every
                        benchmark shape), and whether the other kernel (the gmod-exp rows: the mma.sync
                        kernels, the default before the sm_90a wgmma ones) should become the default
                        again: every check ok and faster than the default at every shape.
  decode                the shapes under issue 4's 70 % of copy bandwidth, and whether the key-split
                        decode with three K / V buffers (gmod-exp, GMOD_ATTN_DECODE_STAGES=3) should
                        become the default: no shape slower than 0.99x and one at least 1.02x faster.
  model                 issue 7's targets (prefill >= 1.7x dense, train step >= 1.5x) and whether
                        attention="auto" should keep SDPA for the MoD layers: its train step no slower
                        than the same model on gmod.attention.
  decode_timeline       per shape: the call's event time, the kernels' span, the time outside them, and
                        how much of the call rotating caches (no L2 flush) take away, against a copy's.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional


def _load(out: str, name: str) -> Optional[dict]:
    try:
        with open(os.path.join(out, name)) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _ok(r: dict) -> bool:
    return str(r.get("check", "")).startswith("ok")


def _span(xs: list) -> str:
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "-"


def _yes(b: bool) -> str:
    return "YES" if b else "NO"


# the gmod-exp rows' flags (gmod_ext/bench/attention.py EXPERIMENTS / DECODE_EXPERIMENT)
PREFILL_TARGETS = {"fwd": (1.0, "GMOD_ATTN_FWD_IMPL=mma"), "bwd": (0.8, "GMOD_ATTN_BWD_IMPL=mma")}
DECODE_FLAG = "GMOD_ATTN_DECODE_STAGES=3"


def attention_lines(att: dict) -> list:
    lines = []
    rows = att.get("sections", {}).get("prefill", {}).get("rows", [])
    for p, (target, flag) in PREFILL_TARGETS.items():
        key = lambda r: (r["shape"], r["d"])  # noqa: E731
        gmod = {key(r): r for r in rows if r.get("pass") == p and r.get("impl") == "gmod"}
        exp = {key(r): r for r in rows if r.get("pass") == p and r.get("impl") == "gmod-exp"}
        if not gmod:
            continue
        vf = {k: _num(r.get("vs_flash")) for k, r in gmod.items()}
        short = [f"{k[0]} d{k[1]} {v:.2f}" for k, v in vf.items() if v is not None and v < target]
        measured = [v for v in vf.values() if v is not None]
        lines.append(f"attention {p}: gmod vs SDPA flash {_span(measured)} (target >= {target}: "
                     + (f"not met at {len(short)}/{len(gmod)}: {', '.join(short)})" if short or len(measured) < len(gmod)
                        else f"met at {len(gmod)}/{len(gmod)})"))
        if not exp:
            continue
        vd = {k: _num(r.get("vs_default")) for k, r in exp.items()}
        ok = all(_ok(r) for r in exp.values()) and len(exp) == len(gmod)
        faster = [k for k, v in vd.items() if v is not None and v > 1.0]
        flip = ok and len(faster) == len(gmod)
        ev = [v for v in vd.values() if v is not None]
        best = []  # per shape, the faster of the default and the experiment, vs flash
        for k in gmod:
            both = [v for v in (vf.get(k), _num(exp.get(k, {}).get("vs_flash"))) if v is not None]
            if both:
                best.append(max(both))
        lines.append(f"  {flag}: checks {'ok' if ok else 'NOT all ok: ' + ', '.join(str(r.get('check') or r.get('ms'))[:40] for r in exp.values() if not _ok(r))}"
                     f"; vs the default {_span(ev)}, faster at {len(faster)}/{len(gmod)} -> make it the default: "
                     f"{_yes(flip)} (rule: every check ok and faster at every shape)")
        if best:
            lines.append(f"  best of the two vs flash {_span(best)}: target "
                         f"{'met' if min(best) >= target and len(best) == len(gmod) else 'not met'}")
    return lines


def decode_lines(att: dict) -> list:
    lines = []
    rows = att.get("sections", {}).get("decode", {}).get("rows", [])
    gmod = [r for r in rows if r.get("impl") == "gmod"]
    if gmod:
        pc = [(r, _num(r.get("pct_copy"))) for r in gmod]
        low = [f"B{r['B']} L{r['L']} {v:.0f}%" for r, v in pc if v is None or v < 70]
        vals = [v for _, v in pc if v is not None]
        lines.append(f"decode: gmod {min(vals):.0f}-{max(vals):.0f}% of copy bandwidth (target >= 70 at every shape: "
                     + (f"not met at {len(low)}/{len(gmod)}: {', '.join(low)})" if low else f"met at {len(gmod)}/{len(gmod)})")
                     if vals else "decode: no gmod timing")
    exp = [r for r in rows if r.get("impl") == "gmod-exp"]
    if exp:
        vd = [_num(r.get("vs_default")) for r in exp]
        ok = all(_ok(r) for r in exp) and all(v is not None for v in vd)
        flip = ok and min(vd) >= 0.99 and max(vd) >= 1.02
        lines.append(f"  {DECODE_FLAG}: checks {'ok' if all(_ok(r) for r in exp) else 'NOT all ok'}; vs the default "
                     f"{_span([v for v in vd if v is not None])} -> make it the default: {_yes(flip)} "
                     f"(rule: none below 0.99x, one at 1.02x or more)")
        # which shapes gain and which lose: a policy by batch / cache length, if the flag does not win everywhere
        lines.append("  per shape (B, cache: x the default): " + ", ".join(
            f"B{r['B']} L{r['L']} {v:.2f}" if v is not None else f"B{r['B']} L{r['L']} -" for r, v in zip(exp, vd)))
        best = [max(_num(g.get("pct_copy")) or 0.0, _num(e.get("pct_copy")) or 0.0)
                for g in gmod for e in exp if (g["B"], g["L"]) == (e["B"], e["L"])]
        if best:
            lines.append(f"  best of the two: {min(best):.0f}-{max(best):.0f}% of copy "
                         f"({'met' if min(best) >= 70 else 'not met'} at the 70 % target)")
    return lines


def model_lines(mod: dict) -> list:
    rows = mod.get("sections", {}).get("model", {}).get("rows", [])
    by = {(r.get("impl"), r.get("pass")): r for r in rows}
    lines = []

    def speedup(impl, p):
        x = _num(by.get((impl, p), {}).get("x_dense"))
        return 1.0 / x if x else None

    parts = []
    for p, target in (("prefill", 1.7), ("train step", 1.5)):
        s = speedup("gamma-MoD", p)
        parts.append(f"{p} {s:.2f}x (target {target}: {'met' if s >= target else 'NOT met'})" if s else f"{p} -")
    lines.append("model: gamma-MoD vs dense: " + "; ".join(parts))
    for other in ("gamma-MoD gmod", "gamma-MoD sdpa"):
        s_def, s_other = speedup("gamma-MoD", "train step"), speedup(other, "train step")
        if s_def and s_other:
            keep = s_def >= s_other
            lines.append(f"  train step: gamma-MoD (attention auto) {s_def:.2f}x, {other} {s_other:.2f}x -> keep the "
                         f"default: {_yes(keep)}" + ("" if keep else f" (switch auto to {other.split()[-1]})"))
    return lines


def timeline_lines(tl: dict) -> list:
    lines = []
    rows = tl.get("rows", [])
    for r in rows:
        ev, span, ideal = _num(r.get("event_us")), _num(r.get("span_us")), _num(r.get("ideal_us"))
        if ev is None:
            continue
        head = (f"decode_timeline B{r['B']} L{r['L']} {r.get('mode', 'flush')} PDL {r.get('pdl')} stages "
                f"{r.get('stages', 2)}: event {ev:.1f} us")
        if span is None:
            lines.append(head + " (no kernel times)")
            continue
        lines.append(f"{head}, kernels {span:.1f} (split {_num(r.get('split_us')) or 0.0:.1f}, combine "
                     f"{_num(r.get('combine_us')) or 0.0:.1f}), outside them {ev - span:.1f}, ideal {ideal or 0.0:.1f}")
    # flush vs rotate: how much of the call the flush's after-effects are, against a copy's
    key = {(r["B"], r["L"], r.get("mode"), r.get("pdl"), r.get("stages", 2)): r for r in rows}
    for (B, L, mode, pdl, stages), r in key.items():
        rot = key.get((B, L, "rotate", pdl, stages))
        if mode != "flush" or rot is None:
            continue
        d_call = (_num(r.get("event_us")) or 0.0) - (_num(rot.get("event_us")) or 0.0)
        d_copy = (_num(r.get("copy_us")) or 0.0) - (_num(rot.get("copy_us")) or 0.0)
        lines.append(f"  B{B} L{L} PDL {pdl} stages {stages}: rotating caches take {d_call:.1f} us off the call, {d_copy:.1f} us off "
                     f"a same-size copy -> the benchmark's flush bills the kernels "
                     f"{'much more than a copy (look at the SM set-up after the flush)' if d_call > d_copy + 3.0 else 'about what it bills a copy'}")
    return lines


def verdicts(out: str) -> list:
    lines = []
    att = _load(out, "bench_attention.json")
    if att:
        lines += attention_lines(att) + decode_lines(att)
    mod = _load(out, "bench_model.json")
    if mod:
        lines += model_lines(mod)
    tl = _load(out, "decode_timeline.json")
    if tl:
        lines += timeline_lines(tl)
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    lines = verdicts(argv[0])
    print("-- verdicts (scripts/gpu_verdicts.py)")
    for line in lines or ["no benchmark JSON found"]:
        print(f"   {line}"[:220])
    return 0


if __name__ == "__main__":
    sys.exit(main())
