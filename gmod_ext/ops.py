"""Documented Python wrappers over ``torch.ops.gmod``.

Shapes: B batch, S sequence, D hidden, C capacity (static output width), H heads, d head dim.
Index tensors are int32. Activations are float32, bfloat16 or float16 (float64 too on CPU).
Every op checks its inputs and raises TypeError / ValueError / RuntimeError naming the bad
argument. All wrappers work under torch.compile(fullgraph=True).

Example: a Mixture-of-Depths block on the kept half of the tokens::

    import torch, gmod_ext
    from gmod_ext import ops
    B, S, D = 2, 16, 64
    x = torch.randn(B, S, D)
    logits = ops.router_logits(x, torch.randn(D), torch.ones(D), eps=1e-6)   # [B, S] fp32
    idx, count = ops.route(logits, capacity=S // 2, num_routed=S // 2)         # [B, C], [B]
    h = ops.gather_rows(x, idx, count)                                          # [B, C, D]
    y = ops.scatter_merge(x, h, idx, count, delta=torch.tanh(h), gate=torch.sigmoid(
        ops.gather_rows(logits.unsqueeze(-1), idx, count).squeeze(-1)))
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

_ops = torch.ops.gmod

MASK_ROUTABLE = 0
MASK_FORCED = 1
MASK_NEVER = 2

# the head dims the CUDA attention kernels are instantiated for (GMOD_ATTN_HEADDIMS_STR in
# csrc/include/gmod/attention_params.h; test_attention.py checks the two agree); the CPU kernels take any
CUDA_HEAD_DIMS = (32, 64, 96, 128, 256)


def attention_supports(q: torch.Tensor, v: Optional[torch.Tensor] = None) -> bool:
    """Whether :func:`attention` has a kernel for ``q``'s head dim on ``q``'s device (the CPU: any), and for
    values ``v`` as wide as the keys (the kernels take no other width)."""
    if v is not None and int(v.shape[-1]) != int(q.shape[-1]):
        return False
    return q.device.type != "cuda" or int(q.shape[-1]) in CUDA_HEAD_DIMS


def router_logits(
    x: torch.Tensor, weight: torch.Tensor, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6
) -> torch.Tensor:
    """Fused RMSNorm + router projection, reading ``x`` once.

    ``logit[b, s] = sum_j (x[b,s,j] / rms(x[b,s])) * norm_weight[j] * weight[j]`` with
    ``rms = sqrt(mean(x^2) + eps)``. ``x`` [B, S, D]; ``weight``, ``norm_weight`` [D]
    (float32 or x's dtype). Returns float32 [B, S] (float64 for float64 x).
    For a ``Linear(D, 2)`` router pass ``weight = W[1] - W[0]``: the result is ``l1 - l0`` and
    ``sigmoid`` of it is the router's softmax probability of "keep".
    Differentiable in x, weight and norm_weight.
    """
    return _ops.router_logits(x, weight, norm_weight, float(eps))


def route(
    scores: torch.Tensor,
    capacity: int,
    num_routed: Union[int, torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select tokens per row; returns ``(idx [B, capacity] int32, count [B] int32)``.

    ``mask`` [B, S] int8 codes: 0 routable, 1 forced keep, 2 never (padding); None = all routable.
    Row b keeps every forced token plus the ``num_routed[b]`` highest-scoring routable tokens
    (with ``threshold``: only routable tokens whose score is > threshold, at most num_routed[b]),
    at most ``capacity`` in all; forced tokens take precedence (if they alone exceed capacity,
    the lowest-index ones are kept). Ties go to the lower index, NaN scores rank last.
    ``idx[b, :count[b]]`` is strictly ascending; later slots hold -1. Not differentiable.
    """
    B = scores.shape[0] if scores.dim() > 0 else 0  # a wrong rank is reported by the op itself
    if mask is None:
        mask = torch.zeros(scores.shape, dtype=torch.int8, device=scores.device)
    if not isinstance(num_routed, torch.Tensor):
        num_routed = torch.full((B,), int(num_routed), dtype=torch.int32, device=scores.device)
    return _ops.route(scores, mask, num_routed, int(capacity), None if threshold is None else float(threshold))


def gather_rows(x: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``out[b, c] = x[b, idx[b, c]]`` for ``c < count[b]``, zeros after. [B,S,D] -> [B,C,D].

    ``idx[b, :count[b]]`` must be strictly ascending and inside [0, S). Differentiable in x.
    """
    return _ops.gather_rows(x, idx, count)


def scatter_merge(
    x: torch.Tensor,
    base: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    delta: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    skip_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Merge processed rows back: [B,C,D] -> [B,S,D], a new tensor (inputs are not modified).

    Kept row ``s = idx[b, c]`` (c < count[b]) gets ``base + gate * delta`` (``gate * base``
    without delta, ``base`` with neither); every other row gets ``x`` (``skip_scale * x`` if
    given, p-MoD's STRing). ``gate`` [B, C] and ``skip_scale`` [B, S] are float32 or x's dtype.
    Differentiable in x, base, delta, gate, skip_scale.
    """
    return _ops.scatter_merge(x, base, delta, gate, idx, count, skip_scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_len: torch.Tensor,
    k_len: torch.Tensor,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over per-row lengths; returns ``(o [B,Cq,Hq,d], lse [B,Hq,Cq] float32)``.

    ``q`` [B, Cq, Hq, d], ``k``/``v`` [B, Ck, Hk, d] with Hq a multiple of Hk (GQA).
    Query i < q_len[b] of row b sees keys ``j < k_len[b]`` with ``j <= k_len[b] - q_len[b] + i``
    (bottom-right aligned: training/prefill with q_len == k_len, chunked prefill and decode with
    q_len < k_len). Rows past q_len, and queries that see no key, give o = 0 and lse = -inf.
    ``scale`` defaults to 1/sqrt(d). Differentiable in q, k, v (lse carries no gradient).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _ops.attention(q, k, v, q_len, k_len, float(scale))


def kv_cache_append(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_len: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_len: torch.Tensor,
) -> None:
    """Append compact rows to a MoD layer's KV cache, in place.

    ``k_cache``/``v_cache`` [B, capacity, Hk, d], ``cache_len`` [B] int32; ``k_new``/``v_new``
    [B, T, Hk, d] whose first ``new_len[b]`` rows are appended at ``cache_len[b]``; then
    ``cache_len += new_len``. Overflowing the capacity raises before anything is written.
    Mutates k_cache, v_cache and cache_len only.
    """
    _ops.kv_cache_append(k_cache, v_cache, cache_len, k_new, v_new, new_len)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of queries or keys in one pass (Llama's rotate-half layout).

    ``x`` [B, C, H, d]; ``cos``, ``sin`` [B, C, r] in x's dtype, the angles of each token (shared by its
    heads), ``r`` even and at most ``d``. On the first ``r`` dims of each head, with ``h = r / 2``:
    ``y[:h] = x[:h] cos[:h] - x[h:r] sin[:h]`` and ``y[h:r] = x[h:r] cos[h:r] + x[:h] sin[h:r]``, i.e.
    ``x * cos + cat(-x[h:r], x[:h]) * sin``; dims past ``r`` are copied. Computed in float32 (float64 for
    float64) and rounded once. Differentiable in all three (the angles' gradient in plain torch).
    """
    return _ops.rope(x, cos, sin)
