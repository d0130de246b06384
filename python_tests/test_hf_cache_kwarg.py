"""The KV cache's keyword across transformers releases: 5.24 renamed ``past_key_values`` to ``cache``
(models, decoder layers, generate's model_kwargs and output fields). The MoD layers and generation
hooks take either (gmod_ext._hf); these tests pin the helpers and run a converted model's cached
decode with the cache under both names, on whichever transformers is installed."""
from __future__ import annotations

import warnings

import pytest
import torch

from gmod_hf_utils import num_threads, tiny_model

import gmod_ext
from gmod_ext._hf import cache_kwarg_of, output_cache, pop_cache
from gmod_ext.cache import GmodCache_cls, GmodLayer_cls


def test_pop_cache_takes_any_name_and_refuses_two():
    c = object()
    for name in ("cache", "past_key_values", "layer_past"):  # layer_past: GPT-NeoX's decoder layers
        kw = {name: c, "other": 1}
        assert pop_cache(kw) is c and kw == {"other": 1}
    kw = {"past_key_values": None, "cache": None, "layer_past": None}
    assert pop_cache(kw) is None and kw == {}
    with pytest.raises(ValueError, match="given as cache and past_key_values; pass it once"):
        pop_cache({"cache": c, "past_key_values": object()})
    with pytest.raises(ValueError, match="given as past_key_values and layer_past"):
        pop_cache({"layer_past": c, "past_key_values": object()})


def test_output_cache_reads_the_field_of_either_release():
    c = object()
    assert output_cache({"cache": c}) is c
    assert output_cache({"past_key_values": c}) is c
    assert output_cache({"logits": 1}) is None

    class Out:
        past_key_values = c

    assert output_cache(Out()) is c


def test_cache_kwarg_of_reads_the_signature():
    def new(hidden_states, cache=None, **kw): ...

    def old(hidden_states, past_key_values=None, **kw): ...

    def neox(hidden_states, layer_past=None, **kw): ...

    assert cache_kwarg_of(new) == "cache" and cache_kwarg_of(old) == "past_key_values"
    assert cache_kwarg_of(neox) == "layer_past"
    assert cache_kwarg_of(len) in ("cache", "past_key_values")  # builtins: no crash


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_mod_layers_use_the_compact_cache_under_either_name(name):
    """Prefill (10 tokens) + two decode steps with the GmodCache passed as `name` (`cache` needs
    transformers >= 5.24, where `past_key_values` is the deprecated alias), checked against
    references that involve no cache keyword at all:

    * keep-all conversion (ratio 0, gate="none", decode_threshold 0) of the same weights: the cached
      logits equal the unconverted Hugging Face model's no-cache forward, and every token is stored;
    * skipping (ratio 0.5, separated router scores): the cached logits equal a full no-cache forward
      with the same routing decisions (``gmod_prefill_len=10``), and the compact slots hold fewer
      tokens than positions seen (a cache that was dropped under `name` would give a decode step
      that only sees its own token);
    * the deprecated alias equals the installed release's name bit for bit (only where they differ:
      a run is never compared with itself)."""
    with num_threads(1):
        ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
        ref = tiny_model("llama").eval()
        native = cache_kwarg_of(type(ref).forward)
        if name == "cache" and native != "cache":
            pytest.skip("transformers < 5.24 models take the KV cache as past_key_values only")

        def run(model, kwarg):
            cache = GmodCache_cls()(model)
            logits = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # the deprecated name on transformers >= 5.24
                with torch.no_grad():
                    out = model(ids[:, :10], use_cache=True, **{kwarg: cache})
                    logits.append(out.logits)
                    for t in (10, 11):
                        out = model(ids[:, t:t + 1], use_cache=True, **{kwarg: cache})
                        logits.append(out.logits)
            assert output_cache(out) is cache
            return cache, torch.cat(logits, 1)

        def mod_slots(cache):
            slots = [i for i, l in enumerate(cache.layers) if isinstance(l, GmodLayer_cls())]
            assert slots == [1, 2]
            assert all(cache.layers[i].seen == 12 for i in slots)
            return [cache.layers[i].host_lens() for i in slots]

        # keep-all == Hugging Face (same weights: tiny_model seeds its init)
        keep = tiny_model("llama").eval()
        gmod_ext.convert(keep, ratio=0.0, layers=[1, 2], gate="none", decode_threshold=0.0, progress=False)
        cache, logits = run(keep, name)
        assert mod_slots(cache) == [[12, 12], [12, 12]]
        with torch.no_grad():
            want = ref(ids, use_cache=False).logits
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)

        # skipping: cached == no-cache recompute with the same decisions
        model = tiny_model("llama").eval()
        gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            model.gmod_router.weight.copy_(torch.randn(model.gmod_router.weight.shape, generator=g) * 0.5)
            model.gmod_router.bias.zero_()
        cache, logits = run(model, name)
        lens = mod_slots(cache)
        assert all(5 <= n <= 7 for row in lens for n in row), lens  # top-k: 5 of the 10 prompt tokens
        assert any(n < 7 for row in lens for n in row), lens  # and a decode token skipped somewhere
        with torch.no_grad():
            full = model(ids, use_cache=False, gmod_prefill_len=10).logits
        torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(logits, want, atol=1e-3)  # skipping changed the computation

        if name != native:
            _, native_logits = run(model, native)
            torch.testing.assert_close(logits, native_logits, rtol=0, atol=0)
