"""Hybrid models (Qwen3.5, Qwen3-Next): most decoder layers are linear-attention (Gated DeltaNet)
layers, every fourth one full attention with an output gate (``q_proj`` also makes a per-head gate;
the output is ``o_proj(attention * sigmoid(gate))``).

Only the attention layers can become MoD layers (a recurrent layer has no per-token work to skip that
would leave its state right); the others stay as they are, with their own cache layers. Checked
against Hugging Face's own modules: with every token kept, logits and gradients; skipping, cached
generation (compact slots for the MoD layers beside transformers' linear-attention states) equals the
no-cache recomputation; ARank ranks the attention layers only; and the gate is what the converter's
check needs to see. Qwen3.5's multimodal model too, on an image prompt.
"""
from __future__ import annotations

import math

import pytest
import torch

from gmod_hf_utils import (assert_cache_equals_no_cache, assert_keep_all_equals_hf, assert_vlm_converts_exactly,
                           hf_model, num_threads, padded_prompt, text_config_kwargs, transformers, vision_prompt)

import gmod_ext
from gmod_ext._hf import find_decoder
from gmod_ext.arank import choose_mod_layers
from gmod_ext.convert import is_converted

ATTENTION_LAYERS = [3, 7]  # of 8: transformers' default layer_types put full attention on every fourth


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _qwen35(**kw):
    model = hf_model("Qwen3_5ForCausalLM", "Qwen3_5TextConfig", head_dim=16, num_hidden_layers=8, **kw)
    types = getattr(model.config, "layer_types", None)
    if [i for i, t in enumerate(types or []) if t == "full_attention"] != ATTENTION_LAYERS:
        pytest.skip(f"this transformers' Qwen3.5 puts full attention on {types}")
    return model


def test_only_attention_layers_convert():
    model = _qwen35()
    assert find_decoder(model).convertible == tuple(ATTENTION_LAYERS)
    with pytest.raises(ValueError, match=r"layers \[0\] \(Qwen3_5DecoderLayer without self-attention.*these can: \[3, 7\]"):
        gmod_ext.convert(model, ratio=0.5, layers=[0, 3], progress=False)
    assert not is_converted(model)
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert model.config.gmod["layers"] == ATTENTION_LAYERS


def test_keep_all_logits_and_gradients_equal_hf():
    ref, model = _qwen35(), _qwen35()
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    assert_keep_all_equals_hf(ref, model)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_skipping_generation_cache_equals_no_cache(positions):
    model = _qwen35().eval()
    gmod_ext.convert(model, ratio=0.5, layers="all", positions=positions, progress=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # p well away from 0.5 on both sides: decode steps keep some tokens, skip others
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape, generator=g) * 0.5)
    ids, am = padded_prompt(3, 12, pad=(0, 2, 4), seed=3)
    out = assert_cache_equals_no_cache(model, dict(input_ids=ids, attention_mask=am), max_new_tokens=8)
    cache = out.get("cache") or out.get("past_key_values")
    kinds = [type(layer).__name__ for layer in cache.layers]
    assert [i for i, k in enumerate(kinds) if k == "GmodLayer"] == ATTENTION_LAYERS
    assert all("Linear" in k for i, k in enumerate(kinds) if i not in ATTENTION_LAYERS), kinds
    report = gmod_ext.kv_memory_report(cache)
    rows = {r["layer"]: r for r in report["layers"]}
    assert all(rows[i]["kind"] == "state" and rows[i]["bytes"] > 0 for i in range(8) if i not in ATTENTION_LAYERS)
    assert all(rows[i]["kind"] == "mod" and rows[i]["bytes"] < rows[i]["dense_bytes"] for i in ATTENTION_LAYERS)
    assert "linear-attention states" in gmod_ext.format_memory_report(report)


