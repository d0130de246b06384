"""gmod.scatter_merge ([B,C,D] -> [B,S,D] merge of processed rows) and its backward."""
import itertools

import pytest
import torch
from torch.library import opcheck

from conftest import DTYPES, assert_unchanged, poison_heap, random_route, skip_unsupported, snapshot
from gmod_ext import ops
from references import acc_dtype, assert_within, rounding_error, scatter_merge_ref, unit_roundoff

GMOD_OPS = ("scatter_merge", "scatter_merge_backward")

# (B, S, D, C, counts): counts None = random
SHAPES = [
    (2, 7, 33, 4, None),
    (1, 1, 127, 1, [1]),  # S = 1, everything kept
    (3, 16, 64, 20, [16, 16, 16]),  # capacity > S, all kept
    (2, 9, 5, 0, [0, 0]),  # capacity 0: everything skipped
    (4, 12, 8, 12, [0, 4, 8, 12]),  # count 0 ... count == capacity == S
    (2, 10, 16, 6, [6, 0]),  # count == capacity < S
]
COMBOS = list(itertools.product([False, True], repeat=3))  # (delta, gate, skip_scale)
COMBO_IDS = [f"delta{int(d)}-gate{int(g)}-skip{int(s)}" for d, g, s in COMBOS]


def make_inputs(B, S, D, C, counts, dtype, device, has_delta, has_gate, has_skip, scale_dtype, requires_grad=False,
                skip_dtype=None, garbage_past_count=False):
    """``scale_dtype`` is gate's dtype, and skip_scale's unless ``skip_dtype`` is given."""
    def act(*shape):
        return (torch.randn(*shape) + 0.25).to(dtype).to(device)

    skip_dtype = scale_dtype if skip_dtype is None else skip_dtype
    x, base = act(B, S, D), act(B, C, D)
    delta = act(B, C, D) if has_delta else None
    gate = torch.rand(B, C).add(0.1).to(scale_dtype).to(device) if has_gate else None
    skip = torch.rand(B, S).add(0.5).to(skip_dtype).to(device) if has_skip else None
    idx, count = random_route(B, S, C, counts, device=device, garbage_past_count=garbage_past_count)
    if requires_grad:
        for t in (x, base, delta, gate, skip):
            if t is not None:
                t.requires_grad_()
    return x, base, delta, gate, idx, count, skip


def _abs(t):
    return None if t is None else t.detach().cpu().double().abs()


GRAD_NAMES = ["dx", "dbase", "ddelta", "dgate", "dskip_scale"]


def expected(x, base, delta, gate, skip, idx, count, g):
    """float64 reference output and gradients (at grad ``g``) with their error bounds, for the
    values of the given inputs and the given (idx, count)."""
    dtype, D = x.dtype, x.shape[-1]
    u = unit_roundoff(acc_dtype(dtype))
    idx, count = idx.cpu(), count.cpu()
    cpu = [None if t is None else t.detach().cpu() for t in (x, base, delta, gate, skip)]
    ref = scatter_merge_ref(cpu[0], cpu[1], idx, count, delta=cpu[2], gate=cpu[3], skip_scale=cpu[4])
    mag = scatter_merge_ref(_abs(x), _abs(base), idx, count, delta=_abs(delta), gate=_abs(gate),
                            skip_scale=_abs(skip))
    # one rounding to the output dtype + a couple of roundings of the float32/64 accumulation
    bound = rounding_error(ref, dtype) + 4 * u * mag

    # backward: float64 autograd through the reference, on the same rounded inputs
    leaves = [None if t is None else t.double().requires_grad_() for t in cpu]
    ref_out = scatter_merge_ref(leaves[0], leaves[1], idx, count, delta=leaves[2], gate=leaves[3],
                                skip_scale=leaves[4])
    ref_grads = torch.autograd.grad(ref_out, [t for t in leaves if t is not None], g.cpu().double(),
                                    allow_unused=True, materialize_grads=True)
    # magnitudes: the same gradients at |inputs|, |g| (every term is a product, no cancellation)
    abs_leaves = [None if t is None else t.detach().abs().requires_grad_() for t in leaves]
    mref = scatter_merge_ref(abs_leaves[0], abs_leaves[1], idx, count, delta=abs_leaves[2],
                             gate=abs_leaves[3], skip_scale=abs_leaves[4])
    mags = torch.autograd.grad(mref, [t for t in abs_leaves if t is not None], g.cpu().double().abs(),
                               allow_unused=True)
    diff = [t for t in (x, base, delta, gate, skip) if t is not None]
    grad_bounds = []
    for t, rg, mg in zip(diff, ref_grads, mags):
        mg = torch.zeros_like(rg) if mg is None else mg
        grad_bounds.append(rounding_error(rg, t.dtype) + (D + 4) * u * mg)
    return ref, bound, list(ref_grads), grad_bounds


