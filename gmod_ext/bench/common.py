"""Shared pieces of the gmod_ext benchmarks: timing, floors, correctness checks, tables, JSON.

Timing (see /work/.library/device/METHOD.md):
  * CUDA: one pair of CUDA events around each call; before each call a 256 MiB buffer is
    written so that no input or output is still in L2 (H100 L2 is 50 MB) and small cases are not
    flattered by the cache; warm-up first (module load, handle creation, autotuning stay out);
    the median of many repeats is reported (and the min / 80th percentile kept in the JSON).
    ``--graph`` captures each timed call in a CUDA graph and times its replays (no launch gaps).
  * CPU: ``time.perf_counter`` around each call, median of the repeats.
A list of callables (one per input set) is timed round-robin, for callers that want to rotate
inputs as well.

Nothing here imports gmod_ext, so this module also loads without the compiled library.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence, Union

import torch

MiB = 1 << 20
GB = 1e9


# ------------------------------------------------------------------------------------ context
@dataclasses.dataclass
class Ctx:
    """What every benchmark needs: device, dtype, sizes mode, timing knobs, and the findings."""

    device: torch.device
    dtype: torch.dtype
    quick: bool
    graph: bool = False
    flush: bool = True
    flush_mode: str = "read"  # how flush_l2 evicts L2: "read" (clean lines) or "write" (the old memset)
    budget_ms: float = 300.0  # time spent on the timed repeats of one measurement
    warmup_ms: float = 25.0
    min_reps: int = 10
    max_reps: int = 200
    seed: int = 0
    experiments: bool = False  # attention: also time the opt-in tile plans (gmod-exp rows)
    profile: bool = False  # model: a kernel-time breakdown of one fwd+bwd per impl (torch.profiler)
    attention: str = "auto"  # layer: GmodConfig.attention of the gmod MoD rows ("auto", "gmod" or "sdpa")
    layers: Optional[int] = None  # model: decoder layers (None: the size's default, "auto" at full size)
    copy_GBps: Optional[float] = None
    mismatches: list = dataclasses.field(default_factory=list)
    errors: list = dataclasses.field(default_factory=list)
    _flush_buf: Optional[torch.Tensor] = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def size_mode(self) -> str:
        """'full' (GPU, default), 'quick' (GPU, --quick) or 'cpu' (tiny, always on CPU)."""
        if not self.cuda:
            return "cpu"
        return "quick" if self.quick else "full"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        """Evict L2 by reading a 256 MiB buffer (5x the H100's L2). A read leaves clean lines, which the
        timed call evicts for free. The old flush *wrote* the buffer (zero_()), which left up to the L2's
        50 MB of dirty lines; their write-back to DRAM then ran inside the timed call and was billed to
        it: +37 % traffic for a 134 MB op, +300 % for the 17 MB decode at B=1 (flush_mode "write" keeps
        that behaviour for comparison)."""
        if self._flush_buf is None:
            self._flush_buf = torch.zeros(64 * MiB, dtype=torch.float32, device=self.device)
        if self.flush_mode == "write":
            self._flush_buf.zero_()
        else:
            self._flush_buf.sum()


def make_ctx(args) -> Ctx:
    device = torch.device(args.device)
    quick = bool(args.quick) or device.type != "cuda"
    if args.dtype:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ctx = Ctx(device=device, dtype=dtype, quick=quick, graph=bool(getattr(args, "graph", False)),
              flush=not getattr(args, "no_flush", False), seed=getattr(args, "seed", 0),
              flush_mode=getattr(args, "flush_mode", None) or "read",
              experiments=bool(getattr(args, "experiments", False)),
              profile=bool(getattr(args, "profile", False)),
              layers=getattr(args, "layers", None), attention=getattr(args, "attention", None) or "auto")
    if device.type == "cuda":
        if quick:
            ctx.budget_ms, ctx.min_reps, ctx.max_reps = 60.0, 5, 100
    else:
        ctx.budget_ms, ctx.warmup_ms, ctx.min_reps, ctx.max_reps = 80.0, 0.0, 5, 15
        # One thread by default on CPU: with several, OpenMP's spinning barriers make every call
        # wait for a thread another process has preempted, and the medians become noise.
        torch.set_num_threads(getattr(args, "threads", None) or 1)
    if getattr(args, "budget_ms", None):
        ctx.budget_ms = float(args.budget_ms)
    return ctx


def dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}.get(
        dt, str(dt).replace("torch.", ""))


def esize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def has_kernel(op: str, ctx: Ctx) -> bool:
    """Whether torch.ops.gmod.<op> has a kernel for the benchmark's device.

    ``GMOD_BENCH_HIDE_OPS=attention,route`` pretends those ops have none (tests the n/a path on CPU).
    """
    key = "CUDA" if ctx.cuda else "CPU"
    if op in {o.strip() for o in os.environ.get("GMOD_BENCH_HIDE_OPS", "").split(",") if o.strip()}:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"gmod::{op}", key))
    except RuntimeError:  # op not even registered (library not loaded / older build)
        return False


def missing(ops: Sequence[str], ctx: Ctx) -> Optional[str]:
    """None if every op has a kernel on the device, else the 'n/a (...)' text for the row."""
    key = "CUDA" if ctx.cuda else "CPU"
    gone = [op for op in ops if not has_kernel(op, ctx)]
    if not gone:
        return None
    return f"n/a (no {key} kernel)" if len(gone) == len(ops) else f"n/a (no {key} kernel: {', '.join(gone)})"


# ------------------------------------------------------------------------------------ timing
@dataclasses.dataclass
class Timing:
    ms: float  # median
    min_ms: float
    p80_ms: float
    reps: int
    mode: str  # "cuda-events", "cuda-graph", "perf_counter"

    def as_json(self) -> dict:
        return {"ms": self.ms, "min_ms": self.min_ms, "p80_ms": self.p80_ms, "reps": self.reps, "mode": self.mode}


def _capture_graph(fn: Callable[[], Any], ctx: Ctx) -> Callable[[], Any]:
    side = torch.cuda.Stream(device=ctx.device)
    side.wait_stream(torch.cuda.current_stream(ctx.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(ctx.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ctx.sync()
    return graph.replay


def _pct(xs: list, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def measure(fn: Union[Callable[[], Any], Sequence[Callable[[], Any]]], ctx: Ctx) -> Timing:
    """Median time of one call of ``fn`` (or of the callables of a list, taken round-robin)."""
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    if ctx.cuda:
        return _measure_cuda(fns, ctx)
    return _measure_cpu(fns, ctx)


def _measure_cpu(fns, ctx: Ctx) -> Timing:
    for f in fns:  # warm-up: one call of each
        f()
    est = float("inf")
    for i in range(2):  # the faster of two calls: one slow call (another process) must not cut the repeats
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        est = min(est, max(time.perf_counter() - t0, 1e-6) * 1e3)
    reps = int(min(ctx.max_reps, max(ctx.min_reps, ctx.budget_ms / est)))
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        fns[i % len(fns)]()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), _pct(times, 0.8), reps, "perf_counter")


def _measure_cuda(fns, ctx: Ctx) -> Timing:
    mode = "cuda-events"
    for f in fns:  # first calls: lazy module load, handle creation, autotuning
        f()
    ctx.sync()
    if ctx.graph:
        try:
            fns = [_capture_graph(f, ctx) for f in fns]
            mode = "cuda-graph"
        except Exception as err:  # noqa: BLE001  (host syncs etc. cannot be captured: time eagerly)
            ctx.sync()
            mode = f"cuda-events (graph capture failed: {type(err).__name__})"
    ev = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
    # estimate one call
    s, e = ev(), ev()
    s.record()
    for i in range(3):
        fns[i % len(fns)]()
    e.record()
    ctx.sync()
    est = max(s.elapsed_time(e) / 3, 1e-3)
    # time-based warm-up
    for i in range(int(min(200, ctx.warmup_ms / est))):
        fns[i % len(fns)]()
    flush_ms = 0.12 if ctx.flush else 0.0  # 256 MiB read (or memset) at ~2.5 TB/s
    reps = int(min(ctx.max_reps, max(ctx.min_reps, ctx.budget_ms / (est + flush_ms))))
    starts = [ev() for _ in range(reps)]
    ends = [ev() for _ in range(reps)]
    for i in range(reps):
        if ctx.flush:
            ctx.flush_l2()
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    ctx.sync()
    times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    return Timing(statistics.median(times), min(times), _pct(times, 0.8), reps, mode)


def copy_bandwidth(ctx: Ctx) -> dict:
    """Device-to-device copy of a large buffer: bytes read + bytes written over the median time."""
    nbytes = {"full": 1024 * MiB, "quick": 256 * MiB, "cpu": 64 * MiB}[ctx.size_mode]
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), ctx)
    ok = bool(torch.equal(dst, src))
    moved = 2 * nbytes
    ctx.copy_GBps = moved / (t.ms * 1e-3) / GB
    del src, dst
    return {"bytes": moved, "GBps": ctx.copy_GBps, "timing": t.as_json(), "check": "ok" if ok else "MISMATCH"}


def decode_inputs(B: int, L: int, Hq: int, Hk: int, d: int, device, dtype=torch.bfloat16) -> tuple:
    """One decode step against full caches: random q [B, 1, Hq, d], k / v [B, L, Hk, d], q_len = 1 and
    k_len = L (int32). Shared by `bench attention`'s decode section and scripts/decode_*.py."""
    q = torch.randn(B, 1, Hq, d, dtype=dtype, device=device)
    k, v = (torch.randn(B, L, Hk, d, dtype=dtype, device=device) for _ in range(2))
    q_len = torch.ones(B, dtype=torch.int32, device=device)
    k_len = torch.full((B,), L, dtype=torch.int32, device=device)
    return q, k, v, q_len, k_len


def gbps(nbytes: float, ms: Optional[float]) -> Optional[float]:
    return None if not ms else nbytes / (ms * 1e-3) / GB


# ------------------------------------------------------------------------------------ checks
# Elementwise tolerance: |a - b| <= atol * max|ref| + rtol * |ref|, and ||a - b|| / ||ref|| <= rel.
_TOL = {
    torch.float64: (1e-9, 1e-9, 1e-10),
    torch.float32: (1e-4, 1e-4, 2e-5),
    torch.bfloat16: (4e-2, 4e-2, 1.6e-2),
    torch.float16: (1e-2, 1e-2, 4e-3),
}


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None, exact: bool = False) -> dict:
    """Compare a gmod result with the baseline's. Returns {'ok', 'rel', 'max_abs', 'what'}."""
    if out.shape != ref.shape:
        return {"ok": False, "rel": None, "max_abs": None, "what": f"shape {tuple(out.shape)} != {tuple(ref.shape)}"}
    if exact:
        eq = bool(torch.equal(out, ref.to(out.device)))
        bad = 0 if eq else int((out != ref.to(out.device)).sum())
        return {"ok": eq, "rel": 0.0 if eq else None, "max_abs": None, "what": "exact" if eq else f"{bad} elements differ"}
    # in float64 on the tensors' own device (large tensors: no trip through host memory)
    a, r = out.detach().double(), ref.detach().to(out.device).double()
    if a.numel() == 0:
        return {"ok": True, "rel": 0.0, "max_abs": 0.0, "what": "empty"}
    atol, rtol, rel_tol = _TOL.get(dtype or out.dtype, _TOL[torch.float32])
    nan_a, nan_r = torch.isnan(a), torch.isnan(r)
    if bool((nan_a != nan_r).any()) or bool(torch.isinf(a).ne(torch.isinf(r)).any()):
        return {"ok": False, "rel": None, "max_abs": None, "what": "NaN/inf pattern differs"}
    fin = torch.isfinite(r)
    a, r = a[fin], r[fin]
    diff = (a - r).abs()
    scale = float(r.abs().max()) if r.numel() else 0.0
    rel = float(diff.norm() / r.norm().clamp_min(1e-300)) if r.numel() else 0.0
    max_abs = float(diff.max()) if r.numel() else 0.0
    elem_ok = bool((diff <= atol * scale + rtol * r.abs()).all())
    ok = elem_ok and rel <= rel_tol
    return {"ok": ok, "rel": rel, "max_abs": max_abs,
            "what": f"rel {rel:.1e}" + ("" if elem_ok else f", max|diff| {max_abs:.2e} (scale {scale:.2e})")}


