"""Decoder blocks that differ from Llama's in one part, converted exactly:

* Phi-3 / Phi-4-mini: one fused ``qkv_proj`` (queries, keys, values in that order), residual dropout
  on both updates, Phi-4-mini's partial rotary (0.75 of the head);
* Phi-1 / 2: a parallel block, the output projection named ``dense``, half the head rotated, one
  ``resid_dropout`` for both updates, optional per-head ``q_layernorm`` / ``k_layernorm``;
* GLM / GLM-4 / Ernie-4.5 / Helium: RoPE on interleaved pairs (GLM: on half the head): MoD layers call
  the model's own ``apply_rotary_pos_emb`` where it rotates differently from Llama's;
* GLM-4: norms after attention (``post_self_attn_layernorm``) and after the MLP (``post_mlp_layernorm``);
* the other norm layouts of ``gmod_ext.block_layout``: OLMo-2 (norms on the two updates only, none
  before attention: the router normalises ``x`` without a scale), OLMo (a LayerNorm without weights),
  Apertus (pre-norms named ``attention_layernorm`` / ``feedforward_layernorm``);
* layers without rotary positions (NoPE), read off the condition the attention's forward rotates under:
  SmolLM3 (``if self.use_rope``), and the global layers of two sliding / global hybrids, EXAONE-4
  (``if self.sliding_window is None or self.is_sliding``, with no window there either) and Cohere2
  (``if self.sliding_window is not None``);
* parallel blocks (Cohere, Cohere2: ``y = x + attn(N(x)) + mlp(N(x))``), Cohere's per-head q / k norms;
* GPT-OSS: attention sinks (a learned logit per head in every softmax), its half-width rotation, windows
  on alternate layers, a MoE that returns its router scores beside its output;
* HunYuan: per-head q / k norms after the rotation;
* GPT-NeoX (Pythia): the attention module named ``attention`` with one ``query_key_value`` (each head's
  q, k, v in turn), partial rotary, the cache keyword ``layer_past``, parallel blocks with a norm per
  branch (or sequential ones), dropouts on both updates;
* VaultGemma (Gemma-2's pre-norms only) and HyperCLOVA X (norms on both updates, a residual multiplier);
* Granite's multipliers (both updates scaled by ``residual_multiplier``, ``attention_multiplier`` as the
  attention scale) and GraniteMoeShared's MLP branch (``block_sparse_moe`` + ``shared_mlp``);
* GLM-4V: all of GLM-4 plus 3-D rotary positions on image tokens; Aya Vision: Cohere2 behind SigLIP;
  Granite Vision: LLaVA-NeXT in front of Granite;
  Qwen3-VL: interleaved 3-D M-RoPE and DeepStack (each on an image prompt, keep-all and generation).
* ALiBi: BLOOM (attention and MLP that add the residual themselves, 6 heads), MPT (``Wqkv`` clipped, its
  softmax scale, ``norm_1`` / ``norm_2`` / ``ffn``, the stack ``blocks``; its generate runs without a cache
  in transformers 5.24, so its cache is checked by decoding by hand) and Falcon with ``alibi=True``;
  ``positions="compact"`` refused for them (test_alibi.py has the op and the bias they are given);
* AFMoE: Gemma-2's four norms under other names, an output gate from its own ``gate_proj``, RoPE on its
  sliding layers only;
* BitNet: a norm of the attention output before ``o_proj`` (``attn_sub_norm``);
* GPT-Neo: its attention wrapped in ``attn.attention``, unscaled scores, local (windowed) and global layers;
* GPT-J and CodeGen: a parallel block on ``ln_1``, the model's one-tensor rotation (``(tensor, sin, cos)``)
  on ``rotary_dim`` dims of the head, CodeGen's ``qkv_proj`` in model-parallel groups of q, v, k;
* models whose head does not pass extra keywords on to its text model (Falcon, GPT-NeoX-Japanese, BLOOM,
  MPT): ``gmod_prefill_len`` still reaches their MoD layers;
* multi-head latent attention: DeepSeek-V3 (low-rank queries, interleaved rotary; plain queries, Llama's
  rotary and an odd latent width), DeepSeek-V2 (its complex rotary) and MiniCPM3 (both updates scaled by
  ``scale_depth / sqrt(layers)``); test_mla.py has its latent cache and its refusals;
* DiffLlama: differential attention (one attention over the two halves of the values, then subtracted);
* Llama-4's text model: complex rotary, the L2 q / k norm after it, chunked attention (chunks counted from
  each row's first real token) and the NoPE layers' attention temperature, all binding on the test prompts.

References are Hugging Face's own layers: keeping every token, the converted model gives the dense
model's logits and parameter gradients; skipping half the tokens, generation with the compact cache
gives the tokens and scores of the same model recomputed without a cache; and Phi-3's residual
dropout draws the same masks as Hugging Face's layer.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import (assert_cache_equals_no_cache, assert_keep_all_equals_hf, assert_vlm_converts_exactly,
                           hf_model, mod_slots, num_threads, padded_prompt, text_config_kwargs, transformers,
                           vision_prompt)

import gmod_ext
from gmod_ext._hf import find_decoder
from gmod_ext.block_layout import attention_module
from gmod_ext.mod_layer import _model_rope, is_mod_layer


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


_hf = hf_model
GRANITE = dict(residual_multiplier=0.22, attention_multiplier=0.05, embedding_multiplier=12.0, logits_scaling=8.0)
MLA = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=12, head_dim=8, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)


BUILDERS = {
    "phi3": lambda **kw: _hf("Phi3ForCausalLM", "Phi3Config", **kw),
    "phi4_mini": lambda **kw: _hf("Phi3ForCausalLM", "Phi3Config", partial_rotary_factor=0.75, **kw),
    "glm": lambda **kw: _hf("GlmForCausalLM", "GlmConfig", head_dim=16, **kw),
    "glm4": lambda **kw: _hf("Glm4ForCausalLM", "Glm4Config", head_dim=16, **kw),
    "ernie4_5": lambda **kw: _hf("Ernie4_5ForCausalLM", "Ernie4_5Config", head_dim=16, **kw),
    "olmo": lambda **kw: _hf("OlmoForCausalLM", "OlmoConfig", **kw),
    "olmo2": lambda **kw: _hf("Olmo2ForCausalLM", "Olmo2Config", **kw),
    "apertus": lambda **kw: _hf("ApertusForCausalLM", "ApertusConfig", **kw),
    "smollm3_nope": lambda **kw: _hf("SmolLM3ForCausalLM", "SmolLM3Config", head_dim=16, **kw),
    "exaone4_nope": lambda **kw: _hf("Exaone4ForCausalLM", "Exaone4Config", head_dim=16, sliding_window=5, **kw),
    "cohere2_nope": lambda **kw: _hf("Cohere2ForCausalLM", "Cohere2Config", head_dim=16, sliding_window=5, **kw),
    "cohere_parallel": lambda **kw: _hf("CohereForCausalLM", "CohereConfig", head_dim=16, use_qk_norm=True, **kw),
    # Phi-1 / 2: a parallel block with one LayerNorm, the output projection named dense, half the head
    # rotated, one resid_dropout for both updates; with qk_layernorm, per-head q / k LayerNorms
    "phi2_parallel": lambda **kw: _hf("PhiForCausalLM", "PhiConfig", **kw),
    "phi_qk_layernorm": lambda **kw: _hf("PhiForCausalLM", "PhiConfig", qk_layernorm=True, **kw),
    # GPT-OSS: a sink logit per head in every softmax, its own rotation (the head's halves by d / 2
    # angles), windows of 5 on every other layer, a MoE that also returns its router scores
    "gpt_oss_sinks": lambda **kw: _hf("GptOssForCausalLM", "GptOssConfig", head_dim=16, num_local_experts=4,
                                      num_experts_per_tok=2, sliding_window=5, **kw),
    # HunYuan: per-head q / k norms applied after the rotation (query_layernorm / key_layernorm)
    "hunyuan_post_rope_norm": lambda **kw: _hf("HunYuanDenseV1ForCausalLM", "HunYuanDenseV1Config", head_dim=16, **kw),
    # GPT-NeoX (Pythia): the attention module named attention, one query_key_value holding each head's q,
    # k, v, a quarter of the head rotated, the cache passed as layer_past; parallel (two norms of x) or not
    "gpt_neox_parallel": lambda **kw: _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", **kw),
    "gpt_neox_sequential": lambda **kw: _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", use_parallel_residual=False, **kw),
    # VaultGemma: Gemma-2's pre-norms (input_layernorm, pre_feedforward_layernorm) without its post-norms;
    # HyperCLOVA X: peri-layer norms on both updates (post_norm1 / post_norm2) and a residual multiplier
    "vaultgemma": lambda **kw: _hf("VaultGemmaForCausalLM", "VaultGemmaConfig", head_dim=16, **kw),
    "hyperclovax_peri_norm": lambda **kw: _hf("HyperCLOVAXForCausalLM", "HyperCLOVAXConfig", use_post_norm=True,
                                              residual_multiplier=0.5, **kw),
    # Granite: both updates scaled by residual_multiplier, attention scaled by attention_multiplier (and
    # embeddings / logits scaled outside the layers); GraniteMoeShared's MLP branch is block_sparse_moe +
    # shared_mlp
    "granite_multipliers": lambda **kw: _hf("GraniteForCausalLM", "GraniteConfig", **GRANITE, **kw),
    "granitemoe_shared": lambda **kw: _hf("GraniteMoeSharedForCausalLM", "GraniteMoeSharedConfig", num_local_experts=4,
                                          num_experts_per_tok=2, shared_intermediate_size=48, **GRANITE, **kw),
    # OPT (BLIP-2's language model), XGLM, BioGPT: fairseq's block (LayerNorms with biases, fc1 / fc2 and the
    # activation inline, float dropouts), positions added to the input (learned; XGLM's sinusoidal). Their
    # dropouts are off here (test_residual_dropout_draws_hf_masks turns the residual ones on)
    "opt": lambda **kw: _hf("OPTForCausalLM", "OPTConfig", **{"ffn_dim": 128, "word_embed_proj_dim": 64, "dropout": 0.0,
                                                              **kw}),
    "xglm": lambda **kw: _hf("XGLMForCausalLM", "XGLMConfig", **{"d_model": 64, "ffn_dim": 128, "attention_heads": 4,
                                                                "num_layers": 4, "dropout": 0.0, "attention_dropout": 0.0,
                                                                **kw}),
    "biogpt": lambda **kw: _hf("BioGptForCausalLM", "BioGptConfig", **{"hidden_dropout_prob": 0.0,
                                                                      "attention_probs_dropout_prob": 0.0, **kw}),
    # GPT-2: the stack named h, the attention attn with one Conv1D c_attn (all queries, keys, values) and
    # c_proj, the residual dropout inside the attention, learned positions, the cache passed positionally;
    # with its per-layer attention scale 1 / (layer + 1) and upcast attention
    "gpt2": lambda **kw: _hf("GPT2LMHeadModel", "GPT2Config", **{"n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                                 "attn_pdrop": 0.0, **kw}),
    "gpt2_layer_scaled": lambda **kw: _hf("GPT2LMHeadModel", "GPT2Config", **{
        "n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_by_inverse_layer_idx": True,
        "reorder_and_upcast_attn": True, **kw}),
    # GPTBigCode (StarCoder-1, SantaCoder): GPT-2's block with one key / value head (multi_query), or its
    # multi-head variant whose c_attn holds each head's q, k, v in turn
    "gpt_bigcode_mqa": lambda **kw: _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", **{
        "n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **kw}),
    "gpt_bigcode_mha": lambda **kw: _hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", **{
        "n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "multi_query": False, **kw}),
    # Falcon: layers that return (hidden states, attention weights), the attention named self_attention with
    # one query_key_value in three layouts: Falcon-7B's (every query head, then one key / value head; a parallel
    # block on one norm), Falcon-40B / 180B / 2's (per key / value group: its queries, key, value; a norm per
    # branch, or one), and the multi-head one (per head q, k, v) in a sequential block
    "falcon_7b": lambda **kw: _hf("FalconForCausalLM", "FalconConfig", **{"parallel_attn": True, "multi_query": True,
                                                                          "new_decoder_architecture": False, **kw}),
    "falcon_40b": lambda **kw: _hf("FalconForCausalLM", "FalconConfig", **{"new_decoder_architecture": True,
                                                                           "num_kv_heads": 2, **kw}),
    "falcon_40b_one_norm": lambda **kw: _hf("FalconForCausalLM", "FalconConfig", **{
        "new_decoder_architecture": True, "num_kv_heads": 2, "num_ln_in_parallel_attn": 1, **kw}),
    "falcon_sequential": lambda **kw: _hf("FalconForCausalLM", "FalconConfig", **{
        "parallel_attn": False, "multi_query": False, "new_decoder_architecture": False, **kw}),
    # GPT-NeoX-Japanese: layers that return tuples, and a bias added after the last layer's dense (perturbed:
    # HF initialises it to zeros)
    # ALiBi (a per-head penalty linear in the distance, no rotary): BLOOM (its attention and MLP add the
    # residual themselves; 6 heads: slopes beyond the largest power of 2), MPT (Wqkv, norm_1 / norm_2, an
    # MLP named ffn, the stack named blocks, its bias a table for max_seq_len; clipped q / k / v and its own
    # softmax scale), Falcon with alibi=True (the bias added before the scale, no rotation)
    "bloom": lambda **kw: _hf("BloomForCausalLM", "BloomConfig", **{"hidden_dropout": 0.0, "attention_dropout": 0.0,
                                                                    **kw}),
    "bloom_6_heads": lambda **kw: _hf("BloomForCausalLM", "BloomConfig", **{
        "hidden_size": 48, "num_attention_heads": 6, "hidden_dropout": 0.0, "attention_dropout": 0.0, **kw}),
    "mpt": lambda **kw: _hf("MptForCausalLM", "MptConfig", **{"max_seq_len": 64, **kw}),
    "mpt_clip_scale": lambda **kw: _hf("MptForCausalLM", "MptConfig", **{
        "max_seq_len": 64, "attn_config": {"clip_qkv": 0.6, "softmax_scale": 0.2}, **kw}),
    "falcon_alibi": lambda **kw: _hf("FalconForCausalLM", "FalconConfig", **{"alibi": True, **kw}),
    # GPT-J and CodeGen: attention and MLP side by side on ln_1, the rotation the model's one-tensor function
    # (interleaved pairs, position embeddings as (sin, cos)) on rotary_dim dims of the head or all of it;
    # CodeGen's one qkv_proj in 4 model-parallel groups of q, v, k
    "gptj": lambda **kw: _hf("GPTJForCausalLM", "GPTJConfig", **{"rotary_dim": 8, "n_inner": 128, "resid_pdrop": 0.0,
                                                                 "embd_pdrop": 0.0, "attn_pdrop": 0.0, **kw}),
    "gptj_full_rotary": lambda **kw: _hf("GPTJForCausalLM", "GPTJConfig", **{
        "rotary_dim": 16, "n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **kw}),
    "codegen": lambda **kw: _hf("CodeGenForCausalLM", "CodeGenConfig", **{
        "rotary_dim": 8, "n_inner": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **kw}),
    # GPT-Neo: GPT-2's block around an attention wrapped in a module of its own (attn.attention), scores not
    # scaled by 1 / sqrt(d), local layers (window 5 here, shorter than the prompts) alternating with global ones
    "gpt_neo": lambda **kw: _hf("GPTNeoForCausalLM", "GPTNeoConfig", **{
        "attention_types": [[["global", "local"], 2]], "window_size": 5, "resid_dropout": 0.0, "embed_dropout": 0.0,
        "attention_dropout": 0.0, **kw}),
    # BitNet: Llama's block with a norm of the attention output before o_proj (attn_sub_norm) and one inside the
    # MLP (its own forward)
    "bitnet": lambda **kw: _hf("BitNetForCausalLM", "BitNetConfig", **kw),
    # AFMoE: Gemma-2's four norms as input / post_attention / pre_mlp / post_mlp_layernorm, an output gate of its
    # own (gate_proj), q / k norms, RoPE on its sliding layers only (windows of 5 on alternate layers), a MoE
    "afmoe": lambda **kw: _hf("AfmoeForCausalLM", "AfmoeConfig", **{
        "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_dense_layers": 1,
        "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"] * 2, **kw}),
    "gpt_neox_japanese": lambda **kw: _with_dense_bias(_hf("GPTNeoXJapaneseForCausalLM", "GPTNeoXJapaneseConfig", **{
        "attention_dropout": 0.0, "hidden_dropout": 0.0, **kw})),
    # multi-head latent attention (gmod_ext.mla): DeepSeek-V3 (low-rank queries, interleaved rotary, values
    # narrower than keys, MoE after the first layer), the same with plain queries, Llama's rotary and an odd
    # latent width, and MiniCPM3 (branches scaled by scale_depth / sqrt(layers))
    "deepseek_v3": lambda **kw: _hf("DeepseekV3ForCausalLM", "DeepseekV3Config", **{**MLA, **kw}),
    "deepseek_v3_plain_q": lambda **kw: _hf("DeepseekV3ForCausalLM", "DeepseekV3Config", **{
        **MLA, "q_lora_rank": None, "rope_interleave": False, "kv_lora_rank": 31, **kw}),
    "deepseek_v2": lambda **kw: _hf("DeepseekV2ForCausalLM", "DeepseekV2Config", **{**MLA, **kw}),  # complex rotary
    # Llama-4's text model: complex rotary (freqs_cis), an L2 q / k norm after it, a NoPE layer (3) with attention
    # temperature tuning, chunked attention on the RoPE layers, MoE feed_forward on every second layer; chunks of 4
    # and a temperature floor of 3 positions, so that both bind on the test prompts
    "llama4": lambda **kw: _hf("Llama4ForCausalLM", "Llama4TextConfig", **{
        "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128,
        "interleave_moe_layer_step": 2, "attention_chunk_size": 4, "floor_scale": 3, "attn_scale": 0.5, **kw}),
    # differential attention: two softmax maps over the two halves of the value heads, subtracted, then a group norm
    "diffllama": lambda **kw: _hf("DiffLlamaForCausalLM", "DiffLlamaConfig", **kw),
    "minicpm3": lambda **kw: _hf("MiniCPM3ForCausalLM", "MiniCPM3Config", **{
        **MLA, "scale_depth": 1.4, "scale_emb": 12, "dim_model_base": 32, **kw}),
}
def _with_dense_bias(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("dense_bias"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(12))
    return model


# layers that attend without RoPE
NOPE = {"smollm3_nope": [3], "exaone4_nope": [3], "cohere2_nope": [3], "opt": [0, 1, 2, 3], "xglm": [0, 1, 2, 3],
        "biogpt": [0, 1, 2, 3], "gpt2": [0, 1, 2, 3], "gpt2_layer_scaled": [0, 1, 2, 3],
        "gpt_bigcode_mqa": [0, 1, 2, 3], "gpt_bigcode_mha": [0, 1, 2, 3], "bloom": [0, 1, 2, 3],
        "bloom_6_heads": [0, 1, 2, 3], "gpt_neo": [0, 1, 2, 3], "afmoe": [1, 3], "mpt": [0, 1, 2, 3], "mpt_clip_scale": [0, 1, 2, 3], "falcon_alibi": [0, 1, 2, 3], "llama4": [3]}
ALIBI = {"bloom", "bloom_6_heads", "mpt", "mpt_clip_scale", "falcon_alibi"}
OWN_ROPE = {"glm", "glm4", "ernie4_5", "cohere_parallel", "cohere2_nope", "gpt_oss_sinks", "gptj", "gptj_full_rotary",
            "codegen", "llama4"}  # whose rotation is not Llama's (interleaved; Llama-4's complex freqs_cis)


def _perturb_norms(model):
    """HF initialises norm weights to 1 (or 0 for offset norms): perturb them, so that a norm applied in
    the wrong place (or not at all) changes the result."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


