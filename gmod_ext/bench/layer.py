"""`python -m gmod_ext.bench layer`: one gamma-MoD decoder layer against its dense baselines.

A LLaMA-7B-shaped ``LlamaDecoderLayer`` (D=4096, 32 heads, head dim 128, MLP 11008; bf16 on CUDA;
tiny fp32 shapes on CPU) turned into a MoD layer (``gmod_ext.make_mod_layer``, gamma-MoD gating,
skip ratio 0.5, every token routable, so it processes C = S/2 tokens of each row), timed forward and
forward+backward against:

  (a) dense, all S    the same Hugging Face layer run densely on all S tokens (SDPA, causal);
  (b) dense, kept C   the same layer on only the C kept tokens (already gathered, with their RoPE
                      positions): the work a MoD layer cannot avoid. gamma-MoD's target is
                      <= 1.05x of (b): the routing, gather, scatter and gate cost at most 5 %;
  (c) torch MoD       a plain-PyTorch MoD layer as public MoD code writes it: RMSNorm + fp32
                      Linear(D, 2) router + softmax, topk, sort, gather (tokens and RoPE tables),
                      the layer's own projections, RoPE, SDPA (causal), MLP, gate p on the MLP
                      branch (gamma-MoD), scatter_add back into the sequence.

The row "gmod MoD, window S/8" is the same MoD layer given a sliding window of S/8 positions (as
Mistral's or Gemma-3's local layers have): its attention runs on ``gmod_ext.masked_attention`` (SDPA
with a mask built from the kept tokens' positions) instead of the fused causal kernel, so the row
shows what that path costs; it is checked against (c) with the same window mask. The row
"gmod MoD, packed S/8" gives the layer rows that each hold 8 packed sequences of S/8 tokens (what a
padding-free collator makes): each sequence is routed on its own (``router.per_sequence_codes``) and
the kept tokens attend within their sequence, again on the masked path; checked against (c) with the
same selection and a same-sequence causal mask.

fwd+bwd rows time ``autograd.grad`` of the output (random upstream gradient) with respect to the
input and every weight (the router included), so nothing accumulates between repeats.
The gmod layer's forward is checked once against (c) run with the same selection.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F

from ..config import keep_count
from .common import Col, Ctx, Section, check_all, measure, missing, record_check, record_error

SIZES = {
    # LLaMA-7B layer: D 4096, 32 heads (no GQA), MLP 11008
    "full": dict(B=4, S=2048, D=4096, H=32, Hk=32, I=11008),
    "quick": dict(B=2, S=1024, D=4096, H=32, Hk=32, I=11008),
    "cpu": dict(B=2, S=256, D=256, H=4, Hk=4, I=688),
}
RATIO = 0.5

GMOD_FWD = ["router_logits", "route", "gather_rows", "attention", "scatter_merge"]
GMOD_BWD = GMOD_FWD + ["router_logits_backward", "gather_rows_backward", "attention_backward",
                       "scatter_merge_backward"]
GMOD_WINDOW_FWD = ["router_logits", "route", "gather_rows", "scatter_merge"]  # its attention: plain torch
GMOD_WINDOW_BWD = GMOD_WINDOW_FWD + ["router_logits_backward", "gather_rows_backward", "scatter_merge_backward"]

LAYER_COLS = [
    Col("impl", "impl", help="gmod MoD = the Hugging Face layer converted with gmod_ext (router_logits, route, "
        "gather_rows, attention, scatter_merge ops); (a) dense, all S = the HF layer on every token; (b) dense, "
        "kept C = the HF layer on the C kept tokens only; (c) torch MoD = plain-PyTorch MoD (topk, sort, gather, "
        "SDPA, scatter_add) as public MoD code does it; gmod MoD, window S/8 = the gmod layer with a sliding "
        "window of S/8 positions (its attention on gmod_ext.masked_attention; TFLOP/s still counts causal pairs); "
        "gmod MoD, packed S/8 = the gmod layer on rows of 8 packed sequences (per-sequence routing, attention "
        "within each sequence on gmod_ext.masked_attention; TFLOP/s counts the whole row's causal pairs); gmod MoD, "
        "torch rope = the gmod layer with GMOD_ROPE=torch (q / k rotated by torch ops instead of gmod.rope)"),
    Col("pass", "pass", help="fwd = forward; fwd+bwd = forward + autograd.grad w.r.t. the input and all weights"),
    Col("tokens", "tokens", help="tokens per row the layer's attention and MLP run on (S, or C = S/2 kept; "
        "packed: the capacity C + 7, one slot more per extra sequence, of which C are kept)"),
    Col("ms", "ms", "ms", "median time; 'n/a (no CUDA kernel)' when a gmod op has no kernel for the device"),
    Col("TFLOPs", "TFLOP/s", ".4g", "useful matmul FLOPs of the row (projections, causal attention, MLP on its "
        "tokens) / time, 10^12 per second"),
    Col("vs_kept", "x kept", ".3f", "ms / ms of (b) dense on the kept tokens, same pass (gmod target: <= 1.05)"),
    Col("vs_dense", "x dense", ".3f", "ms / ms of (a) dense on all tokens, same pass (< 1: faster than dense)"),
    Col("target", "target", help="gmod rows on CUDA: 'ok' if x kept <= 1.05, else 'MISSED (..x)'; 'n/a (CPU)' on "
        "CPU (C++ reference kernels, tiny shapes: not what the target is about)"),
    Col("check", "check", help="gmod MoD output vs (c) torch MoD fed the same selection, once before timing"),
]
TABLES = [("layer", LAYER_COLS)]


def llama_layer_config(z: dict, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=z["D"], intermediate_size=z["I"], num_attention_heads=z["H"], num_key_value_heads=z["Hk"],
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=max(4096, z["S"]), attn_implementation="sdpa")
    cfg._attn_implementation = "sdpa"
    return cfg


def layer_flops(D: int, H: int, Hk: int, d: int, I: int, B: int, n: int) -> float:
    """Forward matmul FLOPs of one Llama layer on B rows of n tokens (causal attention pairs)."""
    proj = 2.0 * n * (D * H * d + 2 * D * Hk * d + H * d * D)
    attn = 4.0 * H * d * n * (n + 1) / 2.0
    mlp = 2.0 * n * 3 * D * I
    return B * (proj + attn + mlp)


def _rope(q, k, cos, sin):
    """q/k [B, H, n, d], cos/sin [B, n, d] (Hugging Face's apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def torch_mod_layer(layer, router_w, router_b, x, cos, sin, C: int, idx=None, window=None, segment=None):
    """Plain-PyTorch gamma-MoD layer (public-code style). ``idx`` [B, C] int64 forces a selection;
    ``window``: kept token i sees kept token j iff 0 <= idx_i - idx_j < window (a sliding window);
    ``segment`` [B, S] packed-sequence ids: kept tokens see only their own sequence's."""
    B, S, D = x.shape
    attn = layer.self_attn
    d = attn.head_dim
    xn = layer.input_layernorm(x)
    logits = F.linear(xn.float(), router_w, router_b)  # fp32 router
    p = logits.softmax(-1)[..., 1]  # [B, S]
    if idx is None:
        idx = p.topk(C, dim=1, sorted=False).indices.sort(dim=1).values
    ie = idx.unsqueeze(-1)
    xs = x.gather(1, ie.expand(B, C, D))
    cs = cos.expand(B, -1, -1).gather(1, ie.expand(B, C, cos.shape[-1]))
    sn = sin.expand(B, -1, -1).gather(1, ie.expand(B, C, sin.shape[-1]))
    h_in = layer.input_layernorm(xs)
    q = attn.q_proj(h_in).view(B, C, -1, d).transpose(1, 2)
    k = attn.k_proj(h_in).view(B, C, -1, d).transpose(1, 2)
    v = attn.v_proj(h_in).view(B, C, -1, d).transpose(1, 2)
    q, k = _rope(q, k, cs.to(q.dtype), sn.to(q.dtype))
    if window is None and segment is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])
    else:
        gap = idx.unsqueeze(2) - idx.unsqueeze(1)  # [B, C, C] position distance of query and key
        mask = gap >= 0
        if window is not None:
            mask = mask & (gap < window)
        if segment is not None:
            sk = segment.gather(1, idx)
            mask = mask & (sk.unsqueeze(2) == sk.unsqueeze(1))
        mask = mask.unsqueeze(1)
        rep = q.shape[1] // k.shape[1]
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                           attn_mask=mask, scale=attn.scaling)
    h = xs + attn.o_proj(o.transpose(1, 2).reshape(B, C, -1))
    m = layer.mlp(layer.post_attention_layernorm(h))
    ps = p.gather(1, idx).unsqueeze(-1).to(x.dtype)
    y = h + ps * m
    return x.scatter_add(1, ie.expand(B, C, D), y - xs)


