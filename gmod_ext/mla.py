"""Multi-head latent attention (MLA) in MoD layers: DeepSeek-V2 / V3 and the models built on their attention
(GLM-4.7-Flash's ``glm4_moe_lite``, MiniCPM3, Youtu, ...).

MLA projects each token to a small latent instead of per-head keys and values:

* ``kv_a_proj_with_mqa(x)`` = [c, k_rot]: ``c`` (``kv_lora_rank`` wide) is normalised by ``kv_a_layernorm``;
  ``k_rot`` (``qk_rope_head_dim``) is one rotated key part shared by every head;
* the attention's ``expand_kv(c, k_rot)`` makes the keys ``[k_nope_h, k_rot]`` and the values ``v_h`` of
  every head from them (``kv_b_proj``);
* queries are ``q_proj(x)`` (or ``q_b_proj(q_a_layernorm(q_a_proj(x)))``), per head ``[q_nope, q_rot]`` with
  ``q_rot`` rotated, scaled by the attention's ``scaling`` (with YaRN's mscale).

Hugging Face caches the latent ([c, k_rot] per token, one "head"), not the expanded keys and values, and
expands the whole cache at every step. A MoD layer does the same with its compact cache, so the cache keeps
MLA's saving: the latent of each kept token is stored split in two halves, one in the cache's key slot and
one in its value slot (the compact cache holds keys and values of one shape), and :func:`expand` rebuilds
the keys and values from them with the model's own ``expand_kv``. The value head dim differs from the key's
(128 against 192 in DeepSeek-V3): the values are zero-padded to the key's width for the attention kernels,
and the output cut back (:func:`value_dim`).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .rotary import complex_rotation

__all__ = ["is_mla", "check", "qkv", "expand", "value_dim"]


def is_mla(attn: nn.Module) -> bool:
    """Whether ``attn`` is DeepSeek-V3's multi-head latent attention (its latent projection and expand_kv)."""
    return isinstance(getattr(attn, "kv_a_proj_with_mqa", None), nn.Module) \
        and isinstance(getattr(attn, "kv_b_proj", None), nn.Module) and callable(getattr(attn, "expand_kv", None)) \
        and all(isinstance(getattr(attn, n, None), int) for n in ("kv_lora_rank", "qk_rope_head_dim",
                                                                   "qk_nope_head_dim", "v_head_dim"))


# the parts of DeepSeek-V3's attention, all of which gmod_ext.mla runs; an attention with more (DeepSeek-V3.2's
# sparse-attention indexer, which picks each query's top-k keys) computes something else
_KNOWN_PARTS = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
                "o_proj", "rotary_emb")


def check(attn: nn.Module) -> None:
    """Raise TypeError, saying why, for an MLA attention a MoD layer cannot reproduce."""
    extra = sorted(n for n, m in attn.named_children() if m is not None and n not in _KNOWN_PARTS)
    if extra:
        raise TypeError(f"gmod: {type(attn).__name__} is multi-head latent attention with parts MoD layers do not run "
                        f"({extra}; e.g. DeepSeek-V3.2's sparse-attention indexer, which attends each query to its "
                        "top-k keys only)")
    if attn.v_head_dim > attn.qk_nope_head_dim + attn.qk_rope_head_dim:
        raise TypeError(f"gmod: {type(attn).__name__}'s values ({attn.v_head_dim} per head) are wider than its keys "
                        f"({attn.qk_nope_head_dim + attn.qk_rope_head_dim}); MoD layers pad values to the key width")
    _rotation(attn)


def value_dim(attn: nn.Module) -> Optional[int]:
    """The value head dim of an MLA attention whose values are narrower than its keys (the output of the
    attention is cut to it), else None."""
    if not is_mla(attn):
        return None
    return int(attn.v_head_dim) if attn.v_head_dim < attn.qk_nope_head_dim + attn.qk_rope_head_dim else None


