"""gmod_ext.convert on tiny Llama / Mistral / Qwen2 / LLaVA models."""
from __future__ import annotations

import copy
import math
import types

import pytest
import torch

from gmod_hf_utils import (
    IMAGE_TOKEN,
    make_batch,
    num_threads,
    plain_block,
    plain_router_logits,
    tiny_model,
    transformers,
)

import gmod_ext
from gmod_ext.config import capacity, capacity_of_rows, prd_skip_ratios
from gmod_ext.convert import is_converted

ARCHS = ["llama", "mistral", "qwen2", "llava"]


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _text_model(model):
    return model.model.language_model if hasattr(model.model, "language_model") else model.model


def _text_layers(model):
    return _text_model(model).layers


def _logits_loss(out, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.logits.shape, generator=g).to(out.logits.dtype)
    valid = batch["attention_mask"].bool()
    return (out.logits * w)[valid].float().sum()


def _compare_grads(ref, conv, atol=None, rtol=None, rel_norm=None):
    """Elementwise (atol/rtol) or, for low precision, relative-norm comparison of the gradients."""
    conv_params = dict(conv.named_parameters())
    n = 0
    for name, p in ref.named_parameters():
        q = conv_params[name]
        if p.grad is None:
            assert q.grad is None or float(q.grad.abs().max()) == 0.0, name
            continue
        if rel_norm is not None:
            if name.endswith("k_proj.bias"):
                continue  # mathematically zero (softmax is shift-invariant): pure rounding noise
            err = float((q.grad.float() - p.grad.float()).norm() / p.grad.float().norm().clamp(min=1e-6))
            assert err < rel_norm, f"{name}: relative gradient error {err:.3g}"
        else:
            torch.testing.assert_close(
                q.grad.float(), p.grad.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}"
            )
        n += 1
    assert n > 10


# ----------------------------------------------------------------------------- equality at ratio 0
@pytest.mark.parametrize("arch", ARCHS + ["qwen3"])
@pytest.mark.parametrize("mode", ["gate_none", "pmod_zero_router"])
def test_ratio0_equals_hf_fp32(arch, mode):
    ref = tiny_model(arch)
    conv = copy.deepcopy(ref)
    if mode == "gate_none":
        gmod_ext.convert(conv, ratio=0.0, layers="all", gate="none", progress=False)
    else:
        gmod_ext.convert(conv, ratio=0.0, layers="all", variant="pmod", schedule="constant", progress=False)
        assert float(conv.gmod_router.weight.detach().abs().max()) == 0.0
    batch = make_batch(arch)
    out_ref = ref(**_inputs(batch))
    out_conv = conv(**_inputs(batch))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out_conv.logits[valid], out_ref.logits[valid], atol=2e-5, rtol=1e-5)
    _logits_loss(out_ref, batch).backward()
    _logits_loss(out_conv, batch).backward()
    _compare_grads(ref, conv, atol=5e-5, rtol=1e-4)
    st = conv.gmod_stats()
    assert sorted(st["layers"]) == [0, 1, 2, 3] and st["skip_ratio"] == 0.0


def _sharpen_attention(model, factor=8.0):
    """Scale q_proj / k_proj of every text decoder layer by ``factor`` (attention scores by factor^2).

    Hugging Face's std-0.02 init gives tiny models nearly uniform attention (score std ~0.02), so the
    logits barely depend on the attention: a softmax scale x1.5, x3 or even x0 (uniform attention)
    moved the bf16 logits less than the flash rule's bound. With scores 64x larger (std ~1.5) those
    bugs move the logits 25x-80x more than bf16 rounding does. A power of two keeps the scaled
    bf16 / fp16 weights exact, so the float64 model sees exactly the same weights.
    """
    with torch.no_grad():
        for layer in _text_layers(model):
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(factor)
                if proj.bias is not None:
                    proj.bias.mul_(factor)


