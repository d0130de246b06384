"""Fake (meta) kernels and autograd formulas for the torch.ops.gmod ops.

The fake kernels give torch.compile / FakeTensor the output shapes and dtypes without running a
kernel. Each differentiable op's backward is itself a registered op (``*_backward``), so
the whole graph stays inside torch.ops.gmod and compiles with fullgraph=True.
"""
from __future__ import annotations

import math

import torch

_ops = torch.ops.gmod


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    """Raise like the C++ check_device when an argument is on another device than ``ref``.

    A call that mixes devices with a meta tensor (e.g. x on cpu, idx on meta) is dispatched to these
    fake kernels, not to the CPU kernel, so without this check it would silently return
    uninitialised memory (or, for kv_cache_append, do nothing) instead of raising.
    """
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(
                f"gmod.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                "all tensors must be on one device"
            )


def _check_eps(op: str, eps: float) -> None:
    """As the C++ check_eps: a plain float argument, so a traced call can check it as well."""
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"gmod.{op}: eps must be a finite number >= 0, got {eps}")


def _check_scale(op: str, scale: float) -> None:
    """As the C++ check in check_attention_inputs."""
    if not math.isfinite(scale):
        raise ValueError(f"gmod.{op}: scale must be finite, got {scale}")


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("gmod::router_logits")
def _(x, weight, norm_weight, eps):
    _check_eps("router_logits", eps)
    _same_device("router_logits", "x", x, weight=weight, norm_weight=norm_weight)
    torch._check(x.dim() == 3, lambda: "gmod.router_logits: x must be 3-D [B, S, D]")
    return x.new_empty(x.shape[:2], dtype=_acc_dtype(x))


@torch.library.register_fake("gmod::router_logits_backward")
def _(grad, x, weight, norm_weight, eps):
    _check_eps("router_logits_backward", eps)
    _same_device("router_logits_backward", "x", x, grad=grad, weight=weight, norm_weight=norm_weight)
    dnorm = torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty((0,), dtype=_acc_dtype(x))
    return torch.empty_like(x), torch.empty_like(weight), dnorm


@torch.library.register_fake("gmod::route")
def _(scores, mask, num_routed, capacity, threshold=None):
    _same_device("route", "scores", scores, mask=mask, num_routed=num_routed)
    torch._check(scores.dim() == 2, lambda: "gmod.route: scores must be 2-D [B, S]")
    B = scores.shape[0]
    return scores.new_empty((B, capacity), dtype=torch.int32), scores.new_empty((B,), dtype=torch.int32)


@torch.library.register_fake("gmod::gather_rows")
def _(x, idx, count):
    _same_device("gather_rows", "x", x, idx=idx, count=count)
    torch._check(x.dim() == 3 and idx.dim() == 2, lambda: "gmod.gather_rows: x must be [B, S, D], idx [B, C]")
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


@torch.library.register_fake("gmod::gather_rows_backward")
def _(grad, idx, count, seq_len):
    _same_device("gather_rows_backward", "grad", grad, idx=idx, count=count)
    return grad.new_empty((grad.shape[0], seq_len, grad.shape[2]))


@torch.library.register_fake("gmod::scatter_merge")
def _(x, base, delta, gate, idx, count, skip_scale):
    _same_device(
        "scatter_merge", "x", x, base=base, delta=delta, gate=gate, idx=idx, count=count, skip_scale=skip_scale
    )
    return torch.empty_like(x)


@torch.library.register_fake("gmod::scatter_merge_backward")
def _(grad, x, base, delta, gate, idx, count, skip_scale):
    _same_device(
        "scatter_merge_backward", "x", x, grad=grad, base=base, delta=delta, gate=gate, idx=idx, count=count,
        skip_scale=skip_scale,
    )
    acc = _acc_dtype(x)
    ddelta = torch.empty_like(delta) if delta is not None else x.new_empty((0,))
    dgate = torch.empty_like(gate) if gate is not None else x.new_empty((0,), dtype=acc)
    dskip = torch.empty_like(skip_scale) if skip_scale is not None else x.new_empty((0,), dtype=acc)
    return torch.empty_like(x), torch.empty_like(base), ddelta, dgate, dskip


@torch.library.register_fake("gmod::attention")
def _(q, k, v, q_len, k_len, scale):
    _check_scale("attention", scale)
    _same_device("attention", "q", q, k=k, v=v, q_len=q_len, k_len=k_len)
    torch._check(q.dim() == 4, lambda: "gmod.attention: q must be 4-D [B, Cq, Hq, d]")
    B, Cq, Hq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, Hq, Cq), dtype=_acc_dtype(q))


@torch.library.register_fake("gmod::attention_backward")
def _(grad_o, q, k, v, o, lse, q_len, k_len, scale):
    _check_scale("attention_backward", scale)
    _same_device("attention_backward", "q", q, grad_o=grad_o, k=k, v=v, o=o, lse=lse, q_len=q_len, k_len=k_len)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.register_fake("gmod::kv_cache_append")
