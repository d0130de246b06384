"""The MoD decoder layer (gmod_ext.mod_layer) on a tiny Llama layer against plain PyTorch."""
from __future__ import annotations

import copy

import pytest
import torch

from gmod_hf_utils import (
    num_threads,
    plain_block,
    plain_router_logits,
    reference_selection,
    tiny_model,
    transformers,
)

from gmod_ext.config import GmodConfig, capacity
from gmod_ext.mod_layer import MoDDecoderLayer, make_mod_layer, unmake_mod_layer
from gmod_ext.router import GmodState, RoutingInfo


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


B, S = 3, 20


def build(variant="gamma", gate="default", positions="original", ratio=0.5, dtype=torch.float32, **cfg):
    model = tiny_model("llama", dtype=dtype)
    layer = model.model.layers[1]
    dense = copy.deepcopy(layer)
    state = GmodState(
        GmodConfig(variant=variant, gate=gate, positions=positions, router="per_layer", router_init="normal", **cfg),
        rotary=model.model.rotary_emb,
    )
    make_mod_layer(layer, ratio, layer_idx=1, state=state)
    with torch.no_grad():  # a router with clearly separated logits (no near-ties)
        layer.gmod_router.weight.normal_(0.0, 1.0)
        layer.gmod_router.bias.normal_(0.0, 0.5)
    return model, layer, dense


def routing_mask():
    mask = torch.zeros(B, S, dtype=torch.int8)
    mask[0, [2, 5, 6]] = 1  # forced
    mask[1, :4] = 2  # left padding
    mask[1, [10, 11]] = 1
    mask[2, -2:] = 2  # right padding
    return mask


def expected_output(layer, x, pe, mask, ratio, variant, gate, positions, rotary):
    cfg_gate = "none" if gate == "none" else variant
    logits = plain_router_logits(x, layer.input_layernorm, layer.gmod_router)
    sel = reference_selection(logits, mask, ratio)
    y = x.clone()
    if cfg_gate == "pmod":
        w = 0.2 * torch.tanh(logits) + 1.0
        skip = torch.where(mask == 2, torch.ones_like(w), w) if mask is not None else w
        y = (skip.unsqueeze(-1) * x.float()).to(x.dtype)
    for b, keep in enumerate(sel):
        keep_t = torch.tensor(keep, dtype=torch.long)
        xs = x[b, keep_t]
        if positions == "original":
            cos, sin = pe[0][0, keep_t], pe[1][0, keep_t]
        else:
            cos, sin = rotary(xs, torch.arange(len(keep)).unsqueeze(0))
            cos, sin = cos[0], sin[0]
        h, a, m = plain_block(layer, xs, cos, sin)
        p = torch.sigmoid(logits[b, keep_t]).unsqueeze(-1)
        if cfg_gate == "none":
            out = h + m
        elif cfg_gate == "gamma":
            out = h + (p * m.float()).to(x.dtype)
        elif cfg_gate == "mod":
            out = xs + (p * (a + m).float()).to(x.dtype)
        else:
            w = (0.2 * torch.tanh(logits[b, keep_t]) + 1.0).unsqueeze(-1)
            out = xs + (w * (a + m).float()).to(x.dtype)
        y[b, keep_t] = out
    return y, sel