LAYOUTS = {"phi3": "llama", "phi4_mini": "llama", "glm": "llama", "glm4": "glm4", "ernie4_5": "llama",
           "olmo": "llama", "olmo2": "olmo2", "apertus": "apertus", "smollm3_nope": "llama",
           "exaone4_nope": "olmo2", "cohere2_nope": "parallel", "cohere_parallel": "parallel",
           "granite_multipliers": "llama", "granitemoe_shared": "llama", "phi2_parallel": "parallel",
           "phi_qk_layernorm": "parallel", "gpt_oss_sinks": "llama", "hunyuan_post_rope_norm": "llama",
           "gpt_neox_parallel": "neox", "gpt_neox_sequential": "llama", "vaultgemma": "vaultgemma",
           "hyperclovax_peri_norm": "hyperclovax", "opt": "opt", "xglm": "opt", "biogpt": "opt", "gpt2": "gpt2",
           "gpt2_layer_scaled": "gpt2", "gpt_bigcode_mqa": "gpt2", "gpt_bigcode_mha": "gpt2", "falcon_7b": "parallel",
           "falcon_40b": "neox", "falcon_40b_one_norm": "parallel", "falcon_sequential": "llama",
           "gpt_neox_japanese": "llama", "bloom": "llama", "bloom_6_heads": "llama", "mpt": "mpt",
           "mpt_clip_scale": "mpt", "falcon_alibi": "parallel", "gptj": "gptj", "gptj_full_rotary": "gptj",
           "codegen": "gptj", "gpt_neo": "gpt2", "bitnet": "llama", "afmoe": "afmoe", "deepseek_v3": "llama",
           "deepseek_v3_plain_q": "llama", "deepseek_v2": "llama", "minicpm3": "llama", "llama4": "llama", "diffllama": "llama"}