def check_values(device, B, S, D, C, counts, dtype, combo, gate_dtype, skip_dtype, garbage_past_count=False):
    x, base, delta, gate, idx, count, skip = make_inputs(
        B, S, D, C, counts, dtype, device, *combo, gate_dtype, requires_grad=True, skip_dtype=skip_dtype,
        garbage_past_count=garbage_past_count,
    )
    inputs = (x, base, delta, gate, idx, count, skip)
    names = ["x", "base", "delta", "gate", "idx", "count", "skip_scale"]
    before = snapshot(*inputs)
    poison_heap(device, B * S * D * x.element_size())
    out = ops.scatter_merge(x, base, idx, count, delta=delta, gate=gate, skip_scale=skip)
    assert_unchanged(before, inputs, names)
    assert out.dtype == dtype and out.shape == x.shape

    g = (torch.randn(B, S, D) + 0.25).to(dtype).to(device)
    ref, bound, ref_grads, grad_bounds = expected(x, base, delta, gate, skip, idx, count, g)
    assert_within(out, ref, bound, "scatter_merge")

    diff = [t for t in (x, base, delta, gate, skip) if t is not None]
    diff_names = [n for n, t in zip(GRAD_NAMES, (x, base, delta, gate, skip)) if t is not None]
    poison_heap(device, B * S * D * x.element_size())
    grads = torch.autograd.grad(out, diff, g)
    assert_unchanged(before, inputs, names)
    for name, t, gr, rg, bd in zip(diff_names, diff, grads, ref_grads, grad_bounds):
        assert gr.dtype == t.dtype and gr.shape == t.shape, name
        assert_within(gr, rg, bd, name)
    return (x, base, delta, gate, idx, count, skip, g), (ref, bound, ref_grads, grad_bounds)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
@pytest.mark.parametrize("scale_is_fp32", [True, False])
def test_values(device, shape, dtype, combo, scale_is_fp32):
    skip_unsupported(device, dtype)
    B, S, D, C, counts = shape
    scale_dtype = torch.float32 if scale_is_fp32 else dtype
    check_values(device, B, S, D, C, counts, dtype, combo, scale_dtype, scale_dtype)


