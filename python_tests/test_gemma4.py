"""Gemma 4's decoder blocks as MoD layers (gmod_ext.block_extras): per-layer input embeddings, the layer
scalar, values that are the keys (attention_k_eq_v) with a value norm, the parallel MoE branch, KV sharing
(refused per layer), and the bidirectional attention over image tokens that mm_token_type_ids mark in the
sliding-window layers of the models with use_bidirectional_attention="vision".

References are Hugging Face's own Gemma 4 modules: the dense model in float64 (its float32 error is the
yardstick of each tolerance), and for skipping, the dense layer run on the kept tokens alone.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gmod_hf_utils import assert_keep_all_generation_equals_dense, assert_keep_all_logits_equal_dense_float64, \
    decode_step_io, one_skipping_layer, padded_ids as _ids, rel_err as _rel, transformers

import gmod_ext
from gmod_ext._hf import find_decoder, token_type_rule
from gmod_ext.mod_layer import make_mod_layer

if not hasattr(transformers, "Gemma4TextConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Gemma 4", allow_module_level=True)

LAYER_TYPES = ["sliding_attention"] * 2 + ["full_attention"] + ["sliding_attention"] * 2 + ["full_attention"]
FULL = 2  # a full-attention layer (no window, its own head dim)
VARIANTS = {
    "per_layer_inputs": {},
    "no_per_layer_inputs": dict(hidden_size_per_layer_input=0),
    "values_are_keys": dict(attention_k_eq_v=True),  # full-attention layers have no v_proj
    "moe_branch": dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
    "kv_sharing": dict(num_kv_shared_layers=2),  # layers 2, 3 store keys / values, 4, 5 reuse them
}


def _text_kwargs(**over):
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16,
              sliding_window=5, layer_types=list(LAYER_TYPES), global_head_dim=32, vocab_size_per_layer_input=128,
              hidden_size_per_layer_input=8)
    kw.update(over)
    return kw


def _scalars_drawn(model, seed=0):
    """Layer scalars away from their init of 1, so that applying one or not (or twice) shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("layer_scalar"):
                buf.copy_(torch.empty(buf.shape).uniform_(0.3, 1.6, generator=g))
    return model


def _gemma4(**over):
    cfg = transformers.Gemma4TextConfig(**_text_kwargs(**over))
    cfg._experts_implementation = "eager"  # (its grouped-GEMM experts take no float64)
    torch.manual_seed(0)
    return _scalars_drawn(transformers.Gemma4ForCausalLM(cfg).float().eval())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_token_kept_gives_the_dense_model(variant):
    """ratio 0, no gate: the converted model's logits (float32) are the dense model's in float64, within a few
    times the dense model's own float32 error."""
    model = _gemma4(**VARIANTS[variant])
    converted = assert_keep_all_logits_equal_dense_float64(model, *_ids())
    assert converted == ([0, 1] if variant == "kv_sharing" else list(range(6)))


