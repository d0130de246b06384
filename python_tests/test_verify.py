"""gmod_ext.verify: convert refuses decoder blocks a MoD layer does not reproduce, and accepts the
Llama family.

Each architecture is a tiny Hugging Face model built from a config (no download). The reference is
Hugging Face's own decoder layer: for the accepted ones, the converted model with every token kept and
no gating must give the dense model's logits; for the refused ones, the same comparison is what fails
(shown here once with verify=False), and convert must say so before changing anything.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

from gmod_hf_utils import (VOCAB, assert_keep_all_generation_equals_dense, hf_model, text_config_kwargs, tiny_model,
                           transformers)

import gmod_ext
from gmod_ext._hf import find_decoder
from gmod_ext.convert import is_converted
from gmod_ext.verify import VERIFY_TOLERANCE, check_decoder_layers


_hf = hf_model


REFUSED = {
    # name: (builder, words the error must contain, whether verify=False is offered)
    # depth-scaled residual sums (Beam's depth_scaled_residual_add): found by the comparison only
    "beam": (lambda: _hf("BeamForCausalLM", "BeamConfig"), "not a block a MoD layer reproduces", True),
    # a layer that returns a list built at run time, whose model reads out[0] (OpenAI GPT): a MoD layer's
    # tensor would lose all but its first row there (tuples its return statements spell out, Falcon's, are
    # returned in kind)
    "openai_gpt": (lambda: _hf("OpenAIGPTLMHeadModel", "OpenAIGPTConfig"), "returns a list", True),
}
ACCEPTED = {
    "llama": lambda: tiny_model("llama"),
    # differential attention (two softmax maps subtracted: gmod_ext.diff_attention)
    "diffllama": lambda: _hf("DiffLlamaForCausalLM", "DiffLlamaConfig"),
    "mistral": lambda: tiny_model("mistral"),
    "qwen2": lambda: tiny_model("qwen2"),
    "qwen3": lambda: tiny_model("qwen3"),
    "llava": lambda: tiny_model("llava"),
    "gemma": lambda: _hf("GemmaForCausalLM", "GemmaConfig", head_dim=16),
    "mixtral": lambda: _hf("MixtralForCausalLM", "MixtralConfig"),
    "qwen2_moe": lambda: _hf("Qwen2MoeForCausalLM", "Qwen2MoeConfig", moe_intermediate_size=32,
                             shared_expert_intermediate_size=32),  # sliding_window 0 = none
    "granite": lambda: _hf("GraniteForCausalLM", "GraniteConfig"),  # multipliers 1: a Llama block
    # Granite's residual / attention multipliers, GraniteMoE's experts named block_sparse_moe
    "granite_multipliers": lambda: _hf("GraniteForCausalLM", "GraniteConfig", residual_multiplier=0.5,
                                       attention_multiplier=0.05),
    # GPT-OSS: attention sinks, its own half-width rotation, a MoE returning router scores too
    "gpt_oss": lambda: _hf("GptOssForCausalLM", "GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    # Phi-2: a parallel block with the output projection named dense
    # HunYuan: per-head q / k norms after the rotation
    "hunyuan": lambda: _hf("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", head_dim=16),
    # GPT-NeoX: attention named attention, per-head fused query_key_value, parallel residual, layer_past
    "gpt_neox": lambda: _hf("GPTNeoXForCausalLM", "GPTNeoXConfig"),
    "phi2": lambda: _hf("PhiForCausalLM", "PhiConfig"),
    "granitemoe": lambda: _hf("GraniteMoeForCausalLM", "GraniteMoeConfig", residual_multiplier=0.5,
                              num_local_experts=4, num_experts_per_tok=2),
    # LayerNorm with biases and a plain GELU MLP (StarCoder2), partial rotary + LayerNorm (StableLM),
    # MoE MLPs (OLMoE, Qwen3-MoE)
    "starcoder2": lambda: _hf("Starcoder2ForCausalLM", "Starcoder2Config"),
    "stablelm": lambda: _hf("StableLmForCausalLM", "StableLmConfig"),
    "olmoe": lambda: _hf("OlmoeForCausalLM", "OlmoeConfig", num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: _hf("Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=16, num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32),
    # Gemma-2 / 3: the sandwich block (norms after attention and around the MLP), Gemma's 1 + w norms
    "gemma2_nocap": lambda: _hf("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, attn_logit_softcapping=None),
    # soft-capped logits (Gemma-2's default cap is 50) and sliding windows shorter than the check prompt:
    # the MoD layer's position-masked attention (test_sliding_window.py makes the cap bind)
    "gemma2_softcap_window": lambda: _hf("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, sliding_window=5),
    "mistral_window": lambda: tiny_model("mistral", sliding_window=5),
    "gemma3_window": lambda: _hf("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16, sliding_window=5,
                                 layer_types=["sliding_attention", "full_attention"] * 2),
    "gemma3": lambda: _hf("Gemma3ForCausalLM", "Gemma3TextConfig", head_dim=16),
    # Phi-3: one fused qkv_proj, residual dropout; Phi-4-mini's partial rotary
    "phi3": lambda: _hf("Phi3ForCausalLM", "Phi3Config"),
    "phi4_mini_partial_rotary": lambda: _hf("Phi3ForCausalLM", "Phi3Config", partial_rotary_factor=0.75),
    # the model's own rotation: GLM / GLM-4 interleave pairs on half the head, Ernie-4.5 / Helium pairs too;
    # GLM-4 adds norms after attention and after the MLP
    "glm": lambda: _hf("GlmForCausalLM", "GlmConfig", head_dim=16),
    "glm4": lambda: _hf("Glm4ForCausalLM", "Glm4Config", head_dim=16),
    "ernie4_5": lambda: _hf("Ernie4_5ForCausalLM", "Ernie4_5Config", head_dim=16),
    "helium": lambda: _hf("HeliumForCausalLM", "HeliumConfig", head_dim=16),
    # other norm layouts (gmod_ext.block_layout): OLMo's weightless LayerNorm (the router then normalises
    # without a scale), OLMo-2's norms on the two updates only, Apertus' renamed pre-norms
    "olmo": lambda: _hf("OlmoForCausalLM", "OlmoConfig"),
    "olmo2": lambda: _hf("Olmo2ForCausalLM", "Olmo2Config"),
    "apertus": lambda: _hf("ApertusForCausalLM", "ApertusConfig"),
    # SmolLM3: no rotary on every fourth layer (use_rope = 0: NoPE), the MoD layer does not rotate there
    "smollm3_nope": lambda: _hf("SmolLM3ForCausalLM", "SmolLM3Config", head_dim=16),
    # sliding / global hybrids whose global layers attend without rotary positions and without a window
    # (window 5 < the 20-token prompt): EXAONE-4 (OLMo-2's norm layout), Cohere2 (a parallel block)
    "exaone4_nope": lambda: _hf("Exaone4ForCausalLM", "Exaone4Config", head_dim=16, sliding_window=5),
    "cohere2_nope": lambda: _hf("Cohere2ForCausalLM", "Cohere2Config", head_dim=16, sliding_window=5),
    # Cohere: attention and MLP side by side on one norm, per-head q / k LayerNorms
    "cohere_parallel": lambda: _hf("CohereForCausalLM", "CohereConfig", head_dim=16, use_qk_norm=True),
    # OPT's family: fairseq's block (fc1 / fc2 inline, out_proj), positions added to the input, no rotary;
    # OPT with embeddings projected in / out of a narrower width, and with LayerNorms without weights (the
    # hidden size then read off out_proj, the router normalising without a scale); XGLM; BioGPT
    "opt": lambda: _hf("OPTForCausalLM", "OPTConfig", ffn_dim=128, word_embed_proj_dim=64),
    "opt_projected": lambda: _hf("OPTForCausalLM", "OPTConfig", ffn_dim=128, word_embed_proj_dim=32),
    "opt_no_affine": lambda: _hf("OPTForCausalLM", "OPTConfig", ffn_dim=128, word_embed_proj_dim=64,
                                 layer_norm_elementwise_affine=False),
    "xglm": lambda: _hf("XGLMForCausalLM", "XGLMConfig", d_model=64, ffn_dim=128, attention_heads=4, num_layers=4),
    "biogpt": lambda: _hf("BioGptForCausalLM", "BioGptConfig"),
    # GPT-2: stack h, attention attn (Conv1D c_attn / c_proj), learned positions; its per-layer attention scale
    "gpt2": lambda: _hf("GPT2LMHeadModel", "GPT2Config", n_inner=128),
    "gpt2_layer_scaled": lambda: _hf("GPT2LMHeadModel", "GPT2Config", n_inner=128, scale_attn_by_inverse_layer_idx=True),
    # GPTBigCode: GPT-2's block with one key / value head, or each head's q, k, v in turn in c_attn
    "gpt_bigcode_mqa": lambda: _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", n_inner=128),
    "gpt_bigcode_mha": lambda: _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", n_inner=128, multi_query=False),
    # Falcon: layers returning (hidden states, attention weights), self_attention with its three
    # query_key_value layouts (7B's multi-query, 40B's grouped, multi-head), parallel or sequential blocks
    "falcon_7b": lambda: _hf("FalconForCausalLM", "FalconConfig", parallel_attn=True, multi_query=True),
    "falcon_40b": lambda: _hf("FalconForCausalLM", "FalconConfig", new_decoder_architecture=True, num_kv_heads=2),
    # ALiBi: the model's per-key bias at the kept keys' original positions, no rotation: BLOOM (6 heads: slopes
    # past the largest power of 2), MPT (its bias a table for max_seq_len), Falcon with alibi=True
    "bloom_alibi": lambda: _hf("BloomForCausalLM", "BloomConfig", hidden_size=48, num_attention_heads=6),
    "mpt_alibi": lambda: _hf("MptForCausalLM", "MptConfig", max_seq_len=64),
    "falcon_alibi": lambda: _hf("FalconForCausalLM", "FalconConfig", alibi=True),
    "falcon_sequential": lambda: _hf("FalconForCausalLM", "FalconConfig", parallel_attn=False, multi_query=False),
    # GPT-J / CodeGen: parallel on ln_1, their one-tensor rotation on part of the head; CodeGen's grouped qkv_proj
    "gptj": lambda: _hf("GPTJForCausalLM", "GPTJConfig", rotary_dim=8, n_inner=128),
    "codegen": lambda: _hf("CodeGenForCausalLM", "CodeGenConfig", rotary_dim=8, n_inner=128),
    # BitNet: a norm of the attention output before o_proj
    "bitnet": lambda: _hf("BitNetForCausalLM", "BitNetConfig"),
    # AFMoE: sandwich norms under other names, an output gate from gate_proj, RoPE on sliding layers only
    "afmoe": lambda: _hf("AfmoeForCausalLM", "AfmoeConfig", head_dim=16, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=32, num_dense_layers=1),
    # Cohere Compass: rope settings per layer type, none for its full-attention layers (the model gives them no
    # position embeddings: NoPE), windows on the sliding ones
    "cohere_compass_nope": lambda: _hf(
        "CohereCompassForCausalLM", "CohereCompassTextConfig", head_dim=16, sliding_window=5,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}, "full_attention": None}),
    # GPT-Neo: the attention wrapped in attn.attention, unscaled scores, windows of 5 on alternate layers
    "gpt_neo": lambda: _hf("GPTNeoForCausalLM", "GPTNeoConfig", attention_types=[[["global", "local"], 2]], window_size=5),
    # GPT-NeoX-Japanese: tuples too, a separate bias after the last layer's dense, its model passes no
    # keywords on to the layers
    "gpt_neox_japanese": lambda: _hf("GPTNeoXJapaneseForCausalLM", "GPTNeoXJapaneseConfig"),
}


def _ids(seed=3, B=2, S=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 30, (B, S), generator=g)  # below LLaVA's image token


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_blocks_convert_and_keep_every_token_exactly(name):
    """Accepted: convert passes its check, and with ratio 0 and no gate the converted model computes
    the dense model's function (logits against Hugging Face's own layers, eager and SDPA)."""
    model = ACCEPTED[name]().eval()
    ids = _ids()
    ref = _logits(model, ids)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    out = _logits(model, ids)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, (name, err)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_blocks_raise_before_anything_changes(name):
    build, words, offers_override = REFUSED[name]
    model = build()
    before = copy.deepcopy(model.state_dict())
    model.train()
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match=r"^gmod") as info:
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    msg = str(info.value)
    assert words in msg and (("verify=False" in msg) == offers_override), msg
    # nothing changed: not converted, same weights, same train/eval flags, same global RNG state
    assert not is_converted(model)
    assert not any(type(l).__name__.startswith("Gmod") or hasattr(l, "gmod_ratio") for l in find_decoder(model).layers)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("name,build,words", [
    # OPT-350m's post-norm block: normalised after each residual sum, nothing a MoD layer could gate
    ("opt_post_norm", lambda: _hf("OPTForCausalLM", "OPTConfig", ffn_dim=128, word_embed_proj_dim=64,
                                  do_layer_norm_before=False), "is post-norm (do_layer_norm_before=False"),
    # a decoder with cross-attention (the decoder of an encoder-decoder model)
    ("xglm_cross_attention", lambda: _hf("XGLMForCausalLM", "XGLMConfig", d_model=64, ffn_dim=128, attention_heads=4,
                                         num_layers=4, add_cross_attention=True), "has cross-attention (encoder_attn"),
    ("gpt2_cross_attention", lambda: _hf("GPT2LMHeadModel", "GPT2Config", n_inner=128, add_cross_attention=True),
     "has cross-attention (encoder_attn / crossattention)"),
    # BLOOM's variant that adds its updates to the normed input, not to the block's input
    ("bloom_post_layernorm_residual", lambda: _hf("BloomForCausalLM", "BloomConfig",
                                                  apply_residual_connection_post_layernorm=True),
     "adds its updates to the normed input (apply_residual_connection_post_layernorm=True)"),
])
def test_known_blocks_without_a_layout_are_refused_with_the_reason(name, build, words):
    """Blocks of a known family that MoD layers do not reproduce get no layout, and convert says why
    (not only that the layers are not Llama-family); the model is left as it was."""
    model = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"^gmod") as info:
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert words in str(info.value), str(info.value)
    assert not is_converted(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_returned_arity_reads_the_return_statements():
    """MoD layers return what the wrapped forward's return statements spell: one tensor (transformers 5), a
    tuple of n (Falcon's and GPT-NeoX-Japanese's (hidden states, attention weights)); a list built at run
    time cannot be told (verify refuses it, test above)."""
    from gmod_ext.mod_layer import _returned_arity

    T = transformers
    assert _returned_arity(T.models.llama.modeling_llama.LlamaDecoderLayer) == 0
    assert _returned_arity(T.models.falcon.modeling_falcon.FalconDecoderLayer) == 2
    assert _returned_arity(T.models.gpt_neox_japanese.modeling_gpt_neox_japanese.GPTNeoXJapaneseLayer) == 2
    model = ACCEPTED["falcon_7b"]().eval()
    gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    x = torch.randn(1, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    pe = model.transformer.rotary_emb(x, torch.arange(6).unsqueeze(0))
    with torch.no_grad():
        out = model.transformer.h[0](x, None, None, position_embeddings=pe)  # (hidden_states, alibi, mask, ...)
    assert type(out) is tuple and len(out) == 2 and out[0].shape == x.shape and out[1] is None


def _planted_llama(term: float):
    """A tiny Llama whose layers add ``term * hidden_states`` to their output: a deviation a MoD layer does
    not compute, planted in an otherwise supported class."""
    model = tiny_model("llama")
    base = type(model.model.layers[0])

    class Scaled(base):
        def forward(self, hidden_states, *args, **kwargs):
            out = super().forward(hidden_states, *args, **kwargs)
            if isinstance(out, tuple):
                return (out[0] + term * hidden_states,) + tuple(out[1:])
            return out + term * hidden_states

    for layer in model.model.layers:
        layer.__class__ = Scaled
    return model


def test_verify_false_converts_a_refused_block_and_the_check_was_right():
    """With verify=False a refused block (a planted deviation) converts, and keeping every token does NOT
    give its logits: what the check refused is a real difference, not a false alarm."""
    model = _planted_llama(0.5).eval()
    with pytest.raises(TypeError, match="not a block a MoD layer reproduces"):
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    ids = _ids()
    ref = _logits(model, ids)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False, verify=False)
    err = float((_logits(model, ids) - ref).abs().max() / ref.abs().max())
    assert err > 1e-2, err


def test_a_changed_llama_block_is_refused():
    """A Llama layer whose forward adds a term the MoD layer does not compute (a planted deviation in an
    otherwise supported class) is refused: the check compares behaviour, not class names."""
    model = _planted_llama(0.01)
    with pytest.raises(TypeError, match=r"differs from the layer's own by"):
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)


def test_a_stack_that_needs_more_than_token_ids_is_refused_with_the_reason():
    """A decoder stack whose forward needs inputs a text prompt does not give (BLT's byte-level local
    encoder wants patch ids: its forward failed inside transformers with an AttributeError that reached
    the user as a crash) is refused with a TypeError that names the stack and the model's own error, and
    the model is left unconverted; the model's original error stays attached as the cause."""
    model = tiny_model("llama")
    stack = find_decoder(model).text_model
    plain = stack.forward

    def needs_patch_ids(*args, patch_ids=None, **kwargs):
        return plain(*args, **kwargs) + patch_ids.unsqueeze(-1)  # None without them: AttributeError

    stack.forward = needs_patch_ids
    with pytest.raises(TypeError, match=r"LlamaModel, the stack of decoder layers found in LlamaForCausalLM, does "
                       r"not run on token ids alone \(AttributeError: 'NoneType' object") as info:
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert isinstance(info.value.__cause__, AttributeError)
    assert not is_converted(model)


