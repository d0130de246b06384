"""Differential checks of converted models against independent references, on random configurations
drawn from fixed seeds (a compact version of a randomized fuzzing run; each case is small).

* keep-all (ratio 0, gate="none", decode_threshold 0): logits and greedy generation (tokens and
  scores) equal the unconverted Hugging Face model, random archs / batch sizes / padding / layer sets;
* skipping (ratio 0.25 / 0.5, every variant, both position modes and router kinds): a cached
  ``generate`` equals ``generate(use_cache=False)`` and a no-cache forward with
  ``gmod_prefill_len=<prompt length>`` (the documented cache / no-cache routing equality);
* one MoD layer against ``test_mod_layer.expected_output`` over random shapes, ratios, variants,
  gates, positions, GQA ratios and routing masks with forced / padding codes (rows entirely padding
  included), float32 and float64;
* save_pretrained + gmod_ext.from_pretrained gives bit-identical logits and generations.
"""
from __future__ import annotations

import random

import pytest
import torch

from gmod_hf_utils import IMAGE_TOKEN, N_IMAGE, num_threads, tiny_model

import gmod_ext
from gmod_ext.config import GmodConfig
from gmod_ext.mod_layer import make_mod_layer
from gmod_ext.router import GmodState, RoutingInfo


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "llava"]