@pytest.mark.parametrize(
    "arch,dtype", [(a, torch.bfloat16) for a in ARCHS] + [("llama", torch.float16), ("qwen2", torch.float16)]
)
def test_ratio0_equals_hf_low_precision(arch, dtype):
    """Converted bf16 / fp16 model at ratio 0 (gate none) against the dense Hugging Face model run in
    float64 (the same low-precision weights, upcast), by the flash-attention rule: the converted
    model's max logit error must be <= 2x the error of the Hugging Face model itself run in ``dtype``,
    plus a few roundings of the logits' peak; and so must each weight's gradient (relative norms)."""

    ref = tiny_model(arch, dtype=dtype)
    _sharpen_attention(ref)
    ref64 = copy.deepcopy(ref).double()
    conv = copy.deepcopy(ref)
    gmod_ext.convert(conv, ratio=0.0, layers="all", gate="none", progress=False)
    assert conv.gmod_router.weight.dtype == torch.float32
    batch = make_batch(arch)
    batch64 = dict(batch)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        batch64["pixel_values"] = batch["pixel_values"].double()
    out_ref = ref(**_inputs(batch))
    out_conv = conv(**_inputs(batch))
    out_64 = ref64(**_inputs(batch64))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out_conv.logits[valid].float(), out_ref.logits[valid].float(), atol=3e-2, rtol=3e-2)
    _assert_logits_by_the_flash_rule(out_conv, out_ref, out_64, valid, dtype)
    _logits_loss(out_ref, batch).backward()
    _logits_loss(out_conv, batch).backward()
    _logits_loss(out_64, batch).backward()
    _compare_grads(ref, conv, rel_norm=6e-2)  # (both round; the truth decides below)
    _assert_grads_by_the_flash_rule(ref, conv, ref64, dtype)


def _assert_logits_by_the_flash_rule(out_conv, out_ref, out_64, valid, dtype):
    """The converted model's logits (at ``valid``) are at most 2x as far from the float64 model's as Hugging Face's
    own are in ``dtype``, plus 4 roundings of the logits' peak."""
    from references import assert_close_lowp, unit_roundoff

    truth = out_64.logits[valid]
    peak = truth.abs().max().item()
    assert_close_lowp(out_conv.logits[valid], truth, out_ref.logits[valid], what="logits", factor=2.0,
                      atol=4 * unit_roundoff(dtype) * peak)


def _assert_grads_by_the_flash_rule(ref, conv, ref64, dtype, grad_dtype=None):
    """Each weight's gradient of ``conv`` is at most 2x as far from ``ref64``'s (float64) as Hugging Face's
    ``ref`` is, plus 8 roundings in ``dtype`` (relative norms); of dtype ``grad_dtype`` where given."""
    from references import unit_roundoff

    truth_grads = dict(ref64.named_parameters())
    conv_params = dict(conv.named_parameters())
    for name, p in ref.named_parameters():
        t = truth_grads[name].grad
        if p.grad is None or name.endswith("k_proj.bias"):  # (k_proj.bias: exactly zero, rounding noise)
            continue
        assert grad_dtype is None or conv_params[name].grad.dtype == grad_dtype, name
        norm = t.norm().clamp(min=1e-12)
        ours, hf = ((g.grad.double() - t).norm() / norm for g in (conv_params[name], p))
        assert ours <= 2 * hf + 8 * unit_roundoff(dtype), f"{name}: gradient error {ours:.3g} vs Hugging Face's {hf:.3g}"


@pytest.mark.parametrize("arch,dtype", [(a, torch.bfloat16) for a in ARCHS + ["qwen3"]] + [("llama", torch.float16)])
def test_ratio0_under_autocast_equals_hf(arch, dtype):
    """Mixed precision as transformers' Trainer runs it (``bf16=True`` / ``fp16=True``: float32 weights, the
    forward under ``torch.autocast``): the converted model at ratio 0 (gate none) against the dense Hugging
    Face model run in float64, by the flash-attention rule against the same Hugging Face model under autocast,
    for the logits and each weight's gradient. Autocast hands the MoD layer's attention a float32 query
    (Qwen3's query norm) with bfloat16 keys, and its merge bfloat16 branches with a float32 residual stream:
    both are taken as the model's own layer takes them (in autocast's dtype / promoted to the stream's)."""

    ref = tiny_model(arch)
    _sharpen_attention(ref)
    ref64 = copy.deepcopy(ref).double()
    conv = copy.deepcopy(ref)
    gmod_ext.convert(conv, ratio=0.0, layers="all", gate="none", progress=False)
    batch = make_batch(arch)
    batch64 = dict(batch)
    if "pixel_values" in batch:
        batch64["pixel_values"] = batch["pixel_values"].double()
    with torch.autocast("cpu", dtype=dtype):
        out_ref = ref(**_inputs(batch))
        out_conv = conv(**_inputs(batch))
    out_64 = ref64(**_inputs(batch64))
    valid = batch["attention_mask"].bool()
    assert out_conv.logits.dtype == out_ref.logits.dtype
    _assert_logits_by_the_flash_rule(out_conv, out_ref, out_64, valid, dtype)
    _logits_loss(out_ref, batch).backward()
    _logits_loss(out_conv, batch).backward()
    _logits_loss(out_64, batch).backward()
    _assert_grads_by_the_flash_rule(ref, conv, ref64, dtype, grad_dtype=torch.float32)


