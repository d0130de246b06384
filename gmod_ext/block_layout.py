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
HyperCLOVA X           input_layernorm         post_norm1                post_attention_layernorm   post_norm2
VaultGemma             input_layernorm         -                         pre_feedforward_layernorm  -
Apertus                attention_layernorm     -                         feedforward_layernorm      -
OLMo-2 / 3, EXAONE-4   -                       post_attention_layernorm  -                          post_feedforward_layernorm
Cohere, Phi-1/2 (par.) input_layernorm         -                         input_layernorm, on x      -
GPT-NeoX (parallel)    input_layernorm         -                         post_attention_layernorm,  -
                                                                         on x
=====================  ======================  ========================  =========================  =======================

The MLP branch is ``mlp``, or, in Granite's MoE families, ``block_sparse_moe`` plus ``shared_mlp`` where
the block has them (their outputs are summed: GraniteMoE, GraniteMoeShared, Granite-4's hybrid). Granite
also scales both updates by ``residual_multiplier``; a MoD layer does the same (``BlockLayout``
leaves that to the block's own attribute).

A parallel block runs attention and MLP side by side on the block's input (``y = x + attn(N(x)) +
mlp(N(x))``, or with a second norm for the MLP, ``mlp(N'(x))``, in GPT-NeoX); its MoD layer gives the
MLP the kept tokens' input ``x`` rather than ``h``.

A block that fits none of these has no layout and is refused. Fitting a layout is necessary, not
sufficient: ``gmod_ext.verify`` compares the MoD layer with the block itself before converting.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["BlockLayout", "block_layout", "block_hidden_size", "attention_module", "KNOWN_NORMS", "MLP_BRANCHES",
           "ATTENTION_NAMES"]


@dataclass(frozen=True)
class BlockLayout:
    """Child names of the four norms (None: the block has no such norm)."""

    attn_in: Optional[str]
    attn_out: Optional[str]
    mlp_in: Optional[str]
    mlp_out: Optional[str]
    family: str
    parallel: bool = False  # the MLP reads the block's input (through mlp_in), not h: y = x + attn + mlp
    mlp: tuple = ("mlp",)  # the MLP branch's modules, whose outputs are summed (see MLP_BRANCHES)
    attn: str = "self_attn"  # the attention module's name (GPT-NeoX: "attention")

    def names(self) -> tuple:
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n is not None)


KNOWN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm",
               "attention_layernorm", "feedforward_layernorm", "post_norm1", "post_norm2")


# Names the attention module goes by: ``self_attn`` (most families), ``attention`` (GPT-NeoX).
ATTENTION_NAMES = ("self_attn", "attention")

# Names an MLP branch is made of, in the order their outputs are added (Granite's MoE blocks: the experts,
# then the shared MLP; a ``None`` child, e.g. Granite-4 without experts, is left out).
MLP_BRANCHES = ("mlp", "block_sparse_moe", "shared_mlp")


def block_layout(layer: nn.Module) -> Optional[BlockLayout]:
    """The norm layout of a decoder block (see the module docstring), or None if it fits none."""
    layout = _norm_layout(layer)
    if layout is None:
        return None
    mlp = tuple(n for n in MLP_BRANCHES if isinstance(getattr(layer, n, None), nn.Module))
    attn = next(n for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), nn.Module))
    return layout if (mlp, attn) == (layout.mlp, layout.attn) else dataclasses.replace(layout, mlp=mlp, attn=attn)


def attention_module(layer: nn.Module) -> Optional[nn.Module]:
    """The block's attention module (``self_attn``, or GPT-NeoX's ``attention``), or None."""
    for name in ATTENTION_NAMES:
        m = getattr(layer, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _norm_layout(layer: nn.Module) -> Optional[BlockLayout]:
    def has(name):
        return isinstance(getattr(layer, name, None), nn.Module)

    if not (any(has(n) for n in ATTENTION_NAMES) and any(has(n) for n in MLP_BRANCHES)):
        return None
    if has("input_layernorm") and has("post_attention_layernorm") and getattr(layer, "use_parallel_residual", None) is True:
        # GPT-NeoX (Pythia): attention and MLP side by side, each with its own norm of the block's input
        return BlockLayout("input_layernorm", None, "post_attention_layernorm", None, "neox", parallel=True)
    if has("input_layernorm"):
        if has("pre_feedforward_layernorm") and has("post_feedforward_layernorm") and has("post_attention_layernorm"):
            return BlockLayout("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                               "post_feedforward_layernorm", "gemma2")
        if has("post_self_attn_layernorm") and has("post_attention_layernorm"):
            return BlockLayout("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                               "post_mlp_layernorm" if has("post_mlp_layernorm") else None, "glm4")
        if has("post_norm1") and has("post_norm2") and has("post_attention_layernorm"):
            # HyperCLOVA X's peri-layer norms on both updates (nn.Identity where config.use_post_norm is off)
            return BlockLayout("input_layernorm", "post_norm1", "post_attention_layernorm", "post_norm2", "hyperclovax")
        if has("post_attention_layernorm"):
            return BlockLayout("input_layernorm", None, "post_attention_layernorm", None, "llama")
        if has("pre_feedforward_layernorm"):  # VaultGemma: Gemma-2's pre-norms without its post-norms
            return BlockLayout("input_layernorm", None, "pre_feedforward_layernorm", None, "vaultgemma")
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
    w = getattr(getattr(attention_module(layer), "o_proj", None), "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None
