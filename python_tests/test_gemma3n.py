"""Gemma 3n's decoder blocks as MoD layers (gmod_ext.block_extras): AltUp's K hidden-state streams per token
(predicted from each other before the block, corrected with its output after it), the LAuReL branch beside the
attention, per-layer inputs (added to streams 1..K-1 after the correction), activation-sparse MLPs, sliding
windows and KV sharing (refused per layer, as for Gemma 4).

References are Hugging Face's own Gemma 3n modules: the dense model in float64 (its float32 error is the
yardstick of each tolerance), and for skipping, the dense layer run on the kept tokens alone.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gmod_hf_utils import assert_keep_all_generation_equals_dense, assert_keep_all_logits_equal_dense_float64, \
    decode_step_io, one_skipping_layer, padded_ids as _ids, rel_err as _rel, transformers

import gmod_ext
from gmod_ext._hf import find_decoder

if not hasattr(transformers, "Gemma3nTextConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Gemma 3n", allow_module_level=True)

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
K = 4  # AltUp streams
SLIDING, FULL = 1, 2


def _gemma3n(kv_shared=0, **over):
    kw = dict(vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_size_per_layer_input=8, laurel_rank=8,
              altup_num_inputs=K, num_kv_shared_layers=kv_shared, sliding_window=5, layer_types=list(LAYER_TYPES),
              activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0], pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
    kw.update(over)
    torch.manual_seed(0)
    model = transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(**kw)).float().eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # AltUp's coefficients and output scale start at 0: draw them, so that they act
        for name, p in model.named_parameters():
            if "altup.correction_coefs" in name or "altup.prediction_coefs" in name or "correct_output_scale" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("kv_shared", [0, 2])
def test_every_token_kept_gives_the_dense_model(kv_shared):
    """ratio 0, no gate: the converted model's logits (float32) are the dense model's in float64, within a few
    times the dense model's own float32 error; with KV sharing, the layers that store or reuse keys stay dense."""
    model = _gemma3n(kv_shared)
    converted = assert_keep_all_logits_equal_dense_float64(model, *_ids())
    assert converted == ([0, 1] if kv_shared else list(range(6)))


def _dense_on_kept(layer, x, e, pe, kept):
    """The Hugging Face layer (eager attention) on the kept tokens of one row alone, all K streams: causal
    among them (a sliding window counted in original positions), at their original positions."""
    pos = torch.tensor(kept)
    allowed = pos[None, :] <= pos[:, None]
    if layer.self_attn.sliding_window is not None:
        allowed &= (pos[:, None] - pos[None, :]) < layer.self_attn.sliding_window
    bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))[None, None]
    cos, sin = (t[:, kept] for t in pe)
    with torch.no_grad():
        return layer(x[:, :, kept], (cos, sin), e[:, kept], shared_kv_states={}, attention_mask=bias)


