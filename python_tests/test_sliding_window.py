"""Sliding-window and soft-capped attention in MoD layers (gmod_ext.masked_attention) and the window
trimming of the compact KV cache.

* the op: ``position_masked_attention`` against a float64 loop over every (row, query, head) with
  the visible keys listed one by one, forward and gradients, float32 and bfloat16 (error at most 2x
  that of the same loop run in bfloat16), GQA, key lengths 0 and 1, windows 1 / 3, a soft-cap;
* keeping every token, a converted Mistral / Gemma-2 / Gemma-3 with windows shorter than the prompt
  (and a Gemma-2 whose soft-cap binds) gives Hugging Face's logits, gradients and greedy tokens and
  scores, while its MoD caches drop what left the window;
* skipping: the cached generation equals the no-cache recompute, and equals itself with the
  trimming switched off; prompt-lookup decoding equals greedy; a crop past a trim is refused unless
  the past was recorded.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import assert_keep_all_equals_hf, mod_slots, num_threads, padded_prompt, skipping_llama, \
    text_config_kwargs, tiny_model, transformers
from references import position_attention_ref

import gmod_ext
from gmod_ext.cache import GmodLayer_cls
from gmod_ext.masked_attention import attention_softcap, position_masked_attention


GMOD_OPS = ()  # the op tests' CUDA case needs no gmod kernel: the position-masked path is plain torch


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


# ----------------------------------------------------------------------------- the op
def _ascending(g, B, n, span):
    """[B, n] int32: per row n distinct ascending positions below ``span``."""
    return torch.stack([torch.randperm(span, generator=g)[:n].sort().values for _ in range(B)]).to(torch.int32)


def _case(seed, Hk, decode, dtype):
    g = torch.Generator().manual_seed(seed)
    B, Hq, d = 3, 4, 16
    Ck = 11
    Cq = 3 if decode else Ck
    k_pos = _ascending(g, B, Ck, 30)
    k_len = torch.tensor([Ck, 1, 0] if decode else [Ck, 7, 1], dtype=torch.int32)
    if decode:  # the step's queries are the last stored keys of their row (row 2 stores nothing)
        q_pos = torch.stack([k_pos[b, max(int(k_len[b]) - Cq, 0):][:Cq] if int(k_len[b]) >= Cq
                             else torch.full((Cq,), 31, dtype=torch.int32) for b in range(B)])
    else:  # a MoD layer's whole-sequence call: both are the routing's idx, -1 past the row's count
        k_pos[torch.arange(Ck).unsqueeze(0) >= k_len.unsqueeze(1)] = -1
        q_pos = k_pos.clone()
    q = torch.randn(B, Cq, Hq, d, generator=g).to(dtype)
    k = torch.randn(B, Ck, Hk, d, generator=g).to(dtype)
    v = torch.randn(B, Ck, Hk, d, generator=g).to(dtype)
    return q, k, v, q_pos, k_pos, k_len


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (1, None), (None, 0.8), (3, 0.8)])
@pytest.mark.parametrize("Hk", [1, 2, 4])
@pytest.mark.parametrize("decode", [False, True])
def test_op_matches_float64_loop(window, softcap, Hk, decode, device):
    case = _case(10 * Hk + decode, Hk, decode, torch.float32)
    q, k, v, q_pos, k_pos, k_len = (t.to(device) for t in case)
    scale = 0.7
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    saved = [t.detach().clone() for t in (q, k, v, q_pos, k_pos, k_len)]
    inputs = (q, k, v, q_pos, k_pos, k_len)
    out = position_masked_attention(*inputs, scale, window=window, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert bool(torch.isfinite(out).all())
    out = out.cpu()
    q_pos, k_pos, k_len = case[3:]
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, visible = position_attention_ref(q64, k64, v64, q_pos, k_pos, k_len, scale, window, softcap)
    assert visible.any() and (~visible).any() or decode  # both kinds of rows occur (the decode case: row 2)
    torch.testing.assert_close(out.double()[visible], ref[visible], **tol)
    # gradients through the rows that see something (the others are never read by a MoD layer)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * visible[..., None, None]
    (out.double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert bool(torch.isfinite(a).all()), name
        torch.testing.assert_close(a.cpu().double(), b, **tol, msg=lambda m: f"{name}: {m}")
    for a, b in zip(inputs, saved):  # inputs untouched
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("window,softcap", [(None, None), (3, None), (3, 0.8)])
@pytest.mark.parametrize("Hk", [1, 4])
@pytest.mark.parametrize("decode", [False, True])
def test_op_with_sinks_matches_float64_loop(window, softcap, Hk, decode, device):
    """GPT-OSS's sinks: one logit per head joins each softmax and is dropped; gradients reach the sinks."""
    case = _case(100 + 10 * Hk + decode, Hk, decode, torch.float32)
    q, k, v, q_pos, k_pos, k_len = (t.to(device) for t in case)
    sinks = torch.randn(q.shape[2], generator=torch.Generator().manual_seed(3)).to(device)
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    q, k, v, sinks = (t.clone().requires_grad_() for t in (q, k, v, sinks))
    saved = sinks.detach().clone()
    out = position_masked_attention(q, k, v, q_pos, k_pos, k_len, 0.7, window=window, softcap=softcap, sinks=sinks)
    q64, k64, v64, s64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v, sinks))
    ref, visible = position_attention_ref(q64, k64, v64, *case[3:], 0.7, window, softcap, sinks=s64)
    without, _ = position_attention_ref(q64, k64, v64, *case[3:], 0.7, window, softcap)
    assert float((ref - without).detach()[visible].abs().max()) > 1e-2  # the sinks matter here
    torch.testing.assert_close(out.cpu().double()[visible], ref[visible], **tol)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * visible[..., None, None]
    (out.cpu().double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv"),
                       (sinks.grad, s64.grad, "dsinks")):
        torch.testing.assert_close(a.cpu().double(), b, **tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(sinks.detach(), saved)
    with pytest.raises(ValueError, match=r"sinks must be \[Hq\]"):
        position_masked_attention(q, k, v, q_pos, k_pos, k_len, 0.7, sinks=sinks[:-1])


@pytest.mark.parametrize("window,softcap", [(3, None), (None, 0.8), (4, 1.5)])
def test_op_bfloat16_within_twice_the_bfloat16_error(window, softcap, device):
    q, k, v, q_pos, k_pos, k_len = _case(5, 2, False, torch.bfloat16)
    out = position_masked_attention(*(t.to(device) for t in (q, k, v, q_pos, k_pos, k_len)), 0.5, window=window,
                                    softcap=softcap)
    assert out.dtype == torch.bfloat16 and out.device.type == device
    out = out.cpu()
    ref, visible = position_attention_ref(q, k, v, q_pos, k_pos, k_len, 0.5, window, softcap)
    low, _ = position_attention_ref(q, k, v, q_pos, k_pos, k_len, 0.5, window, softcap, dtype=torch.bfloat16)
    err = (out.double() - ref)[visible].abs().max()
    err_low = (low.double() - ref)[visible].abs().max()
    assert err <= 2 * err_low + 1e-3, (float(err), float(err_low))


def test_op_rejects_bad_shapes_and_caps():
    q, k, v, q_pos, k_pos, k_len = _case(1, 2, False, torch.float32)
    with pytest.raises(ValueError, match="q_pos / k_pos"):
        position_masked_attention(q, k, v, q_pos[:, :3], k_pos, k_len, 1.0)
    with pytest.raises(ValueError, match="k_len"):
        position_masked_attention(q, k, v, q_pos, k_pos, k_len[:2], 1.0)
    with pytest.raises(ValueError, match="multiple"):
        position_masked_attention(q[:, :, :3], k, v, q_pos, k_pos, k_len, 1.0)
    with pytest.raises(ValueError, match=r"\[B, C, H, d\]"):
        position_masked_attention(q[0], k, v, q_pos, k_pos, k_len, 1.0)

    class Attn:
        attn_logit_softcapping = -2.0

    with pytest.raises(ValueError, match="positive"):
        attention_softcap(Attn())
    Attn.attn_logit_softcapping = 0.0
    assert attention_softcap(Attn()) is None


# ----------------------------------------------------------------------------- keep-all == Hugging Face
W = 5


def _hf(cls_name, cfg_name, **over):
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**text_config_kwargs(**over))
    cfg.pad_token_id = None
    return getattr(transformers, cls_name)(cfg).float().eval()


