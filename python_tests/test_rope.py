"""gmod.rope (rotary position embedding of q or k in one pass) and its backward, against a float64
plain-torch reference written from the docstring, Hugging Face's own apply_rotary_pos_emb, and opcheck."""
import pytest
import torch
from torch.library import opcheck

from conftest import DTYPES, assert_unchanged, poison_heap, skip_unsupported, snapshot
from gmod_ext import ops
from references import assert_close_lowp, rope_ref

GMOD_OPS = ("rope", "rope_backward")

# (B, C, H, d, r): full rotary (vector paths at d = 64 / 128), partial rotary (a tail copied), the
# smallest head, and empty batches
SHAPES = [(2, 5, 3, 8, 8), (1, 7, 4, 64, 64), (2, 9, 2, 128, 128), (2, 3, 2, 10, 6), (3, 4, 1, 128, 64),
          (1, 1, 1, 2, 2), (2, 0, 3, 8, 8), (0, 3, 2, 8, 8)]


def _inputs(B, C, H, d, r, dtype, device):
    """Random q-like values and random angle tables whose two halves differ (the op reads both)."""
    x = (torch.randn(B, C, H, d) + 0.25).to(dtype).to(device)
    angles = torch.rand(B, C, r) * 6.28
    return x, angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_values(device, shape, dtype):
    skip_unsupported(device, dtype)
    B, C, H, d, r = shape
    x, cos, sin = _inputs(B, C, H, d, r, dtype, device)
    x.requires_grad_()
    before = snapshot(x, cos, sin)
    poison_heap(device, max(1, x.numel()) * x.element_size())
    y = ops.rope(x, cos, sin)
    assert_unchanged(before, (x, cos, sin), ["x", "cos", "sin"])
    assert y.dtype == dtype and y.shape == x.shape
    xc, cc, sc = (t.detach().cpu() for t in (x, cos, sin))
    ref, pt = rope_ref(xc, cc, sc), rope_ref(xc, cc, sc, compute_dtype=None)
    assert_close_lowp(y, ref, pt, "rope")
    assert torch.equal(y.detach().cpu()[..., r:], xc[..., r:]), "dims past r must be copied"

    g = (torch.randn(B, C, H, d) - 0.25).to(dtype).to(device)
    poison_heap(device, max(1, x.numel()) * x.element_size())
    (dx,) = torch.autograd.grad(y, x, g)
    x64 = xc.double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(rope_ref(x64, cc.double(), sc.double()), x64, g.cpu().double())
    xp = xc.clone().requires_grad_()
    (pt_dx,) = torch.autograd.grad(rope_ref(xp, cc, sc, compute_dtype=None), xp, g.cpu())
    assert dx.dtype == dtype
    assert_close_lowp(dx, ref_dx, pt_dx, "rope backward")


def test_gradients_of_the_angles_too():
    """Learned angles get their gradient as well (gradcheck in float64, partial rotary)."""
    x, cos, sin = _inputs(2, 3, 2, 10, 6, torch.float64, "cpu")
    assert torch.autograd.gradcheck(ops.rope, (x.requires_grad_(), cos.requires_grad_(), sin.requires_grad_()))


