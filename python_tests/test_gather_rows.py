"""gmod.gather_rows ([B,S,D] -> [B,C,D] compaction) and its backward (scatter into zeros).
A row copy is exact, so outputs must equal the reference bit for bit in every dtype."""
import pytest
import torch
from torch.library import opcheck

from conftest import DTYPES, assert_unchanged, poison_heap, random_route, skip_unsupported, snapshot
from gmod_ext import ops
from references import gather_rows_ref

GMOD_OPS = ("gather_rows", "gather_rows_backward")

# (B, S, D, C)
SHAPES = [(2, 7, 33, 4), (1, 1, 127, 1), (3, 16, 64, 20), (2, 9, 5, 0), (4, 12, 8, 12)]


def counts_for(kind, B, S, C):
    n = min(S, C)
    if kind == "random":
        return None
    if kind == "zero":
        return [0] * B
    if kind == "full":  # count == capacity (or == S when the capacity exceeds S)
        return [n] * B
    if kind == "mixed":
        return [(b * n) // max(1, B - 1) for b in range(B)]
    raise ValueError(kind)


def check_forward_backward(device, B, S, D, C, counts, dtype, garbage_past_count=False):
    """Forward and backward against the reference, bit for bit; returns the inputs and both results
    (out, dx) and their references for further checks."""
    x = (torch.randn(B, S, D) + 0.5).to(dtype).to(device).requires_grad_()
    idx, count = random_route(B, S, C, counts, device=device, garbage_past_count=garbage_past_count)
    before = snapshot(x, idx, count)
    poison_heap(device, B * C * D * x.element_size())
    out = ops.gather_rows(x, idx, count)
    assert_unchanged(before, (x, idx, count), ["x", "idx", "count"])
    assert out.dtype == dtype and out.shape == (B, C, D)
    ref = gather_rows_ref(x.detach().cpu(), idx.cpu(), count.cpu())
    assert torch.equal(out.detach().cpu(), ref), "gather_rows differs from the reference"

    g = (torch.randn(B, C, D) + 0.5).to(dtype).to(device)
    poison_heap(device, B * S * D * x.element_size())
    (dx,) = torch.autograd.grad(out, x, g)
    assert_unchanged(before[1:], (idx, count), ["idx", "count"])
    x64 = x.detach().cpu().double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(gather_rows_ref(x64, idx.cpu(), count.cpu()), x64, g.cpu().double())
    assert dx.dtype == dtype
    assert torch.equal(dx.cpu().double(), ref_dx), "gather_rows backward differs from the reference"
    return x, idx, count, g, ref, ref_dx


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count_kind", ["random", "zero", "full", "mixed"])
def test_forward_backward_values(device, shape, dtype, count_kind):
    skip_unsupported(device, dtype)
    B, S, D, C = shape
    check_forward_backward(device, B, S, D, C, counts_for(count_kind, B, S, C), dtype)


# (B, S, D, C, counts): every case has rows with count < C, so slots past count exist
GARBAGE_SHAPES = [
    (2, 7, 33, 4, [2, 0]),
    (1, 1, 127, 3, [1]),  # S = 1: every junk slot repeats the one kept position
    (3, 16, 64, 20, [16, 5, 0]),  # capacity > S, a full row followed by junk
    (4, 12, 8, 12, [0, 4, 8, 11]),
    (2, 10, 16, 6, [6, 3]),  # count == capacity in row 0, junk only in row 1
]


@pytest.mark.parametrize("shape", GARBAGE_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ignores_slots_past_count(device, shape, dtype):
    """idx slots past count[b] hold in-range junk (kept positions repeated, positions not kept):
    only ``c < count[b]`` decides validity, in both directions."""
    skip_unsupported(device, dtype)
    B, S, D, C, counts = shape
    x, idx, count, g, ref, ref_dx = check_forward_backward(device, B, S, D, C, counts, dtype, garbage_past_count=True)
    # The inputs do separate the two semantics: treating every idx >= 0 as valid (here: every slot,
    # as the junk is in range) gives other results, forward and backward.
    assert bool((idx >= 0).all()) and any(n < C for n in counts)
    full = torch.full((B,), C, dtype=torch.int32)
    assert not torch.equal(gather_rows_ref(x.detach().cpu(), idx.cpu(), full), ref)
    x64 = x.detach().cpu().double().requires_grad_()
    (wrong_dx,) = torch.autograd.grad(gather_rows_ref(x64, idx.cpu(), full), x64, g.cpu().double())
    assert not torch.equal(wrong_dx, ref_dx)


@pytest.mark.parametrize("shape", [(2, 6, 3, 4), (3, 5, 2, 7)])
def test_gradcheck(shape):
    B, S, D, C = shape
    x = torch.randn(B, S, D, dtype=torch.float64, requires_grad=True)
    idx, count = random_route(B, S, C, [min(S, C), 1, 0][:B])
    torch.autograd.gradcheck(lambda x: ops.gather_rows(x, idx, count), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("garbage", [False, True], ids=["minus1-past-count", "junk-past-count"])
def test_opcheck(device, dtype, garbage):
    skip_unsupported(device, dtype)
    B, S, D, C = 3, 10, 6, 5
    x = torch.randn(B, S, D, dtype=dtype, device=device, requires_grad=True)
    idx, count = random_route(B, S, C, [5, 0, 3], device=device, garbage_past_count=garbage)
    opcheck(torch.ops.gmod.gather_rows.default, (x, idx, count))
    g = torch.randn(B, C, D, dtype=dtype, device=device)
    opcheck(torch.ops.gmod.gather_rows_backward.default, (g, idx, count, S))


def test_after_route(device):
    """The (idx, count) produced by route are accepted as they are, including the -1 sentinels."""
    B, S, D = 3, 20, 16
    x = torch.randn(B, S, D, device=device)
    idx, count = ops.route(torch.randn(B, S, device=device), capacity=8, num_routed=torch.tensor(
        [3, 8, 0], dtype=torch.int32, device=device))
    assert bool((idx[0, 3:] == -1).all())
    out = ops.gather_rows(x, idx, count)
    assert torch.equal(out.cpu(), gather_rows_ref(x.cpu(), idx.cpu(), count.cpu()))


def test_empty(device):
    for B, S, D, C in [(0, 4, 3, 2), (2, 0, 3, 2), (2, 4, 0, 2), (2, 4, 3, 0)]:
        x = torch.randn(B, S, D, device=device, requires_grad=True)
        idx = torch.full((B, C), -1, dtype=torch.int32, device=device)
        count = torch.zeros(B, dtype=torch.int32, device=device)
        out = ops.gather_rows(x, idx, count)
        assert out.shape == (B, C, D)
        assert bool((out == 0).all())
        out.sum().backward()
        assert x.grad.shape == x.shape and bool((x.grad == 0).all())