@pytest.mark.parametrize(
    "variant,gate,positions",
    [
        ("gamma", "default", "original"),
        ("gamma", "default", "compact"),
        ("mod", "default", "original"),
        ("pmod", "default", "original"),
        ("gamma", "none", "original"),
    ],
)
@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("attention", ["gmod", "sdpa"])
def test_layer_matches_plain_pytorch(variant, gate, positions, ratio, attention):
    model, layer, _ = build(variant, gate, positions, ratio, attention=attention)
    rotary = model.model.rotary_emb
    x = torch.randn(B, S, 64, requires_grad=True)
    pe = rotary(x, torch.arange(S).unsqueeze(0))
    mask = routing_mask()
    info = RoutingInfo(mask, max_forced=int((mask == 1).sum(1).max()))
    y = layer(x, position_embeddings=pe, gmod_routing=info)
    ref, sel = expected_output(layer, x, pe, mask, ratio, variant, gate, positions, rotary)

    idx, count = info.selection[1]
    # the documented rule: count = F + R - floor(r R); forced always kept; padding never
    for b in range(B):
        R = int((mask[b] == 0).sum())
        F_ = int((mask[b] == 1).sum())
        assert int(count[b]) == F_ + R - int(ratio * R + 1e-9)
        got = idx[b, : count[b]].tolist()
        assert got == sel[b]
        assert set((mask[b] == 1).nonzero().flatten().tolist()) <= set(got)
        assert not set((mask[b] == 2).nonzero().flatten().tolist()) & set(got)
    assert idx.shape[1] == capacity(S, ratio, info.max_forced)

    kept = torch.zeros(B, S, dtype=torch.bool)
    for b, k in enumerate(sel):
        kept[b, k] = True
    skipped = ~kept
    if variant == "pmod" and gate != "none":
        pad = mask == 2
        assert torch.equal(y[pad], x[pad])  # padding untouched even with STRing
        torch.testing.assert_close(y[skipped], ref[skipped], atol=1e-6, rtol=1e-6)
    else:
        assert torch.equal(y[skipped], x[skipped])  # skipped tokens bit-identical
    torch.testing.assert_close(y[kept], ref[kept], atol=2e-5, rtol=2e-5)

    # gradients (x, layer weights and router) against the plain-PyTorch graph
    gy = torch.randn_like(y)
    params = [x] + [p for p in layer.parameters()]
    g1 = torch.autograd.grad((y * gy).sum(), params, allow_unused=True)
    g2 = torch.autograd.grad((ref * gy).sum(), params, allow_unused=True)
    for p, a, b_ in zip(params, g1, g2):
        if b_ is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        torch.testing.assert_close(a, b_, atol=5e-5, rtol=1e-4)


def _sharpen_layer(layer):
    """Re-draw the decoder layer's matrices (not the router) at std 1/sqrt(fan_in), q/k at twice that.

    With Hugging Face's std-0.02 init the layer adds only ~0.01 to a residual stream of magnitude ~1, so
    in bf16 / fp16 the rounding of y itself is as large as the whole layer contribution, and attention
    is nearly uniform: a wrong attention scale, a dropped MLP or a wrong gate would hide under the
    rounding. With these weights the contribution y - x is O(1) and attention is sharp (scores O(4)).
    """
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 2 and not name.startswith("gmod_router"):
                sharp = 2.0 if name.startswith(("self_attn.q_proj", "self_attn.k_proj")) else 1.0
                p.normal_(0.0, sharp * p.shape[1] ** -0.5)


