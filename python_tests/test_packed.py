"""Packed sequences: several sequences in one row, told apart by ``position_ids`` that restart and no
attention mask (what transformers' ``DataCollatorWithFlattening`` and padding-free trainers feed).

Transformers' models then attend only within each sequence (when no KV cache is used); MoD layers
must too, or a converted model would silently mix sequences. Checked here:

* the op: ``position_masked_attention`` with sequence ids against the float64 loop reference;
* keeping every token: a converted Llama / windowed Mistral on packed rows gives Hugging Face's packed
  logits and gradients, which equal those of each sequence run alone (both RoPE position modes);
* routing: each packed sequence keeps what it would keep alone (``per_sequence_codes`` against a plain
  Python top-k per sequence, ties / NaN / forced / padding / threshold included);
* skipping, with a fixed selection per token and with the router's own top-k: every token of a packed
  row leaves the model as it does when its sequence runs alone, and the MoD layers select the same
  tokens; a padding-free training batch has the loss, aux loss and gradients of its sequences alone;
* where transformers does not pack (an attention mask is given, position_ids that never restart, or a
  KV cache), neither do MoD layers;
* a batch from ``DataCollatorWithFlattening``: the converted model's loss equals Hugging Face's.
"""
from __future__ import annotations

import math

import pytest
import torch

from gmod_hf_utils import assert_grads_equal, num_threads, tiny_model, transformers
from references import position_attention_ref

import gmod_ext
from gmod_ext.masked_attention import position_masked_attention
from gmod_ext.router import max_segments, packed_segments, per_sequence_codes


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
    assert_grads_equal(model, ref)


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


# ----------------------------------------------------------------------------- routing per sequence
def _keep_alone_ref(scores, codes, ratio, threshold):
    """Plain Python: which tokens one sequence keeps alone (forced + its best keep(R, r) routable ones,
    ties to the lower index, NaN last; with a threshold only scores above it)."""
    routable = [i for i, c in enumerate(codes) if c == 0]
    n_keep = len(routable) - int(math.floor(len(routable) * ratio + 1e-9))
    ranked = sorted(routable, key=lambda i: (math.isnan(scores[i]), -scores[i] if not math.isnan(scores[i]) else 0, i))
    chosen = [i for i in ranked[:n_keep] if threshold is None or scores[i] > threshold]
    return {i for i, c in enumerate(codes) if c == 1} | set(chosen)


@pytest.mark.parametrize("threshold", [None, 0.0])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.99])
def test_per_sequence_codes_choose_what_each_sequence_keeps_alone(ratio, threshold):
    g = torch.Generator().manual_seed(int(ratio * 100) + (threshold is not None))
    lengths = [[1, 6, 2, 9, 1, 5], [24], [3, 3, 3, 3, 3, 3, 3, 3], [12, 1, 11]]
    B, S = len(lengths), 24
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    seg = packed_segments(pos)
    scores = (torch.randn(B, S, generator=g) * 2).round() / 2  # many ties
    scores[0, 3], scores[2, 7], scores[3, 0] = float("nan"), float("-inf"), float("inf")
    codes = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), B * S, replacement=True, generator=g)
    codes = codes.view(B, S).to(torch.int8)
    scores[0, 7:9] = torch.tensor([float("nan"), float("-inf")])  # a sequence of two: NaN ranks below -inf
    codes[0, 7:9] = 0
    out = per_sequence_codes(scores, codes, seg, ratio, threshold)
    assert out.dtype == torch.int8 and set(out.unique().tolist()) <= {1, 2}
    for b, row in enumerate(lengths):
        at = 0
        for n in row:
            want = _keep_alone_ref(scores[b, at:at + n].tolist(), codes[b, at:at + n].tolist(), ratio, threshold)
            got = {i - at for i in range(at, at + n) if out[b, i] == 1}
            assert got == want, (b, at, n)
            at += n
    # routed with num_routed 0, the capacity bound (per-row count + sequences - 1) holds for every row
    n_routable = (codes == 0).sum(1)
    per_row = (codes == 1).sum(1) + n_routable - torch.floor(n_routable.double() * ratio + 1e-9).long()
    C = min(S, int(per_row.max()) + max_segments(seg) - 1)
    idx, count = gmod_ext.ops.route(scores, C, 0, out)
    assert torch.equal(count.long(), (out == 1).sum(1)) and int(count.max()) <= C
    for b in range(B):
        assert idx[b, : count[b]].tolist() == (out[b] == 1).nonzero().flatten().tolist()
    # no codes given: everything routable
    plain = per_sequence_codes(scores, None, seg, ratio)
    torch.testing.assert_close(plain, per_sequence_codes(scores, torch.zeros_like(codes), seg, ratio))


def test_per_sequence_keep_counts_follow_the_config_rule():
    """keep(n, r) = n - floor(r n) with the config's float tolerance (0.58 * 50 is 28.999... in floats)."""
    lengths = [50, 50, 100, 7]
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    scores = torch.randn(1, seg.shape[1], generator=torch.Generator().manual_seed(7))
    out = per_sequence_codes(scores, None, seg, 0.58)
    kept = [int((out[0, seg[0] == i] == 1).sum()) for i in range(len(lengths))]
    assert kept == [gmod_ext.config.keep_count(n, 0.58) for n in lengths] == [21, 21, 42, 3]


