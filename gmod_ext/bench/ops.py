"""`python -m gmod_ext.bench ops`: the memory-bound MoD ops against the copy bandwidth and torch.

Sections:
  copy      device-to-device copy of a large buffer: the bandwidth floor (bytes read + written).
  ops       router_logits / gather_rows / scatter_merge / rope, forward and backward: effective bandwidth
            (bytes that must move over the median time), % of the copy bandwidth, and the torch
            ops a user would write instead.
  route     gmod.route against topk + sort + mask handling as public MoD code writes it.
  overhead  the whole MoD overhead of one layer (router_logits + route + gather_rows + scatter_merge)
            against its bandwidth floor and against the public-code torch version.

Byte counts are the fewest bytes each op must move: every input it needs read once, every
output written once. Symbols: B batch, S sequence, D hidden, C capacity, K = sum(count) kept rows
(= B*C here), e = bytes per activation element; scores, gates and indices are 4 bytes.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import (
    Col, Ctx, Section, check_all, compare, copy_bandwidth, esize, gbps, measure, missing, record_check,
    record_error,
)

_ops = torch.ops.gmod
EPS = 1e-6

SIZES = {
    # B, S, D for the op table and the overhead; (B, S) pairs for route
    "full": dict(B=8, S=2048, D=4096, route=[(8, 4096), (1, 32768)]),
    "quick": dict(B=4, S=1024, D=2048, route=[(4, 2048), (1, 8192)]),
    "cpu": dict(B=2, S=256, D=512, route=[(2, 512), (1, 2048)]),
}

COPY_COLS = [
    Col("what", "what", help="the baseline: a device-to-device copy (dst.copy_(src)) of one large buffer"),
    Col("MB", "MB moved", ".0f", "bytes read + bytes written, in 10^6 bytes"),
    Col("ms", "ms", "ms", "median time of one copy (milliseconds)"),
    Col("GBps", "GB/s", ".0f", "MB moved / ms: the bandwidth floor every other row is compared with"),
    Col("check", "check", help="dst == src after the copy"),
]
OP_COLS = [
    Col("op", "op", help="the gmod op"),
    Col("pass", "pass", help="fwd = the op, bwd = its registered backward op called directly"),
    Col("formula", "bytes that must move", help="inputs read once -> outputs written once; BSDe = B*S*D*e "
        "bytes, BC4 = B*C*4 bytes (B batch, S seq, D hidden, C capacity, K kept rows = B*C, e bytes per "
        "activation element; w fp32, nw activation dtype)"),
    Col("MB", "MB", ".1f", "that formula evaluated, 10^6 bytes"),
    Col("gmod_ms", "gmod ms", "ms", "median time of the gmod op; 'n/a (no CUDA kernel)' if it has none"),
    Col("GBps", "GB/s", ".0f", "MB / gmod ms: effective bandwidth"),
    Col("pct_copy", "% copy", ".0f", "GB/s over the measured copy bandwidth, in % (100 = at the floor)"),
    Col("torch_ms", "torch ms", "ms", "median time of the same result from plain torch ops (eager)"),
    Col("speedup", "vs torch", ".2f", "torch ms / gmod ms (> 1: gmod is faster)"),
    Col("check", "check", help="gmod result vs the torch result, once before timing; MISMATCH = wrong"),
]
ROUTE_COLS = [
    Col("shape", "B x S", help="scores [B, S] fp32; mask: 1/32 of tokens forced, some rows padded"),
    Col("C", "C", help="capacity = most tokens kept in a row (forced + half of the routable)"),
    Col("gmod_ms", "gmod ms", "ms", "median time of gmod.route"),
    Col("torch_ms", "torch ms", "ms", "public-code way: mask scores (forced +1 as gamma-MoD, padding -inf), "
        "topk, sort indices, counts from the mask"),
    Col("speedup", "speedup", ".2f", "torch ms / gmod ms"),
    Col("check", "check", help="idx and count identical to the torch result"),
]
MOD_COLS = [
    Col("impl", "impl", help="gmod: router_logits + route + gather_rows (+ gate) + scatter_merge; "
        "torch: the public-code version (RMSNorm, Linear(D,2) router, softmax, topk, sort, gather, scatter)"),
    Col("ms", "ms", "ms", "median time of the whole MoD overhead of one layer (the layer's own work excluded)"),
    Col("floor_ms", "floor ms", "ms", "bytes that must move (see the note under the table) / copy bandwidth"),
    Col("x_floor", "x floor", ".2f", "ms / floor ms (1.0 = as fast as the memory allows)"),
    Col("speedup", "vs torch", ".2f", "torch ms / this row's ms"),
    Col("check", "check", help="gmod logits, selection and merged output vs torch ops on the same inputs"),
]
TABLES = [("copy", COPY_COLS), ("ops", OP_COLS), ("route", ROUTE_COLS), ("overhead", MOD_COLS)]


# ------------------------------------------------------------------------------ helpers
def _pick_idx(B: int, S: int, C: int, dev, gen) -> torch.Tensor:
    """C distinct ascending positions per row, int32."""
    r = torch.rand(B, S, generator=gen, device="cpu")
    return r.argsort(dim=1)[:, :C].sort(dim=1).values.to(torch.int32).to(dev)


def _pair(ctx: Ctx, label: str, gmod_ops, gmod_fn: Callable, torch_fn: Callable, check: Callable) -> dict:
    """Check gmod against torch once, then time both. Returns timings / check / n-a / error texts."""
    res: dict = {}
    ref = None
    try:
        ref = torch_fn()
        res["torch"] = measure(torch_fn, ctx)
    except Exception as err:  # noqa: BLE001
        res["torch_err"] = record_error(ctx, label + " [torch]", err)
    na = missing(gmod_ops, ctx)
    if na:
        res["na"] = na
        return res
    try:
        out = gmod_fn()
        ctx.sync()
        res["check"] = record_check(ctx, label, check(out, ref)) if ref is not None else "unchecked"
        del out
        res["gmod"] = measure(gmod_fn, ctx)
    except Exception as err:  # noqa: BLE001
        res["gmod_err"] = record_error(ctx, label, err)
    return res


def _fill(row: dict, res: dict, ctx: Ctx, nbytes: Optional[float] = None) -> dict:
    g, t = res.get("gmod"), res.get("torch")
    row["gmod_ms"] = g.ms if g else res.get("na") or res.get("gmod_err")
    row["torch_ms"] = t.ms if t else res.get("torch_err")
    row["check"] = res.get("check")
    if g and nbytes is not None:
        row["GBps"] = gbps(nbytes, g.ms)
        row["pct_copy"] = 100.0 * row["GBps"] / ctx.copy_GBps if ctx.copy_GBps else None
    if g and t:
        row["speedup"] = t.ms / g.ms
    row["timing"] = {k: v.as_json() for k, v in (("gmod", g), ("torch", t)) if v}
    return row


# ------------------------------------------------------------------------------ (1) copy
def bench_copy(ctx: Ctx) -> Section:
    sec = Section("copy", "copy bandwidth (the floor)", COPY_COLS)
    c = copy_bandwidth(ctx)
    sec.add(what=f"{str(ctx.device)} copy_ of {c['bytes'] // 2 >> 20} MiB", MB=c["bytes"] / 1e6, ms=c["timing"]["ms"],
            GBps=c["GBps"], check=c["check"], bytes=c["bytes"], timing=c["timing"])
    if c["check"] != "ok":
        ctx.mismatches.append({"bench": "copy", "detail": "dst != src"})
    return sec


# ------------------------------------------------------------------------------ (2) ops
def bench_ops(ctx: Ctx) -> Section:
    z = SIZES[ctx.size_mode]
    B, S, D = z["B"], z["S"], z["D"]
    C = S // 2
    dev, dt, e = ctx.device, ctx.dtype, esize(ctx.dtype)
    gen = torch.Generator().manual_seed(ctx.seed)
    sec = Section("ops", f"ops: effective bandwidth, B={B} S={S} D={D} C={C} {str(dt)[6:]}", OP_COLS)
    sec.notes.append("bwd rows time the registered backward op alone; torch bwd = autograd.grad of its forward graph")

    x = torch.randn(B, S, D, dtype=dt, device=dev)
    w = (torch.randn(D, device=dev) / math.sqrt(D)).float()
    nw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)  # the layer's input_layernorm weight
    idx = _pick_idx(B, S, C, dev, gen)
    count = torch.full((B,), C, dtype=torch.int32, device=dev)
    idx_exp = idx.long().unsqueeze(-1).expand(B, C, D)
    K = B * C
    ew, enw = w.element_size(), nw.element_size()

    # -- router_logits fwd
    def torch_router(xx, ww, nn):
        return F.rms_norm(xx.float(), (D,), nn.float(), EPS) @ ww

    nbytes = B * S * D * e + D * (ew + enw) + B * S * 4
    res = _pair(ctx, "router_logits fwd", ["router_logits"], lambda: _ops.router_logits(x, w, nw, EPS),
                lambda: torch_router(x, w, nw), lambda o, r: compare(o, r, torch.float32))
    _fill(sec.add(op="router_logits", **{"pass": "fwd"}, formula="x BSDe + w,nw D(4+e) -> BS4",
                  MB=nbytes / 1e6, bytes=nbytes), res, ctx, nbytes)

    # -- router_logits bwd
    g = torch.randn(B, S, device=dev)
    xr, wr, nr = (t.detach().clone().requires_grad_() for t in (x, w, nw))
    out_r = torch_router(xr, wr, nr)
    nbytes = B * S * 4 + B * S * D * e + D * (ew + enw) + B * S * D * e + D * (ew + enw)
    res = _pair(
        ctx, "router_logits bwd", ["router_logits_backward"],
        lambda: _ops.router_logits_backward(g, x, w, nw, EPS),
        lambda: torch.autograd.grad(out_r, (xr, wr, nr), g, retain_graph=True),
        lambda o, r: check_all([("dx", o[0], r[0]), ("dw", o[1], r[1]), ("dnorm", o[2], r[2])], dt))
    _fill(sec.add(op="router_logits", **{"pass": "bwd"},
                  formula="grad BS4 + x BSDe + D(4+e) -> dx BSDe + D(4+e)",
                  MB=nbytes / 1e6, bytes=nbytes), res, ctx, nbytes)
    del xr, wr, nr, out_r

    # -- gather_rows fwd / bwd
    nbytes = K * D * e + B * C * 4 + B * 4 + B * C * D * e
    res = _pair(ctx, "gather_rows fwd", ["gather_rows"], lambda: _ops.gather_rows(x, idx, count),
                lambda: torch.gather(x, 1, idx_exp), lambda o, r: compare(o, r, exact=True))
    _fill(sec.add(op="gather_rows", **{"pass": "fwd"}, formula="kept rows KDe + idx BC4 -> BCDe",
                  MB=nbytes / 1e6, bytes=nbytes), res, ctx, nbytes)

    gc = torch.randn(B, C, D, dtype=dt, device=dev)
    nbytes = B * C * D * e + B * C * 4 + B * 4 + B * S * D * e
    res = _pair(ctx, "gather_rows bwd", ["gather_rows_backward"],
                lambda: _ops.gather_rows_backward(gc, idx, count, S),
                lambda: torch.zeros_like(x).scatter_(1, idx_exp, gc), lambda o, r: compare(o, r, exact=True))
    _fill(sec.add(op="gather_rows", **{"pass": "bwd"}, formula="grad BCDe + idx BC4 -> dx BSDe",
                  MB=nbytes / 1e6, bytes=nbytes), res, ctx, nbytes)

    # -- scatter_merge fwd / bwd (gamma-MoD form: kept rows get base + gate * delta)
    base = torch.randn(B, C, D, dtype=dt, device=dev)
    delta = torch.randn(B, C, D, dtype=dt, device=dev)
    gate = torch.rand(B, C, device=dev)

    def torch_merge(xx, bb, dd, gg):
        return xx.scatter(1, idx_exp, (bb + gg.unsqueeze(-1) * dd).to(xx.dtype))

    nbytes = (B * S - K) * D * e + 2 * K * D * e + B * C * 4 + B * C * 4 + B * 4 + B * S * D * e
    res = _pair(ctx, "scatter_merge fwd", ["scatter_merge"],
                lambda: _ops.scatter_merge(x, base, delta, gate, idx, count, None),
                lambda: torch_merge(x, base, delta, gate), lambda o, r: compare(o, r, dt))
    _fill(sec.add(op="scatter_merge", **{"pass": "fwd"},
                  formula="x (BS-K)De + base,delta 2KDe + gate,idx 2BC4 -> BSDe",
                  MB=nbytes / 1e6, bytes=nbytes), res, ctx, nbytes)

    gy = torch.randn(B, S, D, dtype=dt, device=dev)
    leaves = [t.detach().clone().requires_grad_() for t in (x, base, delta, gate)]
    out_m = torch_merge(*leaves)
    nbytes = B * S * D * e + K * D * e + B * C * 4 + B * C * 4 + B * 4 + B * S * D * e + 2 * K * D * e + B * C * 4
    res = _pair(
        ctx, "scatter_merge bwd", ["scatter_merge_backward"],
        lambda: _ops.scatter_merge_backward(gy, x, base, delta, gate, idx, count, None),
        lambda: torch.autograd.grad(out_m, leaves, gy, retain_graph=True),
        lambda o, r: check_all([("dx", o[0], r[0]), ("dbase", o[1], r[1]), ("ddelta", o[2], r[2]),
                                ("dgate", o[3], r[3])], dt))
    _fill(sec.add(op="scatter_merge", **{"pass": "bwd"},
                  formula="grad BSDe + delta KDe + 2BC4 -> dx BSDe + 2KDe + BC4",
                  MB=nbytes / 1e6, bytes=nbytes), res, ctx, nbytes)
    del leaves, out_m

    # -- rope fwd / bwd on the kept tokens' queries [B, C, H, d] (d = 128 where D allows: Llama's heads)
    d = 128 if D % 128 == 0 else D
    H, r = D // d, d
    q = torch.randn(B, C, H, d, dtype=dt, device=dev)
    ang = torch.rand(B, C, r // 2, device=dev) * 6.28
    cos, sin = (torch.cat((f(ang), f(ang)), dim=-1).to(dt) for f in (torch.cos, torch.sin))

    def torch_rope(xx):  # Hugging Face's apply_rotary_pos_emb on [B, C, H, d]
        return xx * cos.unsqueeze(2) + torch.cat((-xx[..., r // 2:], xx[..., : r // 2]), dim=-1) * sin.unsqueeze(2)

    nbytes = 2 * B * C * D * e + 2 * B * C * r * e
    res = _pair(ctx, "rope fwd", ["rope"], lambda: _ops.rope(q, cos, sin), lambda: torch_rope(q),
                lambda o, r_: compare(o, r_, dt))
    _fill(sec.add(op="rope", **{"pass": "fwd"}, formula="q BCDe + cos,sin 2BCre -> BCDe", MB=nbytes / 1e6,
                  bytes=nbytes), res, ctx, nbytes)
    gq = torch.randn(B, C, H, d, dtype=dt, device=dev)
    qr = q.detach().clone().requires_grad_()
    out_q = torch_rope(qr)
    res = _pair(ctx, "rope bwd", ["rope_backward"], lambda: _ops.rope_backward(gq, cos, sin),
                lambda: torch.autograd.grad(out_q, qr, gq, retain_graph=True)[0], lambda o, r_: compare(o, r_, dt))
    _fill(sec.add(op="rope", **{"pass": "bwd"}, formula="grad BCDe + cos,sin 2BCre -> dq BCDe", MB=nbytes / 1e6,
                  bytes=nbytes), res, ctx, nbytes)
    del qr, out_q
    return sec


# ------------------------------------------------------------------------------ (3) route
def make_mask(B: int, S: int, dev, pad: bool = True) -> torch.Tensor:
    """int8 [B, S]: a forced span of S/32 tokens (the question), padding at the end of odd rows."""
    m = torch.zeros(B, S, dtype=torch.int8)
    f = max(1, S // 32)
    for b in range(B):
        npad = (S // 8) * (b % 2) * (1 + b % 3) // 3 if pad else 0
        end = S - npad
        m[b, end - 2 * f:end - f] = 1
        if npad:
            m[b, end:] = 2
    return m.to(dev)


def keep_counts(mask: torch.Tensor, ratio: float = 0.5) -> tuple:
    """num_routed[b] = (1 - ratio) of row b's routable tokens; capacity = the most kept in a row."""
    routable = (mask == 0).sum(1)
    forced = (mask == 1).sum(1)
    num_routed = torch.round(routable.double() * (1 - ratio)).to(torch.int32)
    cap = int((forced + num_routed).max())
    return num_routed, cap


