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
AFMoE                  input_layernorm         post_attention_layernorm  pre_mlp_layernorm          post_mlp_layernorm
VaultGemma             input_layernorm         -                         pre_feedforward_layernorm  -
Apertus                attention_layernorm     -                         feedforward_layernorm      -
OLMo-2 / 3, EXAONE-4   -                       post_attention_layernorm  -                          post_feedforward_layernorm
OPT, XGLM, BioGPT      self_attn_layer_norm    -                         final_layer_norm           -
GPT-2                  ln_1                    -                         ln_2                       -
MPT                    norm_1                  -                         norm_2                     -
Cohere, Phi-1/2 (par.) input_layernorm         -                         input_layernorm, on x      -
GPT-NeoX (parallel)    input_layernorm         -                         post_attention_layernorm,  -
                                                                         on x
Falcon-40B / 180B / 2  ln_attn                 -                         ln_mlp, on x               -
Falcon-7B (parallel)   input_layernorm         -                         input_layernorm, on x      -
GPT-J, CodeGen (par.)  ln_1                    -                         ln_1, on x                 -
=====================  ======================  ========================  =========================  =======================

The MLP branch is ``mlp``, or, in Granite's MoE families, ``block_sparse_moe`` plus ``shared_mlp`` where
the block has them (their outputs are summed: GraniteMoE, GraniteMoeShared, Granite-4's hybrid). Granite
also scales both updates by ``residual_multiplier``; a MoD layer does the same (``BlockLayout``
leaves that to the block's own attribute).

OPT's family (OPT, the language model of BLIP-2 / InstructBLIP; XGLM; BioGPT: fairseq's decoder) has no
MLP module: the block computes ``fc2(activation_fn(fc1(.)))`` itself (``BlockLayout.mlp = ("fc1", "fc2")``,
``mlp_act = "activation_fn"``), drops out both updates with the float ``dropout`` (and the activation with
``activation_dropout``), and gets absolute positions added to its input, not rotary ones. Its post-norm
variant (``do_layer_norm_before = False``, OPT-350m) normalises after each residual sum: no update a MoD
layer could gate, so it is refused with that reason (:func:`layout_refusal`), as is a block with
cross-attention (``encoder_attn``).

GPT-2's block names its attention ``attn`` (one ``c_attn`` for q, k, v, ``c_proj`` out, the residual
dropout inside the attention module) and its decoder stack ``h``; its positions are added to the input too.
GPT-J and CodeGen (the stack ``h``) run GPT-2's ``attn`` (separate ``q_proj`` / ``k_proj`` / ``v_proj``, or
CodeGen's one ``qkv_proj`` in 4 model-parallel groups of q, v, k) and ``mlp`` side by side on ``ln_1``.
MPT names its attention ``attn`` too (one ``Wqkv``, ``out_proj``), its MLP ``ffn`` and its stack ``blocks``.
BLOOM's and MPT's MLPs (and BLOOM's attention) take the residual and add it themselves; both use ALiBi
(:mod:`gmod_ext.alibi`). BLOOM's variant that takes the residual after the norm
(``apply_residual_connection_post_layernorm``) is refused: its update is not added to the block's input.

A parallel block runs attention and MLP side by side on the block's input (``y = x + attn(N(x)) +
mlp(N(x))``, or with a second norm for the MLP, ``mlp(N'(x))``, in GPT-NeoX); its MoD layer gives the
MLP the kept tokens' input ``x`` rather than ``h``.

A block that fits none of these has no layout and is refused. Fitting a layout is necessary, not
sufficient: ``gmod_ext.verify`` compares the MoD layer with the block itself before converting.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["BlockLayout", "block_layout", "block_hidden_size", "attention_module", "out_projection", "first_child",
           "layout_refusal", "KNOWN_NORMS", "MLP_BRANCHES", "ATTENTION_NAMES", "OUT_PROJS"]


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
    attn: str = "self_attn"  # the attention module's name (GPT-NeoX: "attention", GPT-2: "attn", GPT-Neo: "attn.attention")
    # set (OPT's family): ``mlp`` names two linear layers run in sequence with this activation between them,
    # ``mlp[1](act(mlp[0](h)))``, not branches to sum; the updates' dropout is the block's float ``dropout``
    mlp_act: Optional[str] = None
    # the attention / MLP children whose forward takes the residual and returns ``residual + update`` (BLOOM's
    # attention and MLP, MPT's MLP): a MoD layer calls such an MLP with a zero residual
    adds_residual: tuple = ()

    def names(self) -> tuple:
        return tuple(n for n in (self.attn_in, self.attn_out, self.mlp_in, self.mlp_out) if n is not None)


KNOWN_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm",
               "attention_layernorm", "feedforward_layernorm", "post_norm1", "post_norm2", "self_attn_layer_norm",
               "final_layer_norm", "ln_1", "ln_2", "ln_attn", "ln_mlp", "norm_1", "norm_2", "pre_mlp_layernorm")


# Names the attention module goes by: ``self_attn`` (most families), ``attention`` (GPT-NeoX), ``attn`` (GPT-2),
# ``self_attention`` (Falcon).
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")

# Names the attention's output projection goes by: Llama's; Phi-1 / 2's and GPT-NeoX's; OPT's; GPT-2's (a Conv1D).
OUT_PROJS = ("o_proj", "dense", "out_proj", "c_proj")

# Names an MLP branch is made of, in the order their outputs are added (Granite's MoE blocks: the experts,
# then the shared MLP; a ``None`` child, e.g. Granite-4 without experts, is left out; MPT's ``ffn``;
# Llama-4's ``feed_forward``).
MLP_BRANCHES = ("mlp", "block_sparse_moe", "shared_mlp", "ffn", "feed_forward")


def block_layout(layer: nn.Module) -> Optional[BlockLayout]:
    """The norm layout of a decoder block (see the module docstring), or None if it fits none."""
    layout = _norm_layout(layer)
    if layout is None:
        return None
    if layout.mlp_act is None:
        mlp = tuple(n for n in MLP_BRANCHES if isinstance(getattr(layer, n, None), nn.Module))
        attn = next(n for n in ATTENTION_NAMES if isinstance(getattr(layer, n, None), nn.Module))
        if (mlp, attn) != (layout.mlp, layout.attn):
            layout = dataclasses.replace(layout, mlp=mlp, attn=attn)
    adds = tuple(n for n in (layout.attn, *layout.mlp) if _takes_residual(getattr(layer, n, None)))
    if adds:
        layout = dataclasses.replace(layout, adds_residual=adds)
    if _wrapped_attention(getattr(layer, layout.attn, None)) is not None:
        layout = dataclasses.replace(layout, attn=f"{layout.attn}.attention")
    return layout


def _wrapped_attention(attn) -> Optional[nn.Module]:
    """GPT-Neo's attention module wraps the one with the projections as its ``attention``: that one, or None."""
    inner = getattr(attn, "attention", None)
    if isinstance(inner, nn.Module) and out_projection(attn) is None and out_projection(inner) is not None:
        return inner
    return None


def _takes_residual(module) -> bool:
    """Whether ``module``'s forward takes a ``residual`` argument (and returns ``residual + its update``)."""
    try:
        return isinstance(module, nn.Module) and "residual" in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def first_child(module: nn.Module, names: tuple, kind: type = nn.Module):
    """The first of ``module``'s attributes ``names`` that is a ``kind``, or None (families name the same
    part differently)."""
    return next((m for m in (getattr(module, n, None) for n in names) if isinstance(m, kind)), None)


def attention_module(layer: nn.Module) -> Optional[nn.Module]:
    """The block's attention module (``self_attn``, GPT-NeoX's ``attention``, GPT-2's ``attn``; GPT-Neo's
    ``attn.attention``, which holds the projections), or None."""
    attn = first_child(layer, ATTENTION_NAMES)
    return _wrapped_attention(attn) or attn


def out_projection(attn: nn.Module) -> Optional[nn.Module]:
    """The attention's output projection (one of :data:`OUT_PROJS`), or None."""
    return first_child(attn, OUT_PROJS)


def _has(layer: nn.Module, name: str) -> bool:
    return isinstance(getattr(layer, name, None), nn.Module)


def _opt_like(layer: nn.Module) -> bool:
    """OPT / XGLM / BioGPT's block: self-attention, two LayerNorms, ``fc1`` / ``fc2`` and their activation."""
    return all(_has(layer, n) for n in ("self_attn", "self_attn_layer_norm", "final_layer_norm", "fc1", "fc2")) \
        and callable(getattr(layer, "activation_fn", None))


def layout_refusal(layer: nn.Module) -> Optional[str]:
    """Why a block that looks like a known family still has no layout, or None."""
    if _has(layer, "encoder_attn") or _has(layer, "crossattention"):
        return (f"{type(layer).__name__} has cross-attention (encoder_attn / crossattention): a decoder of an "
                "encoder-decoder model, which MoD layers do not reproduce")
    if getattr(layer, "apply_residual_connection_post_layernorm", False) is True:
        return (f"{type(layer).__name__} adds its updates to the normed input "
                "(apply_residual_connection_post_layernorm=True): a skipped token would not keep its input, so "
                "MoD layers do not reproduce it")
    if _opt_like(layer) and getattr(layer, "do_layer_norm_before", True) is False:
        return (f"{type(layer).__name__} is post-norm (do_layer_norm_before=False, e.g. OPT-350m): it normalises "
                "after each residual sum, so there is no residual update a MoD layer could gate")
    return None


def _norm_layout(layer: nn.Module) -> Optional[BlockLayout]:
    def has(name):
        return _has(layer, name)

    if layout_refusal(layer) is not None:
        return None
    if _opt_like(layer):
        return BlockLayout("self_attn_layer_norm", None, "final_layer_norm", None, "opt", mlp=("fc1", "fc2"),
                           mlp_act="activation_fn")
    if has("ln_1") and has("ln_2") and has("attn") and has("mlp"):
        return BlockLayout("ln_1", None, "ln_2", None, "gpt2", attn="attn")
    if has("ln_1") and not has("ln_2") and has("attn") and has("mlp"):  # GPT-J, CodeGen: parallel on one norm
        return BlockLayout("ln_1", None, "ln_1", None, "gptj", parallel=True, attn="attn")
    if has("norm_1") and has("norm_2") and has("attn") and has("ffn"):
        return BlockLayout("norm_1", None, "norm_2", None, "mpt", attn="attn", mlp=("ffn",))
    if not (any(has(n) for n in ATTENTION_NAMES) and any(has(n) for n in MLP_BRANCHES)):
        return None
    if has("ln_attn") and has("ln_mlp"):  # Falcon-40B / 180B, Falcon-2: parallel, a norm of x for each branch
        return BlockLayout("ln_attn", None, "ln_mlp", None, "neox", parallel=True)
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
        if has("pre_mlp_layernorm") and has("post_mlp_layernorm") and has("post_attention_layernorm"):
            # AFMoE: Gemma-2's four norms under other names
            return BlockLayout("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm",
                               "afmoe")
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
    """The block's hidden size: a norm's weight length, else the attention output projection's (``o_proj``,
    ``dense``, ``out_proj``, GPT-2's ``c_proj``: OPT's LayerNorms may have no weights)."""
    layout = block_layout(layer)
    for name in layout.names() if layout is not None else ():
        w = getattr(getattr(layer, name), "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1:
            return int(w.shape[0])
    proj = out_projection(attention_module(layer))
    w = getattr(proj, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return int(w.shape[1] if hasattr(proj, "nf") else w.shape[0])  # GPT-2's Conv1D stores [in, out]
