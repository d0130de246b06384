"""The compact MoD KV cache (gmod_ext.cache): memory accounting, decode skipping, Cache API, chunked
prefill, NVTX stages, and the default use_cache=True forward staying the training computation."""
from __future__ import annotations

import copy

import pytest
import torch

from gmod_hf_utils import make_batch, mod_slots, num_threads, plain_router_logits, skipping_llama, tiny_model, transformers

import gmod_ext
from gmod_ext import mod_layer
from gmod_ext.cache import GmodCache_cls, GmodLayer_cls, crop_removes_tokens, format_memory_report, memory_report


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def _ids(B, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (B, S), generator=g)


# ----------------------------------------------------------------------------- memory
def test_memory_ratio_32_layers_28_mod(capsys):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    gmod_ext.convert(model, ratio=0.5, layers=list(range(4, 32)), progress=False)  # 28 MoD, 4 dense
    ids = _ids(2, 128)
    am = torch.ones_like(ids)
    am[1, :16] = 0  # left padding
    ids[am == 0] = 0
    out = model.generate(
        ids, attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    cache = out.past_key_values
    rep = gmod_ext.kv_memory_report(cache)
    with capsys.disabled():
        print("\n" + format_memory_report(rep))
    assert [r["kind"] for r in rep["layers"]] == ["dense"] * 4 + ["mod"] * 28
    assert rep["seq_len"] == 128 + 5 and rep["batch"] == 2
    per_token = 2 * 16 * 4 * 2  # Hk * d * fp32 * (k, v)
    dense = 32 * 2 * (128 + 5) * per_token
    assert rep["dense_equivalent_bytes"] == dense
    assert rep["total_bytes"] == sum(r["bytes"] for r in rep["layers"])
    for r in rep["layers"][:4]:
        assert r["bytes"] == 2 * 133 * per_token and r["tokens"] == [133, 133]
    for r in rep["layers"][4:]:
        # prompt: top-k keeps half of the real tokens; decode: at most one per step
        assert 64 <= r["tokens"][0] <= 64 + 5 and 56 <= r["tokens"][1] <= 56 + 5
        assert r["used_bytes"] == sum(r["tokens"]) * per_token <= r["bytes"]
    assert rep["ratio"] <= 0.6, rep["ratio"]
    assert rep["used_ratio"] <= rep["ratio"]
    assert cache.memory_report()["ratio"] == rep["ratio"]


def test_memory_report_plain_dense_cache():
    model = tiny_model("llama").eval()
    out = model(_ids(2, 9), use_cache=True)
    rep = memory_report(out.past_key_values)
    assert rep["ratio"] == 1.0 and all(r["kind"] == "dense" for r in rep["layers"])
    assert "ratio 1.000" in format_memory_report(out.past_key_values)


# ----------------------------------------------------------------------------- decode skipping
def test_decode_skip_appends_nothing():
    model = skipping_llama()
    ids = _ids(2, 10)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, transformers.DynamicCache)
    slots = mod_slots(cache)  # a plain DynamicCache got compact slots on first use
    assert sorted(slots) == [1, 2, 3]
    before = {i: s.cache_len.clone() for i, s in slots.items()}
    assert all(s.host_lens() == [5, 5] for s in slots.values())  # top-k: half of 10

    seen = {}
    hooks = [
        model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0].clone(), o.clone())))
        for i in slots
    ]
    nxt = torch.tensor([[7], [8]])
    with torch.no_grad():
        model.gmod_router.bias[1] = -30.0  # p ~ 0 < 0.5: every MoD layer skips the new token
        model(nxt, past_key_values=cache, use_cache=True)
    for i, s in slots.items():
        assert torch.equal(s.cache_len, before[i])  # nothing appended
        assert s.seen == 11
        x, y = seen[i]
        assert torch.equal(x, y)  # the layer left the token unchanged
    assert cache.get_seq_length() == 11 and cache.layers[0].get_seq_length() == 11

    with torch.no_grad():
        model.gmod_router.bias[1] = 30.0  # p ~ 1 >= 0.5: processed and appended
        model(torch.tensor([[9], [10]]), past_key_values=cache, use_cache=True)
    for i, s in slots.items():
        assert s.cache_len.tolist() == [6, 6] and s.host_lens() == [6, 6]
        x, y = seen[i]
        assert not torch.equal(x, y)
    for h in hooks:
        h.remove()


