"""Where a decoder block puts its norms: what a MoD layer needs to rebuild the block on its kept tokens.

Every block a MoD layer reproduces computes

    h = x + N_ao(o_proj(attention(q, k, v of N_in(x))))      then      y = h + N_mo(mlp(N_mi(h)))

with up to four norms, each one optional. Transformers' families name them differently (and
``post_attention_layernorm`` means the norm *before* the MLP in Llama but the norm *of the attention
output* in Gemma-2 and OLMo-2), so the roles are read off the block's children once:

=====================  ======================  ========================  =========================  =======================
family                 N_in (before attention)  N_ao (attention output)   N_mi (before the MLP)      N_mo (MLP output)
=====================  ======================  ========================  =========================  =======================
Llama, Qwen, Phi-3...  input_layernorm         -                         post_attention_layernorm   -
Gemma-2 / 3            input_layernorm         post_attention_layernorm  pre_feedforward_layernorm  post_feedforward_layernorm
GLM-4                  input_layernorm         post_self_attn_layernorm  post_attention_layernorm   post_mlp_layernorm
Apertus                attention_layernorm     -                         feedforward_layernorm      -
OLMo-2 / 3, EXAONE-4   -                       post_attention_layernorm  -                          post_feedforward_layernorm
Cohere (parallel)      input_layernorm         -                         input_layernorm, on x      -
=====================  ======================  ========================  =========================  =======================

A parallel block runs attention and MLP side by side on the same normed input (``y = x + attn(N(x)) +
mlp(N(x))``); its MoD layer gives the MLP the kept tokens' input ``x`` rather than ``h``.

A block that fits none of these has no layout and is refused. Fitting a layout is necessary, not
sufficient: ``gmod_ext.verify`` compares the MoD layer with the block itself before converting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["BlockLayout", "block_layout", "block_hidden_size", "KNOWN_NORMS"]


@dataclass(frozen=True)
class BlockLayout:
    """Child names of the four norms (None: the block has no such norm)."""

    attn_in: Optional[str]
    attn_out: Optional[str]
    mlp_in: Optional[str]
    mlp_out: Optional[str]
    family: str
    parallel: bool = False  # the MLP reads the block's input (through attn_in), not h: y = x + attn + mlp

    def names(self) -> tuple:
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n is not None)


KNOWN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm",
               "attention_layernorm", "feedforward_layernorm")


def block_layout(layer: nn.Module) -> Optional[BlockLayout]:
    """The norm layout of a decoder block (see the module docstring), or None if it fits none."""
    def has(name):
        return isinstance(getattr(layer, name, None), nn.Module)

    if not (has("self_attn") and has("mlp")):
        return None
    if has("input_layernorm"):
        if has("pre_feedforward_layernorm") and has("post_feedforward_layernorm") and has("post_attention_layernorm"):
            return BlockLayout("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                               "post_feedforward_layernorm", "gemma2")
        if has("post_self_attn_layernorm") and has("post_attention_layernorm"):
            return BlockLayout("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                               "post_mlp_layernorm" if has("post_mlp_layernorm") else None, "glm4")
        if has("post_attention_layernorm"):
            return BlockLayout("input_layernorm", None, "post_attention_layernorm", None, "llama")
        # one norm for both branches: a parallel block, y = x + attn(N(x)) + mlp(N(x)) (Cohere, Phi-1/2)
        return BlockLayout("input_layernorm", None, "input_layernorm", None, "parallel", parallel=True)
    if has("attention_layernorm") and has("feedforward_layernorm"):
        return BlockLayout("attention_layernorm", None, "feedforward_layernorm", None, "apertus")
    if has("post_attention_layernorm") and has("post_feedforward_layernorm"):
        return BlockLayout(None, "post_attention_layernorm", None, "post_feedforward_layernorm", "olmo2")
    return None


def block_hidden_size(layer: nn.Module) -> Optional[int]:
    """The block's hidden size: a norm's weight length, else the attention output projection's."""
    layout = block_layout(layer)
    for name in layout.names() if layout is not None else ():
        w = getattr(getattr(layer, name), "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            return int(w.shape[0])
    w = getattr(getattr(getattr(layer, "self_attn", None), "o_proj", None), "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None