def test_check_counts_kinds_and_leaves_rng_and_modes_alone():
    model = tiny_model("llama")
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    assert check_decoder_layers(model, find_decoder(model)) == 1  # four layers of one kind
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert 1e-6 < VERIFY_TOLERANCE <= 1e-3


def test_sliding_window_zero_or_disabled_means_none():
    from gmod_ext.mod_layer import _sliding_window

    class Attn(torch.nn.Module):
        def __init__(self, **cfg):
            super().__init__()
            self.config = type("C", (), cfg)()
            self.layer_idx = 1

    assert _sliding_window(Attn(sliding_window=0)) is None
    assert _sliding_window(Attn(sliding_window=4096, use_sliding_window=False)) is None
    assert _sliding_window(Attn(sliding_window=4096, layer_types=["sliding_attention", "full_attention"])) is None
    assert _sliding_window(Attn(sliding_window=4096, layer_types=["full_attention", "sliding_attention"])) == 4096
    assert _sliding_window(Attn(sliding_window=4096)) == 4096
    a = Attn(sliding_window=4096)
    a.sliding_window = None  # the module's own setting decides
    assert _sliding_window(a) is None


def test_meta_device_model_converts_with_a_warning():
    """A model built on the meta device (weights to be loaded later) has nothing to compute with: the
    check is skipped with a warning, and the conversion itself goes on."""
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config_kwargs()))
    with pytest.warns(UserWarning, match="meta device"):
        gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
    assert is_converted(model)


