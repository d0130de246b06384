"""ALiBi in MoD layers (gmod_ext.alibi): BLOOM, MPT and Falcon with ``alibi=True``.

* the op: ``position_masked_attention`` with a per-key bias ``slope * key position`` (the form the models
  give their layers) equals a float64 loop that adds ALiBi's relative penalty ``slope * (k - q)``, forward
  and gradients, GQA, decode-shaped calls, rows with 0 and 1 keys;
* what the layers are given: ``AlibiBias.columns`` reads BLOOM's, Falcon's and MPT's bias as
  ``slope * position`` with the slopes of the ALiBi paper's geometric sequence, written out here (BLOOM with
  6 heads: the 4 of the largest power of 2, then every other one of 8), Falcon's times 1 / sqrt(d);
* skipping half the tokens, a MoD layer's output at its kept tokens is Hugging Face's own block run on only
  those tokens, with the model's bias at their original positions (BLOOM, MPT), and the skipped tokens are
  unchanged;
* errors: biases of the wrong shape or too short, both keywords at once, positions="compact".

The models' keep-all logits and gradients, dropout masks, and cached generation against the no-cache
recomputation are in test_block_variants.py; the conversion check in test_verify.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from gmod_hf_utils import hf_model, num_threads, padded_prompt
from references import position_attention_ref

import gmod_ext
from gmod_ext._hf import find_decoder
from gmod_ext.alibi import AlibiBias, key_bias, pop_alibi, uses_alibi
from gmod_ext.convert import is_converted
from gmod_ext.masked_attention import position_masked_attention

GMOD_OPS = ()  # plain torch: no gmod kernel


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


# ----------------------------------------------------------------------------- the op
def _case(seed, Hk, decode):
    g = torch.Generator().manual_seed(seed)
    B, Hq, d, Ck = 3, 4, 16, 9
    Cq = 2 if decode else Ck
    k_pos = torch.stack([torch.randperm(25, generator=g)[:Ck].sort().values for _ in range(B)]).to(torch.int32)
    k_len = torch.tensor([Ck, 1, 0] if decode else [Ck, 5, 1], dtype=torch.int32)
    if decode:  # the step's queries: the last stored keys of their row
        q_pos = torch.stack([k_pos[b, int(k_len[b]) - Cq:int(k_len[b])] if int(k_len[b]) >= Cq
                             else torch.full((Cq,), 26, dtype=torch.int32) for b in range(B)])
    else:
        k_pos[torch.arange(Ck).unsqueeze(0) >= k_len.unsqueeze(1)] = -1
        q_pos = k_pos.clone()
    q = torch.randn(B, Cq, Hq, d, generator=g)
    k, v = torch.randn(B, Ck, Hk, d, generator=g), torch.randn(B, Ck, Hk, d, generator=g)
    slopes = torch.rand(Hq, generator=g) + 0.3
    return q, k, v, q_pos, k_pos, k_len, slopes


@pytest.mark.parametrize("Hk", [1, 2, 4])
@pytest.mark.parametrize("decode", [False, True])
def test_key_bias_equals_relative_alibi_float64(Hk, decode, device):
    q, k, v, q_pos, k_pos, k_len, slopes = _case(7 * Hk + decode, Hk, decode)
    # the models' form: one bias per key column, slope * position (the query's part is left out)
    bias = (slopes.view(1, -1, 1) * k_pos.clamp(min=0).to(torch.float32).unsqueeze(1)).contiguous()
    q, k, v = (t.to(device).requires_grad_() for t in (q, k, v))
    saved = bias.clone()
    out = position_masked_attention(q, k, v, q_pos.to(device), k_pos.to(device), k_len.to(device), 0.6,
                                    key_bias=bias.to(device))
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref, visible = position_attention_ref(q64, k64, v64, q_pos, k_pos, k_len, 0.6, alibi=slopes.double())
    without, _ = position_attention_ref(q64, k64, v64, q_pos, k_pos, k_len, 0.6)
    assert float((ref - without).detach()[visible].abs().max()) > 1e-2  # the bias matters here
    tol = dict(rtol=1e-5, atol=1e-5) if device == "cpu" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.detach().cpu().double()[visible], ref.detach()[visible], **tol)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * visible[..., None, None]
    (out.cpu().double() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        torch.testing.assert_close(a.cpu().double(), b, **tol, msg=lambda m: f"{name}: {m}")
    assert torch.equal(bias, saved)
    with pytest.raises(ValueError, match=r"key_bias must be \[B, Hq, Ck\]"):
        position_masked_attention(q, k, v, q_pos, k_pos, k_len, 0.6, key_bias=bias[:, :-1].to(device))


# ----------------------------------------------------------------------------- what the layers are given
def _paper_slopes(H: int) -> list:
    """ALiBi's slopes: for H a power of 2, 2^(-8 i / H), i = 1..H; otherwise those of the largest power of 2
    below H, then the odd-numbered ones of twice that."""
    p = 2 ** int(math.floor(math.log2(H)))
    slopes = [2.0 ** (-8.0 * i / p) for i in range(1, p + 1)]
    return slopes + [2.0 ** (-8.0 * i / (2 * p)) for i in range(1, 2 * p, 2)][:H - p]


def _given_bias(model, ids, am):
    """The ALiBi bias the model gives its first layer (pop_alibi of its call's keywords)."""
    seen = {}

    def grab(mod, args, kwargs):
        seen["bias"] = pop_alibi(dict(kwargs))

    handle = find_decoder(model).layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids, attention_mask=am)
    handle.remove()
    return seen["bias"]


