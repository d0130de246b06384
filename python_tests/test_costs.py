"""gmod_ext.costs (the demo's and ``bench model``'s FLOP column) against torch's own FLOP counter on one
decoder layer of a real Hugging Face model: gated MLPs count 3 matrices, GPT-2's / OPT's / BLOOM's / MPT's 2."""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import hf_model, tiny_model

from gmod_ext._hf import find_decoder
from gmod_ext.costs import arch_of, layer_flops

MODELS = {
    "llama": (lambda: tiny_model("llama"), 3),
    "gpt2": (lambda: hf_model("GPT2LMHeadModel", "GPT2Config", n_inner=96), 2),
    "opt": (lambda: hf_model("OPTForCausalLM", "OPTConfig", ffn_dim=96, word_embed_proj_dim=64), 2),
    "gpt_neox": (lambda: hf_model("GPTNeoXForCausalLM", "GPTNeoXConfig", num_key_value_heads=4), 2),  # (MHA)
    # BLOOM's and MPT's MLPs are 4 D wide (Hugging Face's MPT ignores expansion_ratio): configs without a stray
    # intermediate_size
    "bloom": (lambda: _plain("BloomForCausalLM", "BloomConfig", hidden_size=64, n_head=4, n_layer=2), 2),
    "mpt": (lambda: _plain("MptForCausalLM", "MptConfig", d_model=64, n_heads=4, n_layers=2, max_seq_len=32), 2),
}


def _plain(cls_name, cfg_name, **cfg):
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, cls_name)(getattr(transformers, cfg_name)(vocab_size=128, **cfg)).float()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_layer_flops_match_torch_flop_counter(name):
    from torch.utils.flop_counter import FlopCounterMode

    build, mats = MODELS[name]
    model = build().eval()
    model.config._attn_implementation = "eager"  # attention as matmuls the counter sees (over all S x S pairs)
    a = arch_of(model)
    assert a["mlp_mats"] == mats
    captured = {}
    layer = find_decoder(model).layers[1]
    handle = layer.register_forward_pre_hook(lambda m, args, kw: captured.setdefault("x", (args, kw)), with_kwargs=True)
    n = 9
    with torch.no_grad():
        model(torch.randint(1, 100, (1, n), generator=torch.Generator().manual_seed(0)), use_cache=False)
    handle.remove()
    args, kw = captured["x"]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(*args, **kw)
    causal = 4.0 * a["Hq"] * a["d"] * n * (n + 1) / 2.0
    full = 4.0 * a["Hq"] * a["d"] * n * n  # the eager matmuls compute the masked half too
    assert counter.get_total_flops() == layer_flops(a, n) - causal + full