@pytest.mark.parametrize("name", ["llama", "gemma", "gemma3"])
def test_router_reads_the_norm_the_layer_applies(name):
    """The router's RMSNorm uses the input norm's effective scale: ``weight`` (Llama) or ``1 + weight``
    (Gemma's offset norms, probed at conversion): its logits equal the router's projection of the layer's
    own input_layernorm output (Hugging Face's module), in float64."""
    model = ACCEPTED[name]()
    gmod_ext.convert(model, ratio=0.5, layers=[1], progress=False)
    layer = find_decoder(model).layers[1]
    assert layer._gmod_norm_offset == (name != "llama")
    with torch.no_grad():
        layer.input_layernorm.weight.uniform_(-0.5, 0.5)  # away from the init, so both readings differ
    x = torch.randn(2, 9, layer.input_layernorm.weight.shape[0])
    got = layer.gmod_logits(x)
    r = model.gmod_router
    w = (r.weight[1] - r.weight[0]).double()
    want = copy.deepcopy(layer.input_layernorm).double()(x.double()) @ w + (r.bias[1] - r.bias[0]).double()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gemma2_nocap", "gemma3", "cohere_compass_nope"])
def test_generation_with_every_token_kept_equals_dense(name):
    """The compact-cache decode path runs the same block (Gemma's sandwich norms included): with ratio 0,
    no gate and decode_threshold 0 (every new token kept), greedy generation and its scores equal the
    dense model's, token for token."""
    assert_keep_all_generation_equals_dense(ACCEPTED[name]().eval(), _ids(seed=5, B=2, S=12))