def check_all(pairs: Sequence[tuple], dtype: Optional[torch.dtype] = None) -> dict:
    """compare() over (name, out, ref[, exact]) tuples; the worst result, named."""
    worst = {"ok": True, "rel": 0.0, "max_abs": 0.0, "what": "ok"}
    rels = []
    for p in pairs:
        name, out, ref = p[0], p[1], p[2]
        exact = len(p) > 3 and p[3]
        c = compare(out, ref, dtype, exact=exact)
        if c["rel"] is not None:
            rels.append(c["rel"])
        if not c["ok"] and worst["ok"]:
            worst = dict(c, what=f"{name}: {c['what']}")
    if worst["ok"]:
        worst["rel"] = max(rels) if rels else 0.0
        worst["what"] = f"ok (rel {worst['rel']:.0e})" if rels and worst["rel"] > 0 else "ok"
    return worst


def record_check(ctx: Ctx, label: str, result: dict) -> str:
    """Remember a failed check; return the text of the row's 'check' column."""
    if result["ok"]:
        if result["what"] in ("exact", "ok") or result["what"].startswith("ok"):
            return result["what"]
        return f"ok (rel {result['rel']:.0e})" if result.get("rel") else "ok"
    ctx.mismatches.append({"bench": label, "detail": result["what"]})
    print(f"\n*** MISMATCH *** {label}: {result['what']}  (gmod result differs from the baseline)\n",
          file=sys.stderr, flush=True)
    return f"MISMATCH {result['what']}"


