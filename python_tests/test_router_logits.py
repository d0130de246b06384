"""gmod.router_logits (fused RMSNorm + router dot) and its backward."""
import pytest
import torch
from torch.library import opcheck

from conftest import DTYPES, assert_unchanged, poison_heap, skip_unsupported, snapshot
from gmod_ext import ops
from references import acc_dtype, assert_within, rounding_error, router_logits_ref, unit_roundoff

GMOD_OPS = ("router_logits", "router_logits_backward")

# the last shape has B*S = 1200 rows: its [B, S] logits are large enough (>= 4.8 KB) for the
# poisoned heap blocks to be reused on CPU too, not only by the CUDA caching allocator
SHAPES = [(2, 7, 33), (1, 1, 127), (3, 16, 64), (2, 3, 1), (4, 300, 24)]

# (norm, weight dtype, norm_weight dtype): "f32" float32, "x" the activation dtype. weight and
# norm_weight may each be either, independently (the CUDA kernel has a float32 flag for each).
WEIGHTS = [(True, "f32", "f32"), (True, "x", "x"), (True, "f32", "x"), (True, "x", "f32"),
           (False, "f32", None), (False, "x", None)]
WEIGHT_IDS = [f"w_{w}-nw_{nw}" if norm else f"w_{w}-no_norm" for norm, w, nw in WEIGHTS]


def make_inputs(shape, dtype, device, norm: bool, wdtype_is_x: bool, requires_grad=False, nwdtype_is_x=None):
    """weight in x's dtype if ``wdtype_is_x`` else float32; norm_weight likewise by ``nwdtype_is_x``
    (default: the same as weight)."""
    B, S, D = shape
    x = (torch.randn(B, S, D) * 2 + 0.3).to(dtype).to(device)
    if nwdtype_is_x is None:
        nwdtype_is_x = wdtype_is_x
    wdt = dtype if wdtype_is_x else torch.float32
    nwdt = dtype if nwdtype_is_x else torch.float32
    w = torch.randn(D).to(wdt).to(device)
    nw = (torch.rand(D) + 0.5).to(nwdt).to(device) if norm else None
    for t in (x, w, nw):
        if t is not None:
            t.requires_grad_(requires_grad)
    return x, w, nw


def _magnitudes(x, w, nw, eps):
    """|x| . |a| * r per row, r = 1/rms, in float64: the condition of the dot product."""
    x64 = x.detach().double().cpu()
    a = w.detach().double().cpu() * (nw.detach().double().cpu() if nw is not None else 1.0)
    r = 1.0 / torch.sqrt(x64.pow(2).mean(-1) + eps)
    return x64, a, r, (x64.abs() * a.abs()).sum(-1) * r


def weights_case(dtype, weights):
    """(norm, wdtype_is_x, nwdtype_is_x); skips mixed dtypes for float32 x (the same as unmixed)."""
    norm, w, nw = weights
    if norm and w != nw and dtype == torch.float32:
        pytest.skip("float32 x: mixed weight dtypes are the unmixed float32 case")
    return norm, w == "x", nw == "x"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
@pytest.mark.parametrize("eps", [1e-6, 0.5])
def test_forward_values(device, shape, dtype, weights, eps):
    skip_unsupported(device, dtype)
    norm, w_is_x, nw_is_x = weights_case(dtype, weights)
    x, w, nw = make_inputs(shape, dtype, device, norm, w_is_x, nwdtype_is_x=nw_is_x)
    before = snapshot(x, w, nw)
    poison_heap(device, shape[0] * shape[1] * torch.empty((), dtype=acc_dtype(dtype)).element_size())
    out = ops.router_logits(x, w, nw, eps=eps)
    assert_unchanged(before, (x, w, nw), ["x", "weight", "norm_weight"])
    assert out.dtype == acc_dtype(dtype) and out.shape == shape[:2] and out.device.type == device
    ref = router_logits_ref(x, w, nw, eps)
    # Higham's bound for a length-D dot product plus the rsqrt: O(D) roundings of the accumulation
    # type, relative to sum_j |x_j a_j| * r (inputs are exact values of their dtype).
    D = shape[2]
    _, _, _, mag = _magnitudes(x, w, nw, eps)
    assert_within(out, ref, (2 * D + 16) * unit_roundoff(acc_dtype(dtype)) * mag, "logits")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", WEIGHTS, ids=WEIGHT_IDS)