def _vlm(name: str):
    """Tiny multimodal models of other families (their language models are what convert changes)."""
    T = transformers
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512), num_hidden_layers=2)
    vis = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
               patch_size=8)
    torch.manual_seed(0)
    try:
        if name == "llava_next":
            cfg = T.LlavaNextConfig(text_config=T.LlamaConfig(**tc), vision_config=T.CLIPVisionConfig(**vis),
                                    image_token_index=299)
            return T.LlavaNextForConditionalGeneration(cfg).float()
        if name == "llava_onevision":
            cfg = T.LlavaOnevisionConfig(text_config=T.Qwen2Config(**tc), vision_config=T.SiglipVisionConfig(**vis),
                                         image_token_index=299, video_token_index=298)
            return T.LlavaOnevisionForConditionalGeneration(cfg).float()
        if name == "gemma3_vlm":
            cfg = T.Gemma3Config(text_config=dict(tc, head_dim=16), vision_config=vis, mm_tokens_per_image=4,
                                 image_token_id=299, boi_token_id=297, eoi_token_id=298)
            return T.Gemma3ForConditionalGeneration(cfg).float()
        if name == "paligemma":
            cfg = T.PaliGemmaConfig(text_config=T.GemmaConfig(**tc, head_dim=16), vision_config=T.SiglipVisionConfig(**vis),
                                    image_token_index=299)
            return T.PaliGemmaForConditionalGeneration(cfg).float()
    except (AttributeError, TypeError, ValueError) as err:  # a transformers without it, or another config API
        pytest.skip(f"cannot build a tiny {name} here: {err}")
    raise ValueError(name)