def _flash_rule(out, pt, truth, dtype, what):
    """flash-attention's rule for a ``dtype`` computation: max |out - truth| <= 2 x max |pt - truth| + 4
    roundings of the truth's peak, where pt is the same math done in ``dtype`` and truth the float64
    result. (out / pt may arrive upcast to float64, so the message's "same math in" dtype can read
    float64; the real dtype is in ``what``.)"""
    from references import assert_close_lowp, unit_roundoff

    peak = truth.detach().double().abs().max().item()
    assert peak > 0.0, f"{what}: zero reference, nothing tested"
    assert_close_lowp(out, truth, pt, what=f"{what} [{dtype}]", factor=2.0, atol=4 * unit_roundoff(dtype) * peak)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_low_precision(dtype):
    """bf16 / fp16 layer against the float64 reference, by the flash-attention rule.

    The implementation's max error against ``expected_output`` run in float64 (the same weights and
    inputs upcast) must be <= 2x the error of the same reference math run in ``dtype`` + a few
    roundings of the compared quantity's peak. Forward, the compared quantity is the layer's
    contribution y - x on the kept tokens (the residual x is exact and would only dilute the error);
    backward, the input gradient minus its identity (residual) part, and every weight / router gradient.
    (The float64 reference keeps the few fp32 steps of the plain-PyTorch helpers: router logits, the
    gate product, attention scores; their ~1e-7 relative error is far below bf16 / fp16 rounding.)
    """
    model, layer, _ = build("gamma", ratio=0.5, dtype=dtype)
    assert layer.gmod_router.weight.dtype == torch.float32  # router stays fp32
    _sharpen_layer(layer)
    layer64 = copy.deepcopy(layer).double()
    rotary = model.model.rotary_emb
    x = torch.randn(B, S, 64).to(dtype).requires_grad_()
    pe = rotary(x, torch.arange(S).unsqueeze(0))
    mask = routing_mask()
    info = RoutingInfo(mask, max_forced=3)
    y = layer(x, position_embeddings=pe, gmod_routing=info)
    assert y.dtype == dtype
    # the same math in dtype (the "pt" baseline of the rule) and in float64 (the truth)
    ref, sel = expected_output(layer, x, pe, mask, 0.5, "gamma", "default", "original", rotary)
    x64 = x.detach().double().requires_grad_()
    pe64 = tuple(t.double() for t in pe)
    ref64, sel64 = expected_output(layer64, x64, pe64, mask, 0.5, "gamma", "default", "original", rotary)
    assert sel64 == sel  # well separated router logits: the same tokens in both precisions
    idx, count = info.selection[1]
    assert [idx[b, : count[b]].tolist() for b in range(B)] == sel
    kept = torch.zeros(B, S, dtype=torch.bool)
    for b, k in enumerate(sel):
        kept[b, k] = True
    assert torch.equal(y[~kept], x[~kept])
    torch.testing.assert_close(y[kept].float(), ref[kept].float(), atol=3e-2, rtol=3e-2)

    def flash_rule(out, pt, truth, what):
        _flash_rule(out, pt, truth, dtype, what)

    def delta(t, x_):
        return (t.detach().double() - x_.detach().double())[kept]

    flash_rule(delta(y, x), delta(ref, x), delta(ref64, x64), "y - x (kept tokens)")

    # backward: the same upstream gradient (representable in dtype) through all three graphs
    gy = torch.randn(B, S, 64).to(dtype).double()
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    params = [x] + list(layer.parameters())
    params64 = [x64] + list(layer64.parameters())
    g_impl = torch.autograd.grad((y.double() * gy).sum(), params, allow_unused=True)
    g_pt = torch.autograd.grad((ref.double() * gy).sum(), params, allow_unused=True)
    g_64 = torch.autograd.grad((ref64 * gy).sum(), params64, allow_unused=True)
    router_grad = g_impl[names.index("gmod_router.weight")]
    assert router_grad is not None and router_grad.dtype == torch.float32
    assert torch.isfinite(router_grad).all()
    assert torch.equal(g_impl[0][~kept].double(), gy[~kept])  # skipped tokens: the identity
    checked = 0
    for name, gi, gp, g64 in zip(names, g_impl, g_pt, g_64):
        assert g64 is not None, name
        gi = torch.zeros_like(g64) if gi is None else gi.double()  # e.g. a gate that ignores the router
        gp = gp.double()
        if name == "x":  # the layer's part of dL/dx (the residual adds gy exactly)
            gi, gp, g64 = gi - gy, gp - gy, g64 - gy
        flash_rule(gi, gp, g64, f"grad {name}")
        checked += 1
    assert checked == 12


def test_layer_identity_and_state_dict():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    keys = set(layer.state_dict())
    cls = type(layer)
    make_mod_layer(layer, 0.3, layer_idx=0, router_init="zeros")
    assert isinstance(layer, cls) and isinstance(layer, MoDDecoderLayer)
    assert set(layer.state_dict()) == keys | {"gmod_router.weight", "gmod_router.bias"}
    assert type(layer).__name__ == "MoD" + cls.__name__
    unmake_mod_layer(layer)
    assert type(layer) is cls and set(layer.state_dict()) == keys


def test_layer_without_routing_info_and_position_ids():
    """Called like a plain HF layer (no gmod_routing): every token routable, top-k by ratio."""
    model, layer, _ = build("gamma", ratio=0.25)
    x = torch.randn(2, 16, 64)
    pe = model.model.rotary_emb(x, torch.arange(16).unsqueeze(0))
    y = layer(x, attention_mask=None, position_ids=torch.arange(16).unsqueeze(0), position_embeddings=pe)
    assert (y != x).any(-1).sum(1).tolist() == [12, 12]
    # the right 12 tokens, with the right values: the plain-PyTorch layer with no mask (all routable)
    ref, sel = expected_output(layer, x, pe, None, 0.25, "gamma", "default", "original", model.model.rotary_emb)
    assert [torch.nonzero((y[b] != x[b]).any(-1)).flatten().tolist() for b in range(2)] == sel
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # without position_embeddings the layer computes them with the model's rotary module
    y2 = layer(x, position_ids=torch.arange(16).unsqueeze(0))
    torch.testing.assert_close(y2, y)


def test_kv_cache_hook():
    model, layer, dense = build("gamma", ratio=0.5)
    x = torch.randn(1, 8, 64)
    pe = model.model.rotary_emb(x, torch.arange(8).unsqueeze(0))
    cache = transformers.DynamicCache(config=model.config)
    with pytest.raises(NotImplementedError, match="KV cache"):
        layer(x, position_embeddings=pe, past_key_values=cache, use_cache=True)
    # on_cache="dense": the wrapped layer runs densely (and fills the cache)
    layer._gmod_state.config.on_cache = "dense"
    y = layer(x, position_embeddings=pe, past_key_values=cache, use_cache=True)
    ref = dense(x, position_embeddings=pe, past_key_values=transformers.DynamicCache(config=model.config), use_cache=True)
    torch.testing.assert_close(y, ref)
    assert cache.get_seq_length(1) == 8


