"""Rolling the compact MoD KV cache back (``crop``), and the generation modes built on it.

* a cache fed a prompt and n tokens, then cropped by k, holds exactly what a cache fed the prompt
  and n - k tokens holds (every slot's keys, values, lengths, positions), and the next step's
  logits agree, on batches whose rows keep and skip different tokens (so a crop that assumed every
  removed position was stored fails);
* assisted generation (a draft model's tokens verified in one multi-token step, the rejected ones
  cropped) and prompt-lookup decoding give plain greedy generation's tokens and scores;
* ``crop``'s argument in both of transformers' meanings (``crop(-n)`` removes n; ``crop(m >= 0)``
  keeps m where ``crop`` takes ``max_length`` (5.13), is refused where it takes ``tokens_to_remove``
  (5.17, 5.24), and there ``crop(0)`` removes nothing).
"""
from __future__ import annotations

import copy

import pytest
import torch

from gmod_hf_utils import mod_slots, num_threads, padded_prompt, skipping_llama, tiny_model

from gmod_ext.cache import GmodLayer_cls, crop_removes_tokens, crop_target


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _feed(model, ids, am, new, chunks):
    """Prefill ``ids``, then feed ``new`` [B, n] in the given chunk sizes; returns (cache, last logits)."""
    cache = model.gmod_new_cache()
    with torch.no_grad():
        out = model(ids, attention_mask=am, past_key_values=cache, use_cache=True)
        at = 0
        for c in chunks:
            am = torch.cat([am, torch.ones(am.shape[0], c, dtype=am.dtype)], 1)
            out = model(new[:, at : at + c], attention_mask=am, past_key_values=cache, use_cache=True)
            at += c
    return cache, out.logits[:, -1], am