def record_error(ctx: Ctx, label: str, err: BaseException) -> str:
    msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
    ctx.errors.append({"bench": label, "error": msg})
    print(f"*** ERROR *** {label}: {msg}", file=sys.stderr, flush=True)
    if ctx.cuda:  # a failed kernel must not poison the next measurement's timing
        try:
            ctx.sync()
        except Exception:  # noqa: BLE001
            pass
    return "ERROR " + msg[:60]


# ------------------------------------------------------------------------------------ tables
@dataclasses.dataclass
class Col:
    key: str
    header: str
    fmt: str = ""  # format spec for numbers, e.g. ".3f"; "" = str()
    help: str = ""


@dataclasses.dataclass
class Section:
    name: str
    title: str
    cols: list
    rows: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)

    def add(self, **row) -> dict:
        self.rows.append(row)
        return row

    def as_json(self) -> dict:
        return {"name": self.name, "title": self.title, "columns": [c.key for c in self.cols],
                "headers": {c.key: c.header for c in self.cols}, "rows": [_jsonable(r) for r in self.rows],
                "notes": self.notes}


def _fmt(v: Any, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return str(v)
        if spec == "ms":  # 4 significant digits
            return f"{v:.4g}" if v < 1000 else f"{v:.0f}"
        return format(v, spec) if spec else str(v)
    return str(v)


def _numeric(s: str) -> bool:
    t = s.rstrip("x%").replace(".", "", 1).replace("e-", "").replace("e+", "").lstrip("-")
    return t.isdigit()


def render(section: Section) -> str:
    heads = [c.header for c in section.cols]
    cells = [[_fmt(r.get(c.key), c.fmt) for c in section.cols] for r in section.rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(heads)]
    right = [bool(cells) and all(_numeric(row[i]) or row[i] == "-" for row in cells) for i in range(len(heads))]

    def line(vals):
        # numbers right-aligned (also in columns that mix numbers and 'n/a (...)' texts), text left
        return "  ".join(v.rjust(w) if (r or _numeric(v)) else v.ljust(w)
                         for v, w, r in zip(vals, widths, right)).rstrip()

    out = [f"== {section.title}", line(heads), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    out += [f"   {n}" for n in section.notes]
    return "\n".join(out)


def columns_help(sections: Sequence[tuple]) -> str:
    """Text for --help: for each table, each column's meaning."""
    lines = []
    for title, cols in sections:
        lines.append(f"{title}:")
        for c in cols:
            if c.help:
                lines.append(f"  {c.header:<11} {c.help}")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ JSON
def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    return str(v)


def meta(ctx: Ctx) -> dict:
    info: dict = {
        "device": str(ctx.device),
        "device_name": torch.cuda.get_device_name(ctx.device) if ctx.cuda else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "python": platform.python_version(),
        "dtype": dtype_name(ctx.dtype),
        "size_mode": ctx.size_mode,
        "timing": {
            "method": "cuda events, median" if ctx.cuda else "time.perf_counter, median",
            "l2_flush_256MiB": bool(ctx.cuda and ctx.flush),
            "l2_flush_mode": ctx.flush_mode if ctx.cuda and ctx.flush else None,
            "cuda_graph": bool(ctx.graph),
            # GMOD_TRUST_INDICES=1: the CUDA ops skip their index validation and its host sync
            "index_validation": os.environ.get("GMOD_TRUST_INDICES") != "1",
            "budget_ms": ctx.budget_ms,
            "min_reps": ctx.min_reps,
            "max_reps": ctx.max_reps,
        },
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import gmod_ext  # noqa: PLC0415

        info["gmod_build"] = gmod_ext.BUILD_INFO
    except Exception as err:  # noqa: BLE001
        info["gmod_build"] = f"not loaded: {err}"
    return info


def write_json(path: str, benchmark: str, ctx: Ctx, sections: Sequence[Section], extra: Optional[dict] = None) -> None:
    status = "mismatch" if ctx.mismatches else ("error" if ctx.errors else "ok")
    doc = {
        "benchmark": benchmark,
        "status": status,
        "meta": meta(ctx),
        "copy_GBps": ctx.copy_GBps,
        "sections": {s.name: s.as_json() for s in sections},
        "mismatches": ctx.mismatches,
        "errors": ctx.errors,
    }
    if extra:
        doc.update(_jsonable(extra))
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(doc), f, indent=1)