@pytest.mark.parametrize("autocast", [False, True])
def test_compile_aot_eager(autocast):
    """The MoD layer under torch.compile(fullgraph=True) equals eager, forward and gradients (also under
    torch.autocast, whose dtype the layer reads to cast the attention's inputs)."""
    import contextlib

    torch._dynamo.reset()
    model, layer, _ = build("gamma", ratio=0.5)
    x = torch.randn(2, 12, 64)
    pe = model.model.rotary_emb(x, torch.arange(12).unsqueeze(0))
    mask = torch.zeros(2, 12, dtype=torch.int8)
    mask[0, :2] = 1
    mask[1, :3] = 2
    xe = x.clone().requires_grad_()
    xc = x.clone().requires_grad_()
    info_e, info_c = RoutingInfo(mask, 2), RoutingInfo(mask, 2)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with ctx():
        ye = layer(xe, position_embeddings=pe, gmod_routing=info_e)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with ctx():
        yc = compiled(xc, position_embeddings=pe, gmod_routing=info_c)
    assert yc.dtype == ye.dtype == torch.float32
    torch.testing.assert_close(yc, ye)
    assert torch.equal(info_c.selection[1][0], info_e.selection[1][0])
    loss_e = ye.square().sum() + info_e.aux[1]
    loss_c = yc.square().sum() + info_c.aux[1]
    ge = torch.autograd.grad(loss_e, [xe, layer.gmod_router.weight])
    gc = torch.autograd.grad(loss_c, [xc, layer.gmod_router.weight])
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)


