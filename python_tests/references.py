"""Independent plain-PyTorch references for every gmod op, written from the docstrings in
gmod_ext/ops.py (not from the kernels), plus the comparison helpers the tests use.

By default the math runs in float64 (``compute_dtype=torch.float64``). The attention and
router references can also run in the input's own dtype (``compute_dtype=None``): that is the
"same math in low precision" baseline of the flash-attention tests, whose error against the
float64 reference sets the tolerance for bf16/fp16 (``assert_close_lowp``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

MASK_ROUTABLE, MASK_FORCED, MASK_NEVER = 0, 1, 2


def _cd(t: torch.Tensor, compute_dtype):
    return t.dtype if compute_dtype is None else compute_dtype


# ------------------------------------------------------------------ router_logits
def router_logits_ref(x, weight, norm_weight=None, eps=1e-6, compute_dtype=torch.float64):
    """RMSNorm (rms = sqrt(mean(x^2) + eps), times norm_weight), then a dot product with weight."""
    cd = _cd(x, compute_dtype)
    x = x.to(cd)
    rms = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    h = x / rms
    if norm_weight is not None:
        h = h * norm_weight.to(cd)
    return (h * weight.to(cd)).sum(dim=-1)


# ------------------------------------------------------------------ route
def route_ref(scores, mask, num_routed, capacity: int, threshold: Optional[float] = None):
    """One python loop per row, straight from the docstring of gmod_ext.ops.route.

    * forced tokens (mask 1) first; if there are more than ``capacity``, the lowest-index ones;
    * then the best ``num_routed[b]`` routable tokens (mask 0) by score, descending, ties to the
      lower index, NaN last; in threshold mode only routable tokens with ``score > threshold``
      (compared the way torch compares ``scores > threshold``, i.e. in the scores' dtype);
    * never more than ``capacity`` in all; padding (mask 2) never;
    * indices ascending, slots past the count hold -1.
    """
    scores = scores.detach().cpu()
    mask = mask.cpu()
    B, S = scores.shape
    if isinstance(num_routed, int):
        num_routed = [num_routed] * B
    else:
        num_routed = [int(v) for v in num_routed.cpu()]
    above = (scores > threshold) if threshold is not None else torch.ones_like(scores, dtype=torch.bool)
    idx = torch.full((B, capacity), -1, dtype=torch.int32)
    count = torch.zeros(B, dtype=torch.int32)
    for b in range(B):
        row = [float(v) for v in scores[b]]
        codes = [int(v) for v in mask[b]]
        forced = [j for j in range(S) if codes[j] == MASK_FORCED][:capacity]
        cand = [j for j in range(S) if codes[j] == MASK_ROUTABLE and bool(above[b, j])]

        def key(j):
            s = row[j]
            return (1, 0.0, j) if math.isnan(s) else (0, -s, j)

        cand.sort(key=key)
        quota = max(0, min(num_routed[b], capacity - len(forced), len(cand)))
        kept = sorted(forced + cand[:quota])
        idx[b, : len(kept)] = torch.tensor(kept, dtype=torch.int32)
        count[b] = len(kept)
    return idx, count


# ------------------------------------------------------------------ gather / scatter
def gather_rows_ref(x, idx, count):
    """out[b, c] = x[b, idx[b, c]] for c < count[b], zeros after. Differentiable in x."""
    B, S, D = x.shape
    C = idx.shape[1]
    idx, count = idx.to(x.device).long(), count.to(x.device).long()
    valid = torch.arange(C, device=x.device).view(1, C) < count.view(B, 1)
    safe = torch.where(valid, idx, torch.zeros_like(idx)).clamp(0, max(S - 1, 0))
    if S == 0:
        return x.new_zeros(B, C, D) + x.sum() * 0
    rows = torch.gather(x, 1, safe.unsqueeze(-1).expand(B, C, D))
    return torch.where(valid.unsqueeze(-1), rows, torch.zeros_like(rows))


def scatter_merge_ref(x, base, idx, count, delta=None, gate=None, skip_scale=None, compute_dtype=torch.float64):
    """Kept row s = idx[b, c]: base + gate*delta (gate*base without delta, base with neither);
    other rows: x, or skip_scale*x. Differentiable (plain torch autograd)."""
    cd = _cd(x, compute_dtype)
    B, S, D = x.shape
    xs = x.to(cd)
    if skip_scale is not None:
        xs = xs * skip_scale.to(cd).unsqueeze(-1)
    b_ = base.to(cd)
    g = gate.to(cd).unsqueeze(-1) if gate is not None else None
    if delta is not None:
        kept = b_ + (g * delta.to(cd) if g is not None else delta.to(cd))
    else:
        kept = g * b_ if g is not None else b_
    rows = []
    for b in range(B):
        n = int(count[b])
        src = {int(idx[b, c]): c for c in range(n)}
        rows.append(torch.stack([kept[b, src[s]] if s in src else xs[b, s] for s in range(S)]) if S else xs[b])
    return torch.stack(rows) if B else xs


# ------------------------------------------------------------------ attention
def attention_mask_ref(Cq: int, Ck: int, q_len, k_len, device="cpu"):
    """allowed[b, i, j]: i < q_len[b], j < k_len[b], j <= k_len[b] - q_len[b] + i (bottom-right causal)."""
    ql = q_len.to(device=device, dtype=torch.int64).view(-1, 1, 1)
    kl = k_len.to(device=device, dtype=torch.int64).view(-1, 1, 1)
    i = torch.arange(Cq, device=device).view(1, -1, 1)
    j = torch.arange(Ck, device=device).view(1, 1, -1)
    return (i < ql) & (j < kl) & (j <= kl - ql + i)


def attention_ref(q, k, v, q_len, k_len, scale=None, compute_dtype=torch.float64):
    """Explicit mask + softmax. GQA by repeat_interleave of the kv heads. Returns (o, lse):
    o [B, Cq, Hq, d] (zeros where a query sees no key, including rows past q_len), lse [B, Hq, Cq]
    (-inf there). Differentiable in q, k, v without NaN gradients."""
    cd = _cd(q, compute_dtype)
    B, Cq, Hq, d = q.shape
    Hk = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    if Hq != Hk:
        kc = kc.repeat_interleave(Hq // Hk, dim=2)
        vc = vc.repeat_interleave(Hq // Hk, dim=2)
    s = torch.einsum("bihe,bjhe->bhij", qc, kc) * scale
    allowed = attention_mask_ref(Cq, k.shape[1], q_len, k_len, q.device).unsqueeze(1)  # [B,1,Cq,Ck]
    has_key = allowed.any(dim=-1, keepdim=True)
    s = s.masked_fill(~allowed, -math.inf)
    s_safe = torch.where(has_key, s, torch.zeros_like(s))  # rows with no key: finite, zeroed below
    p = torch.softmax(s_safe, dim=-1) * allowed
    o = torch.einsum("bhij,bjhe->bihe", p, vc)
    lse = torch.logsumexp(s_safe, dim=-1).masked_fill(~has_key.squeeze(-1), -math.inf)
    return o, lse


# ------------------------------------------------------------------ kv cache
def position_attention_ref(q, k, v, q_pos, k_pos, k_len, scale, window=None, softcap=None, q_seg=None, k_seg=None,
                           dtype=torch.float64, q_block=None, k_block=None, sinks=None, alibi=None,
                           window_in_blocks=True):
    """gmod_ext.masked_attention.position_masked_attention, one (row, query, head) at a time: the visible
    keys listed by the documented rule (earlier, or in the query's block; inside the window, which with
    ``window_in_blocks=False`` does not limit a block's keys; in its packed sequence), scores plus
    ``alibi[h] * (key position - query position)`` with ``alibi`` [Hq] slopes (ALiBi's relative form), softmax (with ``sinks`` [Hq], the head's sink logit as one more entry, then
    dropped), weighted sum, computed in ``dtype``. Returns (out, visible [B, Cq]
    bool); rows with no visible key are left at 0 (the op's value there is unspecified)."""

    def same_block(b, i, j):
        return q_block is not None and int(q_block[b, i]) >= 0 and int(q_block[b, i]) == int(k_block[b, j])

    B, Cq, Hq, d = q.shape
    rep = Hq // k.shape[2]
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    rows, visible = [], torch.zeros(B, Cq, dtype=torch.bool)
    for b in range(B):
        outs = []
        for i in range(Cq):
            p = int(q_pos[b, i])
            def sees(j):
                near = window is None or p - int(k_pos[b, j]) < window
                if window_in_blocks:
                    return (int(k_pos[b, j]) <= p or same_block(b, i, j)) and near
                return (int(k_pos[b, j]) <= p and near) or same_block(b, i, j)

            js = [j for j in range(int(k_len[b]))
                  if sees(j) and (q_seg is None or int(q_seg[b, i]) == int(k_seg[b, j]))]
            heads = []
            for h in range(Hq):
                if not js:
                    heads.append(torch.zeros(d, dtype=dtype))
                    continue
                s = (k[b, js, h // rep] @ q[b, i, h]) * scale
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                if alibi is not None:
                    s = s + float(alibi[h]) * (k_pos[b, js].to(dtype) - p)
                if sinks is None:
                    heads.append(torch.softmax(s, 0) @ v[b, js, h // rep])
                else:
                    heads.append(torch.softmax(torch.cat([s, sinks[h:h + 1].to(dtype)]), 0)[:-1] @ v[b, js, h // rep])
            visible[b, i] = bool(js)
            outs.append(torch.stack(heads))
        rows.append(torch.stack(outs))
    return torch.stack(rows), visible


def kv_cache_append_ref(k_cache, v_cache, cache_len, k_new, v_new, new_len):
    """Functional: returns new (k_cache, v_cache, cache_len)."""
    kc, vc, cl = k_cache.clone(), v_cache.clone(), cache_len.clone()
    for b in range(k_cache.shape[0]):
        c, n = int(cache_len[b]), int(new_len[b])
        kc[b, c : c + n] = k_new[b, :n]
        vc[b, c : c + n] = v_new[b, :n]
        cl[b] = c + n
    return kc, vc, cl


def rope_ref(x, cos, sin, compute_dtype=torch.float64):
    """ops.rope from its docstring: on the first r = cos.shape[-1] dims of each head,
    x * cos + cat(-x[h:r], x[:h]) * sin with h = r / 2 (cos / sin [B, C, r] shared by the heads); the rest
    copied. In ``compute_dtype`` (None: x's own), returned in x's dtype."""
    cd = _cd(x, compute_dtype)
    r = cos.shape[-1]
    h = r // 2
    xr = x[..., :r].to(cd)
    c, s = cos.to(cd).unsqueeze(2), sin.to(cd).unsqueeze(2)
    rot = xr * c + torch.cat((-xr[..., h:], xr[..., :h]), dim=-1) * s
    return torch.cat((rot.to(x.dtype), x[..., r:]), dim=-1)


# ------------------------------------------------------------------ comparisons
def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp at 1: the relative error of one rounding to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def rounding_error(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest error of rounding the exact value ``ref`` to ``dtype`` once (subnormals included)."""
    fi = torch.finfo(dtype)
    ref = ref.detach().to("cpu", torch.float64)
    return unit_roundoff(dtype) * (ref.abs() + fi.smallest_normal)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_within(out, ref, bound, what="output"):
    """|out - ref| <= bound elementwise (bound broadcastable); NaN/inf must match exactly."""
    out64, ref64 = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    nonfinite = ~torch.isfinite(ref64)
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{what}: NaN pattern differs"
    assert torch.equal(out64[nonfinite & ~torch.isnan(ref64)], ref64[nonfinite & ~torch.isnan(ref64)]), (
        f"{what}: inf entries differ"
    )
    fin = ~nonfinite
    err = (out64 - ref64).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(ref64)
    bad = fin & ~(err <= bound)
    if bool(bad.any()):
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {int(fin.sum())} elements off; first at {i}: got {out64[i].item()!r}, "
            f"reference {ref64[i].item()!r}, |err| {err[i].item():.3g} > bound {bound[i].item():.3g}; "
            f"max err {err[fin].max().item():.3g}"
        )


def assert_close_lowp(out, ref, pt, what="output", factor=2.0, atol=None):
    """flash-attention's rule: the kernel's max error against the float64 reference must be at most
    ``factor`` times the max error of the same math done in the input dtype (``pt``), plus atol.

    The default atol is relative to the largest reference value: a few roundings for bf16/fp16
    (where the ``pt`` term dominates anyway), and 128 roundings for float32/float64, where the
    kernel and ``pt`` both sit at the accumulation dtype's accuracy and only summation order
    (e.g. a GQA group's dk summed over heads x queries) separates them.
    NaN/-inf patterns must match the reference exactly."""
    out64, ref64, pt64 = (t.detach().to("cpu", torch.float64) for t in (out, ref, pt))
    fin = torch.isfinite(ref64)
    assert torch.equal(out64[~fin], ref64[~fin]), f"{what}: non-finite entries differ from the reference"
    assert bool(torch.isfinite(out64[fin]).all()), f"{what}: non-finite values where the reference is finite"
    if not bool(fin.any()):
        return
    peak = max(1.0, ref64[fin].abs().max().item())
    if atol is None:
        mult = 4 if out.dtype in (torch.bfloat16, torch.float16) else 128
        atol = mult * unit_roundoff(out.dtype) * peak
    err = (out64 - ref64)[fin].abs().max().item()
    pt_err = (pt64 - ref64)[fin].abs().max().item()
    assert err <= factor * pt_err + atol, (
        f"{what}: max error {err:.3g} vs float64 reference exceeds {factor} x {pt_err:.3g} "
        f"(same math in {pt.dtype}) + {atol:.3g} (reference peak {peak:.3g})"
    )