# the others: ("mlp",); OPT's family: fc1 then fc2, in sequence
MLP_BRANCH = {"granitemoe_shared": ("block_sparse_moe", "shared_mlp"), "opt": ("fc1", "fc2"), "xglm": ("fc1", "fc2"),
              "biogpt": ("fc1", "fc2"), "mpt": ("ffn",), "mpt_clip_scale": ("ffn",), "llama4": ("feed_forward",)}


# children that take the residual and add it themselves (the others: none)
ADDS_RESIDUAL = {"bloom": ("self_attention", "mlp"), "bloom_6_heads": ("self_attention", "mlp"), "mpt": ("ffn",),
                 "mpt_clip_scale": ("ffn",)}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_block_layout_names_each_norm_role(arch):
    from gmod_ext.block_layout import block_layout

    layer = find_decoder(BUILDERS[arch]()).layers[0]
    layout = block_layout(layer)
    assert layout is not None and layout.family == LAYOUTS[arch] and layout.mlp == MLP_BRANCH.get(arch, ("mlp",))
    assert layout.adds_residual == ADDS_RESIDUAL.get(arch, ())
    norms = {n for n, m in layer.named_children() if "norm" in n or "Norm" in type(m).__name__}  # (GPT-2: ln_1, ln_2)
    assert set(layout.names()) == norms  # every norm has a role


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_nope_layers_are_read_off_the_attention(arch):
    from gmod_ext.mod_layer import _uses_rope

    layers = find_decoder(BUILDERS[arch]()).layers
    assert [i for i, layer in enumerate(layers) if not _uses_rope(attention_module(layer))] == NOPE.get(arch, [])