def _dense_on_kept(layer, x, e, pe, kept):
    """The Hugging Face layer (float64, eager attention) on the kept tokens of one row alone: causal among
    them, at their original positions."""
    C = len(kept)
    causal = torch.full((C, C), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    cos, sin = (t[:, kept] for t in pe)
    with torch.no_grad():
        return layer(x[:, kept], e[:, kept], shared_kv_states={}, position_embeddings=(cos, sin),
                     attention_mask=causal)


@pytest.mark.parametrize("variant", ["per_layer_inputs", "moe_branch", "values_are_keys"])
def test_skipping_matches_the_dense_layer_on_the_kept_tokens_and_scales_the_skipped(variant):
    """ratio 0.5, no gate, a random router: each kept token's output is the Hugging Face layer's on the kept
    tokens alone (with its per-layer input); each skipped token's is ``layer_scalar * x`` (the scalar rescales
    the residual stream for every token)."""
    model = _gemma4(**VARIANTS[variant])
    dense, layer = one_skipping_layer(model, FULL)
    B, S, D = 2, 16, 64
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, S, D, generator=g)
    e = torch.randn(B, S, 8, generator=g)
    pos = torch.arange(S).unsqueeze(0)
    pe = model.model.rotary_emb(x, pos, "full_attention")
    with torch.no_grad():
        y = layer(x, e, shared_kv_states={}, position_embeddings=pe, attention_mask=None, position_ids=pos)
    idx, count = model.gmod_state.scratch.selection[FULL]
    assert count.tolist() == [S // 2] * B
    scalar = float(layer.layer_scalar)
    assert scalar != 1.0
    pe64 = tuple(t.double() for t in pe)
    for b in range(B):
        kept = sorted(idx[b, : count[b]].tolist())
        skipped = [t for t in range(S) if t not in kept]
        want = _dense_on_kept(dense, x[b:b + 1].double(), e[b:b + 1].double(), pe64, kept)
        want32 = _dense_on_kept(copy.deepcopy(dense).float(), x[b:b + 1], e[b:b + 1], pe, kept)
        base = max(_rel(want32, want), 1e-7)
        assert _rel(y[b:b + 1, kept], want) <= 8 * base, (b, _rel(y[b:b + 1, kept], want), base)
        torch.testing.assert_close(y[b, skipped], x[b, skipped] * layer.layer_scalar, rtol=0, atol=0)


def test_a_decode_step_that_keeps_no_token_returns_the_scaled_input():
    """Decode with decode_threshold 1 (no new token is kept): the MoD layer returns layer_scalar * x, as a
    skipped token of the prefill."""
    model = _gemma4()
    gmod_ext.convert(model, ratio=0.5, layers=[FULL], decode_threshold=1.0, progress=False)
    layer = find_decoder(model).layers[FULL]
    x, y = decode_step_io(model, layer)
    assert x.shape[1] == 1
    torch.testing.assert_close(y, x * layer.layer_scalar, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["per_layer_inputs", "kv_sharing"])
def test_generation_with_every_token_kept_equals_dense(variant):
    """The compact-cache decode path runs the same block: with ratio 0, no gate and decode_threshold 0,
    greedy generation and its scores equal the dense model's (KV-sharing layers stay dense)."""
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    assert_keep_all_generation_equals_dense(_gemma4(**VARIANTS[variant]), ids)


def test_kv_sharing_layers_are_refused_by_name():
    model = _gemma4(num_kv_shared_layers=2)
    parts = find_decoder(model)
    assert parts.convertible == (0, 1) and sorted(parts.refusals) == [2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"layers \[4\] cannot become MoD layers: layer 4 attends over keys and "
                                         r"values an earlier layer computed.*these can: \[0, 1\]"):
        gmod_ext.convert(model, ratio=0.5, layers=[1, 4], progress=False)
    with pytest.raises(ValueError, match=r"layers \[3\] cannot become MoD layers: layer 3 stores its keys"):
        gmod_ext.convert(model, ratio=0.5, layers=[3], progress=False)
    assert not any(hasattr(layer, "gmod_ratio") for layer in parts.layers)
    with pytest.raises(TypeError, match="KV sharing: is_kv_shared_layer"):
        make_mod_layer(parts.layers[5], 0.5)
    # every layer stores or reuses (each type's one producer, then the consumers): nothing to convert
    small = _gemma4(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                    num_kv_shared_layers=2)
    with pytest.raises(TypeError, match=r"none of Gemma4TextModel's decoder layers can become a MoD layer: layer 0"):
        gmod_ext.convert(small, ratio=0.5, layers="all", progress=False)


def test_a_missing_or_misshaped_per_layer_input_is_an_error():
    model = _gemma4()
    gmod_ext.convert(model, ratio=0.5, layers=[0], progress=False)
    layer = find_decoder(model).layers[0]
    x = torch.randn(1, 6, 64)
    pe = model.model.rotary_emb(x, torch.arange(6).unsqueeze(0), "sliding_attention")
    with pytest.raises(ValueError, match="adds a per-layer input embedding to each token and was not given one"):
        layer(x, position_embeddings=pe, attention_mask=None)
    with pytest.raises(ValueError, match=r"per_layer_input must be \[B, S, P\] = \[1, 6, 8\], got \[1, 6, 4\]"):
        layer(x, torch.randn(1, 6, 4), position_embeddings=pe, attention_mask=None)


def _gemma4_vlm(bidirectional):
    tc = _text_kwargs(vocab_size=300, vocab_size_per_layer_input=300, use_bidirectional_attention=bidirectional)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
              head_dim=16)
    cfg = transformers.Gemma4Config(text_config=tc, vision_config=vc, audio_config=None, image_token_id=299)
    torch.manual_seed(0)
    return _scalars_drawn(transformers.Gemma4ForConditionalGeneration(cfg).float().eval())