def torch_route(scores: torch.Tensor, mask: torch.Tensor, num_routed: torch.Tensor, C: int,
                forced_bonus: float = 1.0) -> tuple:
    """Selection as public MoD code writes it: topk(p + m) with padding at -inf, sorted indices.

    ``forced_bonus`` 1.0 is gamma-MoD's m = 1 on forced tokens (right for probabilities in [0, 1]);
    pass inf for unbounded scores such as logits.
    """
    B, S = scores.shape
    forced, never = mask == 1, mask == 2
    s = scores.masked_fill(never, float("-inf"))
    if forced_bonus == float("inf"):
        s = s.masked_fill(forced, float("inf"))
    else:
        s = s + forced.to(scores.dtype) * forced_bonus  # gamma-MoD: topk(p + m)
    count = (forced.sum(1) + torch.minimum(num_routed.long(), (mask == 0).sum(1))).clamp(max=C)
    top = s.topk(C, dim=1).indices  # descending by score: forced first, then the best routable
    keep = torch.arange(C, device=scores.device).unsqueeze(0) < count.unsqueeze(1)
    idx = torch.where(keep, top, S).sort(dim=1).values
    return torch.where(idx == S, -1, idx).to(torch.int32), count.to(torch.int32)


def bench_route(ctx: Ctx) -> Section:
    sec = Section("route", "route: gmod.route vs topk + sort + mask handling (ratio 0.5)", ROUTE_COLS)
    for B, S in SIZES[ctx.size_mode]["route"]:
        dev = ctx.device
        mask = make_mask(B, S, dev)
        num_routed, C = keep_counts(mask)
        # distinct probabilities in (0, 1): no ties, so topk and gmod must agree exactly
        scores = torch.stack([(torch.randperm(S) + 0.5) / S for _ in range(B)]).float().to(dev)
        res = _pair(ctx, f"route {B}x{S}", ["route"], lambda: _ops.route(scores, mask, num_routed, C, None),
                    lambda: torch_route(scores, mask, num_routed, C),
                    lambda o, r: check_all([("idx", o[0], r[0], True), ("count", o[1], r[1], True)]))
        _fill(sec.add(shape=f"{B}x{S}", C=C), res, ctx)
    return sec