@pytest.mark.parametrize("name", ["llava_next", "llava_onevision"])
def test_multimodal_models_convert_exactly(name):
    model = _vlm(name).eval()
    ids = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(7))
    ref = _logits(model, ids)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    err = float((_logits(model, ids) - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, (name, err)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vl_image_prompt_with_3d_positions_converts_exactly(name):
    """Qwen2-VL / Qwen2.5-VL rotate q and k by 3-D (time, height, width) positions on image tokens
    (M-RoPE). MoD layers take the model's cos / sin rows of the kept tokens, so a prompt with an image
    must give the dense logits with every token kept. The 1-D positions' logits differ, so a MoD layer
    that recomputed positions itself would fail here."""
    T = transformers
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512), num_hidden_layers=2)
    hd = tc["hidden_size"] // tc["num_attention_heads"]
    section = [hd // 2 - 2 * (hd // 2 // 3), hd // 2 // 3, hd // 2 // 3]
    text = dict(tc, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    vis = dict(depth=1, embed_dim=32, hidden_size=tc["hidden_size"], num_heads=2, patch_size=4, spatial_merge_size=2,
               temporal_patch_size=2, in_channels=3, out_hidden_size=tc["hidden_size"], intermediate_size=64)
    ids_cfg = dict(image_token_id=299, video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)
    torch.manual_seed(0)
    try:
        if name == "qwen2_vl":
            model = T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(text_config=text, vision_config=vis, **ids_cfg))
        else:
            model = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(text_config=text, vision_config=vis,
                                                                              **ids_cfg))
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny {name} here: {err}")
    model = model.float().eval()
    B, S = 2, 16
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 250, (B, S), generator=g)
    ids[:, 2], ids[:, 3:7], ids[:, 7] = 297, 299, 296  # vision start, 4 image tokens (a 4x4 patch grid, merged 2x2)
    kw = dict(pixel_values=torch.randn(B * 16, 3 * 2 * 4 * 4, generator=g),
              image_grid_thw=torch.tensor([[1, 4, 4]] * B))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        kw["mm_token_type_ids"] = (ids == 299).long()
    with torch.no_grad():
        ref = model(input_ids=ids, **kw).logits
        flat = model(input_ids=ids, **kw, position_ids=torch.arange(S).expand(B, -1)).logits
    assert float((flat - ref).abs().max() / ref.abs().max()) > 1e-4  # the 3-D positions matter here
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    with torch.no_grad():
        out = model(input_ids=ids, **kw).logits
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, (name, err)