@pytest.mark.parametrize("variant", ["gamma", "mod", "pmod"])
def test_training_step_under_autocast(variant):
    """A training step at ratio 0.5 under ``torch.autocast`` (bfloat16): the loss (with its aux term) and the
    gradients come out float32 and finite, the router gets a gradient, each layer keeps what its routing
    says; and a cached prefill + decode step under autocast (generation in a mixed-precision eval loop) at
    ratio 0 (every token kept) gives the dense model's logits under autocast, to bfloat16's accuracy."""
    model = tiny_model("llama")
    kw = {"schedule": "constant"} if variant == "pmod" else {}
    gmod_ext.convert(model, ratio=0.5, layers="all", variant=variant, router_init="normal", progress=False, **kw)
    batch = make_batch("llama", labels_prefix=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.loss.dtype == torch.float32 and math.isfinite(float(out.loss))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or (p.grad.dtype == torch.float32 and bool(torch.isfinite(p.grad).all())), name
    assert float(model.gmod_router.weight.grad.abs().sum()) > 0
    forced = model.config.gmod["forced"]
    must_keep = torch.zeros_like(batch["attention_mask"], dtype=torch.bool) if forced == "none" else \
        (batch["labels"] == -100) & batch["attention_mask"].bool()
    _check_selection(model, batch, model.gmod_state.current, 0.5, must_keep)

    dense = tiny_model("llama").eval()
    keep_all = copy.deepcopy(dense)
    gmod_ext.convert(keep_all, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, progress=False)
    ids = batch["input_ids"][:1, :12]
    logits = []
    for m in (dense, keep_all):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            pre = m(ids, use_cache=True)
            step = m(ids[:, -1:], past_key_values=pre.past_key_values, use_cache=True)
        logits.append(torch.cat([pre.logits, step.logits], 1).float())
    peak = float(logits[0].abs().max())
    torch.testing.assert_close(logits[1], logits[0], atol=0.05 * peak, rtol=0)


def _gamma_reference(model, router):
    """Patch each decoder layer of ``model`` with gamma-MoD keep-all math in plain PyTorch + HF modules."""

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kw):
        kw.pop("gmod_routing", None)
        h = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            **kw,
        )[0]
        p = torch.sigmoid(plain_router_logits(hidden_states, self.input_layernorm, router)).unsqueeze(-1)
        return h + (p * self.mlp(self.post_attention_layernorm(h)).float()).to(h.dtype)

    for layer in _text_layers(model):
        layer.forward = types.MethodType(forward, layer)


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_gamma_ratio0_equals_plain_pytorch(arch):
    ref = tiny_model(arch)
    conv = copy.deepcopy(ref)
    gmod_ext.convert(conv, ratio=0.0, layers="all", progress=False)
    with torch.no_grad():
        conv.gmod_router.weight.normal_(0, 0.5)
        conv.gmod_router.bias.normal_(0, 0.5)
    router = torch.nn.Linear(64, 2)
    router.load_state_dict(conv.gmod_router.state_dict())
    _gamma_reference(ref, router)
    batch = make_batch(arch)
    out_ref = ref(**_inputs(batch))
    out_conv = conv(**_inputs(batch))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out_conv.logits[valid], out_ref.logits[valid], atol=2e-5, rtol=1e-5)
    _logits_loss(out_ref, batch).backward()
    _logits_loss(out_conv, batch).backward()
    torch.testing.assert_close(conv.gmod_router.weight.grad, router.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(conv.gmod_router.bias.grad, router.bias.grad, atol=1e-5, rtol=1e-4)
    _compare_grads(ref, conv, atol=5e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- routing at ratio r
def _check_selection(model, batch, info, ratio, must_keep):
    am = batch["attention_mask"].bool()
    for layer_idx, (idx, count) in info.selection.items():
        S = am.shape[1]
        # the tight capacity: the largest row's exact count (no all-padding rows in the GEMMs)
        assert info.rows is not None and idx.shape[1] == capacity_of_rows(info.rows, ratio, S)
        assert idx.shape[1] == max(1, int(count.max()))
        assert idx.shape[1] <= capacity(S, ratio, info.max_forced)
        for b in range(am.shape[0]):
            kept = set(idx[b, : count[b]].tolist())
            assert not kept & set((~am[b]).nonzero().flatten().tolist()), "padding processed"
            forced = set(must_keep[b].nonzero().flatten().tolist())
            assert forced <= kept, f"layer {layer_idx} row {b}: forced tokens skipped"
            R = int((am[b] & ~must_keep[b]).sum())
            assert int(count[b]) == len(forced) + R - math.floor(ratio * R + 1e-9)


@pytest.mark.parametrize("arch,forced_mode", [(a, None) for a in ARCHS] + [("llava", "ignored_labels")])
def test_ratio_half_routing(arch, forced_mode):
    """convert's default masked routing: a LLaVA model keeps every text token (labelled answer tokens
    included) and routes the image; a text-only model keeps the label -100 prompt and routes the rest.
    ``forced="ignored_labels"`` on LLaVA keeps only the unlabelled text."""
    model = tiny_model(arch)
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], progress=False, forced=forced_mode)
    expected_mode = forced_mode or ("text" if arch == "llava" else "ignored_labels")
    assert model.config.gmod["forced"] == expected_mode
    batch = make_batch(arch, labels_prefix=6)
    seen = {}

    def hook(i):
        def f(module, args, output):
            seen[i] = (args[0].detach(), output.detach())

        return f

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(_text_layers(model))]
    model(**batch)
    for h in handles:
        h.remove()
    info = model.gmod_state.current
    if expected_mode == "text":
        forced = (batch["input_ids"] != IMAGE_TOKEN) & batch["attention_mask"].bool()
        assert ((batch["labels"] != -100) & forced).any()  # labelled tokens are among the forced ones
    else:
        forced = (batch["labels"] == -100) & batch["attention_mask"].bool()
        if arch == "llava":
            forced &= batch["input_ids"] != IMAGE_TOKEN
    assert forced.any()
    _check_selection(model, batch, info, 0.5, forced)
    # skipped tokens (and padding) leave each MoD layer bit-identical
    for li in [1, 2, 3]:
        x_in, y_out = seen[li]
        idx, count = info.selection[li]
        kept = torch.zeros_like(forced)
        for b in range(kept.shape[0]):
            kept[b, idx[b, : count[b]].long()] = True
        assert torch.equal(y_out[~kept], x_in[~kept])
        assert (y_out[kept] != x_in[kept]).any(-1).all()
        # kept tokens: the HF modules on the gathered tokens, explicit causal mask, gamma gate
        layer = _text_layers(model)[li]
        S = x_in.shape[1]
        cos, sin = _text_model(model).rotary_emb(x_in, torch.arange(S).unsqueeze(0))
        logits = plain_router_logits(x_in, layer.input_layernorm, model.gmod_router)
        with torch.no_grad():
            for b in range(kept.shape[0]):
                keep = idx[b, : count[b]].long()
                h, _, m = plain_block(layer, x_in[b, keep], cos[0, keep], sin[0, keep])
                expected = h + torch.sigmoid(logits[b, keep]).unsqueeze(-1) * m
                torch.testing.assert_close(y_out[b, keep], expected, atol=2e-5, rtol=1e-5)
    st = model.gmod_stats()
    assert set(st["layers"]) == {1, 2, 3}
    assert 0.0 < st["skip_ratio"] < 0.5
    for v in st["layers"].values():
        assert 0.0 < v["mean_p"] < 1.0 and math.isfinite(v["aux_loss"])