def test_backward_values(device, shape, dtype, weights):
    skip_unsupported(device, dtype)
    norm, w_is_x, nw_is_x = weights_case(dtype, weights)
    eps = 0.25
    x, w, nw = make_inputs(shape, dtype, device, norm, w_is_x, requires_grad=True, nwdtype_is_x=nw_is_x)
    poison_heap(device, shape[0] * shape[1] * torch.empty((), dtype=acc_dtype(dtype)).element_size())
    out = ops.router_logits(x, w, nw, eps=eps)
    g = torch.randn(out.shape, dtype=out.dtype, device=device)
    before = snapshot(x, w, nw, g)
    poison_heap(device, x.numel() * x.element_size())
    grads = torch.autograd.grad(out, [t for t in (x, w, nw) if t is not None], g)
    assert_unchanged(before, (x, w, nw, g), ["x", "weight", "norm_weight", "grad"])

    # float64 reference gradients on the same (rounded) inputs
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    nw64 = nw.detach().double().cpu().requires_grad_() if nw is not None else None
    ref = router_logits_ref(x64, w64, nw64, eps)
    refs = torch.autograd.grad(ref, [t for t in (x64, w64, nw64) if t is not None], g.double().cpu())

    D, N = shape[2], shape[0] * shape[1]
    u = unit_roundoff(acc_dtype(dtype))
    xa, a, r, mag = _magnitudes(x, w, nw, eps)
    ga = g.double().cpu().abs()
    # dx_i = g (r a_i - r^3 x_i (x.a) / D): one rounding to x's dtype + O(D) accumulation roundings
    dx_mag = ga[..., None] * (r[..., None] * a.abs() + r[..., None] ** 3 * xa.abs() * (mag / r)[..., None] / D)
    assert grads[0].dtype == x.dtype
    assert_within(grads[0], refs[0], rounding_error(refs[0], x.dtype) + (2 * D + 16) * u * dx_mag, "dx")
    # dweight_j = nw_j * sum_rows g r x_j (and symmetric for norm_weight): N-term sums
    U_mag = (ga[..., None] * r[..., None] * xa.abs()).reshape(N, D).sum(0)
    other = [nw, w]
    for k, (t, name) in enumerate(zip([w, nw], ["dweight", "dnorm_weight"])):
        if t is None:
            continue
        o = other[k]
        o_abs = o.detach().double().cpu().abs() if o is not None else 1.0
        bound = rounding_error(refs[1 + k], t.dtype) + (2 * D + N + 16) * u * U_mag * o_abs
        assert grads[1 + k].dtype == t.dtype
        assert_within(grads[1 + k], refs[1 + k], bound, name)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 0.3])
def test_gradcheck(norm, eps):
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    nw = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_() if norm else None
    torch.autograd.gradcheck(lambda x, w, nw: ops.router_logits(x, w, nw, eps=eps), (x, w, nw))


def test_gradcheck_only_x():
    x = torch.randn(1, 3, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64)
    nw = torch.rand(7, dtype=torch.float64) + 0.5
    torch.autograd.gradcheck(lambda x: ops.router_logits(x, w, nw), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("norm", [True, False])
def test_opcheck(device, dtype, norm):
    skip_unsupported(device, dtype)
    x, w, nw = make_inputs((2, 5, 9), dtype, device, norm, wdtype_is_x=False, requires_grad=True)
    opcheck(torch.ops.gmod.router_logits.default, (x, w, nw, 1e-5))
    xd, wd = x.detach(), w.detach()
    nwd = nw.detach() if nw is not None else None
    g = torch.randn(2, 5, dtype=acc_dtype(dtype), device=device)
    opcheck(torch.ops.gmod.router_logits_backward.default, (g, xd, wd, nwd, 1e-5))


@pytest.mark.parametrize("wdtypes", [("f32", "x"), ("x", "f32")], ids=["w_f32-nw_x", "w_x-nw_f32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_opcheck_mixed_weight_dtypes(device, dtype, wdtypes):
    skip_unsupported(device, dtype)
    x, w, nw = make_inputs((2, 5, 9), dtype, device, True, wdtypes[0] == "x", requires_grad=True,
                           nwdtype_is_x=wdtypes[1] == "x")
    assert w.dtype != nw.dtype
    opcheck(torch.ops.gmod.router_logits.default, (x, w, nw, 1e-5))
    g = torch.randn(2, 5, dtype=acc_dtype(dtype), device=device)
    opcheck(torch.ops.gmod.router_logits_backward.default, (g, x.detach(), w.detach(), nw.detach(), 1e-5))


def test_empty_batch_and_sequence(device):
    for B, S in [(0, 4), (2, 0)]:
        x = torch.randn(B, S, 8, device=device, requires_grad=True)
        w = torch.randn(8, device=device, requires_grad=True)
        out = ops.router_logits(x, w, None)
        assert out.shape == (B, S)
        out.sum().backward()
        assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))
