"""Multi-head latent attention (gmod_ext.mla): DeepSeek-V3's family in MoD layers.

test_block_variants.py runs the general checks on DeepSeek-V3 (two variants) and MiniCPM3 (keeping
every token, logits and gradients equal Hugging Face's; skipping, the compact cache equals the recompute).
Here:

* the compact cache of a MoD layer holds each kept token's latent (``kv_lora_rank + qk_rope_head_dim``
  values, as Hugging Face's own MLA cache does), not the expanded keys and values of every head; keeping
  every token, its greedy generation gives Hugging Face's tokens and scores;
* MLA attentions that compute something else are refused with the reason: a rotation it does not know,
  DeepSeek-V3.2's sparse-attention indexer.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import assert_cache_equals_no_cache, hf_model, mod_slots, num_threads, padded_prompt

import gmod_ext
from gmod_ext.mod_layer import is_mod_layer

# the ops a converted model's forward runs (the CUDA case is skipped without their CUDA kernels)
GMOD_OPS = ("router_logits", "route", "gather_rows", "scatter_merge", "kv_cache_append", "attention")
MLA = dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=12, head_dim=8, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _v3(**kw):
    return hf_model("DeepseekV3ForCausalLM", "DeepseekV3Config", **{**MLA, **kw}).eval()


@pytest.mark.parametrize("kv_lora_rank", [32, 31])
def test_compact_cache_holds_the_latent_and_greedy_equals_hf(kv_lora_rank, device):
    """(On CUDA the tiny model's 24-wide heads have no kernel: its MoD layers attend with SDPA there.)"""
    ref, model = _v3(kv_lora_rank=kv_lora_rank).to(device), _v3(kv_lora_rank=kv_lora_rank).to(device)
    gmod_ext.convert(model, ratio=0.0, layers=[1, 2, 3], gate="none", decode_threshold=0.0, progress=False)
    ids, am = (t.to(device) for t in padded_prompt(2, 10, pad=(0, 3), seed=4))
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    out_ref = ref.generate(input_ids=ids, attention_mask=am, **gen)
    out = model.generate(input_ids=ids, attention_mask=am, **gen)
    assert torch.equal(out.sequences, out_ref.sequences)
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-3, atol=1e-3)  # (TF32 matmuls)
    for step, (a, b) in enumerate(zip(out.scores, out_ref.scores)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"step {step}: {m}")

    cache = getattr(out, "past_key_values", None) or out.cache
    ref_cache = getattr(out_ref, "past_key_values", None) or out_ref.cache
    width = kv_lora_rank + MLA["qk_rope_head_dim"]  # one latent per token, shared by the heads
    hf_layer = ref_cache.layers[1]  # Hugging Face's own MLA cache: the latent and the rotated key part
    assert hf_layer.keys.shape[-1] + hf_layer.values.shape[-1] == width
    slots = mod_slots(cache)
    assert sorted(slots) == [1, 2, 3]
    for i, slot in slots.items():
        assert slot.keys.shape[2:] == (1, (width + 1) // 2) and slot.values.shape[2:] == (1, (width + 1) // 2)
        # every token kept: each row holds its non-padding positions (the last generated token is not fed back)
        assert slot.cache_len.tolist() == [int(n) + 6 - 1 for n in am.sum(1).cpu()]
    report = gmod_ext.kv_memory_report(cache)
    per_token = 2 * ((width + 1) // 2) * 4  # float32
    mod_rows = [r for r in report["layers"] if r["kind"] == "mod"]
    assert all(r["used_bytes"] == sum(r["tokens"]) * per_token for r in mod_rows)


def test_head_dims_without_a_kernel_run_on_sdpa(monkeypatch):
    """DeepSeek-V3's keys are 192 wide, a head dim the CUDA attention kernels are not built for: there MoD
    layers attend with SDPA (prefill) and the position-masked attention (decode). Run on the CPU with the
    kernels declared unable, skipping half the tokens: the compact cache still equals the recompute."""
    from gmod_ext import ops

    calls = []
    monkeypatch.setattr(ops, "attention_supports", lambda q, v=None: calls.append(q.shape[-1]) or False)
    monkeypatch.setattr(ops, "attention", lambda *a, **k: pytest.fail("gmod.attention called"))
    model = _v3()
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], progress=False)
    with torch.no_grad():
        model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape,
                                                   generator=torch.Generator().manual_seed(2)) * 0.5)
    ids, am = padded_prompt(2, 10, pad=(0, 3), seed=4)
    assert_cache_equals_no_cache(model, dict(input_ids=ids, attention_mask=am), max_new_tokens=6)
    assert calls and set(calls) == {MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]}


def test_mla_with_a_rotation_it_does_not_know_is_refused():
    """An MLA attention whose forward rotates with none of the functions gmod_ext.mla knows (Llama's,
    DeepSeek-V3's interleaved one, DeepSeek-V2's complex one) is refused, not rotated some other way."""
    model = _v3()
    base = type(model.model.layers[1].self_attn)

    class OwnRotation(base):  # (computes what its base does; only the name of its rotation differs)
        def forward(self, *args, **kwargs):
            if kwargs.get("position_embeddings") is None:
                some_other_rotation()
            return super().forward(*args, **kwargs)

    model.model.layers[1].self_attn.__class__ = OwnRotation
    with pytest.raises(TypeError, match="rotates with none of"):
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert not any(is_mod_layer(m) for m in model.modules())


def some_other_rotation():  # (never called)
    raise AssertionError("not reached")


def test_mla_with_a_sparse_attention_indexer_is_refused():
    """DeepSeek-V3.2 attends each query to the top-k keys its indexer picks: a dense MoD layer would not."""
    model = hf_model("DeepseekV32ForCausalLM", "DeepseekV32Config", **MLA, index_n_heads=2, index_head_dim=16,
                     index_topk=4)
    with pytest.raises(TypeError, match=r"\['indexer'\].*top-k"):
        gmod_ext.convert(model, ratio=0.5, layers="all", progress=False)
    assert not any(is_mod_layer(m) for m in model.modules())
