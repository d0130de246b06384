"""Packed sequences: several sequences in one row, told apart by ``position_ids`` that restart and no
attention mask (what transformers' ``DataCollatorWithFlattening`` and padding-free trainers feed).

Transformers' models then attend only within each sequence (when no KV cache is used); MoD layers
must too, or a converted model would silently mix sequences. Checked here:

* the op: ``position_masked_attention`` with sequence ids against the float64 loop reference;
* keeping every token: a converted Llama / windowed Mistral on packed rows gives Hugging Face's packed
  logits and gradients, which equal those of each sequence run alone (both RoPE position modes);
* skipping (a fixed selection per token, so that it cannot depend on the neighbours): every token of a
  packed row leaves the model as it does when its sequence runs alone;
* where transformers does not pack (an attention mask is given, position_ids that never restart, or a
  KV cache), neither do MoD layers;
* a batch from ``DataCollatorWithFlattening``: the converted model's loss equals Hugging Face's.
"""
from __future__ import annotations

import pytest
import torch

from gmod_hf_utils import num_threads, tiny_model, transformers
from references import position_attention_ref

import gmod_ext
from gmod_ext.masked_attention import position_masked_attention
from gmod_ext.router import packed_segments


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


LENGTHS = [[5, 7, 4], [9, 7], [16]]  # three rows of 16 tokens: 3, 2 and 1 sequences


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(LENGTHS), 16), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return ids, pos


def _spans():
    for r, row in enumerate(LENGTHS):
        at = 0
        for n in row:
            yield r, at, n
            at += n


# ----------------------------------------------------------------------------- the op and the ids
def test_packed_segments_follow_transformers():
    _, pos = _packed()
    seg = packed_segments(pos)
    assert seg.tolist()[0] == [0] * 5 + [1] * 7 + [2] * 4 and seg.tolist()[2] == [0] * 16
    find = getattr(__import__("transformers.masking_utils", fromlist=["x"]), "find_packed_sequence_indices", None)
    if find is not None:
        assert torch.equal(seg, find(pos))
    assert packed_segments(torch.arange(16).expand(3, -1)) is None  # nothing packed: no ids
    assert packed_segments(torch.arange(16).unsqueeze(0) + 4) is None  # an offset is not a restart


@pytest.mark.parametrize("window", [None, 3])
def test_op_with_sequence_ids_matches_float64_loop(window):
    g = torch.Generator().manual_seed(1)
    B, C, Hq, Hk, d = 3, 16, 4, 2, 16
    idx = torch.arange(C, dtype=torch.int32).expand(B, -1).clone()
    k_len = torch.tensor([16, 16, 11], dtype=torch.int32)
    idx[2, 11:] = -1
    seg = packed_segments(_packed()[1])
    q, k, v = (torch.randn(B, C, h, d, generator=g).requires_grad_() for h in (Hq, Hk, Hk))
    out = position_masked_attention(q, k, v, idx, idx, k_len, 0.25, window=window, q_seg=seg, k_seg=seg)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, visible = position_attention_ref(q64, k64, v64, idx, idx, k_len, 0.25, window, q_seg=seg, k_seg=seg)
    torch.testing.assert_close(out.double()[visible], ref[visible], rtol=1e-5, atol=1e-6)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g) * visible[..., None, None]
    grads = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q64, k64, v64))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both"):
        position_masked_attention(q, k, v, idx, idx, k_len, 0.25, q_seg=seg)
    with pytest.raises(ValueError, match="shapes"):
        position_masked_attention(q, k, v, idx, idx, k_len, 0.25, q_seg=seg[:, :4], k_seg=seg)


