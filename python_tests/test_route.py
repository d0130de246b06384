"""gmod.route: token selection. Results must equal the python reference exactly (ties included)."""
import math

import pytest
import torch
from torch.library import opcheck

from conftest import assert_unchanged, poison_heap, snapshot
from gmod_ext import ops
from references import MASK_FORCED, MASK_NEVER, MASK_ROUTABLE, route_ref

GMOD_OPS = ("route",)


def make_scores(kind, B, S):
    if kind == "randn":
        return torch.randn(B, S)
    if kind == "ties":  # very few distinct values: almost every comparison is a tie
        return torch.randint(-1, 3, (B, S)).float() * 0.5
    if kind == "ties_nan_inf":
        s = torch.randint(-1, 2, (B, S)).float()
        r = torch.rand(B, S)
        s[r < 0.15] = math.nan
        s[(r >= 0.15) & (r < 0.22)] = math.inf
        s[(r >= 0.22) & (r < 0.27)] = -math.inf
        return s
    raise ValueError(kind)


def make_mask(kind, B, S):
    if kind == "none":
        return torch.zeros(B, S, dtype=torch.int8)
    if kind == "random":
        r = torch.rand(B, S)
        m = torch.zeros(B, S, dtype=torch.int8)
        m[r < 0.25] = MASK_FORCED
        m[r > 0.8] = MASK_NEVER
        return m
    if kind == "all_forced":
        return torch.full((B, S), MASK_FORCED, dtype=torch.int8)
    if kind == "all_padding":
        return torch.full((B, S), MASK_NEVER, dtype=torch.int8)
    if kind == "trailing_padding":  # forced prefix (instruction), routable middle, padded tail
        m = torch.zeros(B, S, dtype=torch.int8)
        for b in range(B):
            m[b, : S // 4] = MASK_FORCED
            m[b, S - b * S // (2 * B) :] = MASK_NEVER
        return m
    raise ValueError(kind)


def poison_outputs(device, B, capacity):
    """NaN-filled freed blocks the size of idx [B, C] and count [B] (int32), so an entry the kernel
    forgets to write reads 2143289344 (NaN's bits) instead of a lucky 0 or -1. The CUDA caching
    allocator reuses them at any size; on CPU (glibc, 64-byte aligned allocations) blocks of a few
    dozen bytes are practically never reused, blocks of 1 KiB and more mostly are: hence the
    many-row test below."""
    poison_heap(device, B * capacity * 4)
    poison_heap(device, B * 4)


def check_route(scores, mask, num_routed, capacity, threshold, device):
    s, m, n = scores.to(device), mask.to(device), num_routed.to(device)
    before = snapshot(s, m, n)
    poison_outputs(device, scores.shape[0], capacity)
    idx, count = torch.ops.gmod.route(s, m, n, capacity, threshold)
    assert_unchanged(before, (s, m, n), ["scores", "mask", "num_routed"])
    assert idx.dtype == torch.int32 and count.dtype == torch.int32
    assert idx.shape == (scores.shape[0], capacity) and count.shape == (scores.shape[0],)
    assert idx.device.type == device and count.device.type == device
    ref_idx, ref_count = route_ref(scores, mask, num_routed, capacity, threshold)
    assert torch.equal(count.cpu(), ref_count), f"count {count.tolist()} != reference {ref_count.tolist()}"
    assert torch.equal(idx.cpu(), ref_idx), f"idx\n{idx.tolist()}\n!= reference\n{ref_idx.tolist()}"
    return idx, count


@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 64)])
@pytest.mark.parametrize("score_kind", ["randn", "ties", "ties_nan_inf"])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all_forced", "all_padding", "trailing_padding"])
@pytest.mark.parametrize("cap", ["zero", "half", "S", "more"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(device, shape, score_kind, mask_kind, cap, dtype):
    B, S = shape
    capacity = {"zero": 0, "half": S // 2, "S": S, "more": S + 5}[cap]
    scores = make_scores(score_kind, B, S).to(dtype)
    mask = make_mask(mask_kind, B, S)
    # per-row budgets from 0 up to past the number of routable tokens
    num_routed = torch.randint(0, S + 4, (B,), dtype=torch.int32)
    check_route(scores, mask, num_routed, capacity, None, device)
    # threshold mode on the same inputs: a threshold that is one of the (tied) score values
    finite = scores[torch.isfinite(scores)]
    thr = float(finite[0]) if finite.numel() else 0.0
    check_route(scores, mask, num_routed, capacity, thr, device)


@pytest.mark.parametrize("threshold", [-math.inf, -0.5, 0.0, 0.25, 1.0, math.inf, 1e300])
def test_threshold_mode(device, threshold):
    B, S = 4, 40
    scores = torch.randint(-4, 5, (B, S)).float() / 4  # exact multiples of 0.25: many scores == threshold
    scores[0, 3] = math.nan
    scores[1, :5] = math.inf
    mask = make_mask("random", B, S)
    num_routed = torch.tensor([0, 5, 12, 100], dtype=torch.int32)
    idx, count = check_route(scores, mask, num_routed, 30, threshold, device)
    # strictly greater: no routable token with score <= threshold is kept
    for b in range(B):
        for j in idx[b, : count[b]].tolist():
            if mask[b, j] == MASK_ROUTABLE:
                assert scores[b, j] > threshold


def test_forced_over_capacity(device):
    S, C = 20, 6
    scores = torch.randn(2, S)
    mask = torch.zeros(2, S, dtype=torch.int8)
    mask[0, [1, 4, 5, 9, 11, 12, 15, 19]] = MASK_FORCED  # 8 forced > capacity 6
    mask[1, [0, 2]] = MASK_FORCED
    mask[1, 3:] = MASK_NEVER
    idx, count = check_route(scores, mask, torch.tensor([5, 5], dtype=torch.int32), C, None, device)
    assert idx[0].tolist() == [1, 4, 5, 9, 11, 12] and count[0] == C  # lowest-index forced ones
    assert idx[1].tolist() == [0, 1, 2, -1, -1, -1] and count[1] == 3  # only token 1 is routable


def test_count_equals_capacity_and_topk_order(device):
    S, C = 16, 5
    scores = torch.arange(S, dtype=torch.float32).flip(0).repeat(2, 1)  # strictly decreasing
    scores[1] = torch.randperm(S).float()
    mask = torch.zeros(2, S, dtype=torch.int8)
    idx, count = check_route(scores, mask, torch.tensor([C, C + 3], dtype=torch.int32), C, None, device)
    assert count.tolist() == [C, C]
    assert idx[0].tolist() == list(range(C))
    assert idx[1].tolist() == sorted(scores[1].topk(C).indices.tolist())


def test_ties_go_to_lower_index(device):
    S = 33
    scores = torch.full((3, S), 0.75)
    scores[1, ::2] = 1.0
    mask = torch.zeros(3, S, dtype=torch.int8)
    mask[2, :10] = MASK_NEVER
    idx, count = check_route(scores, mask, torch.tensor([7, 20, 4], dtype=torch.int32), S, None, device)
    assert idx[0, :7].tolist() == list(range(7))
    assert idx[1, :20].tolist() == sorted(list(range(0, S, 2)) + [1, 3, 5])
    assert idx[2, :4].tolist() == [10, 11, 12, 13]


def test_nan_ranks_last(device):
    scores = torch.tensor([[math.nan, -math.inf, math.nan, -5.0, math.nan]])
    mask = torch.zeros(1, 5, dtype=torch.int8)
    for k, expected in [(1, [3]), (2, [1, 3]), (3, [0, 1, 3]), (4, [0, 1, 2, 3]), (9, [0, 1, 2, 3, 4])]:
        idx, count = check_route(scores, mask, torch.tensor([k], dtype=torch.int32), 5, None, device)
        assert idx[0, : count[0]].tolist() == expected


def test_num_routed_exceeds_routable(device):
    S = 12
    scores = torch.randn(2, S)
    mask = torch.full((2, S), MASK_NEVER, dtype=torch.int8)
    mask[0, [2, 7]] = MASK_ROUTABLE
    mask[0, 5] = MASK_FORCED
    mask[1, 4] = MASK_ROUTABLE
    idx, count = check_route(scores, mask, torch.tensor([50, 50], dtype=torch.int32), 8, None, device)
    assert count.tolist() == [3, 1]
    assert idx[0].tolist() == [2, 5, 7, -1, -1, -1, -1, -1]
    assert idx[1].tolist() == [4] + [-1] * 7


def test_rows_are_independent_and_deterministic(device):
    B, S, C = 9, 50, 20
    scores = make_scores("ties_nan_inf", B, S)
    mask = make_mask("random", B, S)
    num_routed = torch.randint(0, S, (B,), dtype=torch.int32)
    idx, count = check_route(scores, mask, num_routed, C, None, device)
    idx2, count2 = check_route(scores, mask, num_routed, C, None, device)
    assert torch.equal(idx, idx2) and torch.equal(count, count2)
    for b in range(B):
        poison_outputs(device, 1, C)
        ib, cb = torch.ops.gmod.route(
            scores[b : b + 1].to(device), mask[b : b + 1].to(device), num_routed[b : b + 1].to(device), C, None
        )
        assert torch.equal(ib[0], idx[b]) and cb[0] == count[b]


@pytest.mark.parametrize("mask_kind", ["none", "random", "all_forced", "all_padding", "trailing_padding"])
@pytest.mark.parametrize("cap", ["zero", "half", "more"])
def test_many_rows_poisoned(device, mask_kind, cap):
    """Enough rows that count [B] and idx [B, C] are large enough for the poisoned heap blocks to be
    reused on CPU as well: a row whose count (often 0 here) or idx slot is not written shows up."""
    B, S = 1024, 12
    capacity = {"zero": 0, "half": S // 2, "more": S + 3}[cap]
    scores = make_scores("ties_nan_inf", B, S)
    mask = make_mask(mask_kind, B, S)
    num_routed = torch.randint(0, S + 2, (B,), dtype=torch.int32)
    num_routed[::3] = 0  # many rows with nothing routed
    check_route(scores, mask, num_routed, capacity, None, device)
    check_route(scores, mask, num_routed, capacity, 0.0, device)


def test_wrapper_defaults(device):
    scores = torch.randn(3, 10, device=device)
    poison_outputs(device, 3, 4)
    idx, count = ops.route(scores, capacity=4, num_routed=3)
    ref_idx, ref_count = route_ref(scores, torch.zeros(3, 10, dtype=torch.int8), 3, 4)
    assert torch.equal(idx.cpu(), ref_idx) and torch.equal(count.cpu(), ref_count)


def test_empty(device):
    for B, S, C in [(0, 5, 3), (2, 0, 3), (2, 5, 0), (1024, 0, 3), (1024, 5, 0)]:
        poison_outputs(device, B, C)
        idx, count = torch.ops.gmod.route(
            torch.randn(B, S, device=device),
            torch.zeros(B, S, dtype=torch.int8, device=device),
            torch.full((B,), 2, dtype=torch.int32, device=device),
            C,
            None,
        )
        assert idx.shape == (B, C) and count.shape == (B,)
        assert bool((count == 0).all()) and bool((idx == -1).all())


@pytest.mark.parametrize("threshold", [None, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, threshold, dtype):
    scores = make_scores("ties_nan_inf", 3, 24).to(dtype).to(device)
    mask = make_mask("random", 3, 24).to(device)
    num_routed = torch.tensor([0, 5, 30], dtype=torch.int32, device=device)
    opcheck(torch.ops.gmod.route.default, (scores, mask, num_routed, 10), {"threshold": threshold})


def test_threshold_is_compared_in_the_scores_dtype(device):
    """Like torch's ``scores > threshold``: the threshold is rounded to the scores' dtype first, so a
    float32 score equal to float32(0.1) is not above threshold=0.1 (in float64 it would be)."""
    s32 = torch.tensor([[0.1, 0.2, 0.05, 0.1000001]], dtype=torch.float32)
    mask = torch.zeros(1, 4, dtype=torch.int8)
    n = torch.tensor([4], dtype=torch.int32)
    idx, count = check_route(s32, mask, n, 4, 0.1, device)
    assert idx[0, : count[0]].tolist() == [1, 3]
    idx, count = check_route(s32.double(), mask, n, 4, 0.1, device)
    assert idx[0, : count[0]].tolist() == [0, 1, 3]