@pytest.mark.parametrize("arch", ["bloom_6_heads", "falcon_alibi", "mpt"])
def test_columns_are_slope_times_position(arch):
    build = {"bloom_6_heads": lambda: hf_model("BloomForCausalLM", "BloomConfig", hidden_size=48, num_attention_heads=6),
             "falcon_alibi": lambda: hf_model("FalconForCausalLM", "FalconConfig", alibi=True),
             "mpt": lambda: hf_model("MptForCausalLM", "MptConfig", max_seq_len=40)}[arch]
    model = build().eval()
    B, S = 2, 12
    ids, am = padded_prompt(B, S, pad=(0, 3), seed=2)
    bias = _given_bias(model, ids, am)
    assert bias is not None and bias.kind == ("position_bias" if arch == "mpt" else "alibi")
    layer = find_decoder(model).layers[0]
    attn = getattr(layer, "self_attention", None) or layer.attn
    H = {"bloom_6_heads": 6, "falcon_alibi": 4, "mpt": 4}[arch]
    cols = bias.columns(attn, B, H, S).double()
    assert cols.shape == (B, H, S) and cols.dtype == torch.float64
    slopes = torch.tensor(_paper_slopes(H), dtype=torch.float64)
    if arch == "falcon_alibi":  # added before the 1 / sqrt(d) scale
        slopes = slopes / math.sqrt(attn.head_dim)
    for b in range(B):
        real = am[b].nonzero().flatten()  # the row's tokens (padding on the left: never kept by a MoD layer)
        diff = cols[b][:, real] - cols[b][:, real[:1]]  # the per-row constant drops out of every softmax
        expect = slopes.view(H, 1) * (real - real[0]).double().view(1, -1)
        torch.testing.assert_close(diff, expect, rtol=1e-2 if arch == "falcon_alibi" else 1e-6, atol=1e-6)


def test_bias_errors_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"must hold \[B \* H, 1, K\]"):
        AlibiBias(torch.zeros(2 * 3, 1, 5), "alibi").columns(None, 2, 4, 5)
    with pytest.raises(ValueError, match=r"covers 5 key positions, the layer attends over 7"):
        AlibiBias(torch.zeros(2 * 4, 1, 5), "alibi").columns(None, 2, 4, 7)
    with pytest.raises(ValueError, match=r"position_bias must be \[H, 1, max_seq_len\]"):
        AlibiBias(torch.zeros(4, 5), "position_bias").columns(None, 2, 4, 5)
    with pytest.raises(ValueError, match=r"covers 8 positions \(max_seq_len\), the sequence has 9"):
        AlibiBias(torch.zeros(4, 1, 8), "position_bias").columns(None, 2, 4, 9)
    with pytest.raises(ValueError, match=r"both alibi and position_bias"):
        pop_alibi({"alibi": torch.zeros(1), "position_bias": torch.zeros(1)})
    kw = {"alibi": None, "position_bias": None, "x": 1}
    assert pop_alibi(kw) is None and kw == {"x": 1}
    cols = torch.arange(12.0).view(1, 2, 6)
    assert torch.equal(key_bias(cols, torch.tensor([[5, -1, 2]])), torch.tensor([[[5.0, 0.0, 2.0], [11.0, 6.0, 8.0]]]))


def test_uses_alibi_reads_the_layer():
    assert uses_alibi(find_decoder(hf_model("BloomForCausalLM", "BloomConfig")).layers[0])
    assert uses_alibi(find_decoder(hf_model("MptForCausalLM", "MptConfig", max_seq_len=40)).layers[0])
    assert uses_alibi(find_decoder(hf_model("FalconForCausalLM", "FalconConfig", alibi=True)).layers[0])
    assert not uses_alibi(find_decoder(hf_model("FalconForCausalLM", "FalconConfig")).layers[0])
    assert not uses_alibi(find_decoder(hf_model("LlamaForCausalLM", "LlamaConfig")).layers[0])