def test_routing_stats_are_computed_when_read_and_count_what_was_routed():
    """A forward leaves each MoD layer's statistics uncomputed (LazyStats: no kernels until read); read, they
    are what the layer routed, recomputed here in float64 from its selection, codes and router logits: the
    skipped share of the real tokens, of the routable ones, and the mean keep probability."""
    from gmod_ext.router import LazyStats

    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2], forced="none", router_init="normal", progress=False)
    batch = make_batch("llama")
    fm = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    fm[:, -5:] = True  # forced tokens
    seen = {}
    layer = _text_layers(model)[1]

    def record(_m, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    layer.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        model(**_inputs(batch), gmod_forced_mask=fm)
    info = model.gmod_state.current
    lazy = info.stats[1]
    assert isinstance(lazy, LazyStats) and "not computed" in repr(lazy)
    got = model.gmod_stats()["layers"][1]
    assert "not computed" not in repr(lazy)
    _, count = info.selection[1]
    codes = info.mask
    assert codes is not None and (codes == 1).any() and (codes == 2).any()  # forced and padding tokens both
    valid = (codes != 2).double()
    with torch.no_grad():
        p = torch.sigmoid(layer.gmod_logits(seen["x"]).double())
    count = count.double()
    forced, routable = (codes == 1).sum(1).double(), (codes == 0).sum(1).double()
    want = {"skip_ratio": 1 - count.sum() / valid.sum(),
            "routable_skip_ratio": 1 - (count - forced).sum() / routable.sum(),
            "mean_p": (p * valid).sum() / valid.sum(),
            "aux_loss": float(info.aux[1])}
    for k, v in want.items():
        assert math.isclose(got[k], float(v), rel_tol=1e-6, abs_tol=1e-7), (k, got[k], float(v))
    assert 0 < got["routable_skip_ratio"] < 1 and got["capacity"] == float(info.selection[1][0].shape[1])


def test_aux_loss_of_a_forward_without_autograd_is_computed_when_read():
    """In a forward without autograd (generation, evaluation) each MoD layer's aux loss term is computed only when
    read (no BCE kernel runs in the forward), and then equals the term of the same forward with autograd; the
    loss with labels (which adds 0.01 x their sum) and the statistics read it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountBCE(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.binary_cross_entropy_with_logits.default:
                CountBCE.n += 1
            return func(*args, **(kwargs or {}))

    model = tiny_model("llama")  # (forced="none": the routing does not depend on the labels)
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], router_init="normal", forced="none", progress=False)
    batch = make_batch("llama", labels_prefix=5)
    want = model(**batch)
    want_aux = {i: float(v) for i, v in model.gmod_state.current.aux.items()}
    assert len(want_aux) == 3 and all(v > 0 for v in want_aux.values())
    with torch.no_grad(), CountBCE():
        model(**_inputs(batch))
    assert CountBCE.n == 0
    info = model.gmod_state.current
    assert {i: float(info.aux[i]) for i in info.aux} == want_aux
    with torch.no_grad():
        got = model(**batch)
    assert float(got.loss) == float(want.loss)
    assert model.gmod_stats()["aux_loss"] == pytest.approx(sum(want_aux.values()), rel=1e-6)


def test_llava_text_forced_and_explicit_mask():
    model = tiny_model("llava")
    gmod_ext.convert(model, ratio=0.5, layers="all", variant="pmod", schedule="constant", router_init="normal")
    assert model.config.gmod["forced"] == "text"
    batch = make_batch("llava")
    model(**_inputs(batch))
    info = model.gmod_state.current
    text = (batch["input_ids"] != IMAGE_TOKEN) & batch["attention_mask"].bool()
    _check_selection(model, batch, info, 0.5, text)
    # only image tokens were skipped
    for idx, count in info.selection.values():
        assert int(count.sum()) == int(text.sum()) + 2 * (N := 16) - 2 * math.floor(0.5 * N)

    # explicit forced mask on a text model with forced="none"
    m2 = tiny_model("llama")
    gmod_ext.convert(m2, ratio=0.75, layers=[0, 2], forced="none")
    b2 = make_batch("llama")
    fm = torch.zeros_like(b2["attention_mask"], dtype=torch.bool)
    fm[:, -5:] = True
    m2(**_inputs(b2), gmod_forced_mask=fm)
    _check_selection(m2, b2, m2.gmod_state.current, 0.75, fm & b2["attention_mask"].bool())


def test_aux_loss_added_to_loss():
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
    batch = make_batch("llama", labels_prefix=4)
    out = model(**batch)
    lm = model.loss_function(logits=out.logits, labels=batch["labels"], vocab_size=128)
    aux = model.gmod_state.current.aux_total()
    torch.testing.assert_close(out.loss, lm + 0.01 * aux)
    assert math.isclose(model.gmod_stats()["aux_loss"], float(aux.detach()), rel_tol=1e-5)
    # return_dict=False path
    out_t = model(**batch, return_dict=False)
    torch.testing.assert_close(out_t[0], out.loss)
    # no labels: no aux in the (absent) loss
    assert model(**_inputs(batch)).loss is None
    # the loss has a gradient into the router through the aux term and the gate
    out.loss.backward()
    assert float(model.gmod_router.weight.grad.abs().sum()) > 0


def test_state_dict_keys_and_original_checkpoint():
    ref = tiny_model("qwen2")
    conv = copy.deepcopy(ref)
    gmod_ext.convert(conv, ratio=0.5, layers=[0, 3], router="per_layer", progress=False)
    keys_ref, keys_conv = set(ref.state_dict()), set(conv.state_dict())
    new = {f"model.layers.{i}.gmod_router.{p}" for i in (0, 3) for p in ("weight", "bias")}
    assert keys_conv == keys_ref | new
    fresh = tiny_model("qwen2", seed=5)
    gmod_ext.convert(fresh, ratio=0.5, layers=[0, 3], router="per_layer", progress=False)
    res = fresh.load_state_dict(ref.state_dict(), strict=False)
    assert set(res.missing_keys) == new and not res.unexpected_keys
    for k, v in ref.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


@pytest.mark.parametrize("arch,router", [("llama", "shared"), ("llava", "per_layer")])
def test_save_pretrained_round_trip(tmp_path, arch, router):
    model = tiny_model(arch)
    gmod_ext.convert(model, ratio=0.5, layers=[1, 3], router=router, positions="compact", progress=False)
    for p in model.parameters():  # non-trivial router weights
        if p.dtype == torch.float32 and p.shape[0] == 2:
            with torch.no_grad():
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    loaded = gmod_ext.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.gmod == model.config.gmod
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert set(sd_a) == set(sd_b)
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    batch = make_batch(arch)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    # lower precision load: base weights bf16, routers fp32
    low = gmod_ext.from_pretrained(tmp_path, dtype=torch.bfloat16)
    routers = [m for m in low.modules() if isinstance(m, gmod_ext.GmodRouter)]
    assert routers and all(r.weight.dtype == torch.float32 for r in routers)
    assert _text_layers(low)[0].mlp.up_proj.weight.dtype == torch.bfloat16
    # the plain transformers class still loads the checkpoint (routers ignored)
    plain = type(model).from_pretrained(tmp_path)
    assert not is_converted(plain)


@pytest.mark.parametrize("loss_of", ["model", "scaled", "logits"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_matches(reentrant, loss_of):
    """Loss and every gradient (the shared router's included) with gradient checkpointing equal those without,
    for both of torch's replays: the non-reentrant one (transformers' default) reuses the forward's graph; the
    reentrant one (PEFT's default) runs each layer's forward without autograd, then again with it inside the
    backward pass, where the router's aux loss terms get their gradient through the layers' outputs
    (AuxLossGradient). Backpropagated: the model's loss (with 0.01 x the aux loss), that loss scaled (as a
    gradient scaler or accumulation does: the aux share scales with it), or a loss of the logits alone (no
    aux share at all)."""
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[0, 1, 2], progress=False)
    ckpt = copy.deepcopy(model)
    kw = {"use_reentrant": reentrant}
    if hasattr(ckpt, "activation_checkpointing_enable"):
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()
    ckpt.train()
    batch = make_batch("llama", labels_prefix=5)

    def loss(m):
        out = m(**batch)
        if loss_of == "logits":
            return torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["input_ids"][:, 1:].flatten())
        return out.loss * (2.5 if loss_of == "scaled" else 1.0)

    l1, l2 = loss(model), loss(ckpt)
    torch.testing.assert_close(l2, l1)
    l1.backward()
    l2.backward()
    assert float(ckpt.gmod_router.weight.grad.abs().sum()) > 0
    _compare_grads(model, ckpt, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("router", ["shared", "per_layer"])
def test_layers_of_a_forward_share_the_router_difference_and_the_angles(router, monkeypatch):
    """The MoD layers of one forward take the shared router's ``W[1] - W[0]`` (and the bias difference) once,
    and expand the model's rotary angles to the batch once (RoutingInfo.memo); per-layer routers take their
    own. The loss and every gradient equal those of the same step with nothing shared (each layer computing
    both itself, as a standalone layer does), and nothing is kept once the forward is over."""
    from gmod_ext import mod_layer
    from gmod_ext.router import GmodRouter, RoutingInfo

    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers="all", router=router, router_init="normal", progress=False)
    n_mod = len(model.config.gmod["layers"])
    assert n_mod >= 3
    ref = copy.deepcopy(model)
    batch = make_batch("llama", labels_prefix=5)
    calls = {"difference": 0, "angles": 0}
    difference, batch_angles = GmodRouter.difference, mod_layer._batch_angles

    def count_difference(self):
        calls["difference"] += 1
        return difference(self)

    def count_angles(*args):
        calls["angles"] += 1
        return batch_angles(*args)

    monkeypatch.setattr(GmodRouter, "difference", count_difference)
    monkeypatch.setattr(mod_layer, "_batch_angles", count_angles)
    loss = model(**batch).loss
    assert calls == {"difference": 1 if router == "shared" else n_mod, "angles": 1}
    assert not model.gmod_state.current._memo  # let go at the end of the forward
    loss.backward()
    monkeypatch.setattr(RoutingInfo, "memo", lambda self, key, compute, keep=(): compute())
    calls.update(difference=0, angles=0)
    ref_loss = ref(**batch).loss
    assert calls == {"difference": n_mod, "angles": n_mod}
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    router_grads = [p.grad for n, p in model.named_parameters() if "gmod_router" in n]
    assert router_grads and all(float(g.abs().sum()) > 0 for g in router_grads)
    _compare_grads(ref, model, atol=1e-7, rtol=1e-6)


def test_cache_and_generate():
    model = tiny_model("llama").eval()
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
    assert model.config.use_cache is True and model.config.gmod["on_cache"] == "compact"
    ids = torch.randint(0, 100, (2, 6))
    assert type(model(ids, use_cache=True).past_key_values.layers[1]).__name__ == "GmodLayer"
    for uc in (True, False):
        assert model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=uc, pad_token_id=0).shape == (2, 9)
    err = tiny_model("llama").eval()
    gmod_ext.convert(err, ratio=0.5, layers=[1, 2], on_cache="error", progress=False)
    assert err.config.use_cache is False
    with pytest.raises(NotImplementedError, match="compact MoD KV cache"):
        err(ids, use_cache=True)


def test_arank_layers_and_prd_schedule():
    model = tiny_model("llama")
    calib = [make_batch("llama", seed=s) for s in range(2)]
    gmod_ext.convert(model, ratio=0.3, layers="arank", calibration_batches=calib, progress=False)
    g = model.config.gmod
    assert len(g["arank"]) == 4 and len(g["layers"]) == 3 and g["ratios"] == [0.3] * 3
    dense = sorted(set(range(4)) - set(g["layers"]))
    assert g["arank"][dense[0]] == max(g["arank"])

    m2 = tiny_model("llama", num_hidden_layers=6)
    gmod_ext.convert(m2, ratio=0.5, layers="all", variant="pmod")
    prd = prd_skip_ratios(6, 0.5, 0.1, 0.9)
    assert m2.config.gmod["layers"] == sorted(prd) and 0 not in prd  # R_0 = 1.0 > R_max: dense
    assert m2.config.gmod["ratios"] == [prd[i] for i in sorted(prd)]
    assert m2.config.gmod["forced"] == "none"  # text-only model: nothing to force for pmod
    batch = make_batch("llama")
    m2(**batch)
    # each layer keeps its own ratio's count of each row's real tokens (the counts are shared per ratio only)
    real = batch["attention_mask"].sum(1).tolist()
    info = m2.gmod_state.current
    assert len(set(prd.values())) > 1 and sorted(info.selection) == sorted(prd)
    for li, r in prd.items():
        assert info.selection[li][1].tolist() == [n - math.floor(r * n + 1e-9) for n in real], (li, r)


def test_convert_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="calibration_batches"):
        gmod_ext.convert(model, layers="arank")
    with pytest.raises(ValueError, match="out of range"):
        gmod_ext.convert(model, layers=[7])
    with pytest.raises(ValueError, match="skip ratio"):
        gmod_ext.convert(model, ratio=1.0, layers="all")
    gmod_ext.convert(model, layers="all")
    with pytest.raises(ValueError, match="already converted"):
        gmod_ext.convert(model, layers="all")
    gmod_ext.unconvert(model)
    assert not any(isinstance(m, gmod_ext.MoDDecoderLayer) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model("llama").state_dict())


def test_threshold_routing_in_eval_and_explicit_codes():
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.25, layers=[2], threshold=0.5, progress=False)
    with torch.no_grad():
        model.gmod_router.weight.normal_(0, 0.5)
    layer = model.model.layers[2]
    seen = {}
    h = layer.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0].detach()))
    batch = make_batch("llama", pad=False)
    codes = torch.zeros_like(batch["input_ids"], dtype=torch.int8)
    codes[:, :2] = 1
    model.eval()
    model(batch["input_ids"], gmod_routing_mask=codes)
    h.remove()
    idx, count = model.gmod_state.current.selection[2]
    # p from a plain-PyTorch router (RMSNorm + Linear(D, 2)), not the layer's own gmod_logits
    p = torch.sigmoid(plain_router_logits(seen["x"], layer.input_layernorm, model.gmod_router)).detach()
    assert bool(((p - 0.5).abs() > 1e-4).all())  # no near-tie at the threshold
    S = codes.shape[1]
    R = S - 2
    for b in range(codes.shape[0]):
        kept = idx[b, : count[b]].tolist()
        assert kept[:2] == [0, 1]
        expect = sorted([s for s in range(2, S) if p[b, s] > 0.5], key=lambda s: -p[b, s])[: R - int(0.25 * R)]
        assert kept[2:] == sorted(expect)
    # training mode ignores the threshold: exactly the top-k rule
    model.train()
    model(batch["input_ids"], gmod_routing_mask=codes)
    _, count = model.gmod_state.current.selection[2]
    assert count.tolist() == [2 + R - int(0.25 * R)] * codes.shape[0]


def test_deepcopy_and_pickle_after_forward(tmp_path):
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
    batch = make_batch("llama")
    out = model(**batch)
    out.loss.backward()  # the last forward's record holds tensors with autograd history
    clone = copy.deepcopy(model)
    assert clone.gmod_state.router is clone.gmod_router and clone.gmod_stats.model is clone
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    for m in (clone, loaded):
        torch.testing.assert_close(m(**batch).logits, out.logits, rtol=0, atol=0)
        assert m.gmod_stats()["layers"].keys() == {1, 2}


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_inner_decoder_called_directly_excludes_padding(arch):
    model = tiny_model(arch)
    gmod_ext.convert(model, ratio=0.5, layers=[0, 3], progress=False)
    batch = make_batch(arch)
    text = _text_model(model)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    text(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    info = model.gmod_state.current
    assert info.mask is not None and sorted(info.selection) == [0, 3]
    _check_selection(model, batch, info, 0.5, torch.zeros_like(batch["attention_mask"], dtype=torch.bool))
    # through the top-level model the inner hook passes the top-level routing on (labels -> forced)
    model(**make_batch(arch, labels_prefix=4))
    assert model.gmod_state.current.max_forced >= 4


def test_routing_is_in_flight_only_during_a_forward():
    """GmodState.active (the routing MoD layers take when their model does not pass keywords on, e.g.
    Falcon) is set by the forward hook and cleared when the forward returns or raises: a MoD layer called
    on its own afterwards routes its own input, not a stale batch's."""
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
    batch = make_batch("llama")
    with torch.no_grad():
        model(**batch)
    assert model.gmod_state.active is None and model.gmod_state.current is not None
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    bad["input_ids"][0, 0] = 10 ** 6  # out of the vocabulary: the embedding raises inside the forward
    with pytest.raises(IndexError):
        model(**bad)
    assert model.gmod_state.active is None
    layer = model.model.layers[1]
    x = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x, position_embeddings=model.model.rotary_emb(x, torch.arange(5).unsqueeze(0)))
    assert y.shape == x.shape and torch.isfinite(y).all()