def test_bidirectional_image_attention_is_checked_on_an_image_prompt(monkeypatch):
    """Gemma-3's multimodal model lets the tokens of one image attend to each other both ways
    (token_type_ids). The language-model check prompt has no image; the extra probe with image token
    types checks the layers again on one. MoD layers reproduce it (test_image_blocks.py), so the model
    converts; a MoD layer that were not told the image blocks is refused by that probe, and converted
    anyway (verify=False) it does differ on an image prompt (and not on a text-only one)."""
    import gmod_ext.verify as verify

    def no_blocks(info, types, rule):  # the probe's MoD layer sees no blocks
        info.blocks = None

    monkeypatch.setattr(verify, "set_token_type_blocks", no_blocks)
    model = _vlm("gemma3_vlm").eval()
    with pytest.raises(TypeError, match="on a prompt with token types"):
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    assert not is_converted(model)
    monkeypatch.undo()
    gmod_ext.convert(copy.deepcopy(model), ratio=0.0, layers="all", gate="none", progress=False)  # the real one

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 250, (2, 16), generator=g)
    ids[:, 3], ids[:, 4:8], ids[:, 8] = 297, 299, 298  # begin-of-image, 4 image tokens, end-of-image
    image = dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g), token_type_ids=(ids == 299).long())
    text_ids = torch.randint(0, 250, (2, 16), generator=g)
    with torch.no_grad():
        ref_img = model(input_ids=ids, **image).logits
        ref_txt = model(input_ids=text_ids).logits
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False, verify=False)
    import gmod_ext.convert as convert_mod

    monkeypatch.setattr(convert_mod, "set_token_type_blocks", no_blocks)  # it ignores images
    with torch.no_grad():
        err_img = float((model(input_ids=ids, **image).logits - ref_img).abs().max() / ref_img.abs().max())
        err_txt = float((model(input_ids=text_ids).logits - ref_txt).abs().max() / ref_txt.abs().max())
    assert err_txt < 1e-5 and err_img > 1e-3, (err_txt, err_img)