def test_rotation_under_if_and_else_is_unconditional():
    """GPT-J rotates part of the head under ``if self.rotary_dim is not None`` and all of it in the ``else``:
    that is no NoPE condition, the layer rotates either way (with rotary_dim None, as older configs allow)."""
    from gmod_ext.mod_layer import _uses_rope

    attn = attention_module(find_decoder(BUILDERS["gptj"]()).layers[0])
    assert _uses_rope(attn)
    attn.rotary_dim = None
    assert _uses_rope(attn)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_model_rotation_is_used_exactly_where_it_differs(arch):
    model = BUILDERS[arch]()
    fn = _model_rope(attention_module(find_decoder(model).layers[0]))
    assert (fn is not None) == (arch in OWN_ROPE)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config_kwargs()))
    assert _model_rope(llama.model.layers[0].self_attn) is None  # its own function equals ours


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_keep_all_logits_and_gradients_equal_hf(arch):
    ref = BUILDERS[arch]()
    _perturb_norms(ref)
    model = BUILDERS[arch]()
    model.load_state_dict(ref.state_dict())
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    assert_keep_all_equals_hf(ref, model)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_skipping_generation_cache_equals_no_cache(arch, positions):
    model = BUILDERS[arch]().eval()
    _perturb_norms(model)
    if arch in ALIBI and positions == "compact":  # ALiBi's distances are the model's, at original positions
        with pytest.raises(ValueError, match=r"ALiBi bias .*positions='compact'.*positions='original'"):
            gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], positions=positions, progress=False)
        assert not any(is_mod_layer(m) for m in model.modules())  # refused before changing anything
        return
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], positions=positions, progress=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # p well away from 0.5 on both sides: decode steps keep some tokens, skip others
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape, generator=g) * 0.5)
    ids, am = padded_prompt(3, 12, pad=(0, 2, 4), seed=3)
    if arch in GENERATES_WITHOUT_CACHE:
        cache = _assert_decode_by_hand_equals_no_cache(model, ids, am, steps=10)
    else:
        cached = assert_cache_equals_no_cache(model, dict(input_ids=ids, attention_mask=am), max_new_tokens=10)
        cache = getattr(cached, "past_key_values", None) or cached.cache
    slots = mod_slots(cache)
    seen = 12 + 10 - 1
    stored = [int(s.cache_len.max()) for s in slots.values()]
    assert len(slots) == 3 and all(0 < n < seen for n in stored), stored