def run(ctx: Ctx):
    """Yield the single section of this benchmark."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from ..mod_layer import attention_backend, make_mod_layer
    from ..router import RoutingInfo, max_segments, packed_segments

    transformers.logging.set_verbosity_error()
    torch.manual_seed(ctx.seed)
    z = SIZES[ctx.size_mode]
    B, S, D, H, Hk, I = z["B"], z["S"], z["D"], z["H"], z["Hk"], z["I"]
    dev, dt = ctx.device, ctx.dtype
    C = keep_count(S, RATIO)
    d = D // H
    cfg = llama_layer_config(z, dt)
    with torch.device(dev):  # initialise on the device (a 7B-shaped layer is slow to initialise on a CPU)
        dense = LlamaDecoderLayer(cfg, layer_idx=0)
    dense = dense.to(device=dev, dtype=dt)
    with torch.no_grad():  # HF leaves RMSNorm weights at 1: perturb so a wrong norm would show
        for n_ in (dense.input_layernorm, dense.post_attention_layernorm):
            n_.weight.add_(0.1 * torch.randn_like(n_.weight))
    rotary = LlamaRotaryEmbedding(cfg).to(dev)
    mod = make_mod_layer(copy.deepcopy(dense), RATIO, layer_idx=0, attention=ctx.attention)
    window = max(S // 8, 1)
    mod_w = copy.deepcopy(mod)  # the same weights and router, with a sliding window
    mod_w.self_attn.sliding_window = window
    router = mod.gmod_router
    rw, rb = router.weight, router.bias
    x = torch.randn(B, S, D, device=dev, dtype=dt)
    pos = torch.arange(S, device=dev).unsqueeze(0)
    n_packed = 8  # sequences per row in the packed row
    packed_pos = (torch.arange(S, device=dev) % max(S // n_packed, 1)).unsqueeze(0).expand(B, S)
    cos, sin = rotary(x, pos)
    g_full = torch.randn(B, S, D, device=dev, dtype=dt)

    sec = Section("layer", f"MoD decoder layer: LLaMA-7B-shaped layer D={D} H={H}/{Hk} MLP {I}, B={B} S={S}, "
                  f"ratio {RATIO} (C={C} kept per row), {str(dt)[6:]}", LAYER_COLS)
    if ctx.size_mode == "cpu":
        sec.notes.append("CPU: tiny shapes, gmod ops run their C++ reference kernels (not the target of the "
                         "1.05x goal); the GPU run uses D=4096, 32 heads, MLP 11008 in bf16")
    sec.notes.append("target: gmod MoD <= 1.05x of (b) dense on the kept tokens (same pass)")
    sec.notes.append(f"gmod MoD attention: {attention_backend(mod._gmod_state.config.attention, dev, dt)} "
                     f"(GmodConfig.attention={mod._gmod_state.config.attention!r})")

    # the kept tokens of (b): a fixed selection (the gmod layer's, or every other token)
    idx_b = torch.arange(0, S, 2, device=dev)[:C].unsqueeze(0).expand(B, C).contiguous()
    xk = x.gather(1, idx_b.unsqueeze(-1).expand(B, C, D)).contiguous()
    cos_k = cos.expand(B, -1, -1).gather(1, idx_b.unsqueeze(-1).expand(B, C, cos.shape[-1])).contiguous()
    sin_k = sin.expand(B, -1, -1).gather(1, idx_b.unsqueeze(-1).expand(B, C, sin.shape[-1])).contiguous()
    g_kept = torch.randn(B, C, D, device=dev, dtype=dt)

    dense_params = [p for p in dense.parameters()]
    mod_params = [p for p in mod.parameters()]

    def fwd_dense_all():
        return dense(x, position_embeddings=(cos, sin), position_ids=pos)

    def fwd_dense_kept():
        return dense(xk, position_embeddings=(cos_k, sin_k))

    def fwd_torch_mod():
        return torch_mod_layer(dense, rw, rb, x, cos, sin, C)

    def fwd_gmod():
        return mod(x, position_embeddings=(cos, sin), position_ids=pos)

    def fwd_gmod_window():
        return mod_w(x, position_embeddings=(cos, sin), position_ids=pos)

    def packed_routing():
        info = RoutingInfo()
        info.segments = packed_segments(packed_pos)
        info.max_segments = max_segments(info.segments)
        return info

    packed_info = packed_routing()

    def fwd_gmod_packed():  # (RoPE positions left unpacked: they do not change the cost)
        return mod(x, position_embeddings=(cos, sin), position_ids=pos, gmod_routing=packed_info)

    def torch_rope(fn):  # the same call with GMOD_ROPE=torch: q / k rotated by torch ops, not gmod.rope
        def f():
            old = os.environ.get("GMOD_ROPE")
            os.environ["GMOD_ROPE"] = "torch"
            try:
                return fn()
            finally:
                if old is None:
                    os.environ.pop("GMOD_ROPE")
                else:
                    os.environ["GMOD_ROPE"] = old
        return f

    def bwd_of(fwd, inp, params, g):
        def f():
            inp.requires_grad_(True)
            try:
                out = fwd()
                return torch.autograd.grad(out, [inp] + params, g)
            finally:
                inp.requires_grad_(False)
        return f

    flops_all = layer_flops(D, H, Hk, d, I, B, S)
    flops_kept = layer_flops(D, H, Hk, d, I, B, C)
    impls = [
        ("(a) dense, all S", S, flops_all, fwd_dense_all, bwd_of(fwd_dense_all, x, dense_params, g_full), None),
        ("(b) dense, kept C", C, flops_kept, fwd_dense_kept, bwd_of(fwd_dense_kept, xk, dense_params, g_kept), None),
        ("(c) torch MoD", C, flops_kept, fwd_torch_mod,
         bwd_of(fwd_torch_mod, x, dense_params + [rw, rb], g_full), None),
        ("gmod MoD", C, flops_kept, fwd_gmod, bwd_of(fwd_gmod, x, mod_params, g_full), (GMOD_FWD, GMOD_BWD)),
        ("gmod MoD, torch rope", C, flops_kept, torch_rope(fwd_gmod), torch_rope(bwd_of(fwd_gmod, x, mod_params, g_full)),
         (GMOD_FWD, GMOD_BWD)),
        ("gmod MoD, window S/8", C, flops_kept, fwd_gmod_window,
         bwd_of(fwd_gmod_window, x, list(mod_w.parameters()), g_full), (GMOD_WINDOW_FWD, GMOD_WINDOW_BWD)),
        ("gmod MoD, packed S/8", min(S, C + packed_info.max_segments - 1), flops_kept, fwd_gmod_packed,
         bwd_of(fwd_gmod_packed, x, mod_params, g_full), (GMOD_WINDOW_FWD, GMOD_WINDOW_BWD)),
    ]
    rows = {}
    for name, ntok, flops, f_fwd, f_bwd, gops in impls:
        for pss, fn, fl, ops_needed in (("fwd", f_fwd, flops, gops[0] if gops else None),
                                       ("fwd+bwd", f_bwd, 3 * flops, gops[1] if gops else None)):
            row = sec.add(impl=name, **{"pass": pss}, tokens=ntok)
            rows[(name, pss)] = row
            na = missing(ops_needed, ctx) if ops_needed else None
            if na:
                row["ms"] = na
                continue
            try:
                if name.startswith("gmod MoD") and pss == "fwd":
                    layer_, w_ = (mod_w, window) if name.endswith("window S/8") else (mod, None)
                    seg_ = packed_info.segments if name.endswith("packed S/8") else None
                    with torch.no_grad():
                        y = f_fwd()
                        info = layer_._gmod_state.scratch if seg_ is None else packed_info
                        sel_idx, sel_count = info.selection[0]
                        ok_count = bool((sel_count == C).all())  # (packed: S/16 per sequence, C in all)
                        ref = torch_mod_layer(dense, rw, rb, x, cos, sin, C, idx=sel_idx[:, :C].long(), window=w_,
                                              segment=seg_)
                    ctx.sync()
                    res = check_all([("y", y, ref)], dt)
                    if not ok_count:
                        res = {"ok": False, "rel": None, "max_abs": None, "what": f"count {sel_count.tolist()} != {C}"}
                    row["check"] = record_check(ctx, f"layer {name} fwd B{B} S{S}", res)
                    del y, ref
                if pss == "fwd":
                    with torch.no_grad():
                        t = measure(fn, ctx)
                else:
                    t = measure(fn, ctx)
                row.update(ms=t.ms, TFLOPs=fl / (t.ms * 1e-3) / 1e12, timing=t.as_json())
            except Exception as err:  # noqa: BLE001
                row["ms"] = record_error(ctx, f"layer {name} {pss}", err)
            if ctx.cuda:
                torch.cuda.empty_cache()
    for pss in ("fwd", "fwd+bwd"):
        kept = rows[("(b) dense, kept C", pss)].get("ms")
        full = rows[("(a) dense, all S", pss)].get("ms")
        for (name, p_), row in rows.items():
            if p_ != pss or not isinstance(row.get("ms"), float):
                continue
            if isinstance(kept, float):
                row["vs_kept"] = row["ms"] / kept
            if isinstance(full, float):
                row["vs_dense"] = row["ms"] / full
            if name == "gmod MoD" and row.get("vs_kept") is not None:  # (the window row: no target, a cost)
                if not ctx.cuda:
                    row["target"] = "n/a (CPU)"
                else:
                    row["target"] = "ok" if row["vs_kept"] <= 1.05 else f"MISSED ({row['vs_kept']:.2f}x)"
    yield sec
