"""Differential attention (DiffLlama, arXiv 2410.05258) in MoD layers.

A differential attention layer subtracts two attention maps: ``(softmax(Q1 K1^T) - lambda softmax(Q2 K2^T)) V``.
Hugging Face's DiffLlama writes it with one set of queries and keys per head and the value heads split in
two halves:

* ``v1`` / ``v2``: the first / second half of the key-value heads, each repeated to all of them;
* ``o1 = attention(q, k, v1)``, ``o2 = attention(q, k, v2)``, joined per head as ``[o1 | o2]`` (2d wide);
* the first and second half of the *query* heads of that are subtracted: ``a - lambda b`` with
  ``lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init``;
* a parameter-free RMSNorm over each such 2d-wide head (``groupnorm``), times ``1 - lambda_init``, then
  ``o_proj``.

Both attentions share the softmax, so a MoD layer runs one attention over the values ``[v1 | v2]``
(:func:`values`: 2d wide; the fused kernels take values as wide as the keys only, so this runs on SDPA or
the position-masked attention, see ``gmod_ext.ops.attention_supports``) and then :func:`combine`. The
compact KV cache stores the plain keys and values, as Hugging Face's cache does.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_differential", "values", "combine"]

_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def is_differential(attn: nn.Module) -> bool:
    """Whether ``attn`` is DiffLlama's differential attention (its four lambda vectors, ``lambda_init`` and the
    parameter-free ``groupnorm``)."""
    return all(isinstance(getattr(attn, n, None), torch.Tensor) for n in _LAMBDAS) \
        and isinstance(getattr(attn, "lambda_init", None), float) and isinstance(getattr(attn, "groupnorm", None), nn.Module)


def values(v: torch.Tensor) -> torch.Tensor:
    """[B, T, Hk, d] values as ``[v1 | v2]`` [B, T, Hk, 2d]: each half of the heads repeated to all of them
    (Hugging Face's ``chunk(2, heads)`` then ``repeat``), the two side by side."""
    v1, v2 = v.chunk(2, dim=2)
    return torch.cat([torch.cat([v1, v1], dim=2), torch.cat([v2, v2], dim=2)], dim=-1)


def combine(attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """[B, C, Hq, 2d] attention output over :func:`values` -> the differential output [B, C, Hq * d]."""
    B, C = o.shape[0], o.shape[1]
    a, b = o.chunk(2, dim=2)  # the first and the second half of the query heads
    lam1 = torch.exp(torch.sum(attn.lambda_q1 * attn.lambda_k1, dim=-1, dtype=torch.float32)).to(o.dtype)
    lam2 = torch.exp(torch.sum(attn.lambda_q2 * attn.lambda_k2, dim=-1, dtype=torch.float32)).to(o.dtype)
    out = a - (lam1 - lam2 + attn.lambda_init) * b
    return ((1 - attn.lambda_init) * attn.groupnorm(out)).reshape(B, C, -1)