# MPT's generate runs without a KV cache in transformers 5.24 (every step recomputes the sequence), so
# there the test decodes by hand with the compact cache
GENERATES_WITHOUT_CACHE = {"mpt", "mpt_clip_scale"}


def _assert_decode_by_hand_equals_no_cache(model, ids, am, steps: int):
    """Greedy decoding step by step on the model's compact cache: each step's logits equal the model's
    without a cache on the whole sequence so far (both with ``gmod_prefill_len`` = the prompt length, as
    ``generate`` routes); returns the cache."""
    from gmod_ext._hf import cache_kwarg_of, output_cache

    P, ckw = ids.shape[1], cache_kwarg_of(model.forward)
    with torch.no_grad():
        out = model(ids, attention_mask=am, use_cache=True, gmod_prefill_len=P, **{ckw: model.gmod_new_cache()})
        cache, seq, mask = output_cache(out), ids, am
        for step in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, mask = torch.cat([seq, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(nxt, attention_mask=mask, use_cache=True, gmod_prefill_len=P, **{ckw: cache})
            full = model(seq, attention_mask=mask, use_cache=False, gmod_prefill_len=P).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
    return cache


def test_llama4_chunked_layers_drop_past_chunks_from_the_cache():
    """A chunked layer's query sees only its own chunk, so its compact cache drops what lies a chunk behind
    (as a dense chunked layer, which keeps its last chunk); the NoPE layer (full attention) keeps all it
    stored. Keeping every token, generation still equals Hugging Face's, tokens and scores."""
    from gmod_ext._hf import output_cache

    ref, model = BUILDERS["llama4"]().eval(), BUILDERS["llama4"]().eval()
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", decode_threshold=0.0, progress=False)
    ids, am = padded_prompt(2, 12, pad=(0, 3), seed=3)
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    out_ref, out = ref.generate(input_ids=ids, attention_mask=am, **gen), model.generate(input_ids=ids, attention_mask=am, **gen)
    assert torch.equal(out.sequences, out_ref.sequences)
    for step, (a, b) in enumerate(zip(out.scores, out_ref.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    slots = mod_slots(output_cache(out))
    seen = 12 + 10 - 1
    chunk = model.config.attention_chunk_size
    assert [i for i in slots if slots[i].window is not None] == [0, 1, 2]  # the chunked (RoPE) layers
    for i in (0, 1, 2):
        assert int(slots[i].cache_len.max()) <= chunk + 1 < seen  # (trimmed every max(1, chunk // 8) positions)
    assert slots[3].cache_len.tolist() == [int(n) + 10 - 1 for n in am.sum(1)]  # full attention: all of them


@pytest.mark.parametrize("arch", ["falcon_7b", "gpt_neox_japanese", "bloom"])
def test_model_keywords_reach_layers_whose_model_head_drops_them(arch):
    """Falcon's, GPT-NeoX-Japanese's and BLOOM's heads call their text model without passing extra keywords
    on, so the text model's hook must take the routing of the outer call (made with its gmod_prefill_len)
    rather than make one without it: decoding by hand on the compact cache, each step equals the no-cache
    forward with the same gmod_prefill_len (MPT runs this in the cache test above)."""
    model = BUILDERS[arch]().eval()
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], progress=False)
    with torch.no_grad():
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape,
                                                   generator=torch.Generator().manual_seed(2)) * 0.5)
    ids, am = padded_prompt(3, 12, pad=(0, 0, 3), seed=3)
    _assert_decode_by_hand_equals_no_cache(model, ids, am, steps=6)