def _rotation(attn: nn.Module):
    """The model's rotation of the rotated parts: ``apply_rotary_pos_emb_interleave`` where its forward
    calls that one and its config asks for it (``rope_interleave``, DeepSeek-V3's default), DeepSeek-V2's
    complex ``apply_rotary_emb`` (:func:`gmod_ext.rotary.complex_rotation`), else its ``apply_rotary_pos_emb`` (MiniCPM3,
    ``rope_interleave=False``)."""
    module = sys.modules.get(type(attn).__module__)
    code = getattr(getattr(type(attn).forward, "__wrapped__", type(attn).forward), "__code__", None)
    names = code.co_names if code is not None else ()
    if callable(getattr(module, "apply_rotary_emb", None)) and "apply_rotary_emb" in names:
        return complex_rotation
    interleave = getattr(module, "apply_rotary_pos_emb_interleave", None)
    if callable(interleave) and "apply_rotary_pos_emb_interleave" in names \
            and getattr(getattr(attn, "config", None), "rope_interleave", False) is True:
        return interleave
    fn = getattr(module, "apply_rotary_pos_emb", None)
    if not callable(fn) or "apply_rotary_pos_emb" not in names:
        raise TypeError(f"gmod: {type(attn).__name__} (multi-head latent attention) rotates with none of "
                        "apply_rotary_pos_emb, apply_rotary_pos_emb_interleave (DeepSeek-V3) or apply_rotary_emb "
                        "(DeepSeek-V2's complex rotary): MoD layers cannot reproduce it")
    return fn


def qkv(attn: nn.Module, h: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor]):
    """Queries [B, C, H, dk] of the kept tokens ``h`` [B, C, D] (normed), rotated by ``cos`` / ``sin``
    [B, C, qk_rope_head_dim] rows, and their latent as the compact cache stores it: two halves
    [B, C, 1, ceil((kv_lora_rank + qk_rope_head_dim) / 2)] (the second zero-padded when the width is odd)."""
    B, C = h.shape[0], h.shape[1]
    if getattr(attn, "q_lora_rank", None) is None:
        q = attn.q_proj(h)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(h)))
    q = q.view(B, C, -1, attn.qk_nope_head_dim + attn.qk_rope_head_dim)
    q_pass, q_rot = q.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    c, k_rot = attn.kv_a_proj_with_mqa(h).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    c = attn.kv_a_layernorm(c).view(B, C, 1, attn.kv_lora_rank)
    k_rot = k_rot.view(B, C, 1, attn.qk_rope_head_dim)
    if cos is not None:  # [B, C, H, r] layout: cos / sin unsqueezed at dim 2
        rotate = _rotation(attn)
        if rotate is not complex_rotation:  # (the models' rotary modules return cos / sin in x's dtype)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q_rot, k_rot = rotate(q_rot, k_rot, cos, sin, unsqueeze_dim=2)
    q = torch.cat([q_pass, q_rot], dim=-1)
    latent = torch.cat([c, k_rot.to(c.dtype)], dim=-1)
    half = (latent.shape[-1] + 1) // 2
    if latent.shape[-1] % 2:
        latent = F.pad(latent, (0, 1))
    return q.contiguous(), latent[..., :half].contiguous(), latent[..., half:].contiguous()


def expand(attn: nn.Module, k_half: torch.Tensor, v_half: torch.Tensor):
    """Keys and values [B, T, H, dk] (values zero-padded from ``v_head_dim`` to dk) of the latents stored as
    :func:`qkv`'s halves [B, T, 1, w], by the attention's own ``expand_kv``."""
    width = attn.kv_lora_rank + attn.qk_rope_head_dim
    latent = torch.cat([k_half, v_half], dim=-1)[..., :width]
    c, k_rot = latent.split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    k, v = attn.expand_kv(c.transpose(1, 2), k_rot.transpose(1, 2))  # [B, 1, T, *] in, [B, H, T, *] out
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if v.shape[-1] < k.shape[-1]:
        v = F.pad(v, (0, k.shape[-1] - v.shape[-1]))
    return k.contiguous(), v.contiguous()
