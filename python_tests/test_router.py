"""Router, aux loss, routing masks and the capacity rule (gmod_ext.router / masks / config)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gmod_ext import ops
from gmod_ext.config import GmodConfig, capacity, capacity_of_rows, keep_count, prd_keep_ratios, prd_skip_ratios
from gmod_ext.masks import build_routing_mask, routing_codes_and_rows
from gmod_ext.router import GmodRouter, router_aux_loss, selection_mask


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_router_is_softmax_linear_on_rmsnorm():
    D = 32
    router = GmodRouter(D)
    with torch.no_grad():
        router.bias.normal_()
    x = torch.randn(2, 7, D, requires_grad=True)
    nw = torch.rand(D) + 0.5
    l = router(x, nw, 1e-6)
    assert l.dtype == torch.float32 and l.shape == (2, 7)
    logits = F.linear(_rms(x, nw, 1e-6), router.weight, router.bias)
    p_ref = logits.softmax(-1)[..., 1]
    torch.testing.assert_close(torch.sigmoid(l), p_ref, atol=1e-6, rtol=1e-5)
    # both rows of W get (opposite) gradients, as with the softmax form
    g = torch.autograd.grad(torch.sigmoid(l).sum(), [router.weight, x])
    g_ref = torch.autograd.grad(p_ref.sum(), [router.weight, x])
    torch.testing.assert_close(g[0], g_ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g[1], g_ref[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g[0][0], -g[0][1])


def test_router_stays_fp32():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), GmodRouter(8))
    w = m[1].weight.detach().clone()
    m.to(torch.bfloat16)
    assert m[0].weight.dtype == torch.bfloat16
    assert m[1].weight.dtype == torch.float32 and torch.equal(m[1].weight, w)  # no bf16 round trip
    m.half()
    assert m[1].weight.dtype == torch.float32
    m.to("cpu", torch.float64)
    assert m[1].weight.dtype == torch.float32
    # bf16 activations with the fp32 router
    l = m[1](torch.randn(1, 3, 8, dtype=torch.bfloat16), torch.ones(8, dtype=torch.bfloat16))
    assert l.dtype == torch.float32
    assert GmodRouter(8, init="zeros").weight.abs().max() == 0


def test_aux_loss_is_two_class_cross_entropy():
    B, S = 3, 10
    l0, l1 = torch.randn(B, S), torch.randn(B, S)
    target = (torch.rand(B, S) > 0.5).long()
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :3] = False
    aux = router_aux_loss(l1 - l0, target.float(), valid)
    ce = F.cross_entropy(torch.stack([l0, l1], -1)[valid], target[valid])
    torch.testing.assert_close(aux, ce)
    torch.testing.assert_close(router_aux_loss(l1 - l0, target.float()), F.cross_entropy(torch.stack([l0, l1], -1).view(-1, 2), target.view(-1)))


def test_selection_mask():
    idx = torch.tensor([[0, 3, 4, -1], [1, 2, -1, -1]], dtype=torch.int32)
    count = torch.tensor([3, 2], dtype=torch.int32)
    sel = selection_mask(idx, count, 6)
    assert sel.tolist() == [[1, 0, 0, 1, 1, 0], [0, 1, 1, 0, 0, 0]]


def test_routing_mask_sources():
    B, S = 2, 8
    ids = torch.tensor([[5, 9, 9, 9, 6, 7, 8, 1], [0, 0, 5, 9, 9, 6, 7, 1]])
    am = torch.ones(B, S, dtype=torch.long)
    am[1, :2] = 0
    labels = ids.clone()
    labels[:, :5] = -100
    # nothing given: all routable
    assert build_routing_mask((B, S), "cpu") == (None, 0)
    # padding only
    codes, mf = build_routing_mask((B, S), "cpu", attention_mask=am)
    assert mf == 0 and codes.tolist() == [[0] * 8, [2, 2] + [0] * 6]
    # image span: text forced, image tokens (id 9) routable, padding wins over forced
    codes, mf = build_routing_mask((B, S), "cpu", attention_mask=am, input_ids=ids, mode="text", image_token_id=9)
    assert codes.tolist() == [[1, 0, 0, 0, 1, 1, 1, 1], [2, 2, 1, 0, 0, 1, 1, 1]]
    assert mf == 5
    # labels == -100 forced, except image tokens
    codes, mf = build_routing_mask(
        (B, S), "cpu", attention_mask=am, input_ids=ids, labels=labels, mode="ignored_labels", image_token_id=9
    )
    assert codes.tolist() == [[1, 0, 0, 0, 1, 0, 0, 0], [2, 2, 1, 0, 0, 0, 0, 0]]
    assert mf == 2
    # without labels nothing is forced (inference)
    codes, mf = build_routing_mask((B, S), "cpu", input_ids=ids, mode="ignored_labels")
    assert codes is None and mf == 0
    # explicit mask adds to the mode
    fm = torch.zeros(B, S, dtype=torch.bool)
    fm[:, -1] = True
    codes, mf = build_routing_mask((B, S), "cpu", attention_mask=am, forced_mask=fm)
    assert codes[:, -1].tolist() == [1, 1] and mf == 1
    with pytest.raises(ValueError, match="shape"):
        build_routing_mask((B, S), "cpu", attention_mask=am[:, :5])
    # the hook's one-sync form: the same codes, F_max read off each row's (forced, routable) counts
    kw = dict(attention_mask=am, input_ids=ids, mode="text", image_token_id=9)
    codes, mf, rows = routing_codes_and_rows((B, S), "cpu", **kw)
    assert torch.equal(codes, build_routing_mask((B, S), "cpu", **kw)[0]) and mf == 5
    assert rows == [(5, 3), (4, 2)]
    assert routing_codes_and_rows((B, S), "cpu") == (None, 0, None)


@pytest.mark.parametrize("ratio", [0.0, 0.17, 0.3, 0.5, 0.68, 0.9])
def test_capacity_rule_bounds_every_row(ratio):
    """C = min(S, keep(S, r) + F_max) >= F + keep(R, r) for every split of S into R/F/P."""
    S = 24
    for F_max in (0, 3, 10):
        C = capacity(S, ratio, F_max)
        assert C <= S
        for F_ in range(F_max + 1):
            for R in range(S - F_ + 1):
                assert F_ + keep_count(R, ratio) <= C
    assert capacity(S, 0.0) == S
    assert keep_count(100, 0.29) == 71  # floor with tolerance: 0.29 * 100 counts as 29
    assert keep_count(10, 0.5) == 5 and keep_count(11, 0.5) == 6 and keep_count(1, 0.5) == 1


@pytest.mark.parametrize("ratio", [0.0, 0.17, 0.5, 0.9])
def test_tight_capacity_is_the_largest_row_count(ratio):
    """capacity_of_rows: C = max_b (F_b + keep(R_b, r)), so every row fits and the largest row fills C
    exactly; never above the loose rule min(S, keep(S, r) + F_max), never below 1, never above S."""
    S = 40
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        B = int(torch.randint(1, 5, (1,), generator=rng))
        rows = []
        for _ in range(B):
            F_ = int(torch.randint(0, 12, (1,), generator=rng))
            R = int(torch.randint(0, S - F_ + 1, (1,), generator=rng))
            rows.append((F_, R))
        C = capacity_of_rows(rows, ratio, S)
        counts = [f + keep_count(r, ratio) for f, r in rows]
        assert C == max(1, max(counts)) and all(c <= C for c in counts)
        assert C <= capacity(S, ratio, max(f for f, _ in rows))
    assert capacity_of_rows([(0, 0), (0, 0)], 0.5, S) == 1
    # the bench's LLaVA-like rows: S/8 forced, the rest routable -> 9S/16 where the loose rule gives 5S/8
    assert capacity_of_rows([(256, 1792)] * 4, 0.5, 2048) == 1152 and capacity(2048, 0.5, 256) == 1280


def test_route_follows_rule_with_capacity():
    """ops.route with the documented capacity keeps exactly F + keep(R) per row."""
    B, S, r = 4, 30, 0.6
    torch.manual_seed(0)
    scores = torch.randn(B, S)
    mask = torch.zeros(B, S, dtype=torch.int8)
    mask[0, :12] = 1
    mask[1, -5:] = 2
    mask[2, :3] = 2
    mask[2, 10:14] = 1
    R = (mask == 0).sum(1)
    num_routed = (R - torch.floor(R.double() * r + 1e-9).long()).int()
    F_max = int((mask == 1).sum(1).max())
    idx, count = ops.route(scores, capacity(S, r, F_max), num_routed, mask)
    for b in range(B):
        assert int(count[b]) == int((mask[b] == 1).sum()) + keep_count(int(R[b]), r)


def test_prd_schedule():
    L = 8
    keep = prd_keep_ratios(L, 0.5, 0.1)
    for l, k in enumerate(keep):
        assert math.isclose(k, max(0.1, 0.5 * math.cos(math.pi * l / (L - 1)) + 0.5))
    skip = prd_skip_ratios(L, 0.5, 0.1, 0.9)
    assert 0 not in skip  # R_0 = 1.0 > 0.9 stays dense
    assert all(math.isclose(skip[l], 1 - keep[l]) for l in skip)
    assert math.isclose(skip[L - 1], 0.9)


def test_config_validation_and_dict():
    cfg = GmodConfig(layers=[1, 2], ratios=[0.5, 0.3])
    assert GmodConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.ratio_of(2) == 0.3
    for bad in (dict(variant="x"), dict(router="x"), dict(positions="x"), dict(forced="x"), dict(gate="x")):
        with pytest.raises(ValueError):
            GmodConfig(**bad)
    with pytest.raises(ValueError):
        GmodConfig(layers=[0], ratios=[1.0])