@pytest.mark.parametrize("arch", ["falcon_7b", "bloom", "mpt"])
def test_forced_mask_reaches_layers_whose_model_head_drops_it(arch):
    """gmod_forced_mask given to such a model's head reaches its MoD layers: every token forced, no gate,
    the converted model (ratio 0.5) computes the dense model's logits; without the mask it does not."""
    ref = BUILDERS[arch]().eval()
    model = BUILDERS[arch]().eval()
    model.load_state_dict(ref.state_dict())
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], gate="none", progress=False)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = ref(ids).logits
        forced = model(ids, gmod_forced_mask=torch.ones_like(ids, dtype=torch.bool)).logits
        routed = model(ids).logits
    torch.testing.assert_close(forced, dense, rtol=1e-5, atol=1e-5)
    assert float((routed - dense).abs().max()) > 1e-3


@pytest.mark.parametrize("arch,setting", [("phi3", "resid_pdrop"), ("phi2_parallel", "resid_pdrop"),
                                          ("gpt_neox_parallel", "hidden_dropout"), ("opt", "dropout"),
                                          ("xglm", "dropout"), ("xglm", "activation_dropout"),
                                          ("biogpt", "hidden_dropout_prob"), ("biogpt", "activation_dropout"),
                                          ("gpt2", "resid_pdrop"), ("gpt_bigcode_mqa", "resid_pdrop"),
                                          ("bloom", "hidden_dropout"), ("gptj", "resid_pdrop"),
                                          ("gpt_neo", "resid_dropout")])
def test_residual_dropout_draws_hf_masks(arch, setting):
    """Phi-3 drops out the attention and MLP updates (resid_pdrop; Phi-1 / 2 with one module for both,
    GPT-NeoX with hidden_dropout; OPT's family with the functional dropout, and XGLM / BioGPT the MLP's
    activation too; GPT-2 inside its attention and MLP modules; BLOOM's hidden_dropout inside its attention
    and MLP, which add the residual themselves): in training, a MoD layer keeping every token applies them in
    the same order on same-shaped tensors, so it draws the same masks."""
    ref = BUILDERS[arch](**{setting: 0.3})
    model = BUILDERS[arch](**{setting: 0.3})
    model.load_state_dict(ref.state_dict())
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(4))
    ref.train(), model.train()
    torch.manual_seed(5)
    lr = ref(ids).logits
    torch.manual_seed(5)
    lm = model(ids).logits
    torch.testing.assert_close(lm, lr, rtol=1e-5, atol=1e-5)
    torch.manual_seed(6)  # and the dropout is on: another seed, another result
    assert float((model(ids).logits - lm).abs().max().detach()) > 1e-3