def test_sdpa_causal_gqa_without_enable_gqa(monkeypatch):
    """attention="sdpa" on a torch without SDPA's enable_gqa (before 2.5) repeats the kv heads instead:
    the same result, checked against a float64 masked softmax."""
    from gmod_ext import mod_layer

    g = torch.Generator().manual_seed(5)
    B, C, Hq, Hk, d = 2, 9, 4, 2, 8
    q = torch.randn(B, C, Hq, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, C, Hk, d, generator=g, dtype=torch.float64) for _ in range(2))
    s = torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, dim=2)) * 0.3
    s = s.masked_fill(torch.ones(C, C, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(mod_layer._sdpa_causal(q, k, v, 0.3), want)
    real = torch.nn.functional.scaled_dot_product_attention

    def old_sdpa(*args, **kwargs):
        if "enable_gqa" in kwargs:
            raise TypeError("scaled_dot_product_attention() got an unexpected keyword argument 'enable_gqa'")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", old_sdpa)
    torch.testing.assert_close(mod_layer._sdpa_causal(q, k, v, 0.3), want)


def test_attention_auto_backend(monkeypatch):
    """GmodConfig.attention defaults to "auto": torch's SDPA for bf16 / fp16 CUDA tensors (cuDNN / flash,
    measured ~1.8x gmod.attention's TFLOP/s on the H100 for this case), gmod.attention elsewhere (CPU,
    float32). Checked by the kernel a layer calls: on CPU, auto runs gmod.attention and never SDPA;
    "sdpa" runs SDPA; the explicit settings win over auto everywhere."""
    from gmod_ext import mod_layer, ops
    from gmod_ext.mod_layer import attention_backend

    assert GmodConfig().attention == "auto"
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU
    assert attention_backend("auto", cuda, torch.bfloat16) == "sdpa"
    assert attention_backend("auto", cuda, torch.float16) == "sdpa"
    assert attention_backend("auto", cuda, torch.float32) == "gmod"
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        assert attention_backend("auto", cpu, dt) == "gmod"
    for dev in (cuda, cpu):
        assert attention_backend("gmod", dev, torch.bfloat16) == "gmod"
        assert attention_backend("sdpa", dev, torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="attention='flash'"):
        GmodConfig(attention="flash")

    calls = {"sdpa": 0, "gmod": 0}
    real_sdpa, real_attention = mod_layer._sdpa_causal, ops.attention

    def sdpa(*a, **k):
        calls["sdpa"] += 1
        return real_sdpa(*a, **k)

    def gmod(*a, **k):
        calls["gmod"] += 1
        return real_attention(*a, **k)

    monkeypatch.setattr(mod_layer, "_sdpa_causal", sdpa)
    monkeypatch.setattr(ops, "attention", gmod)
    for setting, want in (("auto", "gmod"), ("sdpa", "sdpa"), ("gmod", "gmod")):
        calls.update(sdpa=0, gmod=0)
        model, layer, _ = build(attention=setting, dtype=torch.bfloat16)
        x = torch.randn(B, S, 64, dtype=torch.bfloat16)
        layer(x, position_embeddings=model.model.rotary_emb(x, torch.arange(S).unsqueeze(0)))
        assert calls[want] == 1 and sum(calls.values()) == 1, (setting, calls)


def _backend_by_the_flash_rule(device, dtype, setting):
    """A bf16 / fp16 MoD layer (head dim 64, GQA 4/2, sharpened weights, no routing mask) with
    ``attention=setting``, against the plain-PyTorch layer in float64 by the flash rule: its output's
    y - x on the kept tokens and the layer's part of dL/dx (the residual's identity taken out), each
    allowed 2x the error of the same plain math run in ``dtype``."""
    model = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2).to(device, dtype)  # head dim 64: a CUDA kernel size
    layer = model.model.layers[1]
    rotary = model.model.rotary_emb
    state = GmodState(GmodConfig(router="per_layer", attention=setting), rotary=rotary)
    make_mod_layer(layer, 0.5, layer_idx=1, state=state)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.gmod_router.weight.copy_(torch.randn(layer.gmod_router.weight.shape, generator=gen))
    torch.manual_seed(7)
    _sharpen_layer(layer)
    layer64 = copy.deepcopy(layer).double()
    Sx = 64
    x = torch.randn(B, Sx, 256, generator=gen).to(device, dtype).requires_grad_()
    pe = rotary(x, torch.arange(Sx, device=device).unsqueeze(0))
    y = layer(x, position_embeddings=pe)
    ref, sel = expected_output(layer, x, pe, None, 0.5, "gamma", "default", "original", rotary)
    x64 = x.detach().double().requires_grad_()
    ref64, sel64 = expected_output(layer64, x64, tuple(t.double() for t in pe), None, 0.5, "gamma", "default",
                                   "original", rotary)
    assert sel64 == sel  # the same tokens in both precisions
    kept = torch.zeros(B, Sx, dtype=torch.bool, device=device)
    for b, k in enumerate(sel):
        kept[b, k] = True
    assert torch.equal(y[~kept], x[~kept])

    def delta(t, x_):
        return (t.detach().double() - x_.detach().double())[kept]

    _flash_rule(delta(y, x), delta(ref, x), delta(ref64, x64), dtype, f"y - x, attention={setting}")
    gy = torch.randn(B, Sx, 256, generator=gen).to(dtype).double().to(device)
    (g_impl,) = torch.autograd.grad((y.double() * gy).sum(), [x])
    (g_pt,) = torch.autograd.grad((ref.double() * gy).sum(), [x])
    (g_64,) = torch.autograd.grad((ref64 * gy).sum(), [x64])
    _flash_rule(g_impl.double() - gy, g_pt.double() - gy, g_64 - gy, dtype, f"dL/dx, attention={setting}")


@pytest.mark.parametrize("setting", ["gmod", "sdpa"])
def test_attention_backends_low_precision_cpu(setting):
    """Both attention backends of a bf16 MoD layer on the CPU by the flash rule (the same check the
    CUDA test below makes of "auto", i.e. SDPA, and of gmod.attention)."""
    _backend_by_the_flash_rule("cpu", torch.bfloat16, setting)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available()
                    or not torch._C._dispatch_has_kernel_for_dispatch_key("gmod::attention", "CUDA"),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_auto_runs_sdpa_on_cuda(dtype, monkeypatch):
    """On CUDA in bf16 / fp16 the default attention="auto" runs the MoD layer's attention on SDPA (and
    "gmod" does not); both layers pass the flash rule against the float64 plain-PyTorch layer, forward
    and backward."""
    from gmod_ext import mod_layer

    calls = []
    real_sdpa = mod_layer._sdpa_causal
    monkeypatch.setattr(mod_layer, "_sdpa_causal", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    _backend_by_the_flash_rule("cuda", dtype, "auto")
    assert len(calls) == 1  # auto ran SDPA
    _backend_by_the_flash_rule("cuda", dtype, "gmod")
    assert len(calls) == 1  # gmod did not