def _batch(rng, arch, B, S, pad_mode, labels=False):
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    ids = torch.randint(1, IMAGE_TOKEN, (B, S), generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    pads = []
    for b in range(B):
        n = rng.randrange(0, max(1, S // 3)) if pad_mode != "none" else 0
        pads.append(n)
        if n:
            if pad_mode == "left":
                am[b, :n] = 0
            else:
                am[b, S - n:] = 0
    ids[am == 0] = 0
    batch = {"input_ids": ids, "attention_mask": am}
    if arch == "llava":
        start = rng.randrange(0, 3) + (max(pads) if pad_mode == "left" else 0)
        ids[:, start:start + N_IMAGE] = IMAGE_TOKEN
        batch["pixel_values"] = torch.randn(B, 3, 32, 32, generator=g)
    if labels:
        lab = ids.clone()
        lab[am == 0] = -100
        lab[ids == IMAGE_TOKEN] = -100
        lab[:, : rng.randrange(0, S // 2)] = -100
        batch["labels"] = lab
    return batch


def _seq_len(rng, arch, lo, hi):
    return rng.randint(N_IMAGE + lo, N_IMAGE + hi) if arch == "llava" else rng.randint(4, 4 + hi)


def _max_err(a, b, mask=None):
    a, b = a.double(), b.double()
    d = torch.where(a == b, torch.zeros_like(a), (a - b).abs())  # equal -inf scores (bad_words_ids) count as 0
    if mask is not None:
        d = d[mask]
    return float(d.max()) if d.numel() else 0.0


GEN = dict(do_sample=False, pad_token_id=0, bad_words_ids=[[IMAGE_TOKEN]], return_dict_in_generate=True)


def _sharp_routers(model, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in [m for m in model.modules() if isinstance(m, gmod_ext.GmodRouter)]:
            r.weight.copy_(torch.randn(r.weight.shape, generator=g) * 0.5)
            r.bias.copy_(torch.randn(2, generator=g) * 0.3 if bias else torch.zeros(2))


@pytest.mark.parametrize("seed", [0, 1, 2, 105, 133, 160])
def test_keep_all_equals_hf(seed):
    rng = random.Random(seed)
    arch = rng.choice(ARCHS)
    B = rng.randint(1, 4)
    S = _seq_len(rng, arch, 8, 12)
    pad_mode = rng.choice(["none", "left", "right"])
    labels = rng.random() < 0.5
    layers = "all" if rng.random() < 0.5 else sorted(rng.sample(range(4), rng.randint(1, 4)))
    ref, model = tiny_model(arch).eval(), tiny_model(arch).eval()
    gmod_ext.convert(model, ratio=0.0, layers=layers, gate="none", router=rng.choice(["shared", "per_layer"]),
                     decode_threshold=0.0, attention=rng.choice(["gmod", "sdpa"]), progress=False)
    batch = _batch(rng, arch, B, S, pad_mode, labels)
    with torch.no_grad():
        o1, o2 = ref(**batch), model(**batch)
    valid = batch["attention_mask"].bool()  # padding is never processed by a MoD layer
    assert _max_err(o1.logits, o2.logits, valid) < 1e-5, (arch, B, S, pad_mode, layers)
    gb = _batch(rng, arch, B, S, "left")
    mnt = rng.randint(4, 8)
    with torch.no_grad():
        g1 = ref.generate(**gb, max_new_tokens=mnt, output_scores=True, **GEN)
        g2 = model.generate(**gb, max_new_tokens=mnt, output_scores=True, **GEN)
    assert torch.equal(g1.sequences, g2.sequences)
    assert max(_max_err(a, b) for a, b in zip(g1.scores, g2.scores)) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 1023, 3005])
def test_skipping_cache_equals_prefill_len_forward(seed):
    rng = random.Random(seed)
    arch = rng.choice(ARCHS)
    B = rng.randint(1, 4)
    S = _seq_len(rng, arch, 6, 12)
    pad_mode = rng.choice(["none", "left", "left", "right"])
    variant = rng.choice(["gamma", "mod", "pmod"])
    model = tiny_model(arch, seed=rng.randrange(100)).eval()
    gmod_ext.convert(model, ratio=rng.choice([0.25, 0.5]), layers="all" if rng.random() < 0.5 else [1, 2, 3],
                     variant=variant, positions=rng.choice(["original", "compact"]),
                     router=rng.choice(["shared", "per_layer"]), attention=rng.choice(["gmod", "sdpa"]),
                     threshold=rng.choice([None, 0.5]), progress=False)
    _sharp_routers(model, seed)
    batch = _batch(rng, arch, B, S, pad_mode)
    mnt = rng.randint(4, 8)
    kw = dict(max_new_tokens=mnt, min_new_tokens=mnt, output_logits=True, **GEN)
    with torch.no_grad():
        g1 = model.generate(**batch, **kw)
        g2 = model.generate(**batch, use_cache=False, **kw)
    assert torch.equal(g1.sequences, g2.sequences)
    assert max(_max_err(a, b) for a, b in zip(g1.logits, g2.logits)) < 1e-4
    if pad_mode == "right":  # HF's right-padded generate uses positions no plain forward reproduces
        return
    seq = g1.sequences[:, :-1]
    am = torch.cat([batch["attention_mask"], torch.ones(B, seq.shape[1] - S, dtype=torch.long)], 1)
    fb = {"input_ids": seq, "attention_mask": am, "position_ids": (am.cumsum(-1) - 1).masked_fill(am == 0, 1)}
    if "pixel_values" in batch:
        fb["pixel_values"] = batch["pixel_values"]
    with torch.no_grad():
        out = model(**fb, gmod_prefill_len=S, use_cache=False)
    assert _max_err(out.logits[:, S - 1:], torch.stack(g1.logits, 1)) < 1e-4


def _safe_plain_block(orig):
    def block(layer, xs, cos, sin):
        if xs.shape[0] == 0:  # a row with nothing kept (all padding)
            return xs, xs, xs
        return orig(layer, xs, cos, sin)

    return block


@pytest.mark.parametrize("seed", list(range(100, 112)) + [23, 187])
def test_layer_matches_expected_output(seed, monkeypatch):
    import test_mod_layer

    monkeypatch.setattr(test_mod_layer, "plain_block", _safe_plain_block(test_mod_layer.plain_block))
    rng = random.Random(seed)
    B, S = rng.randint(1, 4), rng.randint(1, 24)
    ratio = rng.choice([0.0, 0.1, 0.25, 0.3, 0.5, 0.75, 0.9])
    variant = rng.choice(["gamma", "mod", "pmod"])
    gate = rng.choice(["default", "default", "none"])
    positions = rng.choice(["original", "compact"])
    hk = rng.choice([1, 2, 4])
    dtype = rng.choice([torch.float64, torch.float32])
    attention = rng.choice(["gmod", "sdpa"])
    use_rows = rng.random() < 0.5
    with_mask = rng.random() < 0.5
    model = tiny_model("llama", dtype=dtype, num_key_value_heads=hk)
    li = rng.randrange(4)
    layer = model.model.layers[li]
    state = GmodState(GmodConfig(variant=variant, gate=gate, positions=positions, router="per_layer",
                                 router_init="normal", attention=attention), rotary=model.model.rotary_emb)
    make_mod_layer(layer, ratio, layer_idx=li, state=state)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.gmod_router.weight.copy_(torch.randn(layer.gmod_router.weight.shape, generator=g, dtype=torch.float64))
        layer.gmod_router.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(B, S, 64, generator=g, dtype=torch.float64).to(dtype) * rng.choice([1.0, 3.0])
    pe = model.model.rotary_emb(x, torch.arange(S).unsqueeze(0))
    mask, info = None, None
    if with_mask:
        mask = torch.zeros(B, S, dtype=torch.int8)
        for b in range(B):
            for s in range(S):
                u = rng.random()
                mask[b, s] = 1 if u < 0.2 else (2 if u < 0.3 else 0)
            if rng.random() < 0.3:
                n = rng.randint(0, S)
                if rng.random() < 0.5:
                    mask[b, :n] = 2
                else:
                    mask[b, S - n:] = 2
        rows = [(int((mask[b] == 1).sum()), int((mask[b] == 0).sum())) for b in range(B)] if use_rows else None
        info = RoutingInfo(mask, int((mask == 1).sum(1).max()), rows=rows)
    elif rng.random() < 0.5:
        info = RoutingInfo(None, 0)
    with torch.no_grad():
        y = layer(x, position_embeddings=pe, gmod_routing=info) if info is not None else layer(x, position_embeddings=pe)
        ref, sel = test_mod_layer.expected_output(layer, x, pe, mask, ratio, variant, gate, positions,
                                                  model.model.rotary_emb)
    # the reference runs its router, softmax and STRing scale in float32: float32-level agreement
    tol = (1e-6 if dtype == torch.float64 else 2e-5) * max(1.0, float(ref.abs().max()))
    assert _max_err(y, ref) <= tol
    if info is not None:
        idx, count = info.selection[li]
        assert [idx[b, : count[b]].tolist() for b in range(B)] == sel


@pytest.mark.parametrize("seed", [101, 104])
def test_save_load_identical(seed, tmp_path):
    rng = random.Random(seed)
    arch = rng.choice(ARCHS)
    B = rng.randint(1, 3)
    S = _seq_len(rng, arch, 6, 10)
    variant = rng.choice(["gamma", "mod", "pmod"])
    layers = [0, 2, 3]
    ratio = 0.5 if variant == "pmod" else [0.25, 0.5, 0.25]
    model = tiny_model(arch, seed=rng.randrange(100)).eval()
    gmod_ext.convert(model, ratio=ratio, layers=layers, variant=variant, positions=rng.choice(["original", "compact"]),
                     router=rng.choice(["shared", "per_layer"]), threshold=0.4, decode_threshold=0.3, progress=False)
    _sharp_routers(model, seed, bias=True)
    batch = _batch(rng, arch, B, S, rng.choice(["left", "right"]), labels=True)
    model.save_pretrained(tmp_path / "m")
    again = gmod_ext.from_pretrained(tmp_path / "m").eval()
    assert type(again) is type(model)
    gb = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        o1, o2 = model(**batch), again(**batch)
        s1 = model.generate(**gb, max_new_tokens=5, **GEN).sequences
        s2 = again.generate(**gb, max_new_tokens=5, **GEN).sequences
    assert torch.equal(o1.logits, o2.logits) and torch.equal(o1.loss, o2.loss)
    assert torch.equal(s1, s2)