def _assert_same_cache(a, b):
    assert a.get_seq_length() == b.get_seq_length()
    sa, sb = mod_slots(a), mod_slots(b)
    assert sorted(sa) == sorted(sb) == [1, 2, 3]
    for i, (la, lb) in enumerate(zip(a.layers, b.layers)):
        if i not in sa:  # dense slots: Hugging Face's DynamicLayer
            torch.testing.assert_close(la.keys, lb.keys, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(la.values, lb.values, rtol=1e-5, atol=1e-6)
            continue
        assert la.seen == lb.seen, i
        assert la.cache_len.tolist() == lb.cache_len.tolist() == la.host_lens() == lb.host_lens(), i
        for r, n in enumerate(la.host_lens()):
            assert la.positions[r, :n].tolist() == lb.positions[r, :n].tolist(), (i, r)
            torch.testing.assert_close(la.keys[r, :n], lb.keys[r, :n], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(la.values[r, :n], lb.values[r, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("B,chunks,remove", [(3, (1,) * 6, 1), (3, (1,) * 6, 4), (3, (1,) * 6, 6), (3, (2, 4), 3),
                                              (3, (6,), 5), (1, (2, 2, 2, 2), 5), (1, (3, 1, 3), 4)])
def test_crop_equals_never_fed(positions, B, chunks, remove):
    """Prefill, then ``chunks`` of new tokens, then ``crop(-remove)``: the cache equals one fed the
    prompt and the first ``n - remove`` tokens one at a time, and so does the next step. Batch 3 has
    rows of different padding; batch 1 with chunks of 2 - 3 tokens has steps that keep one token
    that is not the chunk's first."""
    torch.manual_seed(0)
    model = skipping_llama(positions=positions)
    S, n = 10, sum(chunks)
    ids, am = padded_prompt(B, S, pad=(0, 2, 5)[:B])
    new = torch.randint(1, 100, (B, n), generator=torch.Generator().manual_seed(1))
    cache, _, am_full = _feed(model, ids, am, new, chunks)

    # The recorded positions are the tokens each layer kept: those of a full forward without a cache
    # routed with the same rule (top-k over the prompt, the decode rule after it).
    with torch.no_grad():
        model(torch.cat([ids, new], 1), attention_mask=am_full, use_cache=False, gmod_prefill_len=S)
    for i, slot in mod_slots(cache).items():
        idx, count = model.gmod_state.current.selection[i]
        for r, m in enumerate(slot.host_lens()):
            assert m == int(count[r]) and slot.positions[r, :m].tolist() == idx[r, :m].tolist(), (i, r)

    # The removed positions include tokens some MoD layer skipped in some row and tokens it stored:
    # a crop that took every removed position as stored (or none) would fail below.
    removed_stored = removed_skipped = 0
    for slot in mod_slots(cache).values():
        for r, m in enumerate(slot.host_lens()):
            stored = sum(int(p) >= S + n - remove for p in slot.positions[r, :m].tolist())
            removed_stored += stored
            removed_skipped += remove - stored
    assert removed_stored > 0 and removed_skipped > 0, (removed_stored, removed_skipped)

    lens_before = {i: s.host_lens() for i, s in mod_slots(cache).items()}
    cache.crop(-remove)
    assert cache.get_seq_length() == S + n - remove
    assert any(s.host_lens() != lens_before[i] for i, s in mod_slots(cache).items())

    kept = n - remove
    ref, _, _ = _feed(model, ids, am, new[:, :kept], (1,) * kept)  # one token per step
    _assert_same_cache(cache, ref)

    # the next step from the cropped cache and from the reference agree
    nxt = torch.randint(1, 100, (B, 2), generator=torch.Generator().manual_seed(2))
    am_next = torch.cat([am, torch.ones(B, kept + 2, dtype=am.dtype)], 1)
    with torch.no_grad():
        got = model(nxt, attention_mask=am_next, past_key_values=cache, use_cache=True).logits
        want = model(nxt, attention_mask=am_next, past_key_values=ref, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_same_cache(cache, ref)


@pytest.mark.parametrize("flush_every", [1, 3, 4096])
def test_positions_of_one_token_steps(flush_every, monkeypatch):
    """One-token decode steps record their positions on the host and write them to the device every
    ``pos_tail_flush`` entries (and before a crop): the positions read back are the no-cache routing's,
    also across a crop in between."""
    monkeypatch.setattr(GmodLayer_cls(), "pos_tail_flush", flush_every)
    model = skipping_llama()
    B, S = 3, 9
    ids, am = padded_prompt(B, S, pad=(0, 1, 4))
    new = torch.randint(1, 100, (B, 10), generator=torch.Generator().manual_seed(6))
    cache, _, am_full = _feed(model, ids, am, new[:, :7], (1,) * 7)
    cache.crop(-2)
    with torch.no_grad():
        for t in range(5, 10):
            am_t = am_full[:, : S + t + 1] if t < 7 else torch.cat([am_full, torch.ones(B, t - 6, dtype=am.dtype)], 1)
            model(new[:, t : t + 1], attention_mask=am_t, past_key_values=cache, use_cache=True)
        model(torch.cat([ids, new], 1), attention_mask=torch.cat([am, torch.ones(B, 10, dtype=am.dtype)], 1),
              use_cache=False, gmod_prefill_len=S)
    for i, slot in mod_slots(cache).items():
        idx, count = model.gmod_state.current.selection[i]
        for r, m in enumerate(slot.host_lens()):
            assert m == int(count[r]) and slot.positions[r, :m].tolist() == idx[r, :m].tolist(), (i, r)


def test_crop_zero_and_unfed_cache_change_nothing():
    model = skipping_llama()
    ids, am = padded_prompt(2, 8, pad=(0, 3))
    new = torch.randint(1, 100, (2, 3), generator=torch.Generator().manual_seed(1))
    cache, _, _ = _feed(model, ids, am, new, (1, 1, 1))
    before = {i: (s.seen, s.host_lens(), s.positions.clone(), s.keys.clone()) for i, s in mod_slots(cache).items()}
    new_api = crop_removes_tokens()
    cache.crop(0 if new_api else cache.get_seq_length())
    for i, s in mod_slots(cache).items():
        seen, lens, pos, keys = before[i]
        assert s.seen == seen and s.host_lens() == lens and torch.equal(s.positions, pos) and torch.equal(s.keys, keys)
    fresh = GmodLayer_cls()()
    fresh.crop(-3)  # nothing fed yet
    assert fresh.get_seq_length() == 0 and not fresh.is_initialized
    if new_api:
        with pytest.raises(ValueError, match="negative"):
            cache.crop(2)  # crop(tokens_to_remove): a positive argument is refused, as DynamicLayer does
    else:
        cache.crop(9)  # crop(max_length): keep 9 positions
        assert cache.get_seq_length() == 9 and all(s.seen == 9 for s in mod_slots(cache).values())


def test_crop_target_meanings():
    # crop(tokens_to_remove) (5.17, 5.24): crop(-n) removes n tokens, crop(0) nothing; positive values refused
    assert crop_target(10, -3, True) == 7
    assert crop_target(10, 0, True) == 10
    assert crop_target(10, -15, True) == 0
    with pytest.raises(ValueError, match="negative"):
        crop_target(10, 3, True)
    # crop(max_length) (5.13): crop(m >= 0) keeps m positions, crop(-n) removes n
    assert crop_target(10, 3, False) == 3
    assert crop_target(10, 0, False) == 0
    assert crop_target(10, 12, False) == 10
    assert crop_target(10, -4, False) == 6
    assert crop_target(10, torch.tensor(-2), True) == 8
    with pytest.raises(TypeError, match="int"):
        crop_target(10, "x", True)


def _greedy(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_scores=True, **kw)


def _count_crops(monkeypatch):
    """Counts the crops of MoD slots that removed stored tokens."""
    cls = GmodLayer_cls()
    real = cls.crop
    hits = []

    def spy(self, n):
        before = list(self.host_lens()) if self.is_initialized else []
        real(self, n)
        if self.is_initialized and self.host_lens() != before:
            hits.append(n)

    monkeypatch.setattr(cls, "crop", spy)
    return hits


def _assert_cache_is_the_recompute(model, out, prompt_len):
    """The cache generate returns (after its crops) holds, in every MoD slot, the tokens a forward
    without a cache over the same positions keeps (top-k over the prompt, the decode rule after)."""
    cache = out.get("cache") or out.get("past_key_values")
    seen = cache.get_seq_length()
    assert prompt_len < seen < out.sequences.shape[1]
    with torch.no_grad():
        model(out.sequences[:, :seen], use_cache=False, gmod_prefill_len=prompt_len)
    for i, slot in mod_slots(cache).items():
        assert slot.seen == seen
        idx, count = model.gmod_state.current.selection[i]
        n = slot.host_lens()[0]
        assert n == int(count[0]) and slot.positions[0, :n].tolist() == idx[0, :n].tolist(), i


@pytest.mark.parametrize("mode", ["dense_draft", "self_draft", "prompt_lookup"])
def test_assisted_generation_equals_greedy(mode, monkeypatch):
    """Hugging Face's assisted generation verifies a draft in one multi-token step on the compact cache
    and crops what it rejects: the tokens and scores are plain greedy generation's."""
    torch.manual_seed(0)
    model = skipping_llama()
    g = torch.Generator().manual_seed(3)
    if mode == "prompt_lookup":  # a prompt with repeats, so that n-gram lookup finds drafts
        base = torch.randint(1, 100, (1, 6), generator=g)
        ids = torch.cat([base, base, base[:, :3]], 1)
    else:
        ids = torch.randint(1, 100, (1, 14), generator=g)
    ref = _greedy(model, ids)
    hits = _count_crops(monkeypatch)
    if mode == "dense_draft":  # an unconverted model of the same vocabulary: its drafts are often wrong
        kw = dict(assistant_model=tiny_model("llama", seed=1).eval())
    elif mode == "self_draft":  # a copy of the converted model: its drafts are right
        kw = dict(assistant_model=copy.deepcopy(model))
    else:
        kw = dict(prompt_lookup_num_tokens=3)
    out = _greedy(model, ids, **kw)
    assert torch.equal(out.sequences, ref.sequences), (out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if mode == "dense_draft":
        assert hits, "no crop removed a stored token: the test did not exercise the rollback"
    _assert_cache_is_the_recompute(model, out, ids.shape[1])


def test_speculative_sampling_keeps_the_cache_consistent(monkeypatch):
    """Sampling with a draft model (speculative sampling): the tokens are random, but the cache after
    its crops must still be what a recompute over the generated sequence keeps."""
    model = skipping_llama()
    ids = torch.randint(1, 100, (1, 12), generator=torch.Generator().manual_seed(4))
    hits = _count_crops(monkeypatch)
    torch.manual_seed(5)
    model.generation_config.eos_token_id = None  # no early stop (some releases refuse min_new_tokens with a draft)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=True,
                         pad_token_id=0, assistant_model=tiny_model("llama", seed=1).eval(), return_dict_in_generate=True)
    assert out.sequences.shape[1] == 12 + 24 and hits
    _assert_cache_is_the_recompute(model, out, 12)