@pytest.mark.parametrize("which", [SLIDING, FULL])
def test_skipping_matches_the_dense_layer_on_the_kept_tokens_and_keeps_the_skipped_streams(which):
    """ratio 0.5, no gate, a random router: each kept token's K streams are the Hugging Face layer's on the kept
    tokens alone (AltUp's prediction and correction, LAuReL, the per-layer input, the activation-sparse MLP in the
    sliding layer); a skipped token's K streams leave the layer exactly as they came."""
    model = _gemma3n()
    layer_type = LAYER_TYPES[which]
    dense, layer = one_skipping_layer(model, which)
    B, S, D = 2, 16, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(K, B, S, D, generator=g)
    e = torch.randn(B, S, 8, generator=g)
    pos = torch.arange(S).unsqueeze(0)
    pe = model.model.rotary_emb(x, pos, layer_type)
    with torch.no_grad():
        y = layer(x, pe, e, shared_kv_states={}, attention_mask=None, position_ids=pos)
    assert y.shape == x.shape
    idx, count = model.gmod_state.scratch.selection[which]
    assert count.tolist() == [S // 2] * B
    pe64 = tuple(t.double() for t in pe)
    for b in range(B):
        kept = sorted(idx[b, : count[b]].tolist())
        skipped = [t for t in range(S) if t not in kept]
        want = _dense_on_kept(dense, x[:, b:b + 1].double(), e[b:b + 1].double(), pe64, kept)
        want32 = _dense_on_kept(copy.deepcopy(dense).float(), x[:, b:b + 1], e[b:b + 1], pe, kept)
        base = max(_rel(want32, want), 1e-7)
        assert _rel(y[:, b:b + 1, kept], want) <= 8 * base, (b, _rel(y[:, b:b + 1, kept], want), base)
        torch.testing.assert_close(y[:, b, skipped], x[:, b, skipped], rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["gamma", "mod", "pmod"])
def test_gated_training_step_against_float64(variant):
    """A training step at ratio 0.5 with each gate: the converted float32 model's loss and every weight's gradient
    (router, AltUp, LAuReL, per-layer tables included) are the same converted model's in float64, within a few
    times float32's rounding (the routing is the same: a float32 and a float64 router pick the same tokens here)."""
    model = _gemma3n()
    kw = {"schedule": "constant"} if variant == "pmod" else {}
    gmod_ext.convert(model, ratio=0.5, layers="all", variant=variant, router_init="normal", forced="none",
                     progress=False, **kw)
    model.train()
    m64 = copy.deepcopy(model).double()
    ids, mask = _ids()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(ids, attention_mask=mask, labels=labels).loss
    loss64 = m64(ids, attention_mask=mask, labels=labels).loss
    for a, b in zip(model.gmod_state.current.selection.values(), m64.gmod_state.current.selection.values()):
        assert torch.equal(a[1], b[1]) and all(set(a[0][r, :n].tolist()) == set(b[0][r, :n].tolist())
                                               for r, n in enumerate(a[1].tolist()))
    assert abs(float(loss) - float(loss64)) <= 1e-5 * abs(float(loss64))
    loss.backward()
    loss64.backward()
    p64 = dict(m64.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        t = p64[name].grad
        if t is None or float(t.norm()) == 0.0:
            assert p.grad is None or float(p.grad.abs().max()) == 0.0, name
            continue
        err = float((p.grad.double() - t).norm() / t.norm())
        assert err < 1e-4, (name, err)
        checked += 1
    assert checked > 50 and float(model.gmod_router.weight.grad.abs().sum()) > 0


def test_generation_with_every_token_kept_equals_dense():
    """The compact-cache decode path runs the same AltUp block: with ratio 0, no gate and decode_threshold 0,
    greedy generation and its scores equal the dense model's (KV-sharing layers stay dense)."""
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    assert_keep_all_generation_equals_dense(_gemma3n(kv_shared=2), ids)


@pytest.mark.parametrize("variant", ["gamma", "pmod"])
def test_a_decode_step_that_keeps_no_token_leaves_the_streams(variant):
    """Decode with decode_threshold 1 (no new token is kept): the MoD layer returns its K streams as they came
    (p-MoD: each scaled by the token's STRing weight ``0.2 tanh(l) + 1``)."""
    model = _gemma3n()
    kw = {"schedule": "constant"} if variant == "pmod" else {}
    gmod_ext.convert(model, ratio=0.5, layers=[FULL], variant=variant, decode_threshold=1.0, router_init="normal",
                     progress=False, **kw)
    layer = find_decoder(model).layers[FULL]
    x, y = decode_step_io(model, layer)
    assert x.shape[:3] == (K, 1, 1)
    with torch.no_grad():
        if variant == "gamma":
            torch.testing.assert_close(y, x, rtol=0, atol=0)
        else:
            w = 0.2 * torch.tanh(layer.gmod_logits(x[0])) + 1.0
            assert float((w - 1).abs().max()) > 1e-4
            torch.testing.assert_close(y, x * w[None, :, :, None], rtol=1e-6, atol=1e-6)


def test_streams_of_the_wrong_shape_are_an_error():
    model = _gemma3n()
    gmod_ext.convert(model, ratio=0.5, layers=[0], progress=False)
    layer = find_decoder(model).layers[0]
    x = torch.randn(1, 6, 64)
    pe = model.model.rotary_emb(x, torch.arange(6).unsqueeze(0), "sliding_attention")
    e = torch.randn(1, 6, 8)
    with pytest.raises(ValueError, match=r"takes its 4 hidden-state streams as \[K, B, S, D\] = \[4, B, S, D\], "
                                         r"got \(1, 6, 64\)"):
        layer(x, pe, e, shared_kv_states={}, attention_mask=None)
    with pytest.raises(ValueError, match=r"got \(3, 1, 6, 64\)"):
        layer(torch.randn(3, 1, 6, 64), pe, e, shared_kv_states={}, attention_mask=None)