# ----------------------------------------------------------------------------- keep-all == Hugging Face
BUILDERS = {
    "llama": lambda: tiny_model("llama").eval(),
    "mistral_window": lambda: tiny_model("mistral", sliding_window=6).eval(),
}


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_keep_all_packed_equals_hf_and_each_sequence_alone(arch, positions):
    ref, model = BUILDERS[arch](), BUILDERS[arch]()
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, positions=positions, progress=False)
    ids, pos = _packed()
    rotary, seen = model.gmod_state.rotary, []

    def recording_rotary(x, position_ids):
        seen.append(position_ids)
        return rotary(x, position_ids)

    model.gmod_state.rotary = recording_rotary
    ref.train(), model.train()
    lr = ref(ids, position_ids=pos, labels=ids, use_cache=False)
    lm = model(ids, position_ids=pos, labels=ids, use_cache=False)
    assert model.gmod_state.current.segments is not None
    if positions == "compact":  # each sequence counts from 0 (RoPE alone could not tell: a per-sequence
        # offset cancels in q.k, but position-dependent rotary variants would see it)
        assert len(seen) == 4 and all(torch.equal(p.expand(3, -1), pos) for p in seen)
    torch.testing.assert_close(lm.logits, lr.logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        for r, at, n in _spans():
            alone = ref(ids[r : r + 1, at : at + n], use_cache=False).logits[0]
            torch.testing.assert_close(lm.logits[r, at : at + n], alone, rtol=1e-5, atol=1e-5)
    lr.loss.backward()
    lm.loss.backward()
    grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if "gmod_router" not in n:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- skipping
@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("variant", ["gamma", "pmod"])
def test_skipping_packed_token_equals_its_sequence_alone(variant, positions):
    """With a fixed selection per token (explicit routing codes: 1 keep, 2 skip), routing does not couple
    the sequences of a row, so each packed sequence must come out as it does alone."""
    model = tiny_model("mistral", sliding_window=6).eval()
    extra = {"schedule": "constant", "router_init": "normal"} if variant == "pmod" else {}
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], variant=variant, positions=positions, progress=False,
                     **extra)
    ids, pos = _packed(seed=2)
    g = torch.Generator().manual_seed(3)
    codes = torch.where(torch.rand(ids.shape, generator=g) < 0.5, 1, 2).to(torch.int8)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, gmod_routing_mask=codes, use_cache=False).logits
        for r, at, n in _spans():
            alone = model(ids[r : r + 1, at : at + n], gmod_routing_mask=codes[r : r + 1, at : at + n].contiguous(),
                          use_cache=False).logits[0]
            torch.testing.assert_close(packed[r, at : at + n], alone, rtol=1e-5, atol=1e-5)
        mixed = model(ids, gmod_routing_mask=codes, use_cache=False).logits  # unpacked: the sequences see each other
    assert float((mixed - packed).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- where nothing is packed
def test_no_packing_where_transformers_does_not_pack():
    ref, model = tiny_model("llama").eval(), tiny_model("llama").eval()
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    ids, pos = _packed()
    with torch.no_grad():
        # an attention mask given: transformers ignores the restarts in the mask (RoPE still restarts)
        am = torch.ones_like(ids)
        out = model(ids, position_ids=pos, attention_mask=am, use_cache=False).logits
        assert model.gmod_state.current.segments is None
        torch.testing.assert_close(out, ref(ids, position_ids=pos, attention_mask=am, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
        # a KV cache: the packed mask is not applied (by either)
        out = model(ids, position_ids=pos, use_cache=True).logits
        torch.testing.assert_close(out, ref(ids, position_ids=pos, use_cache=True).logits, rtol=1e-5, atol=1e-5)
        # position_ids that never restart
        model(ids, position_ids=torch.arange(16).expand(3, -1), use_cache=False)
        assert model.gmod_state.current.segments is None


def test_data_collator_with_flattening_loss_equals_hf():
    collator_cls = getattr(transformers, "DataCollatorWithFlattening", None)
    if collator_cls is None:
        pytest.skip("this transformers has no DataCollatorWithFlattening")
    ref, model = tiny_model("llama"), tiny_model("llama")
    gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", aux_coef=0.0, progress=False)
    g = torch.Generator().manual_seed(5)
    features = [{"input_ids": torch.randint(1, 100, (n,), generator=g).tolist()} for n in (6, 11, 4, 9)]
    batch = collator_cls(return_position_ids=True)(features)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 30)
    ref.train(), model.train()
    lr = ref(**batch, use_cache=False)
    lm = model(**batch, use_cache=False)
    torch.testing.assert_close(lm.loss, lr.loss, rtol=1e-5, atol=1e-6)
    # and the loss is that of the four sequences alone (HF's collator marks each start with label -100)
    with torch.no_grad():
        total, count = 0.0, 0
        for f in features:
            x = torch.tensor([f["input_ids"]])
            total += float(ref(x, labels=x, use_cache=False).loss) * (x.shape[1] - 1)
            count += x.shape[1] - 1
    assert abs(float(lm.loss.detach()) - total / count) < 1e-5