def test_matches_hugging_face_rotation(device):
    """Llama's own apply_rotary_pos_emb with its rotary module's cos / sin, in the [B, C, H, d] layout."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as L

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    rotary = L.LlamaRotaryEmbedding(cfg).to(device)
    q, k = torch.randn(2, 11, 4, 16, device=device), torch.randn(2, 11, 2, 16, device=device)
    pos = torch.randint(0, 500, (2, 11), device=device)
    cos, sin = rotary(q, pos)
    want_q, want_k = L.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    torch.testing.assert_close(ops.rope(q, cos, sin), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.rope(k, cos, sin), want_k, rtol=1e-5, atol=1e-5)


def test_unaligned_rows_take_the_narrow_path(device):
    """x, cos, sin that start one element into their storage (not 16-byte aligned) give the same values."""
    x, cos, sin = _inputs(2, 5, 3, 64, 64, torch.bfloat16, device)
    shifted = [torch.empty(t.numel() + 1, dtype=t.dtype, device=device)[1:].view(t.shape).copy_(t) for t in (x, cos, sin)]
    assert all(t.is_contiguous() and t.storage_offset() == 1 for t in shifted)
    assert torch.equal(ops.rope(*shifted), ops.rope(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck(device, dtype):
    skip_unsupported(device, dtype)
    x, cos, sin = _inputs(2, 4, 3, 12, 8, dtype, device)
    opcheck(torch.ops.gmod.rope.default, (x.requires_grad_(), cos, sin))
    opcheck(torch.ops.gmod.rope_backward.default, (torch.randn_like(x), cos, sin))


def _bad(x, cos, sin):
    return dict(x=x, cos=cos, sin=sin)


@pytest.mark.parametrize("case,change,exc,words", [
    ("odd_r", lambda x, c, s: _bad(x, c[..., :7].contiguous(), s[..., :7].contiguous()), ValueError,
     r"r = cos.shape\[2\] must be even and in \[2, d = 8\], got 7"),
    ("r_past_d", lambda x, c, s: _bad(x[..., :6].contiguous(), c, s), ValueError, r"must be even and in \[2, d = 6\], got 8"),
    ("cos_dtype", lambda x, c, s: _bad(x, c.double(), s), TypeError, r"cos must have dtype in \{Float\}, got Double"),
    ("cos_batch", lambda x, c, s: _bad(x, c[:1].contiguous(), s[:1].contiguous()), ValueError, r"cos.shape\[0\] must equal"),
    ("cos_tokens", lambda x, c, s: _bad(x, c[:, :2].contiguous(), s[:, :2].contiguous()), ValueError,
     r"cos.shape\[1\] must equal x.shape\[1\] \(C\)"),
    ("sin_shape", lambda x, c, s: _bad(x, c, s[..., :6].contiguous()), ValueError, r"sin must have cos's shape"),
    ("x_rank", lambda x, c, s: _bad(x.flatten(2), c, s), ValueError, r"x must be 4-D \[B, C, H, d\]"),
    ("x_strided", lambda x, c, s: _bad(x.transpose(1, 2), c, s), ValueError, r"x must be contiguous"),
    ("cos_strided", lambda x, c, s: _bad(x, c.transpose(0, 1).contiguous().transpose(0, 1), s), ValueError,
     r"cos must be contiguous"),
    ("x_int", lambda x, c, s: _bad(x.long(), c, s), TypeError, r"x must have dtype in"),
    ("cos_meta", lambda x, c, s: _bad(x, c.to("meta"), s), RuntimeError, r"cos is on meta but x is on cpu"),
])
def test_bad_inputs_raise_clearly(case, change, exc, words):
    """Each bad argument raises a Python exception naming it, from the op and from its backward (which
    names its first argument grad)."""
    x, cos, sin = _inputs(2, 4, 3, 8, 8, torch.float32, "cpu")
    args = change(x, cos, sin)
    with pytest.raises(exc, match=words):
        ops.rope(args["x"], args["cos"], args["sin"])
    grad_words = words.replace("x must", "grad must").replace("but x is", "but grad is").replace("x.shape", "grad.shape")
    with pytest.raises(exc, match=grad_words):
        torch.ops.gmod.rope_backward(args["x"], args["cos"], args["sin"])


def test_mod_layers_rotate_with_the_fused_op():
    """A converted Llama's MoD layers rotate q and k with gmod.rope (one call each, forward; one backward each),
    and keeping every token they still give the dense model's logits (the rotation is Llama's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import gmod_ext
    from gmod_hf_utils import tiny_model

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    gmod_ext.convert(model, ratio=0.0, layers=[0, 2], gate="none", progress=False)
    calls = Calls()
    with calls:
        out = model(input_ids=ids).logits
        out.float().square().sum().backward()
    assert calls.names.count("rope") == 4 and calls.names.count("rope_backward") == 4
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


def test_gmod_rope_torch_rotates_with_torch_ops(monkeypatch):
    """GMOD_ROPE=torch (to time the two against each other) runs the same formula in torch ops: no gmod.rope
    call, the same values to rounding; another value is an error naming the choices."""
    from gmod_ext.mod_layer import _apply_rope

    q, cos, sin = _inputs(2, 5, 4, 16, 16, torch.float32, "cpu")
    k = torch.randn(2, 5, 2, 16)
    fused = _apply_rope(q, k, cos, sin)
    monkeypatch.setenv("GMOD_ROPE", "torch")
    calls = []
    monkeypatch.setattr(torch.ops.gmod, "rope", lambda *a: calls.append(a))
    plain = _apply_rope(q, k, cos, sin)
    assert not calls
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("GMOD_ROPE", "triton")
    with pytest.raises(ValueError, match=r"GMOD_ROPE=triton is not one of \('fused', 'torch'\)"):
        _apply_rope(q, k, cos, sin)