def test_gpt2_token_types_are_segments_not_image_blocks():
    """GPT-2 takes token_type_ids as segment embeddings: a converted GPT-2 (no image token) must not read
    them as Gemma-3's image blocks (bidirectional attention within a run of 1s)."""
    ref = BUILDERS["gpt2"]().eval()
    model = BUILDERS["gpt2"]().eval()
    model.load_state_dict(ref.state_dict())
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    types = torch.zeros_like(ids)
    types[:, 3:8] = 1
    with torch.no_grad():
        a, b = ref(ids, token_type_ids=types).logits, model(ids, token_type_ids=types).logits
        assert float((a - ref(ids).logits).abs().max()) > 1e-4  # the types change the result
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_falcon_gradient_checkpointing_keeps_the_routing():
    """Falcon's model calls its layers without passing keywords on, so its MoD layers take the routing of
    the forward in flight; under gradient checkpointing the recomputation (in backward, after the forward
    has returned) must still route the same way: same loss and gradients as without checkpointing, on a
    left-padded batch (padding never kept) at ratio 0.5."""
    import copy

    model = BUILDERS["falcon_7b"]()
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], progress=False)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    model.train(), ckpt.train()
    ids, am = padded_prompt(2, 14, pad=(0, 3), seed=5)
    from gmod_hf_utils import assert_grads_equal, lm_labels

    labels = lm_labels(ids, am)
    l1 = model(ids, attention_mask=am, labels=labels).loss
    l2 = ckpt(ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(l2, l1)
    l1.backward(), l2.backward()
    assert_grads_equal(ckpt, model)
    assert float(ckpt.gmod_router.weight.grad.abs().sum()) > 0


def test_gpt_neox_dense_on_cache_passes_the_cache_as_layer_past():
    """on_cache="dense" hands the cache to the wrapped layer under the keyword it takes (GPT-NeoX's
    layers: layer_past), so cached generation is the dense model's."""
    ref = BUILDERS["gpt_neox_parallel"]().eval()
    model = BUILDERS["gpt_neox_parallel"]().eval()
    model.load_state_dict(ref.state_dict())
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], on_cache="dense", progress=False)
    ids, am = padded_prompt(2, 10, pad=(0, 3), seed=4)
    kw = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    with torch.no_grad():
        a, b = ref.generate(input_ids=ids, attention_mask=am, **kw), model.generate(input_ids=ids, attention_mask=am, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.scores, b.scores):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def _glm4v(seed=0):
    T = transformers
    if getattr(T, "Glm4vForConditionalGeneration", None) is None:
        pytest.skip(f"transformers {T.__version__} has no GLM-4V")
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512), num_hidden_layers=3)
    # half the head rotated (on interleaved pairs), its 4 frequencies split over time / height / width
    text = dict(tc, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                     "partial_rotary_factor": 0.5})
    vis = dict(depth=1, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
               in_channels=3, out_hidden_size=tc["hidden_size"], intermediate_size=64, image_size=16)
    try:
        cfg = T.Glm4vConfig(text_config=text, vision_config=vis, image_token_id=299, video_token_id=298,
                            image_start_token_id=297, image_end_token_id=296)
        torch.manual_seed(seed)
        model = T.Glm4vForConditionalGeneration(cfg).float().eval()
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny GLM-4V here: {err}")
    return (model, *vision_prompt())


def test_glm4v_image_prompt_converts_exactly_and_generates_from_the_cache():
    """GLM-4V (GLM-4.1V / 4.5V's architecture): GLM-4's block with 3-D rotary positions on image tokens,
    rotated on interleaved pairs by the model's own function."""
    model = assert_vlm_converts_exactly(_glm4v, skip_layers=[1, 2])
    assert model.model.language_model.layers[1]._gmod_rope is not None


def _aya_vision(seed=0):
    T = transformers
    if getattr(T, "AyaVisionForConditionalGeneration", None) is None:
        pytest.skip(f"transformers {T.__version__} has no Aya Vision")
    tc = T.Cohere2Config(**text_config_kwargs(head_dim=16, sliding_window=5, vocab_size=300))
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    cfg = T.AyaVisionConfig(vision_config=vc, text_config=tc, image_token_index=299, downsample_factor=2)
    torch.manual_seed(seed)
    model = T.AyaVisionForConditionalGeneration(cfg).float().eval()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 250, (2, 20), generator=g)
    ids[:, 2:6] = 299  # (32 / 8 / 2)^2 = 4 image tokens per image
    return model, ids, dict(pixel_values=torch.randn(2, 3, 32, 32, generator=g))


def test_aya_vision_image_prompt_converts_exactly_and_generates_from_the_cache():
    """Aya Vision: a SigLIP image encoder in front of Cohere2 (parallel blocks, window 5 on three layers
    of four, the fourth without rotary positions)."""
    assert_vlm_converts_exactly(_aya_vision, skip_layers=[1, 2, 3], positions_3d=False)


def _granite_vision(seed=0):
    """Granite Vision's architecture: LLaVA-NeXT (anyres tiles, image newlines) in front of Granite with
    its multipliers, a SigLIP encoder."""
    T = transformers
    tc = T.GraniteConfig(**text_config_kwargs(vocab_size=300, **GRANITE))
    vc = T.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    try:
        cfg = T.LlavaNextConfig(text_config=tc, vision_config=vc, image_token_index=299, image_grid_pinpoints=[[32, 32]],
                                vision_feature_select_strategy="full", vision_feature_layer=-1)
    except (TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny LLaVA-NeXT / Granite here: {err}")
    torch.manual_seed(seed)
    model = T.LlavaNextForConditionalGeneration(cfg).float().eval()
    _perturb_norms(model)
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 250, (2, 44), generator=g)
    ids[:, 2:38] = 299  # a 32 x 32 image: 16 base patches + 16 tile patches + 4 newlines = 36 tokens
    kw = dict(pixel_values=torch.randn(2, 2, 3, 32, 32, generator=g), image_sizes=torch.tensor([[32, 32]] * 2))
    return model, ids, kw