ROUTED = [("gamma", "original", 0.5), ("gamma", "compact", 0.5), ("pmod", "original", 0.5),
          ("pmod", "compact", 0.5), ("gamma", "original", 0.95)]  # 0.95: the capacity bound is tight


@pytest.mark.parametrize("variant,positions,ratio", ROUTED)
def test_routed_packed_sequence_equals_its_sequence_alone(variant, positions, ratio):
    """The router's own top-k (no fixed codes): each packed sequence keeps what it keeps alone, so it
    leaves the model as it does alone (per-row top-k would let the sequences take each other's places)."""
    model = tiny_model("mistral", sliding_window=6).eval()
    extra = {"schedule": "constant"} if variant == "pmod" else {}
    gmod_ext.convert(model, ratio=ratio, layers=[1, 2, 3], variant=variant, positions=positions,
                     router_init="normal", progress=False, **extra)
    ids, pos = _packed(seed=4)
    with torch.no_grad():
        packed = model(ids, position_ids=pos, use_cache=False).logits
        sel = dict(model.gmod_state.current.selection)
        assert model.gmod_state.current.max_segments == 3 and len(sel) == 3
        for r, at, n in _spans():
            alone = model(ids[r : r + 1, at : at + n], use_cache=False).logits[0]
            torch.testing.assert_close(packed[r, at : at + n], alone, rtol=1e-5, atol=1e-5)
            for layer, (idx, count) in model.gmod_state.current.selection.items():
                mine = [i - at for i in sel[layer][0][r, : sel[layer][1][r]].tolist() if at <= i < at + n]
                assert mine == idx[0, : count[0]].tolist(), (layer, r, at)


def test_padding_free_training_batch_has_the_loss_and_gradients_of_its_sequences_alone():
    """A DataCollatorWithFlattening batch through a MoD model that skips half the routable tokens (and
    forces the label -100 ones, gamma-MoD's rule): loss, router aux loss and every parameter's gradient
    are the token-weighted mean of those of the sequences run one by one."""
    collator_cls = getattr(transformers, "DataCollatorWithFlattening", None)
    if collator_cls is None:
        pytest.skip("this transformers has no DataCollatorWithFlattening")
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2, 3], router_init="normal", aux_coef=0.0, progress=False)
    g = torch.Generator().manual_seed(6)
    features = [{"input_ids": torch.randint(1, 100, (n,), generator=g).tolist()} for n in (6, 11, 4, 9)]
    batch = collator_cls(return_position_ids=True)(features)
    batch["labels"][0, 8:10] = -100  # a forced prompt span inside the second sequence
    model.train()
    out = model(**batch, use_cache=False)
    aux = model.gmod_state.current.aux_total()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.loss + aux, params, allow_unused=True)
    n_targets = int((batch["labels"] != -100).sum())  # the collator marks each sequence's first token -100
    n_tokens = sum(len(f["input_ids"]) for f in features)
    want_loss = want_aux = 0.0
    want_grads = [torch.zeros_like(p) for p in params]
    at = 0
    for f in features:
        n = len(f["input_ids"])
        x = torch.tensor([f["input_ids"]])
        labels = batch["labels"][:, at : at + n].clone()
        o = model(x, labels=labels, use_cache=False)
        a = model.gmod_state.current.aux_total()
        w_loss, w_aux = int((labels[0, 1:] != -100).sum()) / n_targets, n / n_tokens  # CE: targets; aux: tokens
        for acc, gr in zip(want_grads, torch.autograd.grad(o.loss * w_loss + a * w_aux, params, allow_unused=True)):
            if gr is not None:
                acc += gr
        want_loss += float(o.loss.detach()) * w_loss
        want_aux += float(a.detach()) * w_aux
        at += n
    assert abs(float(out.loss.detach()) - want_loss) < 1e-5 and abs(float(aux.detach()) - want_aux) < 1e-5
    for p, got, want in zip(params, grads, want_grads):
        torch.testing.assert_close(torch.zeros_like(p) if got is None else got, want, rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("known_count", [True, False])
def test_packed_routing_layer_compiles_fullgraph(known_count):
    """The per-sequence routing has no host sync: a MoD layer given packed sequence ids compiles with
    fullgraph=True and matches eager (without the hook's sequence count, the capacity is the sequence
    length while compiling: the same result, more rows)."""
    from gmod_ext.mod_layer import make_mod_layer
    from gmod_ext.router import RoutingInfo

    model = tiny_model("llama")
    layer = make_mod_layer(model.model.layers[1], 0.5, layer_idx=1, router_init="normal")
    _, pos = _packed()
    x = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(8))
    pe = model.model.rotary_emb(x, pos)

    def routing():
        info = RoutingInfo()
        info.segments = packed_segments(pos)
        info.max_segments = 3 if known_count else None
        return info

    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = layer(xe, position_embeddings=pe, gmod_routing=routing())
    yc = torch.compile(layer, backend="aot_eager", fullgraph=True)(xc, position_embeddings=pe, gmod_routing=routing())
    torch.testing.assert_close(yc, ye)
    w = torch.randn(ye.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(torch.autograd.grad((yc * w).sum(), xc)[0], torch.autograd.grad((ye * w).sum(), xe)[0])
    for r, at, n in _spans():  # and each sequence as it is alone
        alone = layer(x[r : r + 1, at : at + n], position_embeddings=tuple(t[r : r + 1, at : at + n] for t in pe))
        torch.testing.assert_close(ye[r, at : at + n].detach(), alone[0].detach(), rtol=1e-5, atol=1e-5)
