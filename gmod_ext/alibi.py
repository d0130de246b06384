"""ALiBi in MoD layers: the bias BLOOM, MPT and Falcon (``alibi=True``) give their layers, read per key.

ALiBi adds ``slope_h * (k - q)`` to the score of query position q for key position k, a penalty linear in
the distance, one slope per head, and no rotary positions. The per-query part ``-slope_h * q`` is the same
for a whole softmax row, so the models leave it out and give each layer one bias per key *column*:

* BLOOM: ``alibi`` [B * H, 1, K], ``slope * position`` with positions counted over the attention mask
  (padding columns 0), added to ``q.k / sqrt(d)``; K the keys the dense layer attends over (its cache plus
  the step), or more with a static cache;
* Falcon with ``alibi=True``: the same tensor (also as [B, H, 1, K]), added before the scale:
  ``(q.k + alibi) / sqrt(d)``, i.e. times the attention's ``beta`` (= ``1 / sqrt(d)``; BLOOM's is 1);
* MPT: ``position_bias`` [H, 1, max_seq_len], ``slope * (j - max_seq_len + 1)``, of which the attention
  takes the last K columns.

A MoD layer attends over its kept tokens only, so it needs the bias at its keys' original positions:
:meth:`AlibiBias.columns` turns what the layer was given into ``[B, H, K]`` float32 by key column, and
:func:`key_bias` gathers that at the keys' positions (the step's kept tokens, or a compact cache's recorded
positions) for :func:`gmod_ext.masked_attention.position_masked_attention`. The values are the model's own
(rounded to its dtype as it rounds them), so a MoD layer keeping every token gives the dense layer's scores.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from .block_layout import attention_module

__all__ = ["AlibiBias", "pop_alibi", "key_bias", "uses_alibi"]


@dataclass(frozen=True)
class AlibiBias:
    """What a decoder layer was given: ``tensor`` under the keyword ``kind`` ("alibi": BLOOM, Falcon;
    "position_bias": MPT)."""

    tensor: torch.Tensor
    kind: str

    def columns(self, attn, B: int, H: int, K: int) -> torch.Tensor:
        """The bias of each of the first K key columns, ``[B, H, K]`` float32, as the dense attention adds
        it to its scaled scores."""
        t = self.tensor
        if self.kind == "alibi":
            L = int(t.shape[-1]) if t.dim() else 0
            if t.dim() < 2 or t.numel() != B * H * L:
                raise ValueError(f"gmod: the ALiBi bias must hold [B * H, 1, K] = [{B} * {H}, 1, K] values, got "
                                 f"shape {tuple(t.shape)}")
            if L < K:
                raise ValueError(f"gmod: the ALiBi bias covers {L} key positions, the layer attends over {K}")
            cols = t.reshape(B, H, L)[:, :, :K].float()
            beta = getattr(attn, "beta", 1.0)  # Falcon adds the bias before scaling by 1 / sqrt(d)
            return cols if beta == 1.0 else cols * float(beta)
        L = int(t.shape[-1]) if t.dim() else 0
        if t.dim() != 3 or t.shape[0] != H or t.shape[1] != 1:
            raise ValueError(f"gmod: MPT's position_bias must be [H, 1, max_seq_len] = [{H}, 1, L], got "
                             f"{tuple(t.shape)}")
        if L < K:
            raise ValueError(f"gmod: MPT's position_bias covers {L} positions (max_seq_len), the sequence has {K}")
        return t[:, 0, L - K:].float().unsqueeze(0).expand(B, H, K)


def uses_alibi(layer) -> bool:
    """Whether a decoder layer's model gives it an ALiBi bias: a layer whose forward takes ``position_bias``
    (MPT) or ``alibi`` (BLOOM; Falcon's layers take it too, and get one iff their config says ``alibi``)."""
    try:
        params = inspect.signature(type(layer).forward).parameters
    except (TypeError, ValueError):
        return False
    if "position_bias" in params:
        return True
    if "alibi" not in params:
        return False
    return getattr(getattr(attention_module(layer), "config", None), "alibi", True) is not False


def pop_alibi(kwargs: dict) -> Optional[AlibiBias]:
    """Removes a layer call's ALiBi bias (``alibi``, or MPT's ``position_bias``) from its keywords and
    returns it, or None."""
    found = [AlibiBias(kwargs.pop(n), n) for n in ("alibi", "position_bias") if kwargs.get(n) is not None]
    for n in ("alibi", "position_bias"):
        kwargs.pop(n, None)
    if len(found) > 1:
        raise ValueError("gmod: a layer was given both alibi and position_bias; pass one")
    return found[0] if found else None


def key_bias(columns: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``columns`` [B, H, K] at ``positions`` [B, C] (key columns; entries outside [0, K), in slots no
    query reads, are clamped): [B, H, C]."""
    B, H, K = columns.shape
    pos = positions.to(device=columns.device, dtype=torch.int64).clamp(0, K - 1)
    return torch.gather(columns, 2, pos.unsqueeze(1).expand(B, H, pos.shape[1]))