# ------------------------------------------------------------------------------ (4) whole MoD overhead
def bench_overhead(ctx: Ctx) -> Section:
    z = SIZES[ctx.size_mode]
    B, S, D = z["B"], z["S"], z["D"]
    dev, dt, e = ctx.device, ctx.dtype, esize(ctx.dtype)
    mask = make_mask(B, S, dev, pad=False)  # forced question span, no padding: count == C in every row
    num_routed, C = keep_counts(mask, 0.5)
    K = B * C
    sec = Section("overhead", f"MoD overhead of one layer: B={B} S={S} D={D} ratio 0.5 (C={C}) {str(dt)[6:]}",
                  MOD_COLS)
    x = torch.randn(B, S, D, dtype=dt, device=dev)
    nw = (1 + 0.1 * torch.randn(D, device=dev)).to(dt)
    W = torch.randn(2, D, device=dev) / math.sqrt(D)  # Linear(D, 2) router, fp32, no bias
    wdiff = (W[1] - W[0]).contiguous()
    delta = torch.randn(B, C, D, dtype=dt, device=dev)  # stands for the layer's MLP output on the kept rows

    def gate_gmod(logits, idx, count):  # the kept tokens' p, gathered with gmod (D = 1)
        return torch.sigmoid(_ops.gather_rows(logits.unsqueeze(-1), idx, count).squeeze(-1))

    def gate_torch(logits, idx, count):
        return torch.sigmoid(logits.gather(1, idx.long().clamp_min(0)))

    gate_of = gate_gmod

    def gmod_overhead():
        logits = _ops.router_logits(x, wdiff, nw, EPS)
        idx, count = _ops.route(logits, mask, num_routed, C, None)
        h = _ops.gather_rows(x, idx, count)
        gate = gate_of(logits, idx, count)
        return _ops.scatter_merge(x, h, delta, gate, idx, count, None), logits, idx, count

    def torch_overhead():
        # HF-style RMSNorm (fp32 math, back to the model dtype, times the weight), fp32 router.
        xf = x.float()
        xn = nw * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(dt)
        p = F.linear(xn.float(), W).softmax(-1)[..., 1]
        s = p.masked_fill(mask == 2, float("-inf")) + (mask == 1).to(p.dtype)
        sel = s.topk(C, dim=1, sorted=False).indices.sort(dim=1).values
        sel_exp = sel.unsqueeze(-1).expand(B, C, D)
        h = torch.gather(x, 1, sel_exp)
        gate = p.gather(1, sel)
        return x.scatter(1, sel_exp, (h + gate.unsqueeze(-1) * delta).to(dt))

    # floor: router reads x and writes logits; route reads scores + mask, writes idx; gather reads the
    # kept rows and writes the compact ones; merge reads the skipped rows of x, base and delta, the gate,
    # and writes the output.
    nbytes = (B * S * D * e + B * S * 4                      # router_logits
              + B * S * 4 + B * S + B * C * 4 + B * 4         # route
              + K * D * e + B * C * D * e                     # gather_rows
              + B * C * 4                                     # gate (gathered logits)
              + (B * S - K) * D * e + 2 * K * D * e + B * C * 4 + B * S * D * e)  # scatter_merge
    sec.notes.append("floor bytes = router: read x BSD·e, write BS·4; route: read BS·5, write BC·4; "
                     "gather: read KD·e, write BCD·e; merge: read x (BS-K)D·e + base,delta 2KD·e + gate BC·4, "
                     f"write BSD·e  = {nbytes / 1e6:.1f} MB")
    floor_ms = nbytes / (ctx.copy_GBps * 1e9) * 1e3 if ctx.copy_GBps else None

    t_torch = None
    trow = sec.add(impl="torch (public code)", floor_ms=floor_ms, check="(reference)")
    try:
        torch_overhead()
        t_torch = measure(torch_overhead, ctx)
        trow.update(ms=t_torch.ms, timing=t_torch.as_json(), x_floor=t_torch.ms / floor_ms if floor_ms else None,
                    speedup=1.0)
    except Exception as err:  # noqa: BLE001
        trow["ms"] = record_error(ctx, "overhead torch", err)

    grow = sec.add(impl="gmod", floor_ms=floor_ms)
    na = missing(["router_logits", "route", "gather_rows", "scatter_merge"], ctx)
    if na:
        grow["ms"] = na
        return sec
    try:
        try:  # gather_rows with D = 1 may be unsupported by a kernel: then gather the gate with torch
            z_logits = torch.randn(B, S, device=dev)
            gate_gmod(z_logits, *_ops.route(z_logits, mask, num_routed, C, None))
            ctx.sync()
        except Exception as err:  # noqa: BLE001
            ctx.sync()
            gate_of = gate_torch
            sec.notes.append(f"gate gathered with torch (gather_rows on [B,S,1] failed: {type(err).__name__})")
        y, logits, idx, count = gmod_overhead()
        # check each stage against torch ops fed with the same inputs (the torch pipeline above rounds
        # the normed x to the model dtype, so its top-k may legitimately differ at near-ties)
        ref_logits = F.rms_norm(x.float(), (D,), nw.float(), EPS) @ wdiff
        ref_idx, ref_count = torch_route(logits, mask, num_routed, C, float("inf"))
        il = idx.long().clamp_min(0)
        ref_y = x.scatter(1, il.unsqueeze(-1).expand(B, C, D),
                          (torch.gather(x, 1, il.unsqueeze(-1).expand(B, C, D))
                           + torch.sigmoid(logits.gather(1, il)).unsqueeze(-1) * delta).to(dt))
        c = check_all([("logits", logits, ref_logits), ("idx", idx, ref_idx, True), ("count", count, ref_count, True),
                       ("out", y, ref_y)], dt)
        grow["check"] = record_check(ctx, "overhead gmod", c)
        del y, logits, idx, count, ref_y
        t = measure(lambda: gmod_overhead()[0], ctx)
        grow.update(ms=t.ms, timing=t.as_json(), x_floor=t.ms / floor_ms if floor_ms else None,
                    speedup=t_torch.ms / t.ms if t_torch else None)
    except Exception as err:  # noqa: BLE001
        grow["ms"] = record_error(ctx, "overhead gmod", err)
    return sec


def run(ctx: Ctx):
    """Yield the sections one by one (the caller prints each as soon as it is done)."""
    torch.manual_seed(ctx.seed)
    for fn in (bench_copy, bench_ops, bench_route, bench_overhead):
        yield fn(ctx)
        if ctx.cuda:
            torch.cuda.empty_cache()