def test_granite_vision_image_prompt_converts_exactly_and_generates_from_the_cache():
    model = assert_vlm_converts_exactly(_granite_vision, skip_layers=[1, 2, 3], positions_3d=False)
    assert model.model.language_model.layers[1].residual_multiplier == GRANITE["residual_multiplier"]


def _qwen3_vl(seed=0):
    T = transformers
    if getattr(T, "Qwen3VLForConditionalGeneration", None) is None:
        pytest.skip(f"transformers {T.__version__} has no Qwen3-VL")
    tc = dict(text_config_kwargs(vocab_size=300, max_position_embeddings=512, head_dim=16), num_hidden_layers=3)
    text = dict(tc, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                     "mrope_interleaved": True})
    vis = dict(depth=2, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
               in_channels=3, out_hidden_size=tc["hidden_size"], intermediate_size=64,
               deepstack_visual_indexes=[0, 1], num_position_embeddings=16)
    try:
        cfg = T.Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=299, video_token_id=298,
                              vision_start_token_id=297, vision_end_token_id=296)
        torch.manual_seed(seed)
        model = T.Qwen3VLForConditionalGeneration(cfg).float().eval()
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny Qwen3-VL here: {err}")
    return (model, *vision_prompt())


def test_qwen3_vl_image_prompt_converts_exactly_and_generates_from_the_cache():
    """Qwen3-VL: Qwen3's block (per-head q / k norms) with interleaved 3-D M-RoPE on image tokens and
    DeepStack (vision features added to the hidden states between the first decoder layers)."""
    assert_vlm_converts_exactly(_qwen3_vl, skip_layers=[1, 2])


def _blip2(seed=0, instruct=False):
    """BLIP-2 / InstructBLIP: a ViT and a Q-Former whose 4 query outputs replace the 4 image tokens in front
    of OPT (InstructBLIP's Q-Former also reads the instruction)."""
    T = transformers
    tc = T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4, vocab_size=300,
                     max_position_embeddings=256, word_embed_proj_dim=64, dropout=0.0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8)
    qc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, encoder_hidden_size=32,
              vocab_size=300)
    names = ("InstructBlipConfig", "InstructBlipForConditionalGeneration") if instruct else \
        ("Blip2Config", "Blip2ForConditionalGeneration")
    cfg_cls, cls = (getattr(T, n, None) for n in names)
    if cls is None:
        pytest.skip(f"transformers {T.__version__} has no {names[1]}")
    try:
        cfg = cfg_cls(vision_config=vc, qformer_config=qc, text_config=tc.to_dict(), num_query_tokens=4,
                      image_token_index=299)
        torch.manual_seed(seed)
        model = cls(cfg).float().eval()
    except (AttributeError, TypeError, ValueError) as err:
        pytest.skip(f"cannot build a tiny {names[1]} here: {err}")
    _perturb_norms(model.language_model)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # the tiny encoders' init (zero query tokens, ...) makes every image alike: perturb them
        for name, p in model.named_parameters():
            if not name.startswith("language_model."):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    ids = torch.randint(3, 250, (2, 16), generator=g)
    ids[:, :4] = 299  # the query tokens' places
    kw = dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g))
    if instruct:
        kw["qformer_input_ids"] = torch.randint(3, 250, (2, 5), generator=g)
    return model, ids, kw


@pytest.mark.parametrize("instruct", [False, True], ids=["blip2", "instructblip"])
def test_blip2_image_prompt_converts_exactly_and_generates_from_the_cache(instruct):
    """BLIP-2 / InstructBLIP (OPT behind a Q-Former): the image changes the logits; keeping every token the
    converted model gives them exactly; skipping, generation from the compact cache equals the no-cache
    recomputation, and the MoD layers' slots hold fewer tokens than were seen."""
    model, ids, kw = _blip2(instruct=instruct)
    with torch.no_grad():
        other = dict(kw, pixel_values=torch.randn(kw["pixel_values"].shape, generator=torch.Generator().manual_seed(3)))
        a, b = model(input_ids=ids, **kw).logits, model(input_ids=ids, **other).logits
    assert float((a - b).abs().max() / a.abs().max()) > 1e-3  # the image reaches the language model
    model = assert_vlm_converts_exactly(lambda seed=0: _blip2(seed, instruct), skip_layers=[1, 2, 3],
                                        positions_3d=False)
    layers = model.language_model.model.decoder.layers
    assert [is_mod_layer(layer) for layer in layers] == [False, True, True, True]
    with torch.no_grad():
        out = model.generate(input_ids=ids, **kw, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    slots = mod_slots(out.past_key_values)
    assert len(slots) == 3 and all(0 < int(s.cache_len.max()) < 16 + 4 - 1 for s in slots.values())


def test_compact_positions_on_an_m_rope_model_warn():
    """positions="compact" gives kept image tokens 1-D positions: on an M-RoPE model convert says so."""
    import warnings

    model, _, _ = _qwen3_vl()
    with pytest.warns(UserWarning, match=r"\(M-RoPE\); positions='compact' gives the kept tokens 1-D positions"):
        gmod_ext.convert(model, ratio=0.5, layers=[1, 2], positions="compact", progress=False)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text_config_kwargs()))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        gmod_ext.convert(llama, ratio=0.5, layers="all", positions="compact", progress=False)
    assert not [w for w in seen if "M-RoPE" in str(w.message)]