def test_image_tokens_attend_both_ways_in_the_sliding_layers_as_the_model_does():
    """use_bidirectional_attention="vision": the tokens of one image (mm_token_type_ids 1 or 2) see each other
    both ways in the sliding-window layers and causally in the full-attention ones. The converted model (every
    token kept, no gate) gives the dense model's logits on a prompt with image and video spans, which differ
    from the causal logits; and a MoD layer told the blocks in a full-attention layer would not."""
    model = _gemma4_vlm("vision")
    assert token_type_rule(model) == "vision" and token_type_rule(_gemma4_vlm(None)) == "image"
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    mm = torch.zeros_like(ids)
    mm[:, 4:9] = 1
    mm[1, 12:15] = 2
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm)
    with torch.no_grad():
        ref = model(**kw).logits
        causal = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert _rel(causal, ref) > 1e-2  # the bidirectional spans matter here
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
        assert _rel(model(**kw).logits, ref) < 1e-5
        info = model.gmod_state.current
        assert info.blocks_sliding_only and info.blocks[1, 12:15].tolist() == [1, 1, 1]
        info_blocks = info.blocks
    # the full-attention layer with the blocks applied anyway differs: the rule is what makes it exact
    layer = find_decoder(model).layers[FULL]
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(2))
    e = torch.randn(2, 20, 8, generator=torch.Generator().manual_seed(3))
    pe = model.model.language_model.rotary_emb(x, torch.arange(20).unsqueeze(0), "full_attention")
    routing = gmod_ext.router.RoutingInfo()
    routing.blocks = info_blocks
    args = dict(shared_kv_states={}, position_embeddings=pe, attention_mask=None)
    with torch.no_grad():
        routing.blocks_sliding_only = True
        right = layer(x, e, gmod_routing=routing, **args)
        plain = layer(x, e, **args)
        routing.blocks_sliding_only = False
        wrong = layer(x, e, gmod_routing=routing, **args)
    assert torch.equal(right, plain) and _rel(wrong, right) > 1e-3


def test_gemma4_unified_image_tokens_attend_both_ways_in_every_layer():
    """Gemma 4 unified's forward applies the image blocks of mm_token_type_ids in every layer (Gemma-3's
    mask): its rule is "vision_all", and the converted model gives the dense logits on an image prompt."""
    if not hasattr(transformers, "Gemma4UnifiedForConditionalGeneration"):
        pytest.skip("no Gemma 4 unified in this transformers")
    tc = _text_kwargs(vocab_size=300, use_bidirectional_attention="vision")
    for k in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        tc.pop(k)
    torch.manual_seed(0)
    model = transformers.Gemma4UnifiedForConditionalGeneration(
        transformers.Gemma4UnifiedConfig(text_config=tc, image_token_id=299)).float().eval()
    _scalars_drawn(model)
    assert token_type_rule(model) == "vision_all"
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    mm = torch.zeros_like(ids)
    mm[:, 4:9] = 1
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm)
    with torch.no_grad():
        ref = model(**kw).logits
        assert _rel(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ref) > 1e-2
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
        assert _rel(model(**kw).logits, ref) < 1e-5
        assert not model.gmod_state.current.blocks_sliding_only


def test_every_token_kept_gives_the_dense_gradients():
    """Training through the per-layer inputs, the layer scalar and the MoE branch: with every token kept, no
    gate and no router loss, the gradient of every weight (the per-layer embedding table included) is the
    dense model's in float64, within a few times the dense model's own float32 error (plus a floor)."""
    dense = _gemma4(**VARIANTS["moe_branch"]).train()
    dense64 = copy.deepcopy(dense).double()
    model = copy.deepcopy(dense)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    ids, mask = _ids(seed=7)
    labels = ids.masked_fill(mask == 0, -100)
    for m in (dense, dense64, model):
        m(ids, attention_mask=mask, labels=labels).loss.backward()
    ours, ref32 = dict(model.named_parameters()), dict(dense.named_parameters())
    checked = 0
    for name, p in dense64.named_parameters():
        if p.grad is None:
            continue
        assert ours[name].grad is not None, name
        base = _rel(ref32[name].grad, p.grad)
        assert _rel(ours[name].grad, p.grad) <= 8 * base + 1e-5, (name, _rel(ours[name].grad, p.grad), base)
        checked += 1
    assert ours["model.embed_tokens_per_layer.weight"].grad.abs().max() > 0
    assert checked > 50
