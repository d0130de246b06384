"""Attention of a MoD layer whose block has a sliding window, soft-capped logits or ALiBi, in plain torch.

``gmod.attention`` (and torch's fused causal SDPA) computes causal attention over a row's kept
tokens: a kept query sees every earlier kept key. Two attention features of the Llama family need
more than that, and both depend on the tokens' *original* positions, which the compact rows do not
carry in their order alone:

* a **sliding window** of W (Mistral, Qwen2 with ``use_sliding_window``, Gemma-2 / Gemma-3's local
  layers): the query at position p sees keys at positions ``p - W < pos <= p``, as Hugging Face's
  mask does (positions are sequence columns, padding included; MoD layers never keep padding);
* **logit soft-capping** (Gemma-2): scores ``c * tanh(s / c)`` before the mask and the softmax;
* **attention sinks** (GPT-OSS): one learned logit per head joins every query's softmax as an extra
  column that has no value (the probabilities of the real keys sum to less than 1);
* **packed sequences** (several sequences in one row, told apart by ``position_ids`` that restart,
  as transformers' padding-free collators make them): a query sees only keys of its own sequence;
  Llama-4's **chunked attention** is the same rule with chunk ids (``(position - left padding) // chunk``);
* **bidirectional blocks** marked by ``token_type_ids``: the tokens of one image (Gemma-3's multimodal
  model) or the whole prompt of a prefix-LM (PaliGemma: image and prefix text, before the causal
  suffix) see each other in both directions: a query in a block also sees the later keys of its
  block. With a window, Gemma-3's mask keeps them inside it (AND(window, OR(causal, block))) and
  PaliGemma-2's does not (OR(AND(window, causal), block)): ``window_in_blocks`` says which;
* **ALiBi** (BLOOM, MPT, Falcon with ``alibi=True``): a per-head penalty linear in the query-key
  distance. The models hand their layers a bias per key *column* (``slope * position``: the per-query
  part of ``slope * (k - q)`` is constant along a softmax row, so they leave it out); a MoD layer
  gathers it at its keys' original positions and passes it as ``key_bias``.

:func:`position_masked_attention` takes the positions of the queries and keys and builds that mask
explicitly: torch's SDPA with a boolean mask, or (soft-capping) the eager math Hugging Face's own
Gemma-2 attention runs: scores in the input dtype, cap, mask and softmax in float32, then ``@ v``.
It is differentiable (training) and serves the cached decode (the keys of a layer's compact cache,
with the positions it records). It costs a ``[B, 1, Cq, Ck]`` mask and, with soft-capping,
``[B, Hq, Cq, Ck]`` float32 scores: the memory of Hugging Face's eager attention on the kept tokens.
MoD layers call it only where the feature changes the result (a window shorter than the sequence,
or a cap); everywhere else they keep the fused kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["position_masked_attention", "attention_softcap", "attention_sinks"]


def attention_sinks(attn) -> Optional[torch.Tensor]:
    """The attention's per-head sink logits (GPT-OSS's ``sinks`` parameter, [heads]), or None."""
    sinks = getattr(attn, "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) and sinks.dim() == 1 else None


def attention_softcap(attn) -> Optional[float]:
    """The attention's logit soft-cap (``attn_logit_softcapping`` of the module or its config), or None,
    as the layer's attention implementation applies it: transformers' eager, flash and flex attention
    cap the scores; its SDPA attention does not (before 5.24 it ignored the cap without a word, and
    Gemma-2 ran on it by default; since then it refuses a cap), so there the layer computes no cap and
    neither does its MoD layer."""
    impl = getattr(getattr(attn, "config", None), "_attn_implementation", None)
    if isinstance(impl, str) and "sdpa" in impl:
        return None
    cap = getattr(attn, "attn_logit_softcapping", None)
    if cap is None:
        cap = getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap == 0:
        return None
    if cap < 0:
        raise ValueError(f"gmod: attn_logit_softcapping must be positive, got {cap}")
    return float(cap)


def _check(q, k, v, q_pos, k_pos, k_len):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"gmod: q, k, v must be [B, C, H, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Cq, Hq, d = q.shape
    _, Ck, Hk, _ = k.shape
    if k.shape[0] != B or v.shape[:3] != k.shape[:3] or k.shape[3] != d:
        raise ValueError(f"gmod: k / v {tuple(k.shape)} / {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"gmod: {Hq} query heads are not a multiple of {Hk} key heads")
    if tuple(q_pos.shape) != (B, Cq) or tuple(k_pos.shape) != (B, Ck):
        raise ValueError(f"gmod: q_pos / k_pos must be [B, Cq] / [B, Ck] = {(B, Cq)} / {(B, Ck)}, got "
                         f"{tuple(q_pos.shape)} / {tuple(k_pos.shape)}")
    if tuple(k_len.shape) != (B,):
        raise ValueError(f"gmod: k_len must be [B] = [{B}], got {tuple(k_len.shape)}")


def _same_id(name: str, q_ids, k_ids, q_pos, k_pos, dev) -> Optional[torch.Tensor]:
    """[B, Cq, Ck] bool ``q_ids[b, i] == k_ids[b, j]`` (ids of queries / keys shaped like their positions), or
    None when neither is given."""
    if q_ids is None and k_ids is None:
        return None
    if q_ids is None or k_ids is None:
        raise ValueError(f"gmod: pass both q_{name} and k_{name}, or neither")
    if tuple(q_ids.shape) != tuple(q_pos.shape) or tuple(k_ids.shape) != tuple(k_pos.shape):
        raise ValueError(f"gmod: q_{name} / k_{name} must have q_pos / k_pos's shapes {tuple(q_pos.shape)} / "
                         f"{tuple(k_pos.shape)}, got {tuple(q_ids.shape)} / {tuple(k_ids.shape)}")
    return q_ids.to(dev).unsqueeze(2) == k_ids.to(dev).unsqueeze(1)


def position_masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
    *,
    window: Optional[int] = None,
    softcap: Optional[float] = None,
    q_seg: Optional[torch.Tensor] = None,
    k_seg: Optional[torch.Tensor] = None,
    q_block: Optional[torch.Tensor] = None,
    k_block: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
    window_in_blocks: bool = True,
) -> torch.Tensor:
    """Attention of ``q`` [B, Cq, Hq, d] over ``k`` / ``v`` [B, Ck, Hk, d] (GQA: Hq a multiple of Hk),
    returning [B, Cq, Hq, d] in q's dtype.

    Query i of row b (at position ``q_pos[b, i]``) sees key j iff ``j < k_len[b]``,
    ``k_pos[b, j] <= q_pos[b, i]`` (or, with ``q_block`` / ``k_block``, [B, Cq] / [B, Ck] block ids with
    -1 outside blocks, ``q_block[b, i] == k_block[b, j] >= 0``), with ``window``
    ``q_pos[b, i] - k_pos[b, j] < window`` (for a key of the query's block too unless ``window_in_blocks`` is
    False), and with ``q_seg`` / ``k_seg`` ([B, Cq] / [B, Ck] sequence
    ids of packed rows) ``q_seg[b, i] == k_seg[b, j]``;
    scores are ``scale * q.k``, soft-capped to ``softcap * tanh(s / softcap)`` when given; ``sinks`` [Hq]
    adds one logit per head to each query's softmax, with no value (GPT-OSS); ``key_bias`` [B, Hq, Ck] is
    added to the scores of every query for key j (ALiBi's per-key column of slope * position). A query that
    sees no key (the slots past a row's count, whose outputs nobody reads) attends to all of its row's
    keys instead, so that every output and gradient stays finite.
    """
    _check(q, k, v, q_pos, k_pos, k_len)
    B, Cq, Hq, d = q.shape
    Ck, Hk = k.shape[1], k.shape[2]
    dev = q.device
    qp = q_pos.to(device=dev, dtype=torch.int64).unsqueeze(2)  # [B, Cq, 1]
    kp = k_pos.to(device=dev, dtype=torch.int64).unsqueeze(1)  # [B, 1, Ck]
    live = torch.arange(Ck, device=dev).unsqueeze(0) < k_len.to(device=dev).unsqueeze(1)  # [B, Ck]
    seen = kp <= qp  # causal
    near = None if window is None else (qp - kp) < int(window)
    same_block = _same_id("block", q_block, k_block, q_pos, k_pos, dev)
    if same_block is not None:  # a block's tokens see each other both ways (ids >= 0; -1: no block)
        in_block = same_block & (q_block.to(dev) >= 0).unsqueeze(2)
        if near is not None and not window_in_blocks:  # PaliGemma-2: OR(AND(window, causal), block)
            seen, near = (seen & near) | in_block, None
        else:
            seen = seen | in_block
    allowed = live.unsqueeze(1) & seen
    if near is not None:
        allowed &= near
    same_seq = _same_id("seg", q_seg, k_seg, q_pos, k_pos, dev)
    if same_seq is not None:
        allowed &= same_seq
    allowed = allowed | ~allowed.any(-1, keepdim=True)  # rows that see nothing: finite, never read
    mask = allowed.unsqueeze(1)  # [B, 1, Cq, Ck], broadcast over heads

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, C, d]
    if Hq != Hk:  # repeat the kv heads (SDPA's enable_gqa needs torch >= 2.5 and no custom mask on some backends)
        kt = kt.repeat_interleave(Hq // Hk, dim=1)
        vt = vt.repeat_interleave(Hq // Hk, dim=1)
    if softcap is None and sinks is None and key_bias is None:
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=float(scale))
        return o.transpose(1, 2)
    s = torch.matmul(qt, kt.transpose(-1, -2)) * float(scale)
    s = s.float()
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if key_bias is not None:
        if tuple(key_bias.shape) != (B, Hq, Ck):
            raise ValueError(f"gmod: key_bias must be [B, Hq, Ck] = {[B, Hq, Ck]}, got {tuple(key_bias.shape)}")
        s = s + key_bias.to(device=dev, dtype=s.dtype).unsqueeze(2)
    s = s.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        if tuple(sinks.shape) != (Hq,):
            raise ValueError(f"gmod: sinks must be [Hq] = [{Hq}], got {tuple(sinks.shape)}")
        sink = sinks.to(device=dev, dtype=s.dtype).view(1, Hq, 1, 1).expand(B, Hq, Cq, 1)
        p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :-1].to(q.dtype)  # the sink has no value
    else:
        p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, vt).transpose(1, 2)