def test_decode_threshold_setting_and_per_row_decisions():
    model = skipping_llama(decode_threshold=0.5)
    assert model.gmod_state.config.decode_threshold == 0.5
    ids = _ids(4, 8)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        layer = model.model.layers[1]
        captured = {}
        h = layer.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0].clone()))
        model(_ids(4, 1, seed=5), past_key_values=cache, use_cache=True)
        h.remove()
        # p from a plain-PyTorch router (RMSNorm + Linear(D, 2)), not the layer's own gmod_logits
        p = torch.sigmoid(plain_router_logits(captured["x"], layer.input_layernorm, model.gmod_router))[:, 0]
    assert all(abs(v - 0.5) > 1e-4 for v in p.tolist()), p  # no near-tie at the threshold
    assert 0 < int((p >= 0.5).sum()) < 4, p  # per-row decisions: some rows keep, some skip
    lens = cache.layers[1].host_lens()
    assert lens == [4 + int(v >= 0.5) for v in p.tolist()]
    assert cache.layers[1].cache_len.tolist() == lens


# ----------------------------------------------------------------------------- Cache API
def test_gmod_cache_api_and_manual_loop_equals_generate():
    model = skipping_llama()
    ids = _ids(1, 12)
    cache = model.gmod_new_cache()
    assert isinstance(cache, GmodCache_cls()) and isinstance(cache, transformers.DynamicCache)
    assert cache.get_seq_length() == 0 and sorted(mod_slots(cache)) == [1, 2, 3]
    seq = ids
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        assert out.past_key_values is cache
        for _ in range(5):
            tok = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, tok], 1)
            out = model(tok, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 12 + 5
    assert cache.get_mask_sizes(1, 1) == (18, 0) and cache.layers[1].get_max_length() == -1
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(seq, ref)


def test_cache_reorder_select_repeat_reset():
    """Rows of distinct lengths (left padding 0 / 2 / 5: top-k keeps 5 / 4 / 3 of the real tokens) and
    contents: after each batch operation every MoD slot's keys, values, cache_len and host lengths are
    the originals indexed by the expected row map (and the dense slots' keys / values likewise)."""
    model = skipping_llama()
    ids = _ids(3, 10)
    am = torch.ones_like(ids)
    am[1, :2] = 0
    am[2, :5] = 0
    ids[am == 0] = 0
    with torch.no_grad():
        cache = model(ids, attention_mask=am, use_cache=True).past_key_values
    slots = mod_slots(cache)
    assert sorted(slots) == [1, 2, 3]
    orig = {
        i: (l.keys.clone(), l.values.clone()) + ((l.cache_len.clone(), list(l.host_lens())) if i in slots else (None, None))
        for i, l in enumerate(cache.layers)
    }
    orig_pos = {i: slots[i].positions.clone() for i in slots}
    for i in slots:
        assert orig[i][3] == [5, 4, 3] and orig[i][2].tolist() == [5, 4, 3]
        pos = orig_pos[i]
        for b, n in enumerate([5, 4, 3]):  # the kept tokens' positions: ascending, real tokens only
            p = pos[b, :n].tolist()
            assert p == sorted(set(p)) and min(p) >= [0, 2, 5][b] and max(p) < 10, (i, b, p)
        k = orig[i][0]
        assert not torch.equal(k[0, :3], k[1, :3]) and not torch.equal(k[1, :3], k[2, :3])  # distinct contents

    def check(rows):  # dense slots (Hugging Face's DynamicLayer, [B, Hk, T, d]) and MoD slots alike
        for i, layer in enumerate(cache.layers):
            k, v, cl, lens = orig[i]
            same = torch.equal(layer.keys, k[rows]) and torch.equal(layer.values, v[rows])
            assert same, f"layer {i}: keys / values are not the original rows {rows}"
            if i in slots:
                assert layer.cache_len.tolist() == cl[rows].tolist() == [lens[r] for r in rows], (i, rows)
                assert layer.host_lens() == [lens[r] for r in rows], (i, rows)
                assert layer.batch_size == len(rows)
                assert torch.equal(layer.positions, orig_pos[i][rows]), (i, rows)

    rows = [2, 0, 1]
    cache.reorder_cache(torch.tensor(rows))
    check(rows)
    rows = torch.tensor(rows).repeat_interleave(2).tolist()  # [2, 2, 0, 0, 1, 1]
    cache.batch_repeat_interleave(2)
    check(rows)
    sel = [5, 0, 3]  # an order of its own: [1, 2, 0]
    cache.batch_select_indices(torch.tensor(sel))
    rows = [rows[j] for j in sel]
    check(rows)
    cache.batch_select_indices(torch.tensor([True, False, True]))  # a boolean mask: rows 0 and 2
    rows = [rows[0], rows[2]]
    check(rows)
    assert rows == [1, 0]
    slot = cache.layers[1]
    cache.crop(0 if crop_removes_tokens() else cache.get_seq_length())  # removes nothing
    check(rows)
    cache.reset()
    assert slot.get_seq_length() == 0 and not slot.is_initialized
    with pytest.raises(NotImplementedError, match="MoD layer"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 1)


def test_gmod_layer_growth():
    slot = GmodLayer_cls()()
    k = torch.randn(2, 4, 2, 16)
    slot.append(k, -k, torch.tensor([4, 2], dtype=torch.int32), idx=torch.tensor([[0, 1, 2, 3], [1, 3, -1, -1]]))
    assert slot.capacity == 4 and slot.lens is None
    assert slot.host_lens() == [4, 2]
    slot.seen = 4  # what the MoD layer's cached call does after each step
    for step in range(40):
        kn = torch.full((2, 1, 2, 16), float(step))
        slot.append(kn, kn, torch.tensor([1, step % 2], dtype=torch.int32), [1, step % 2])
        slot.seen += 1
    # the positions are copied along when the buffer grows: prefill idx, then one per kept step
    assert slot.positions[0, :44].tolist() == list(range(44))
    assert slot.positions[1, :22].tolist() == [1, 3] + [4 + s for s in range(1, 40, 2)]
    assert slot.host_lens() == [44, 22] and slot.cache_len.tolist() == [44, 22]
    assert 44 <= slot.capacity <= 44 + 44 // 32 + 1
    torch.testing.assert_close(slot.keys[0, :4], k[0])
    torch.testing.assert_close(slot.keys[1, :2], k[1, :2])
    assert slot.keys[0, 4:44, 0, 0].tolist() == [float(s) for s in range(40)]
    assert slot.keys[1, 2:22, 0, 0].tolist() == [float(s) for s in range(1, 40, 2)]


def test_unsupported_cache_and_on_cache_modes():
    model = skipping_llama()
    static = transformers.StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(TypeError, match="StaticLayer"):
        model(_ids(1, 6), past_key_values=static, use_cache=True)

    err = tiny_model("llama").eval()
    gmod_ext.convert(err, ratio=0.5, layers=[1], on_cache="error", progress=False)
    assert err.config.use_cache is False and err.generation_config.use_cache is False
    with pytest.raises(NotImplementedError, match="compact MoD KV cache"):
        err(_ids(1, 6), use_cache=True)
    assert err.generate(_ids(1, 6), max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (1, 8)

    conv = tiny_model("llama").eval()
    gmod_ext.convert(conv, ratio=0.5, layers=[1], progress=False)
    assert conv.config.use_cache is True and conv.config.gmod["on_cache"] == "compact"

    dense = tiny_model("llama").eval()
    ref = copy.deepcopy(dense)
    gmod_ext.convert(dense, ratio=0.5, layers=[1], on_cache="dense", gate="none", progress=False)
    ids = _ids(1, 6)
    a = ref.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # the prefill ran densely too, so the whole generation is the dense model's
    assert torch.equal(dense.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0), a)


# ----------------------------------------------------------------------------- multi-token steps
def test_chunked_prefill_equals_no_cache_with_prefill_len():
    model = skipping_llama()
    ids = _ids(2, 16)
    with torch.no_grad():
        full = model(ids, use_cache=False, gmod_prefill_len=8).logits
        cache = model.gmod_new_cache()
        a = model(ids[:, :8], past_key_values=cache, use_cache=True).logits
        b = model(ids[:, 8:13], past_key_values=cache, use_cache=True).logits  # 5 tokens, decode rule
        c = model(ids[:, 13:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-5, atol=1e-5)
    # and the one-call prefill with gmod_prefill_len=8 makes the same decisions
    with torch.no_grad():
        one = model(ids, use_cache=True, gmod_prefill_len=8)
    torch.testing.assert_close(one.logits, full, rtol=1e-5, atol=1e-5)
    for i in (1, 2, 3):
        assert one.past_key_values.layers[i].host_lens() == cache.layers[i].host_lens()


def test_multi_token_step_with_left_padding_in_batch():
    model = skipping_llama()
    ids = _ids(2, 12)
    am = torch.ones_like(ids)
    am[1, :4] = 0
    ids[am == 0] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=am, position_ids=pos, use_cache=False, gmod_prefill_len=7).logits
        cache = model.gmod_new_cache()
        a = model(ids[:, :7], attention_mask=am[:, :7], position_ids=pos[:, :7], past_key_values=cache).logits
        b = model(ids[:, 7:], attention_mask=am, position_ids=pos[:, 7:], past_key_values=cache).logits
    valid = am.bool()
    torch.testing.assert_close(torch.cat([a, b], 1)[valid], full[valid], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training is unchanged
def test_default_use_cache_forward_is_the_training_computation():
    model = skipping_llama(router_std=0.02)
    model.train()
    batch = make_batch("llama", B=2, S=16)
    clone = copy.deepcopy(model)
    out1 = model(**batch)  # use_cache defaults to True: the MoD layers prefill a cache
    assert isinstance(out1.past_key_values, transformers.DynamicCache)
    out2 = clone(**batch, use_cache=False)
    torch.testing.assert_close(out1.logits, out2.logits, rtol=0, atol=0)
    torch.testing.assert_close(out1.loss, out2.loss, rtol=0, atol=0)
    out1.loss.backward()
    out2.loss.backward()
    g1 = dict(model.named_parameters())
    for name, p in clone.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g1[name].grad, p.grad, rtol=0, atol=0, msg=name)


# ----------------------------------------------------------------------------- NVTX
def test_nvtx_stages(monkeypatch):
    import contextlib

    stages = []

    @contextlib.contextmanager
    def rec(stage):
        stages.append(stage)
        yield

    model = skipping_llama(router_std=0.0)  # p = 0.5 exactly: kept at decode
    monkeypatch.setattr(mod_layer, "nvtx_range", rec)  # after convert, whose layer check runs a MoD layer
    with torch.no_grad():
        model(_ids(1, 6), use_cache=False)
        want = ["router", "route", "gather", "attention", "mlp", "merge"]
        assert stages == want * 3
        stages.clear()
        cache = model(_ids(1, 6), use_cache=True).past_key_values
        model(_ids(1, 1), past_key_values=cache)
    assert stages == want * 6