def test_prefix_lm_converts_and_keeps_its_prefix_attention():
    """PaliGemma's language model attends both ways over its prefix (token_type_ids 0) and causally over its
    suffix: its check runs with that rule (test_prefix_lm.py has the rest), and keeping every token the
    converted model gives its logits on a prompt with a prefix."""
    model = _vlm("paligemma").eval()
    ids = torch.randint(0, 250, (2, 12), generator=torch.Generator().manual_seed(7))
    types = torch.ones_like(ids)
    types[:, :7] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, token_type_ids=types).logits
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, token_type_ids=types).logits, ref, rtol=1e-5, atol=1e-5)


def test_mask_hint_reads_bool_and_additive_masks():
    from gmod_ext.verify import _sees_later_tokens

    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    full = torch.ones(5, 5, dtype=torch.bool)
    add = lambda b: torch.zeros(5, 5).masked_fill(~b, torch.finfo(torch.float32).min)  # noqa: E731
    assert not _sees_later_tokens({"attention_mask": causal[None, None]})
    assert _sees_later_tokens({"attention_mask": full[None, None]})
    assert not _sees_later_tokens({"attention_mask": add(causal)[None, None]})
    assert _sees_later_tokens({"attention_mask": add(full)[None, None]})
    assert _sees_later_tokens({"attention_mask": {"full_attention": full[None, None]}})
    assert not _sees_later_tokens({"attention_mask": None}) and not _sees_later_tokens({})
    # a chunk of 2 queries after 3 cached keys: bottom-right aligned causal
    chunk = torch.ones(2, 5, dtype=torch.bool).tril(3)
    assert not _sees_later_tokens({"attention_mask": chunk[None, None]})