def test_arank_ranks_the_attention_layers_only():
    model = _qwen35()
    calib = [torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    ranks = gmod_ext.arank(model, calib, progress=False)
    assert [i for i, r in enumerate(ranks) if not math.isnan(r)] == ATTENTION_LAYERS
    dense = min(ATTENTION_LAYERS, key=lambda i: (-ranks[i], i))  # ceil(2 / 8) = 1 ranked layer stays dense
    assert choose_mod_layers(ranks) == [i for i in ATTENTION_LAYERS if i != dense]
    assert set(choose_mod_layers(ranks, keep_dense=0)) == set(ATTENTION_LAYERS)
    assert set(choose_mod_layers(ranks, threshold=1e9)) == set(ATTENTION_LAYERS)  # NaN layers are never chosen
    gmod_ext.convert(model, ratio=0.5, layers="arank", calibration_batches=calib, progress=False)
    assert len(model.config.gmod["layers"]) == 1 and model.config.gmod["layers"][0] in ATTENTION_LAYERS


def test_choose_mod_layers_leaves_unranked_layers_dense():
    ranks = [float("nan"), 5.0, float("nan"), 3.0, 4.0, float("nan"), 1.0, 2.0]
    assert choose_mod_layers(ranks, keep_dense=2) == [3, 6, 7]  # 5.0 and 4.0 kept dense; NaN layers too
    assert choose_mod_layers(ranks) == [3, 4, 6, 7]  # ceil(5 / 8) = 1 of the 5 ranked layers dense
    assert choose_mod_layers(ranks, threshold=3.5) == [3, 6, 7]
    with pytest.raises(ValueError, match="no layer has an ARank"):
        choose_mod_layers([float("nan")] * 3)


def test_the_output_gate_is_what_the_check_sees(monkeypatch):
    """A MoD layer that ignored the gate (reading q_proj's first half as the query) is refused."""
    import gmod_ext.mod_layer as mod_layer

    monkeypatch.setattr(mod_layer, "_output_gated", lambda attn: False)
    with pytest.raises(TypeError, match=r"decoder layer 3 \(Qwen3_5DecoderLayer\)"):
        gmod_ext.convert(_qwen35(), ratio=0.5, layers="all", progress=False)


def test_qwen3_next_moe_hybrid_keeps_every_token_exactly():
    if getattr(transformers, "Qwen3NextForCausalLM", None) is None:
        pytest.skip("this transformers has no Qwen3-Next")
    model = hf_model("Qwen3NextForCausalLM", "Qwen3NextConfig", head_dim=16, num_hidden_layers=4, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32).eval()
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
        out = model(ids).logits
    assert model.config.gmod["layers"] == list(find_decoder(model).convertible) and model.config.gmod["layers"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _qwen35_vlm(seed=0):
    T = transformers
    if getattr(T, "Qwen3_5ForConditionalGeneration", None) is None:
        pytest.skip(f"transformers {T.__version__} has no Qwen3.5 VLM")
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512, head_dim=16), num_hidden_layers=8)
    text = dict(tc, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True, "partial_rotary_factor": 1.0})
    vis = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
               in_channels=3, out_hidden_size=tc["hidden_size"], intermediate_size=64, num_position_embeddings=16)
    try:
        cfg = T.Qwen3_5Config(text_config=text, vision_config=vis, image_token_id=299, video_token_id=298,
                              vision_start_token_id=297, vision_end_token_id=296)
        torch.manual_seed(seed)
        model = T.Qwen3_5ForConditionalGeneration(cfg).float().eval()
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny Qwen3.5 VLM here: {err}")
    return (model, *vision_prompt())


def test_qwen35_vlm_image_prompt_converts_exactly_and_generates_from_the_cache():
    """Qwen3.5's multimodal model: the hybrid language model behind its vision encoder, 3-D M-RoPE on the
    image tokens."""
    model = assert_vlm_converts_exactly(_qwen35_vlm, skip_layers=ATTENTION_LAYERS)
    assert model.config.gmod["layers"] == ATTENTION_LAYERS


# ------------------------------------------------------------------ Granite-4 (GraniteMoeHybrid)
# Mamba-2 layers and attention layers, each with experts + a shared MLP, Granite's residual multiplier;
# the released Granite-4 hybrids attend without positions (position_embedding_type "nope": the model
# builds no rotary module and passes position_embeddings=None, which its attention's forward tests).
GRANITE4_ATTENTION = [1, 3]


def _granite4(pe="nope", experts=4, seed=0):
    if getattr(transformers, "GraniteMoeHybridForCausalLM", None) is None:
        pytest.skip("this transformers has no GraniteMoeHybrid")
    try:
        model = hf_model("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", position_embedding_type=pe,
                         layer_types=["linear_attention", "full_attention"] * 2, mamba_n_heads=8, mamba_d_head=16,
                         mamba_d_state=16, mamba_n_groups=1, mamba_chunk_size=8, num_local_experts=experts,
                         num_experts_per_tok=2, shared_intermediate_size=48, residual_multiplier=0.22,
                         attention_multiplier=0.05, embedding_multiplier=12.0, logits_scaling=8.0)
    except (TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny GraniteMoeHybrid here: {err}")
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():  # HF leaves norm weights at 1: perturb so a misplaced norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("pe", ["nope", "rope"])
def test_granite4_attention_layers_convert_and_nope_is_read_off_the_model(pe):
    from gmod_ext.mod_layer import _uses_rope

    model = _granite4(pe)
    parts = find_decoder(model)
    assert parts.convertible == tuple(GRANITE4_ATTENTION)
    assert (parts.rotary is None) == (pe == "nope")
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert [layer._gmod_uses_rope for layer in (parts.layers[i] for i in GRANITE4_ATTENTION)] == [pe == "rope"] * 2
    # the same attention class in a model that passes position embeddings rotates
    assert _uses_rope(parts.layers[1].self_attn, model_has_rotary=True)


@pytest.mark.parametrize("pe,experts", [("nope", 4), ("rope", 4), ("nope", 0)])
def test_granite4_keep_all_logits_and_gradients_equal_hf(pe, experts):
    ref = _granite4(pe, experts)
    model = _granite4(pe, experts)
    model.load_state_dict(ref.state_dict())
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    assert_keep_all_equals_hf(ref, model)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_granite4_skipping_generation_cache_equals_no_cache(positions):
    model = _granite4("nope").eval()
    gmod_ext.convert(model, ratio=0.5, layers="all", positions=positions, progress=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape, generator=g) * 0.5)
    ids, am = padded_prompt(3, 12, pad=(0, 2, 4), seed=3)
    out = assert_cache_equals_no_cache(model, dict(input_ids=ids, attention_mask=am), max_new_tokens=8)
    cache = out.get("cache") or out.get("past_key_values")
    report = gmod_ext.kv_memory_report(cache)
    rows = {r["layer"]: r for r in report["layers"]}
    assert all(rows[i]["kind"] == "mod" and rows[i]["bytes"] < rows[i]["dense_bytes"] for i in GRANITE4_ATTENTION)
    assert all(rows[i]["kind"] == "state" for i in range(4) if i not in GRANITE4_ATTENTION)