def test_compact_positions_are_refused_before_anything_changes():
    model = hf_model("BloomForCausalLM", "BloomConfig")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"attends with an ALiBi bias.*positions='original'"):
        gmod_ext.convert(model, ratio=0.5, layers=[1, 2], positions="compact", progress=False)
    assert not is_converted(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- a skipping layer vs HF's block
def _hf_block_on(layer, arch, xs, positions, bias, S):
    """Hugging Face's own block (the MoD layer's wrapped class) on one row's kept tokens ``xs`` [1, c, D]
    alone: causal among them, with the model's bias at their original ``positions``."""
    c = xs.shape[1]
    base = type(layer)._gmod_base_class
    if arch == "bloom":  # alibi [H, 1, K] per row: the columns of the kept tokens; an additive causal mask
        H = layer.num_heads
        alibi = bias.tensor.view(-1, H, 1, S)[0][:, :, positions]
        mask = torch.full((c, c), torch.finfo(xs.dtype).min).triu(1).view(1, 1, c, c)
        out = base.forward(layer, xs, alibi=alibi.reshape(H, 1, c), attention_mask=mask)
    else:  # MPT: the bias table's columns of the kept tokens (the last S are the sequence); a boolean mask
        table = bias.tensor[:, :, bias.tensor.shape[-1] - S:][:, :, positions]
        mask = torch.ones(c, c, dtype=torch.bool).triu(1).view(1, 1, c, c)
        out = base.forward(layer, xs, position_bias=table, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_skipping_layer_is_hf_block_on_the_kept_tokens(arch):
    """Ratio 0.5 on layer 1, no gate: at each row's kept tokens the MoD layer outputs what Hugging Face's
    block computes on those tokens alone with the ALiBi bias of their original positions; elsewhere its
    input, unchanged."""
    model = (hf_model("BloomForCausalLM", "BloomConfig") if arch == "bloom"
             else hf_model("MptForCausalLM", "MptConfig", max_seq_len=40)).eval()
    gmod_ext.convert(model, ratio=0.5, layers=[1], gate="none", progress=False)
    with torch.no_grad():
        model.gmod_router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(4))
    layer = find_decoder(model).layers[1]
    seen = {}

    def grab(mod, args, kwargs, out):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["bias"] = pop_alibi(dict(kwargs))
        seen["y"] = out[0] if isinstance(out, tuple) else out

    handle = layer.register_forward_hook(grab, with_kwargs=True)
    B, S = 2, 14
    ids, am = padded_prompt(B, S, pad=(0, 4), seed=6)
    with torch.no_grad():
        model(ids, attention_mask=am)
    handle.remove()
    idx, count = model.gmod_state.current.selection[1]
    x, y = seen["x"], seen["y"]
    with torch.no_grad():
        for b in range(B):
            kept = idx[b, :int(count[b])].long()
            assert 0 < len(kept) < int(am[b].sum()), kept  # some tokens of the row skipped, some kept
            ref = _hf_block_on(layer, arch, x[b:b + 1, kept], kept, seen["bias"] if arch == "mpt" else
                               AlibiBias(seen["bias"].tensor.view(B, -1, S)[b:b + 1], "alibi"), S)
            torch.testing.assert_close(y[b, kept], ref[0], rtol=1e-5, atol=1e-5)
            skipped = torch.ones(S, dtype=torch.bool)
            skipped[kept] = False
            assert torch.equal(y[b, skipped], x[b, skipped])


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_alibi_layer_compiles_fullgraph(arch):
    """The ALiBi path (the bias read per key, BLOOM's / MPT's MLP called with a zero residual) has no graph
    breaks: a MoD layer compiles with fullgraph=True and matches eager, forward and gradients."""
    from gmod_ext.mod_layer import make_mod_layer
    from gmod_ext.router import RoutingInfo

    model = (hf_model("BloomForCausalLM", "BloomConfig") if arch == "bloom"
             else hf_model("MptForCausalLM", "MptConfig", max_seq_len=40))
    ids, am = padded_prompt(2, 12, pad=(0, 3), seed=1)
    bias = _given_bias(model, ids, am)
    layer = make_mod_layer(find_decoder(model).layers[0], 0.5, layer_idx=0)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 12, dtype=torch.int8)
    mask[1, :3] = 2  # padding
    kw = {bias.kind: bias.tensor}
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye = layer(xe, gmod_routing=RoutingInfo(mask, 0), **kw)
    yc = torch.compile(layer, backend="aot_eager", fullgraph=True)(xc, gmod_routing=RoutingInfo(mask, 0), **kw)
    ye, yc = (y[0] if isinstance(y, tuple) else y for y in (ye, yc))
    torch.testing.assert_close(yc, ye)
    w = torch.randn(ye.shape, generator=torch.Generator().manual_seed(2))
    params = [p for n, p in layer.named_parameters() if "qkv" in n.lower() or "query_key_value" in n][:1]
    ge = torch.autograd.grad((ye * w).sum(), [xe, *params])
    gc = torch.autograd.grad((yc * w).sum(), [xc, *params])
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)