def test_layers_with_their_own_settings_are_checked_on_their_own(monkeypatch):
    """SmolLM3's fourth layer is its class's and its layer type's like the others, but skips the rotation
    (``self_attn.use_rope = 0``): its per-layer settings make it a kind of its own, so the check runs it.
    A MoD layer that rotated anyway is refused, naming that layer; were the kinds merged, the same
    conversion would pass the check and silently change the model."""
    import gmod_ext.mod_layer as mod_layer
    import gmod_ext.verify as verify

    model = ACCEPTED["smollm3_nope"]()
    parts = find_decoder(model)
    assert [parts.layers[i].self_attn.use_rope for i in range(4)] == [1, 1, 1, 0]
    assert verify._kind(parts, 3) != verify._kind(parts, 0) and verify._kind(parts, 2) == verify._kind(parts, 0)
    monkeypatch.setattr(mod_layer, "_uses_rope", lambda attn, **kw: True)  # a MoD layer that always rotates
    with pytest.raises(TypeError, match=r"decoder layer 3 \(SmolLM3DecoderLayer\) is not a block"):
        gmod_ext.convert(copy.deepcopy(model), ratio=0.0, layers="all", gate="none", progress=False)
    monkeypatch.setattr(verify, "_settings", lambda module: ())  # kinds merged: layer 3 goes unchecked
    ids = _ids()
    ref = _logits(model, ids)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    assert float((_logits(model, ids) - ref).abs().max() / ref.abs().max()) > 1e-4


@pytest.mark.parametrize("name", ["llama", "gemma3_window"])
def test_compact_positions_keep_every_token_exactly(name):
    """positions="compact" takes cos / sin from the model's rotary module at the compact positions; with
    every token of an unpadded prompt kept those are the original positions, so the logits are the dense
    model's. Gemma-3's one rotary module gives its local and global layers different angles (theta 10k and
    1M), which a MoD layer asks for by its layer type."""
    model = ACCEPTED[name]().eval()
    ids = _ids()
    ref = _logits(model, ids)
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", positions="compact", progress=False)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)


def test_compact_positions_are_checked_against_the_angles_each_layer_gets():
    """Layers that rotate with angles other than the model's rotary module's (as GraniteSWA's per-layer
    thetas; here a pre-hook hands every layer theta-500 cos / sin) convert with positions="original",
    which gathers the cos / sin rows each layer is given, and are refused with "compact", which would
    compute them with the model's module."""
    def build():
        model = tiny_model("llama").eval()
        other = type(model.model.rotary_emb)(config=copy.deepcopy(model.config))
        other.inv_freq = 1.0 / (500.0 ** (torch.arange(0, 16, 2).float() / 16))  # head_dim 16, theta 500

        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            pos = torch.arange(x.shape[1]).unsqueeze(0)
            kwargs["position_embeddings"] = other(x, pos)
            return args, kwargs

        for layer in model.model.layers:
            layer.register_forward_pre_hook(hook, with_kwargs=True)
        return model

    model = build()
    ids = _ids(B=1)
    ref = _logits(model, ids)
    assert float((ref - _logits(tiny_model("llama").eval(), ids)).abs().max()) > 1e-3  # the angles matter
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"decoder layer 0 \(LlamaDecoderLayer\): with positions='compact' .* "
                                        r"With positions='original' .* converts exactly"):
        gmod_ext.convert(build(), ratio=0.0, layers="all", gate="none", positions="compact", progress=False)
