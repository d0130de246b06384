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


def test_pop_cache_takes_either_name_and_refuses_both():
    c = object()
    for name in ("cache", "past_key_values"):
        kw = {name: c, "other": 1}
        assert pop_cache(kw) is c and kw == {"other": 1}
    kw = {"past_key_values": None, "cache": None}
    assert pop_cache(kw) is None and kw == {}
    with pytest.raises(ValueError, match="both"):
        pop_cache({"cache": c, "past_key_values": object()})


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

    assert cache_kwarg_of(new) == "cache" and cache_kwarg_of(old) == "past_key_values"
    assert cache_kwarg_of(len) in ("cache", "past_key_values")  # builtins: no crash


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_mod_layers_use_the_compact_cache_under_either_name(name):
    """Prefill + two decode steps with the GmodCache passed as `name` (`cache` needs transformers
    >= 5.24, where `past_key_values` is the deprecated alias): the MoD layers fill their compact
    slots, and the logits equal those of the same steps under the installed release's name."""
    with num_threads(1):
        torch.manual_seed(0)
        model = tiny_model("llama").eval()
        gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
        ids = torch.randint(1, 100, (2, 12))
        native = cache_kwarg_of(type(model).forward)
        if name == "cache" and native != "cache":
            pytest.skip("transformers < 5.24 models take the KV cache as past_key_values only")

        def run(kwarg):
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
            return cache, logits

        cache, logits = run(name)
        slots = [i for i, l in enumerate(cache.layers) if isinstance(l, GmodLayer_cls())]
        assert slots == [1, 2]
        assert all(cache.layers[i].seen == 12 for i in slots)
        _, ref = run(native)
        for a, b in zip(logits, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
