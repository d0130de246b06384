"""torch.compile(fullgraph=True) through a small Mixture-of-Depths block made of every gmod op:
router_logits -> route -> gather_rows -> projections + attention -> scatter_merge (and a compact
KV-cache append), compared with eager for the forward and the gradients."""
import pytest
import torch

from gmod_ext import ops

GMOD_OPS = ("router_logits", "router_logits_backward", "route", "gather_rows", "gather_rows_backward",
            "scatter_merge", "scatter_merge_backward", "attention", "attention_backward", "kv_cache_append")

B, S, D, H, HK, DH, C = 2, 16, 32, 4, 2, 64, 10  # head dim 64: supported on every device


def mod_block(x, mask, num_routed, w_router, norm_w, wq, wk, wv, wo, w_mlp):
    logits = ops.router_logits(x, w_router, norm_w, eps=1e-6)  # [B, S] fp32
    idx, count = ops.route(logits.detach(), capacity=C, num_routed=num_routed, mask=mask)
    h = ops.gather_rows(x, idx, count)  # [B, C, D]
    q = (h @ wq).view(B, C, H, DH)
    k = (h @ wk).view(B, C, HK, DH)
    v = (h @ wv).view(B, C, HK, DH)
    o, lse = ops.attention(q, k, v, count, count)
    a = h + o.reshape(B, C, H * DH) @ wo
    gate = torch.sigmoid(ops.gather_rows(logits.unsqueeze(-1), idx, count).squeeze(-1))
    y = ops.scatter_merge(x, a, idx, count, delta=torch.tanh(a @ w_mlp), gate=gate,
                          skip_scale=torch.full_like(logits, 0.9))
    return y, idx, count, lse


def make_params(device):
    g = torch.Generator().manual_seed(0)

    def p(*shape, scale=0.3):
        return (torch.randn(*shape, generator=g) * scale).to(device).requires_grad_()

    x = p(B, S, D, scale=1.0)
    mask = torch.zeros(B, S, dtype=torch.int8)
    mask[0, :3] = 1  # forced instruction tokens
    mask[1, -4:] = 2  # padding
    num_routed = torch.tensor([6, 9], dtype=torch.int32)
    return (x, mask.to(device), num_routed.to(device), p(D), (torch.rand(D, generator=g) + 0.5).to(device)
            .requires_grad_(), p(D, H * DH), p(D, HK * DH), p(D, HK * DH), p(H * DH, D), p(D, D))


def _run(fn, args):
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    y, idx, count, lse = fn(*leaves)
    g = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    grads = torch.autograd.grad(y, [t for t in leaves if t.is_floating_point()], g)
    return y, idx, count, lse, grads


@pytest.mark.parametrize("backend", ["inductor"])
def test_compiled_mod_block_matches_eager(device, backend):
    torch._dynamo.reset()
    args = make_params(device)
    eager = _run(mod_block, args)
    compiled = _run(torch.compile(mod_block, fullgraph=True, backend=backend), args)
    assert torch.equal(eager[1], compiled[1]) and torch.equal(eager[2], compiled[2]), "routing differs"
    assert bool((eager[2] > 0).all())
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-5, atol=1e-5)
    for ge, gc in zip(eager[4], compiled[4]):
        assert bool(ge.abs().sum() > 0)
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


def test_compiled_kv_cache_append(device):
    """The mutating op inside a compiled decode step: attention on the compact cache after appending."""
    torch._dynamo.reset()

    def step(kc, vc, cl, q, kn, vn, nl):
        ops.kv_cache_append(kc, vc, cl, kn, vn, nl)
        o, _ = ops.attention(q, kc, vc, (nl > 0).to(torch.int32), cl)
        return o * 2

    def make():
        g = torch.Generator().manual_seed(1)
        kc = torch.randn(B, 8, HK, DH, generator=g).to(device)
        vc = torch.randn(B, 8, HK, DH, generator=g).to(device)
        cl = torch.tensor([3, 5], dtype=torch.int32, device=device)
        q = torch.randn(B, 1, H, DH, generator=g).to(device)
        kn = torch.randn(B, 1, HK, DH, generator=g).to(device)
        vn = torch.randn(B, 1, HK, DH, generator=g).to(device)
        return kc, vc, cl, q, kn, vn, torch.tensor([1, 0], dtype=torch.int32, device=device)

    a, b = make(), make()
    oe = step(*a)
    oc = torch.compile(step, fullgraph=True, backend="aot_eager")(*b)
    torch.testing.assert_close(oc, oe)
    for t, u in zip(a[:3], b[:3]):
        assert torch.equal(t, u), "the compiled step must mutate the cache like eager"
    assert b[2].tolist() == [4, 5]