def _(k_cache, v_cache, cache_len, k_new, v_new, new_len):
    _same_device(
        "kv_cache_append", "k_cache", k_cache, v_cache=v_cache, cache_len=cache_len, k_new=k_new, v_new=v_new,
        new_len=new_len,
    )
    return None



def _check_rope(op: str, x, cos, sin, x_name: str = "x") -> None:
    _same_device(op, x_name, x, cos=cos, sin=sin)
    torch._check(x.dim() == 4 and cos.dim() == 3, lambda: f"gmod.{op}: x must be [B, C, H, d], cos [B, C, r]")
    torch._check(cos.shape[-1] % 2 == 0 and cos.shape[-1] <= x.shape[-1],
                 lambda: f"gmod.{op}: the rotated width r = cos.shape[2] must be even and at most d")


@torch.library.register_fake("gmod::rope")
def _(x, cos, sin):
    _check_rope("rope", x, cos, sin)
    return torch.empty_like(x)


@torch.library.register_fake("gmod::rope_backward")
def _(grad, cos, sin):
    _check_rope("rope_backward", grad, cos, sin, "grad")
    return torch.empty_like(grad)

# ---------------------------------------------------------------- autograd
def _router_setup(ctx, inputs, output):
    x, weight, norm_weight, eps = inputs
    ctx.save_for_backward(x, weight, norm_weight)
    ctx.eps = eps


def _router_backward(ctx, grad):
    x, weight, norm_weight = ctx.saved_tensors
    dx, dw, dnorm = _ops.router_logits_backward(grad.contiguous(), x, weight, norm_weight, ctx.eps)
    return dx, dw, (dnorm if norm_weight is not None else None), None


torch.library.register_autograd("gmod::router_logits", _router_backward, setup_context=_router_setup)


def _gather_setup(ctx, inputs, output):
    x, idx, count = inputs
    ctx.save_for_backward(idx, count)
    ctx.seq_len = x.shape[1]


def _gather_backward(ctx, grad):
    idx, count = ctx.saved_tensors
    return _ops.gather_rows_backward(grad.contiguous(), idx, count, ctx.seq_len), None, None


torch.library.register_autograd("gmod::gather_rows", _gather_backward, setup_context=_gather_setup)


def _merge_setup(ctx, inputs, output):
    x, base, delta, gate, idx, count, skip_scale = inputs
    ctx.save_for_backward(x, base, delta, gate, idx, count, skip_scale)


def _merge_backward(ctx, grad):
    x, base, delta, gate, idx, count, skip_scale = ctx.saved_tensors
    dx, dbase, ddelta, dgate, dskip = _ops.scatter_merge_backward(
        grad.contiguous(), x, base, delta, gate, idx, count, skip_scale
    )
    return (
        dx,
        dbase,
        ddelta if delta is not None else None,
        dgate if gate is not None else None,
        None,
        None,
        dskip if skip_scale is not None else None,
    )


torch.library.register_autograd("gmod::scatter_merge", _merge_backward, setup_context=_merge_setup)


def _attention_setup(ctx, inputs, output):
    q, k, v, q_len, k_len, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, q_len, k_len)
    ctx.scale = scale
    # lse is a by-product for the backward (and for combining partial results); it carries no gradient.
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_o, grad_lse):
    q, k, v, o, lse, q_len, k_len = ctx.saved_tensors
    dq, dk, dv = _ops.attention_backward(grad_o.contiguous(), q, k, v, o, lse, q_len, k_len, ctx.scale)
    return dq, dk, dv, None, None, None


torch.library.register_autograd("gmod::attention", _attention_backward, setup_context=_attention_setup)


def _rope_setup(ctx, inputs, output):
    x, cos, sin = inputs
    ctx.save_for_backward(x if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None, cos, sin)


def _rope_backward(ctx, grad):
    x, cos, sin = ctx.saved_tensors
    grad = grad.contiguous()
    dx = _ops.rope_backward(grad, cos, sin) if ctx.needs_input_grad[0] else None
    dcos = dsin = None
    if x is not None:  # learned angles (rare): the products summed over the heads, in plain torch
        h = cos.shape[-1] // 2
        g_lo, g_hi, x_lo, x_hi = grad[..., :h], grad[..., h:2 * h], x[..., :h], x[..., h:2 * h]
        dcos = torch.cat(((g_lo * x_lo).sum(2), (g_hi * x_hi).sum(2)), dim=-1)
        dsin = torch.cat((-(g_lo * x_hi).sum(2), (g_hi * x_lo).sum(2)), dim=-1)
    return dx, dcos, dsin


torch.library.register_autograd("gmod::rope", _rope_backward, setup_context=_rope_setup)