# ----------------------------------------------------------------------------- attention="sdpa"
def test_sdpa_attention_matches_gmod_attention():
    """convert(attention="sdpa") computes the same model as attention="gmod" (what "auto" runs on CPU): float64, GQA,
    ratio 0.5 with padding and forced tokens (so rows keep different counts and C has padding slots),
    the loss and every gradient; then a cached prefill (SDPA) + compact-cache decode (gmod) generates
    the same tokens, and set_attention switches back and forth."""
    batch = make_batch("llama", B=3, S=28, labels_prefix=6)
    batch["attention_mask"][0, -5:] = 0  # right padding on another row: three different kept counts
    batch["labels"][0, -5:] = -100
    models = {}
    for att in ("gmod", "sdpa"):
        m = tiny_model("llama", dtype=torch.float64, seed=3)
        gmod_ext.convert(m, ratio=0.5, layers=[0, 2, 3], attention=att, progress=False)
        with torch.no_grad():  # a trained-looking router: separated logits, no near-ties
            m.gmod_router.weight.normal_(0.0, 1.0)
        assert m.config.gmod["attention"] == att
        models[att] = m
    models["sdpa"].load_state_dict(models["gmod"].state_dict())
    outs = {}
    for att, m in models.items():
        out = m(**batch)
        out.loss.backward()
        outs[att] = out
    counts = [c.tolist() for _, c in models["gmod"].gmod_state.current.selection.values()]
    assert any(len(set(c)) > 1 for c in counts), counts  # rows with different counts were exercised
    for att in ("gmod", "sdpa"):
        for li, (idx, cnt) in models[att].gmod_state.current.selection.items():
            ref_idx, ref_cnt = models["gmod"].gmod_state.current.selection[li]
            assert torch.equal(cnt, ref_cnt) and torch.equal(idx, ref_idx)
    torch.testing.assert_close(outs["sdpa"].loss, outs["gmod"].loss, atol=1e-12, rtol=1e-10)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(outs["sdpa"].logits[valid], outs["gmod"].logits[valid], atol=1e-10, rtol=1e-9)
    _compare_grads(models["gmod"], models["sdpa"], atol=1e-10, rtol=1e-8)

    ids = batch["input_ids"][:2, 3:]
    gen = {}
    for att, m in models.items():
        m.eval()
        gen[att] = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen["sdpa"], gen["gmod"])

    m = models["sdpa"]
    assert gmod_ext.set_attention(m, "gmod") is m and m.gmod_state.config.attention == "gmod"
    assert m.config.gmod["attention"] == "gmod"
    with pytest.raises(ValueError, match="attention='flash'"):
        gmod_ext.set_attention(m, "flash")
    with pytest.raises(ValueError, match="not converted"):
        gmod_ext.set_attention(tiny_model("llama"), "sdpa")
    with pytest.raises(ValueError, match="attention"):
        gmod_ext.convert(tiny_model("llama"), layers="all", attention="flash", progress=False)