def _gemma2_binding_cap():
    """A Gemma-2 whose soft-cap of 1.0 changes its logits: its query projections scaled up so that the
    attention scores reach several units (random init keeps them near 0, where tanh is linear)."""
    model = _hf("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=W, attn_logit_softcapping=1.0,
                attn_implementation="eager")  # (transformers < 5.24 ran Gemma-2 on SDPA, which skips the cap)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(25.0)
    return model


BUILDERS = {
    "mistral": lambda: tiny_model("mistral", sliding_window=W).eval(),
    "gemma2": _gemma2_binding_cap,
    "gemma3": lambda: _hf("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16, sliding_window=W,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
}


def _every(window: int) -> int:
    """Positions between two trims of a windowed MoD cache (GmodLayer.trim_window)."""
    return max(1, window // 8)


def _keep_all(name):
    ref, model = BUILDERS[name](), BUILDERS[name]()
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, aux_coef=0.0, progress=False)
    return ref, model


def test_the_soft_cap_binds_in_the_gemma2_model():
    """Otherwise the Gemma-2 tests below could not tell a soft-capped attention from a plain one."""
    model = _gemma2_binding_cap()
    ids, am = padded_prompt(2, 14)
    with torch.no_grad():
        capped = model(ids, attention_mask=am).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        plain = model(ids, attention_mask=am).logits
    assert float((capped - plain).abs().max()) > 1e-2 * float(capped.abs().max())


def test_the_cap_follows_the_attention_implementation():
    """transformers' SDPA attention skips the soft-cap (silently before 5.24, where Gemma-2 ran on it by
    default): a layer configured so computes no cap, and neither does its MoD layer."""
    model = _gemma2_binding_cap()
    assert attention_softcap(model.model.layers[0].self_attn) == 1.0
    model.config._attn_implementation = "sdpa"
    assert attention_softcap(model.model.layers[0].self_attn) is None


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keep_all_logits_and_gradients_equal_hf(name):
    ref, model = _keep_all(name)
    assert_keep_all_equals_hf(ref, model, B=3, S=16, pad=(0, 3, 6), seed=0)  # aux_coef 0: the plain LM loss


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_keep_all_greedy_equals_hf_and_the_cache_drops_what_left_the_window(name):
    ref, model = _keep_all(name)
    ids, am = padded_prompt(3, 14, pad=(0, 3, 6))
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    out_ref = ref.generate(ids, attention_mask=am, **gen)
    out = model.generate(ids, attention_mask=am, **gen)
    assert torch.equal(out.sequences, out_ref.sequences)
    for step, (a, b) in enumerate(zip(out.scores, out_ref.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    cache = out.past_key_values
    windowed = [i for i, s in mod_slots(cache).items() if s.window is not None]
    assert windowed and all(s.window == W for s in mod_slots(cache).values() if s.window is not None)
    for i in windowed:
        slot = cache.layers[i]
        seen = slot.seen
        assert seen == 14 + 15 and slot._trim_floor >= seen - W - _every(W), i
        for r, n in enumerate(slot.host_lens()):  # keep-all: exactly the positions since the last trim
            kept = slot.positions[r, :n].tolist()
            assert kept == list(range(slot._trim_floor + 1, seen)), (i, r, kept)
        assert slot.capacity <= W + 2 * _every(W) + 1
    # the dense equivalent of a windowed MoD slot is what Hugging Face's sliding-window layer holds
    mem, mem_ref = gmod_ext.kv_memory_report(cache), gmod_ext.kv_memory_report(out_ref.past_key_values)
    for i in windowed:
        assert mem["layers"][i]["dense_bytes"] == mem_ref["layers"][i]["bytes"] > 0, i


# ----------------------------------------------------------------------------- skipping
def _windowed(positions="original", window=6):
    return skipping_llama(arch="mistral", model_kw=dict(sliding_window=window), positions=positions)


def _gen(model, ids, am, **kw):
    return model.generate(ids, attention_mask=am, max_new_tokens=24, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True, **kw)


def _same_generation(a, b, tol=1e-4):
    assert torch.equal(a.sequences, b.sequences), (a.sequences, b.sequences)
    for step, (x, y) in enumerate(zip(a.scores, b.scores)):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("positions,window", [("original", 6), ("compact", 6), ("original", 17), ("compact", 17)])
def test_skipping_cache_equals_no_cache_and_untrimmed(positions, window, monkeypatch):
    """The compact positions count the dropped tokens too (a trim that reset them moves later keys'
    rotary positions: caught here by the scores). Window 6 trims at every position, 17 every second."""
    model = _windowed(positions, window=window)
    ids, am = padded_prompt(3, 14, pad=(0, 3, 5), seed=2)
    cached = _gen(model, ids, am)
    slots = mod_slots(cached.past_key_values)
    assert all(s._trim_floor > 0 and int(s.dropped.sum()) > 0 for s in slots.values())
    _same_generation(cached, _gen(model, ids, am, use_cache=False))
    monkeypatch.setattr(GmodLayer_cls(), "trim_window", lambda self, force=False: None)
    untrimmed = _gen(model, ids, am)
    _same_generation(cached, untrimmed, tol=1e-5)
    # the decode steps both kept and skipped tokens in these layers (23 positions fed after the prompt)
    full = mod_slots(untrimmed.past_key_values)
    kept = sum(sum(p >= 14 for p in s.positions[r, : s.host_lens()[r]].tolist()) for s in full.values() for r in range(3))
    assert 0 < kept < len(full) * 3 * 23
    mem_trimmed = gmod_ext.kv_memory_report(cached.past_key_values)
    mem_full = gmod_ext.kv_memory_report(untrimmed.past_key_values)
    assert mem_trimmed["total_bytes"] < mem_full["total_bytes"]
    for s in slots.values():  # a row holds at most the positions of its last W + W // 8 (+ the last step)
        for r, n in enumerate(s.host_lens()):
            assert all(p > s.seen - s.window - _every(s.window) - 1 for p in s.positions[r, :n].tolist())


def test_prompt_lookup_decoding_on_a_windowed_model_equals_greedy():
    if not hasattr(transformers.cache_utils.DynamicSlidingWindowLayer, "activate_past_recording"):
        pytest.skip(f"transformers {transformers.__version__}'s own sliding-window cache cannot be cropped past its window")
    model = _windowed()
    g = torch.Generator().manual_seed(3)
    base = torch.randint(1, 100, (1, 6), generator=g)
    ids = torch.cat([base, base, base[:, :3]], 1)
    am = torch.ones_like(ids)
    ref = _gen(model, ids, am)
    out = _gen(model, ids, am, prompt_lookup_num_tokens=3)
    _same_generation(out, ref)


def _step(model, cache, tokens):
    """Feed ``tokens`` [1, n] one at a time (batch 1, no padding); the last step's logits."""
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            seen = cache.get_seq_length()
            am = torch.ones(1, seen + 1, dtype=torch.long)
            out = model(tokens[:, t : t + 1], attention_mask=am, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


def test_crop_past_a_trim_needs_the_recorded_past():
    # every layer a MoD layer, so that no dense sliding-window slot has its own rules about crops
    model = skipping_llama(arch="mistral", model_kw=dict(sliding_window=4), layers=(0, 1, 2, 3))
    g = torch.Generator().manual_seed(8)
    ids, new = torch.randint(1, 100, (1, 10), generator=g), torch.randint(1, 100, (1, 8), generator=g)

    def prefilled():
        cache = model.gmod_new_cache()
        with torch.no_grad():
            model(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, use_cache=True)
        return cache

    plain = prefilled()
    _step(model, plain, new)
    slot = mod_slots(plain)[1]
    assert slot._trim_floor >= 18 - 4 - 2
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        slot.crop(-3)
    # recorded: nothing is dropped until the crop, and the cropped cache goes on like one never fed them
    rec = prefilled()
    for s in mod_slots(rec).values():
        s.activate_past_recording()
    floors = {i: s._trim_floor for i, s in mod_slots(rec).items()}  # the prefill's trims
    _step(model, rec, new[:, :5])
    assert {i: s._trim_floor for i, s in mod_slots(rec).items()} == floors  # nothing dropped while recording
    for layer in rec.layers:
        layer.crop(-3)  # back to 12 positions: and the window's drop happens now
    assert rec.get_seq_length() == 12
    assert all(s._trim_floor == 12 - 4 > floors[i] for i, s in mod_slots(rec).items())
    fresh = prefilled()
    _step(model, fresh, new[:, :2])
    torch.testing.assert_close(_step(model, rec, new[:, 2:6]), _step(model, fresh, new[:, 2:6]), rtol=1e-5, atol=1e-5)


def test_windowed_soft_capped_layer_compiles_fullgraph():
    """The position-masked path has no host syncs: a Gemma-2 MoD layer (window 5 < 12 tokens, binding
    soft-cap) compiles with fullgraph=True and matches eager, forward and gradients."""
    from gmod_ext.mod_layer import make_mod_layer
    from gmod_ext.router import RoutingInfo

    model = _gemma2_binding_cap()
    layer = make_mod_layer(model.model.layers[0], 0.5, layer_idx=0)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    pe = model.model.rotary_emb(x, torch.arange(12).unsqueeze(0))
    mask = torch.zeros(2, 12, dtype=torch.int8)
    mask[1, :3] = 2
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = layer(xe, position_embeddings=pe, gmod_routing=RoutingInfo(mask, 0))
    yc = torch.compile(layer, backend="aot_eager", fullgraph=True)(xc, position_embeddings=pe,
                                                                  gmod_routing=RoutingInfo(mask, 0))
    torch.testing.assert_close(yc, ye)
    w = torch.randn(ye.shape, generator=torch.Generator().manual_seed(2))
    ge = torch.autograd.grad((ye * w).sum(), [xe, layer.self_attn.q_proj.weight])
    gc = torch.autograd.grad((yc * w).sum(), [xc, layer.self_attn.q_proj.weight])
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)


def test_beam_search_on_a_windowed_model_cache_equals_no_cache():
    """Beam search reorders the rows of every cache slot after the trims began (``dropped`` goes with its
    row, or the compact positions of later tokens would be another row's)."""
    model = _windowed("compact", window=4)
    ids, am = padded_prompt(2, 12, pad=(0, 3), seed=4)
    kw = dict(attention_mask=am, max_new_tokens=16, num_beams=3, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True)
    cached, full = model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw)
    _same_generation(cached, full)
    dropped = [s.dropped.tolist() for s in mod_slots(cached.past_key_values).values()]
    assert any(len(set(d)) > 1 for d in dropped), dropped  # the beams dropped different numbers of tokens
