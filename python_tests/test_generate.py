"""generate() on converted models with the compact MoD KV cache (gmod_ext.cache / gmod_ext.generation).

* keep-all settings (ratio 0, gate="none", decode_threshold 0): token-for-token equal to the
  unconverted Hugging Face model (batch 1, batch 4 with left padding; right-padded prefill logits);
* skipping on (ratio 0.5, gamma-MoD gating): the cached generation equals a full recompute without a
  cache (use_cache=False) with the same routing decisions (``gmod_prefill_len``), batch 1 and 3;
* streaming, sampling, beam search.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import make_batch, num_threads, padded_prompt, tiny_model, transformers

import gmod_ext
from gmod_ext.cache import GmodCache_cls, GmodLayer_cls


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _keep_all(arch="llama", **over):
    ref = tiny_model(arch, **over).eval()
    model = tiny_model(arch, **over).eval()
    gmod_ext.convert(model, ratio=0.0, layers=[1, 2], gate="none", decode_threshold=0.0, progress=False)
    return ref, model


def _skipping(arch="llama", variant="gamma", positions="original", seed=0, **kw):
    model = tiny_model(arch).eval()
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], variant=variant, positions=positions, progress=False, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # clearly separated router scores: half kept, half skipped at decode
        for r in [m for m in model.modules() if isinstance(m, gmod_ext.GmodRouter)]:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.5)
            r.bias.zero_()
    return model


GEN = dict(do_sample=False, pad_token_id=0)


# ----------------------------------------------------------------------------- keep-all == HF
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_keep_all_greedy_equals_hf_batch1(arch):
    ref, model = _keep_all(arch)
    ids, _ = padded_prompt(1, 12)
    out_ref = ref.generate(ids, max_new_tokens=10, **GEN)
    out = model.generate(ids, max_new_tokens=10, return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, out_ref)
    cache = out.past_key_values
    assert isinstance(cache, GmodCache_cls())
    assert [type(l).__name__ for l in cache.layers] == ["DynamicLayer", "GmodLayer", "GmodLayer", "DynamicLayer"]
    # keep-all: every position went through the MoD layers (the last generated token is never fed)
    for i in (1, 2):
        assert cache.layers[i].host_lens() == [12 + 9]
        assert cache.layers[i].cache_len.tolist() == [21]


@pytest.mark.parametrize("arch", ["llama", "mistral", "llava"])
def test_keep_all_greedy_equals_hf_batch4_left_padding(arch):
    ref, model = _keep_all(arch)
    if arch == "llava":
        batch = make_batch("llava", B=4, S=24, pad=True)
        batch.pop("labels")
        batch["attention_mask"][1, :2] = 0  # (image tokens start at 4)
        batch["input_ids"][1, :2] = 0
        kw = batch
        S = 24
    else:
        ids, am = padded_prompt(4, 14, pad=(0, 3, 0, 6))
        kw = dict(input_ids=ids, attention_mask=am)
        S = 14
    # the per-step scores too, not only the tokens: a position (rotary) error in the left-padded rows
    # moves logits by ~1e-3, which flips few argmaxes but is far outside float32 rounding (~1e-6 here)
    gen = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, **GEN)
    out_ref = ref.generate(**kw, **gen)
    out = model.generate(**kw, **gen)
    assert torch.equal(out.sequences, out_ref.sequences), (out.sequences[:, S:], out_ref.sequences[:, S:])
    assert len(out.scores) == len(out_ref.scores) == 8
    for step, (a, b) in enumerate(zip(out.scores, out_ref.scores)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    # padding is never processed, never cached
    real = kw["attention_mask"].sum(1)
    for i in (1, 2):
        assert out.past_key_values.layers[i].host_lens() == (real + 7).tolist()


def test_keep_all_right_padded_prefill_logits():
    ref, model = _keep_all("llama")
    ids, am = padded_prompt(3, 12, pad=(0, 4, 2), side="right")
    with torch.no_grad():
        lr = ref(ids, attention_mask=am).logits
        out = model(ids, attention_mask=am, use_cache=True)
    valid = am.bool()
    torch.testing.assert_close(out.logits[valid], lr[valid], rtol=1e-5, atol=1e-5)
    cache = out.past_key_values
    assert cache.get_seq_length() == 12
    for i in (1, 2):
        slot = cache.layers[i]
        assert isinstance(slot, GmodLayer_cls())
        assert slot.host_lens() == am.sum(1).tolist()  # right padding not appended


def test_keep_all_use_cache_false_equals_hf():
    ref, model = _keep_all("llama")
    ids, am = padded_prompt(2, 10, pad=(0, 3))
    a = ref.generate(ids, attention_mask=am, max_new_tokens=6, use_cache=False, **GEN)
    b = model.generate(ids, attention_mask=am, max_new_tokens=6, use_cache=False, **GEN)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- cache == no cache
@pytest.mark.parametrize(
    "variant,positions,extra",
    [
        ("gamma", "original", {}),
        ("gamma", "compact", {}),
        ("pmod", "original", {"schedule": "constant", "router_init": "normal"}),
        ("mod", "original", {}),
        ("gamma", "original", {"threshold": 0.5}),  # prefill: p > 0.5, capped at the top-k count
    ],
)
@pytest.mark.parametrize("B", [1, 3])
def test_skipping_cache_equals_no_cache(B, variant, positions, extra):
    model = _skipping(variant=variant, positions=positions, **extra)
    pad = (0, 4, 7)[:B]
    ids, am = padded_prompt(B, 16, pad=pad, seed=B)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=12, return_dict_in_generate=True, output_logits=True)
    cached = model.generate(**kw, **GEN)
    full = model.generate(**kw, use_cache=False, **GEN)
    assert torch.equal(cached.sequences, full.sequences)
    for a, b in zip(cached.logits, full.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # skipping really happened, at the prompt and at decode
    cache = cached.past_key_values
    n_real = am.sum(1)
    stored = torch.tensor([cache.layers[i].host_lens() for i in (1, 2, 3)])  # [layers, B]
    total = n_real + 11
    assert (stored < total).all()
    # the training rule (top-k over the whole sequence at every step) routes differently
    if variant == "gamma" and positions == "original" and not extra:
        topk = model.generate(**kw, use_cache=False, gmod_prefill_len=None, **GEN)
        assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(topk.logits, full.logits))


def test_decode_skips_and_keeps_at_decode():
    """Stored tokens: top-k of the prompt plus the decode tokens with p >= 0.5, both present."""
    model = _skipping()
    ids, am = padded_prompt(1, 16)
    out = model.generate(ids, attention_mask=am, max_new_tokens=16, return_dict_in_generate=True, **GEN)
    lens = [out.past_key_values.layers[i].host_lens()[0] for i in (1, 2, 3)]
    assert all(8 <= n <= 8 + 15 for n in lens)
    assert any(n > 8 for n in lens) and any(n < 8 + 15 for n in lens), lens


def test_sampling():
    model = _skipping()
    ids, am = padded_prompt(3, 10, pad=(0, 2, 5))
    kw = dict(attention_mask=am, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(123)
    a = model.generate(ids, **kw)
    torch.manual_seed(123)
    b = model.generate(ids, **kw)
    assert a.shape == (3, 18) and torch.equal(a[:, :10], ids)
    assert int(a.min()) >= 0 and int(a.max()) < 128
    assert torch.equal(a, b)  # seeded: reproducible
    torch.manual_seed(123)
    c = model.generate(ids, use_cache=False, **kw)
    assert c.shape == a.shape
    # same decisions, logits equal to ~1e-7 and the same random draws: in practice the same sample
    # (not guaranteed in general: a draw that lands within rounding of a boundary may differ)
    assert torch.equal(c, a)


def test_streaming():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []
            self.ended = False

        def put(self, value):
            self.chunks.append(value.detach().clone().reshape(-1))

        def end(self):
            self.ended = True

    model = _skipping()
    ids, _ = padded_prompt(1, 10)
    s = Collect()
    out = model.generate(ids, max_new_tokens=7, streamer=s, **GEN)
    assert s.ended
    assert torch.equal(s.chunks[0], ids[0])  # the prompt first, then one token per step
    assert torch.equal(torch.cat(s.chunks[1:]), out[0, 10:])


def test_text_streamer(capsys):
    class Tok:  # the minimum TextStreamer needs
        def decode(self, ids, **kw):
            return "".join(f"<{int(i)}>" for i in ids)

    model = _skipping()
    ids, _ = padded_prompt(1, 6)
    out = model.generate(ids, max_new_tokens=5, streamer=transformers.TextStreamer(Tok(), skip_prompt=True), **GEN)
    printed = capsys.readouterr().out
    assert printed.strip() == "".join(f"<{int(i)}>" for i in out[0, 6:])


def test_beam_search_cache_equals_no_cache():
    model = _skipping()
    ids, am = padded_prompt(2, 12, pad=(0, 3))
    kw = dict(attention_mask=am, max_new_tokens=6, num_beams=3, **GEN)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_generate_hooks_survive_deepcopy_and_unconvert():
    import copy

    model = _skipping()
    ids, _ = padded_prompt(1, 8)
    out = model.generate(ids, max_new_tokens=4, **GEN)
    clone = copy.deepcopy(model)
    assert clone.generate.model is clone and clone.gmod_new_cache.model is clone
    assert torch.equal(clone.generate(ids, max_new_tokens=4, **GEN), out)
    gmod_ext.unconvert(clone)
    assert "generate" not in clone.__dict__ and "gmod_new_cache" not in clone.__dict__