@pytest.mark.parametrize("shape", [(2, 7, 33, 4, [4, 3]), (3, 16, 64, 20, [16, 2, 9])],
                         ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("has_delta", [False, True], ids=["delta0", "delta1"])
@pytest.mark.parametrize("fp32_one", ["gate", "skip_scale"])
def test_values_mixed_scale_dtypes(device, shape, dtype, has_delta, fp32_one):
    """gate and skip_scale pick float32-or-activation dtype independently (the CUDA kernel has a
    flag for each): one float32, the other in x's dtype."""
    skip_unsupported(device, dtype)
    B, S, D, C, counts = shape
    gate_dtype = torch.float32 if fp32_one == "gate" else dtype
    skip_dtype = dtype if fp32_one == "gate" else torch.float32
    check_values(device, B, S, D, C, counts, dtype, (has_delta, True, True), gate_dtype, skip_dtype)


# (B, S, D, C, counts): every case has rows with count < C, so idx has slots past count
GARBAGE_SHAPES = [
    (2, 7, 33, 4, [2, 0]),
    (1, 1, 127, 3, [1]),  # S = 1: every junk slot repeats the one kept position
    (4, 12, 8, 12, [0, 4, 8, 11]),
    (3, 16, 64, 20, [16, 5, 0]),  # capacity > S, a full row followed by junk
]


@pytest.mark.parametrize("shape", GARBAGE_SHAPES, ids=lambda s: "x".join(map(str, s[:4])))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_ignores_slots_past_count(device, shape, dtype, combo):
    """idx slots past count[b] hold in-range junk (kept positions repeated, positions not kept):
    only ``c < count[b]`` decides which rows are kept, forward and backward. gate is float32,
    skip_scale in x's dtype."""
    skip_unsupported(device, dtype)
    B, S, D, C, counts = shape
    (x, base, delta, gate, idx, count, skip, g), (ref, bound, ref_grads, grad_bounds) = check_values(
        device, B, S, D, C, counts, dtype, combo, torch.float32, dtype, garbage_past_count=True
    )
    # The inputs do separate the two semantics: the answer of a kernel that took every idx >= 0
    # as kept (here every slot, as the junk is in range; the last slot wins a repeated position)
    # fails the same checks, forward and backward.
    assert bool((idx >= 0).all()) and any(n < C for n in counts)
    full = torch.full((B,), C, dtype=torch.int32)
    wrong, _, wrong_grads, _ = expected(x, base, delta, gate, skip, idx, full, g)
    with pytest.raises(AssertionError):
        assert_within(wrong.to(dtype), ref, bound, "scatter_merge")
    diff = [t for t in (x, base, delta, gate, skip) if t is not None]
    failed = []
    for name, t, wg, rg, bd in zip(GRAD_NAMES, diff, wrong_grads, ref_grads, grad_bounds):
        try:
            assert_within(wg.to(t.dtype), rg, bd, name)
        except AssertionError:
            failed.append(name)
    assert failed, "the idx >= 0 semantics would pass the backward checks"


@pytest.mark.parametrize("combo", COMBOS, ids=COMBO_IDS)
def test_gradcheck(combo):
    B, S, D, C = 2, 6, 3, 4
    x, base, delta, gate, idx, count, skip = make_inputs(
        B, S, D, C, [3, 4], torch.float64, "cpu", *combo, torch.float64, requires_grad=True
    )

    def f(x, base, delta, gate, skip):
        return ops.scatter_merge(x, base, idx, count, delta=delta, gate=gate, skip_scale=skip)

    torch.autograd.gradcheck(f, (x, base, delta, gate, skip))


@pytest.mark.parametrize(
    "combo",
    [(True, True, True), (False, True, False), (True, False, True), (False, False, False)],
    ids=["all", "gate", "delta-skip", "none"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["plain", "mixed-junk"])
def test_opcheck(device, combo, dtype, variant):
    """plain: float32 gate and skip_scale, -1 past count; mixed-junk: skip_scale in x's dtype and
    in-range junk past count."""
    B, S, D, C = 3, 9, 5, 4
    x, base, delta, gate, idx, count, skip = make_inputs(
        B, S, D, C, [4, 0, 2], dtype, device, *combo, torch.float32, requires_grad=True,
        skip_dtype=torch.float32 if variant == "plain" else dtype, garbage_past_count=variant != "plain",
    )
    opcheck(torch.ops.gmod.scatter_merge.default, (x, base, delta, gate, idx, count, skip))
    det = [None if t is None else t.detach() for t in (x, base, delta, gate, skip)]
    g = torch.randn(B, S, D, dtype=dtype, device=device)
    opcheck(torch.ops.gmod.scatter_merge_backward.default, (g, det[0], det[1], det[2], det[3], idx, count, det[4]))


def test_round_trip_with_gather(device):
    """scatter_merge(x, gather_rows(x)) with no delta/gate gives x back exactly."""
    B, S, D = 3, 14, 7
    x = torch.randn(B, S, D, device=device)
    idx, count = random_route(B, S, 6, [6, 0, 3], device=device)
    y = ops.scatter_merge(x, ops.gather_rows(x, idx, count), idx, count)
    assert torch.equal(y, x)


def test_empty(device):
    for B, S, D, C in [(0, 4, 3, 2), (2, 0, 3, 2), (2, 4, 0, 2), (2, 4, 3, 0)]:
        x = torch.randn(B, S, D, device=device, requires_grad=True)
        base = torch.randn(B, C, D, device=device, requires_grad=True)
        gate = torch.rand(B, C, device=device, requires_grad=True)
        idx = torch.full((B, C), -1, dtype=torch.int32, device=device)
        count = torch.zeros(B, dtype=torch.int32, device=device)
        out = ops.scatter_merge(x, base, idx, count, delta=base * 2, gate=gate)
        assert out.shape == (B, S, D)
        assert torch.equal(out, x)
        out.sum().backward()
        assert x.grad.shape == x.shape and base.grad.shape == base.shape and gate.grad.shape == gate.shape
