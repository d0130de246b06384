"""The Mixture-of-Depths decoder layer for Llama-family Hugging Face models.

:func:`make_mod_layer` turns a ``LlamaDecoderLayer`` / ``MistralDecoderLayer`` /
``Qwen2DecoderLayer`` (or any layer with the same parts: ``input_layernorm`` (RMSNorm),
``self_attn.{q,k,v,o}_proj`` (or one fused ``qkv_proj``, Phi-3, or ``query_key_value``, GPT-NeoX's
``attention``; ``dense`` for ``o_proj``, Phi-1 / 2; + optional ``q_norm`` / ``k_norm``, or HunYuan's
after the rotation), ``post_attention_layernorm``, ``mlp`` (or Granite's ``block_sparse_moe`` +
``shared_mlp``; Gemma 4's and Gemma 3n's extra parts, AltUp's streams among them: :mod:`gmod_ext.block_extras`);
or the other norm layouts of :mod:`gmod_ext.block_layout`: Gemma-2 / 3, GLM-4,
Apertus, OLMo-2, parallel blocks, OPT's family (``fc1`` / ``fc2`` in the block, ``out_proj``), GPT-2
(``attn.c_attn`` / ``c_proj``), Falcon (``self_attention.query_key_value``), GPT-J / CodeGen (parallel on
``ln_1``), GPT-Neo (``attn.attention``), BLOOM and MPT (``attn.Wqkv``, ``ffn``); those with positions added
to the input do not rotate, nor do those given an ALiBi bias, see :mod:`gmod_ext.alibi`) into a MoD layer
**in place**: the object's class becomes a subclass
``MoD<Layer>(MoDDecoderLayer, <Layer>)``, so it keeps its own modules and weights (the state_dict
keys of the original weights do not change; a per-layer router adds ``gmod_router.*``), is still an
instance of the original class (Hugging Face's output capturing, gradient checkpointing and FSDP
class plans keep working) and accepts the same call as the wrapped layer::

    layer(hidden_states, attention_mask=..., position_ids=..., cache=..., use_cache=...,
          position_embeddings=(cos, sin), **kwargs) -> hidden_states [B, S, D]
          (or the tuple the wrapped forward's return statements spell: Falcon's (hidden_states, None))

(the KV cache as ``cache=``, the name transformers >= 5.24 uses, or ``past_key_values=``, the earlier one,
or ``layer_past=``, GPT-NeoX's; arguments after ``hidden_states`` given positionally are named by the
wrapped class's signature, as GPT-2's model passes its cache and mask)

Forward on the selected tokens (all through ``gmod_ext.ops``)::

    l = router_logits(x, W[1]-W[0], input_layernorm.weight, eps) + (b1-b0)     # [B, S] fp32
    idx, count = route(l, C, num_routed, mask)                                # top-k + forced
                                            # (packed rows: per sequence, router.per_sequence_codes)
    xs = gather_rows(x); cos, sin = gather_rows(cos/sin) (or compact arange(count))
    q, k, v = proj(LN1(xs)); (q/k norm); RoPE; o = attention(q, k, v, count, count)  # causal, GQA
                                            # (MLA: q and the latent, keys / values by expand_kv: gmod_ext.mla)
                                            # (or SDPA over the compact rows: GmodConfig.attention;
                                            #  a sliding window shorter than the sequence, a logit
                                            #  soft-cap, attention sinks, ALiBi, packed sequences, image
                                            #  blocks or Llama-4's chunks: gmod_ext.masked_attention, by
                                            #  original position)
    h = xs + o_proj(o); m = mlp(LN2(h))     (other layouts: norms on o_proj(o) / around the MLP, see block_layout;
                                             RoPE: the model's own apply_rotary_pos_emb where it differs, GLM;
                                             Granite: both updates times residual_multiplier)
    y = scatter_merge(x, base, idx, count, delta, gate[, skip_scale])          # variant gating

Gating: gamma ``y = h + p*m``; mod ``y = xs + p*(h + m - xs)``; pmod ``y = xs + w*(h + m - xs)``,
``w = 0.2*tanh(l) + 1`` and skipped (non-padding) tokens ``w*x``; gate="none" ``y = h + m``.
Skipped tokens (and padding) leave the layer bit-identical (except pmod's STRing).

The layer ignores the 4-D ``attention_mask`` it is given: kept tokens attend causally to kept
tokens of the same row (and, in packed rows, ``RoutingInfo.segments``, of the same sequence);
padding (mask code 2) is never kept. The routing mask comes from the
``gmod_routing`` keyword (a :class:`~gmod_ext.router.RoutingInfo`) that a converted model's
forward hook injects; without it every token is routable.

KV cache: a MoD layer called with a KV cache (``cache`` / ``past_key_values``) goes to :meth:`MoDDecoderLayer.gmod_forward_with_cache`:
with ``on_cache="compact"`` (the default of :func:`gmod_ext.convert`) it keeps a compact cache of the
tokens it processed (:mod:`gmod_ext.cache`): the first call (prefill) routes like training (top-k /
threshold), later calls keep a new token iff ``p >= decode_threshold`` and attend to the layer's
compact cache. ``on_cache="dense"`` runs the wrapped layer densely; ``on_cache="error"`` raises
NotImplementedError (the default of a bare :class:`~gmod_ext.config.GmodConfig`, e.g. a standalone
:func:`make_mod_layer`).

NVTX: the stages are wrapped in ``gmod_ext.profiling.nvtx_range`` (``gmod.router``, ``gmod.route``,
``gmod.gather``, ``gmod.attention``, ``gmod.mlp``, ``gmod.merge``), in training and with a cache;
a no-op unless enabled, skipped under torch.compile.
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import os
import sys
import textwrap
import warnings
from typing import Optional

import torch
from torch import nn

from . import block_extras, diff_attention, mla, ops
from .rotary import complex_rotation
from ._hf import accepts, cache_kwarg_of, pop_cache
from .alibi import AlibiBias, key_bias, pop_alibi
from .block_layout import attention_module, block_hidden_size, block_layout, out_projection
from .config import GmodConfig, capacity, capacity_of_rows, num_skipped_tensor
from .masked_attention import attention_sinks, attention_softcap, position_masked_attention
from .masks import check_routing_mask
from .profiling import nvtx_range
from .router import (AuxLossThroughOutput, Deferred, GmodRouter, GmodState, LazyStats, RoutingInfo, logit,
                     max_segments, per_sequence_codes, router_aux_loss, routing_stats, selection_mask)

__all__ = ["MoDDecoderLayer", "make_mod_layer", "unmake_mod_layer", "is_mod_layer", "mod_class_for"]

_CLASS_CACHE: dict[type, type] = {}


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-6


def _cos_sin(position_embeddings):
    """The (cos, sin) pair a rotary module returns, or a complex ``freqs_cis`` (DeepSeek-V2's rotary:
    ``polar(1, angle)`` times its scaling) as its real and imaginary parts, the same numbers."""
    if isinstance(position_embeddings, torch.Tensor) and position_embeddings.is_complex():
        return position_embeddings.real.contiguous(), position_embeddings.imag.contiguous()
    return position_embeddings


def _batch_angles(cos: torch.Tensor, sin: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [B, S, r], contiguous, from the model's [1 or B, S, r] (what ``gather_rows`` reads)."""
    return cos.expand(B, -1, -1).contiguous(), sin.expand(B, -1, -1).contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


ROPE_IMPLS = ("fused", "torch")


def rope_impl() -> str:
    """``GMOD_ROPE``: "fused" (the default: ``ops.rope``) or "torch" (the same formula in torch ops, to time one
    against the other); read at every call, as the kernels' experiment flags are."""
    v = os.environ.get("GMOD_ROPE", "fused")
    if v not in ROPE_IMPLS:
        raise ValueError(f"GMOD_ROPE={v} is not one of {ROPE_IMPLS}")
    return v


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on [B, C, H, d] with cos/sin [B, C, r] (r <= d: partial rotary on the first r dims): the fused
    ``ops.rope`` (one pass over q and one over k, forward and backward), or the same formula in torch ops
    where its layout does not fit (an odd width, angles not one row per token) or ``GMOD_ROPE=torch``."""
    r = cos.shape[-1]
    fits = r % 2 == 0 and r <= q.shape[-1] and cos.dim() == 3 and cos.shape[:2] == q.shape[:2] == k.shape[:2]
    if fits and rope_impl() == "fused":
        cos, sin = cos.to(q.dtype).contiguous(), sin.to(q.dtype).contiguous()
        return ops.rope(q.contiguous(), cos, sin), ops.rope(k.contiguous(), cos, sin)
    cos = cos.unsqueeze(2).to(q.dtype)
    sin = sin.unsqueeze(2).to(q.dtype)
    if r == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q = torch.cat((q_rot * cos + _rotate_half(q_rot) * sin, q_pass), dim=-1)
    k = torch.cat((k_rot * cos + _rotate_half(k_rot) * sin, k_pass), dim=-1)
    return q, k


def _model_rope(attn: nn.Module):
    """The attention module's own ``apply_rotary_pos_emb`` when its forward uses one that rotates
    differently from :func:`_apply_rope` (GLM / GLM-4: interleaved pairs, on half the head), else None
    (ours). Decided once per layer at conversion by applying both to random inputs (float64), with cos /
    sin as wide as the head, or half as wide where the model's function takes only that (GPT-OSS rotates
    the two halves of the head by d / 2 angles: ``[x1 cos - x2 sin, x2 cos + x1 sin]``). A function of one
    tensor, ``apply_rotary_pos_emb(tensor, sin, cos)`` (GPT-J, CodeGen: interleaved pairs on the first
    ``rotary_dim`` dims of the head), is the rotation itself: it is applied to q and k in turn
    (:func:`_rotate_each`), with the model's position embeddings in the model's order."""
    if mla.is_mla(attn):  # its rotated parts are rotated by gmod_ext.mla, with the model's function
        return None
    module = sys.modules.get(type(attn).__module__)
    fn = getattr(module, "apply_rotary_pos_emb", None)
    forward = getattr(type(attn), "forward", None)
    code = getattr(inspect.unwrap(forward), "__code__", None) if callable(forward) else None  # past decorators
    if code is not None and "apply_rotary_emb" in code.co_names and callable(getattr(module, "apply_rotary_emb", None)):
        return complex_rotation  # Llama-4's complex freqs_cis (gmod_ext.rotary)
    if not callable(fn) or code is None or "apply_rotary_pos_emb" not in code.co_names:
        return None
    try:
        params = [p for p in inspect.signature(fn).parameters.values() if p.default is inspect.Parameter.empty]
    except (TypeError, ValueError):
        params = []
    if len(params) == 3 and accepts(fn, "unsqueeze_dim"):
        # (tensor, cos, sin, unsqueeze_dim) (Gemma 4): one tensor at a time, rotated as ours where it agrees
        d = _head_dim(attn)
        g = torch.Generator().manual_seed(0)
        t = torch.randn(1, 3, 2, d, dtype=torch.float64, generator=g, device="cpu")
        cos, sin = (torch.randn(1, 3, d, dtype=torch.float64, generator=g, device="cpu") for _ in range(2))
        try:
            same = torch.allclose(fn(t, cos, sin, unsqueeze_dim=2), _apply_rope(t, t, cos, sin)[0], rtol=1e-12,
                                  atol=1e-12)
        except Exception:  # noqa: BLE001 - another convention: rotate with the model's own function
            same = False
        return None if same else functools.partial(_rotate_each, fn, None, with_unsqueeze=True)
    if len(params) == 3:  # (tensor, sin, cos): one tensor at a time
        rotary_dim = getattr(attn, "rotary_dim", None)
        return functools.partial(_rotate_each, fn, rotary_dim if isinstance(rotary_dim, int) else None)
    d = _head_dim(attn)
    g = torch.Generator().manual_seed(0)
    # on the CPU explicitly: from_pretrained builds layers under a meta-device context
    q, k = (torch.randn(1, 3, 2, d, dtype=torch.float64, generator=g, device="cpu") for _ in range(2))
    for width in (d, d // 2):
        cos, sin = (torch.randn(1, 3, width, dtype=torch.float64, generator=g, device="cpu") for _ in range(2))
        try:
            theirs = fn(q, k, cos, sin, unsqueeze_dim=2)  # [B, C, H, d] layout: cos / sin unsqueezed at 2
        except Exception:  # noqa: BLE001 - not this width (or another signature: ours; the check compares)
            continue
        ours = _apply_rope(q, k, cos, sin)
        same = all(torch.allclose(a, b, rtol=1e-12, atol=1e-12) for a, b in zip(theirs, ours))
        return None if same else fn
    return None


def _rotate_each(fn, rotary_dim: Optional[int], q: torch.Tensor, k: torch.Tensor, first: torch.Tensor,
                 second: torch.Tensor, unsqueeze_dim: int = 2, with_unsqueeze: bool = False):
    """q and k [B, C, H, d] each rotated by the model's one-tensor ``fn(t, first, second)`` (GPT-J / CodeGen:
    ``(tensor, sin, cos)``, ``first`` / ``second`` [B, C, r / 2] as the model's rotary module returns them), on
    their first ``rotary_dim`` dims (None: all); the other dims pass through. ``with_unsqueeze``: the function
    takes ``unsqueeze_dim`` (Gemma 4's ``(tensor, cos, sin, unsqueeze_dim)``), which is passed on."""
    kw = {"unsqueeze_dim": unsqueeze_dim} if with_unsqueeze else {}

    def one(t):
        if rotary_dim is None or rotary_dim >= t.shape[-1]:
            return fn(t, first, second, **kw)
        return torch.cat([fn(t[..., :rotary_dim], first, second, **kw), t[..., rotary_dim:]], dim=-1)

    return one(q), one(k)


_ROPE_TEST_NODES = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.Compare, ast.Is,
                    ast.IsNot, ast.Eq, ast.NotEq, ast.Attribute, ast.Name, ast.Load, ast.Constant)


@functools.lru_cache(maxsize=None)
def _rope_condition(forward):
    """The compiled test of the first ``if`` around a rotary call in ``forward``'s source, when that test
    only reads ``self``'s attributes and the ``position_embeddings`` / ``alibi`` arguments; None when the forward
    rotates unconditionally, or when the test is something else (then the layer counts as rotating).
    Parsed once per attention class, not per layer."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward))))
    except (OSError, TypeError, SyntaxError):
        return None
    def rotates(stmts):
        return any(isinstance(n, ast.Call) and "rotary" in ast.unparse(n.func) for stmt in stmts for n in ast.walk(stmt))

    for node in ast.walk(tree):
        if not isinstance(node, ast.If) or not rotates(node.body):
            continue
        if rotates(node.orelse):  # both branches rotate (GPT-J: part of the head, or all of it)
            return None
        test = ast.Expression(node.test)
        if not all(isinstance(n, _ROPE_TEST_NODES) for n in ast.walk(test)) or any(
                isinstance(n, ast.Name) and n.id not in ("self", "position_embeddings", "alibi") for n in ast.walk(test)):
            return None
        return compile(test, "<rope condition>", "eval")
    return None


@functools.lru_cache(maxsize=None)
def _never_rotates(forward) -> bool:
    """Whether ``forward``'s source calls nothing named like a rotation (``*rotary*`` / ``*rope*``) and never
    reads ``position_embeddings``: attention over positions added to the model's input (OPT's learned,
    XGLM's sinusoidal). False where the source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(forward))))
    except (OSError, TypeError, SyntaxError):
        return False
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and any(w in ast.unparse(n.func).lower() for w in ("rotary", "rope")):
            return False
        if isinstance(n, ast.Name) and n.id == "position_embeddings":
            return False
    return True


def _uses_rope(attn: nn.Module, model_has_rotary: bool = True) -> bool:
    """Whether this attention rotates q and k. Models with layers that attend without rotary positions
    (NoPE) put the rotation under a condition: on the module's own settings, ``if self.use_rope:``
    (SmolLM3, Llama-4), ``if self.sliding_window is not None:`` (Cohere2's global layers), ``if
    self.sliding_window is None or self.is_sliding:`` (EXAONE-4); or on what the model passes, ``if
    position_embeddings is not None:`` (Granite-4's hybrid, whose NoPE models build no rotary module), ``if
    alibi is None:`` (Falcon, whose model gives an ALiBi bias iff its config says ``alibi``).
    The forward's source is read for an ``if`` around a rotary call whose test only reads those, and the
    test is evaluated on this module, with ``position_embeddings`` present iff ``model_has_rotary``, ``alibi``
    iff the attention's config has ``alibi=True``;
    anything else counts as rotating (the conversion check compares the layers anyway). A forward that
    calls no rotation at all (OPT, XGLM, BioGPT: positions added to the input) does not rotate."""
    forward = getattr(type(attn), "forward", None)
    try:
        if _never_rotates(forward):
            return False
        condition = _rope_condition(forward)
    except TypeError:  # an unhashable forward: nothing to read
        return True
    if condition is None:
        return True
    try:
        alibi = getattr(getattr(attn, "config", None), "alibi", None) is True
        return bool(eval(condition, {"__builtins__": {}},
                         {"self": attn, "position_embeddings": _PRESENT if model_has_rotary else None,
                          "alibi": _PRESENT if alibi else None}))
    except Exception:  # noqa: BLE001 - an attribute the module lacks: assume it rotates
        return True


_ATTN_DROPOUTS = ("resid_attn_dropout", "post_attention_dropout", "resid_dropout")  # Phi-3, GPT-NeoX, Phi-1 / 2
_MLP_DROPOUTS = ("resid_mlp_dropout", "post_mlp_dropout", "resid_dropout")
_PRESENT = ("cos", "sin")  # stands for the (cos, sin) pair a model with a rotary module passes


def _output_gated(attn: nn.Module) -> bool:
    """Attention whose ``q_proj`` also makes a per-head output gate (Qwen3-Next / Qwen3.5's gated attention:
    twice ``o_proj``'s input width; the output is ``o_proj(attention * sigmoid(gate))``)."""
    wq = getattr(getattr(attn, "q_proj", None), "weight", None)
    wo = getattr(getattr(attn, "o_proj", None), "weight", None)
    return isinstance(wq, torch.Tensor) and isinstance(wo, torch.Tensor) and wq.dim() == 2 and wo.dim() == 2 \
        and wq.shape[0] == 2 * wo.shape[1]


def _autocast_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q, k, v in ``torch.autocast``'s dtype while it is on for their device, else as they are. The model's own
    layer hands them to SDPA, which autocast casts so (it is on autocast's lower-precision list); the MoD
    layer's attention (``gmod.attention``, which takes one dtype, or SDPA) and its compact cache get them
    the same way. Without this, a query norm's float32 output (autocast promotes RMSNorm's float32 scale times a
    bfloat16 input) would meet bfloat16 values."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of [B, C, H, d] compact rows with torch's SDPA (``attention="sdpa"``), as
    [B, C, Hq, d]. Every row has q_len = k_len = its count, so plain causal attention over the C slots
    is ``gmod.attention(q, k, v, count, count)`` on the first count rows: a kept query sees only
    kept keys before it. The rows past count differ (SDPA attends them to what precedes them; the
    gmod kernel writes zeros), but nothing reads them: the merge scatters the first count rows and
    gives the others a zero gradient, so they add nothing to dq / dk / dv either."""
    Hq, Hk = q.shape[2], k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if Hq == Hk:
        return sdpa(qt, kt, vt, is_causal=True, scale=scale).transpose(1, 2)
    try:
        return sdpa(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    except TypeError:  # torch < 2.5 has no enable_gqa: repeat the kv heads
        kt, vt = (t.repeat_interleave(Hq // Hk, dim=1) for t in (kt, vt))
        return sdpa(qt, kt, vt, is_causal=True, scale=scale).transpose(1, 2)


def attention_backend(setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel a whole-sequence MoD attention runs on: ``GmodConfig.attention``, where "auto" means
    "sdpa" for bf16 / fp16 on CUDA (torch's fused causal kernels; on an H100, 2026-11-26, cuDNN ran
    1.3-1.5x ``gmod.attention``'s forward TFLOP/s and 1.5-1.8x its backward's, and the 7B-shaped model's
    train step was 1.47x dense with SDPA against 1.41x with gmod) and "gmod" elsewhere
    (CPU, float32: the gmod kernels, whose results the CPU tests and the demo's numbers are made of)."""
    if setting != "auto":
        return setting
    return "sdpa" if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else "gmod"


def _layer_type(attn: nn.Module) -> Optional[str]:
    """The attention's entry of ``config.layer_types`` ("sliding_attention", "full_attention", ...), or None."""
    types = getattr(getattr(attn, "config", None), "layer_types", None)
    i = getattr(attn, "layer_idx", None)
    return types[i] if isinstance(types, (list, tuple)) and isinstance(i, int) and 0 <= i < len(types) else None


def _typed_rope_is_none(attn: nn.Module, layer_type: Optional[str]) -> bool:
    """Whether the model's rope settings are per layer type and this layer's type has none (Cohere Compass:
    ``rope_parameters = {"sliding_attention": {...}, "full_attention": None}``): the model then gives
    these layers no position embeddings, and they attend without rotation (NoPE)."""
    params = getattr(getattr(attn, "config", None), "rope_parameters", None)
    return isinstance(params, dict) and layer_type is not None and layer_type in params and params[layer_type] is None


def _head_dim(attn: nn.Module) -> int:
    """The attention's head dim: ``head_dim``, or GPT-NeoX's ``head_size``."""
    d = getattr(attn, "head_dim", None)
    return int(d if d is not None else attn.head_size)


def _out_proj(attn: nn.Module) -> nn.Module:
    """The attention's output projection: ``o_proj``, ``dense`` (Phi-1 / 2, GPT-NeoX), ``out_proj`` (OPT) or
    ``c_proj`` (GPT-2)."""
    return out_projection(attn)


def _qk_norm(attn: nn.Module, name: str, t: torch.Tensor, B: int, C: int, head_dim: int) -> torch.Tensor:
    """Projection [B, C, H*d] -> [B, C, H, d] with the optional q/k norm: per head (Qwen3 style,
    norm over head_dim) or over the whole projection (OLMo-2 style, applied before the split)."""
    norm = getattr(attn, name, None)
    if norm is None:  # Phi-1 / 2 name them q_layernorm / k_layernorm (present when config.qk_layernorm)
        norm = getattr(attn, name.replace("_norm", "_layernorm"), None)
    if norm is None:
        return t.view(B, C, -1, head_dim)
    w = getattr(norm, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() != head_dim:
        return norm(t).view(B, C, -1, head_dim)
    return norm(t.view(B, C, -1, head_dim))  # per head (Cohere's weights are [heads, head_dim])


def _post_rope_norm(attn: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """HunYuan norms q / k per head *after* the rotation (``query_layernorm`` / ``key_layernorm``), and
    Llama-4 both with one parameter-free L2 norm (``qk_norm``, on its RoPE layers only)."""
    norm = getattr(attn, name, None)
    return norm(t) if isinstance(norm, nn.Module) else t


_UNSCALED_ATTENTIONS = ("GPTNeoSelfAttention",)  # scores q.k, not divided by sqrt(d) (GPT-Neo, its flash one too)


def _unscaled(attn: nn.Module) -> bool:
    return any(c.__name__ in _UNSCALED_ATTENTIONS for c in type(attn).__mro__)


def _sliding_window(attn: nn.Module) -> Optional[int]:
    """The attention's sliding window in tokens, or None. ``is_sliding = False`` means none; else the
    module's own ``sliding_window`` decides where it has one (transformers sets it per layer from
    ``config.layer_types``); else the config's, unless ``use_sliding_window`` is False or
    ``layer_types`` says this layer attends fully. 0 means none (Qwen2-MoE's config default). GPT-Neo's
    ``attention_type`` "local" layers see the last ``config.window_size`` positions, its "global" ones all."""
    kind = getattr(attn, "attention_type", None)
    if kind in ("local", "global") and isinstance(getattr(getattr(attn, "config", None), "window_size", None), int):
        return int(attn.config.window_size) if kind == "local" else None
    if getattr(attn, "is_sliding", None) is False:
        return None  # a global layer of a hybrid whose modules all keep the config's window (EXAONE-4)
    if hasattr(attn, "sliding_window"):
        w = attn.sliding_window
    else:
        cfg = getattr(attn, "config", None)
        if cfg is None or getattr(cfg, "use_sliding_window", True) is False:
            return None
        types, idx = getattr(cfg, "layer_types", None), getattr(attn, "layer_idx", None)
        if isinstance(types, (list, tuple)) and isinstance(idx, int) and 0 <= idx < len(types) \
                and types[idx] != "sliding_attention":
            return None
        w = getattr(cfg, "sliding_window", None)
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None


def _binding_chunk(attn: nn.Module, length: int, always: bool = False) -> Optional[int]:
    """Llama-4's chunked attention: the chunk size of a ``"chunked_attention"`` layer (a query sees the
    earlier keys of its own chunk of ``config.attention_chunk_size`` positions, counted from the row's first
    real token) when ``length`` positions exceed it (or ``always``), else None (every key is in the query's
    chunk)."""
    size = getattr(getattr(attn, "config", None), "attention_chunk_size", None)
    if _layer_type(attn) != "chunked_attention" or not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return None
    return size if length > size or always else None


def _chunk_ids(pos: torch.Tensor, routing, size: int) -> torch.Tensor:
    """[B, n] chunk of each position ``pos`` [B, n] (sequence columns): ``(pos - left padding) // size``."""
    pos = pos.to(torch.int64)
    left = getattr(routing, "left_pad", None)
    if left is not None:
        pos = pos - left.to(device=pos.device, dtype=torch.int64).unsqueeze(1)
    return torch.div(pos, size, rounding_mode="floor")


def _temperature(attn: nn.Module, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Llama-4's attention temperature tuning on its NoPE layers: q [B, n, H, d] of the tokens at sequence
    positions ``pos`` [B, n] times ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`` (float32, back to
    q's dtype, as the model computes it); q itself elsewhere."""
    if getattr(attn, "attn_temperature_tuning", False) is not True or getattr(attn, "use_rope", True):
        return q
    scales = torch.log1p(torch.floor((pos.to(device=q.device, dtype=torch.float32) + 1.0) / attn.floor_scale))
    return (q * (scales * attn.attn_scale + 1.0)[:, :, None, None]).to(q.dtype)


def _binding_window(attn: nn.Module, length: int) -> Optional[int]:
    """The sliding window if it changes what a query sees among ``length`` positions, else None (the
    fused causal kernels then compute the same thing)."""
    window = _sliding_window(attn)
    return window if window is not None and length > window else None


@functools.lru_cache(maxsize=None)
def _returned_arity(base: type) -> Optional[int]:
    """How ``base.forward`` returns: 0 for one tensor (transformers 5's decoder layers), n for a tuple of n
    whose first element is the hidden states (Falcon's ``return output, attn_weights``), None when its
    ``return`` statements cannot tell (then the conversion check sees what it returns)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(base.forward))))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if fn is None:
        return None
    arities = set()
    stack = list(fn.body)
    while stack:  # the forward's own returns (not those of functions defined inside it)
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            v = node.value
            arities.add(len(v.elts) if isinstance(v, ast.Tuple) and not any(isinstance(e, ast.Starred) for e in v.elts)
                        else (0 if isinstance(v, ast.Name) else None))
        stack.extend(ast.iter_child_nodes(node))
    return arities.pop() if len(arities) == 1 else None


_POSITIONAL: dict[type, tuple] = {}


def _bind_positional(base: type, args: tuple, kwargs: dict) -> dict:
    """``kwargs`` plus the positional arguments after ``hidden_states`` of a call to ``base.forward``, named
    by its signature (read once per class, through transformers' keyword-renaming decorators)."""
    names = _POSITIONAL.get(base)
    if names is None:
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = [p.name for p in inspect.signature(base.forward).parameters.values() if p.kind in kinds]
        names = _POSITIONAL[base] = tuple(params[2:])  # after self and hidden_states
    if len(args) > len(names):
        raise TypeError(f"gmod: {base.__name__}.forward takes {len(names) + 1} positional arguments after self, "
                        f"but {len(args) + 1} were given")
    out = dict(kwargs)
    for name, value in zip(names, args):
        if name in out:
            raise TypeError(f"gmod: {base.__name__}.forward got multiple values for argument {name!r}")
        out[name] = value
    return out


class MoDDecoderLayer:
    """Mixin of the MoD layer classes (``isinstance(layer, MoDDecoderLayer)`` tells a MoD layer).

    Instance attributes set by :func:`make_mod_layer`: ``gmod_layer_idx``, ``gmod_ratio`` (skip
    ratio), ``_gmod_state`` (:class:`~gmod_ext.router.GmodState`, shared with the model) and, for a
    per-layer router, the submodule ``gmod_router``.
    """

    _gmod_base_class: type = None

    # ------------------------------------------------------------------ call
    def __call__(self, *args, **kwargs):
        # A decoder stack that does not pass keywords on to its layers (Falcon, GPT-NeoX-Japanese) does not pass
        # the hook's gmod_routing either: take the routing of the forward in flight. Here, outside the wrapped
        # class's __call__, so that gradient checkpointing's recomputation gets the same keywords.
        if "gmod_routing" not in kwargs:
            state = self.__dict__.get("_gmod_state")
            if state is not None and state.active is not None:
                kwargs["gmod_routing"] = state.active
        return super().__call__(*args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The wrapped layer's call: ``hidden_states``, then its other arguments by the wrapped class's own
        signature (GPT-2's model passes the cache and the mask positionally), or as keywords."""
        if args:
            kwargs = _bind_positional(self._gmod_base_class, args, kwargs)
        if kwargs.get("encoder_hidden_states") is not None:
            raise NotImplementedError(
                f"gmod: MoD layer {self.gmod_layer_idx} was given encoder_hidden_states: MoD layers reproduce "
                "decoder self-attention only, not cross-attention to an encoder")
        out = self._gmod_call(hidden_states, kwargs)
        n = self.__dict__.get("_gmod_arity") or 0
        if n and isinstance(out, torch.Tensor):  # the wrapped layer's tuple: (hidden states, None, ...)
            return (out,) + (None,) * (n - 1)
        return out

    def _gmod_call(self, hidden_states: torch.Tensor, kwargs: dict):
        routing = kwargs.pop("gmod_routing", None)
        attention_mask = kwargs.pop("attention_mask", None)
        position_ids = kwargs.pop("position_ids", None)
        use_cache = kwargs.pop("use_cache", False)
        position_embeddings = kwargs.pop("position_embeddings", None)
        alibi = pop_alibi(kwargs)  # BLOOM / Falcon's alibi, MPT's position_bias: a bias per key column
        # transformers >= 5.24 passes the KV cache as `cache`, earlier releases as `past_key_values`.
        past_key_values = pop_cache(kwargs)
        if past_key_values is not None:
            return self.gmod_forward_with_cache(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                routing=routing,
                alibi=alibi,
                **kwargs,
            )
        return self.gmod_forward(hidden_states, position_embeddings, position_ids=position_ids, routing=routing,
                                 alibi=alibi, per_layer_input=kwargs.get(block_extras.PER_LAYER_INPUT))

    def gmod_forward_with_cache(self, hidden_states, *, past_key_values, routing=None, alibi=None, **kwargs):
        """A call with a KV cache (prefill / decode), see :mod:`gmod_ext.cache`.

        ``on_cache="compact"`` (what :func:`gmod_ext.convert` sets): this layer keeps a compact
        cache of the tokens it processed (a :class:`~gmod_ext.cache.GmodLayer` slot of the cache;
        a plain ``DynamicCache`` gets one on first use). The first call on an empty slot is the
        prefill: routed like :meth:`gmod_forward` (top-k / threshold, and ``gmod_prefill_len``),
        computed exactly like it (attention over the step's own keys), and the kept tokens' keys /
        values are appended. Every later call routes each new token by
        ``p >= config.decode_threshold`` (:meth:`gmod_forward_decode`). ``on_cache="dense"`` runs
        the wrapped layer densely (every token, ungated); ``on_cache="error"`` raises.
        """
        cfg: GmodConfig = self._gmod_state.config
        if cfg.on_cache == "dense":  # the wrapped layer, with the cache under the name it takes
            kwargs[cache_kwarg_of(super().forward)] = past_key_values
            if alibi is not None:
                kwargs[alibi.kind] = alibi.tensor
            return super().forward(hidden_states, **kwargs)
        if cfg.on_cache != "compact":
            raise NotImplementedError(
                f"gmod: MoD layer {self.gmod_layer_idx} was called with a KV cache (past_key_values) but on_cache="
                f"{cfg.on_cache!r}. Convert with on_cache='compact' (the default of gmod_ext.convert) to use the "
                "compact MoD KV cache, or on_cache='dense' to process every token of MoD layers densely when a cache "
                "is given, or run the model with use_cache=False."
            )
        from .cache import gmod_layer_cache

        slot = gmod_layer_cache(past_key_values, self.gmod_layer_idx)
        # the tokens no later query can see are dropped: those out of a sliding window, and (Llama-4's chunked
        # layers) those more than a chunk behind, as a dense chunked layer keeps only its last chunk
        slot.window = _sliding_window(self._gmod_attn()) or _binding_chunk(self._gmod_attn(), 0, always=True)
        x = hidden_states
        S = x.shape[-2]  # (an AltUp block's input is [K, B, S, D])
        pe = kwargs.get("position_embeddings")
        pos = kwargs.get("position_ids")
        e = kwargs.get(block_extras.PER_LAYER_INPUT)
        if slot.seen == 0 and not slot.is_initialized:
            y = self.gmod_forward(x, pe, position_ids=pos, routing=routing, kv_cache=slot, alibi=alibi,
                                  per_layer_input=e)
            slot.prefill_len = S
        else:
            y = self.gmod_forward_decode(x, slot, pe, position_ids=pos, routing=routing, alibi=alibi,
                                         per_layer_input=e)
        slot.seen += S
        slot.trim_window()  # a sliding window: drop what no later query sees
        return y

    # ------------------------------------------------------------------ parts
    def gmod_router_module(self) -> GmodRouter:
        router = self._modules.get("gmod_router")
        if router is None:
            router = self._gmod_state.router
        if router is None:
            raise RuntimeError(f"gmod: MoD layer {self.gmod_layer_idx} has no router")
        return router

    def gmod_logits(self, hidden_states: torch.Tensor, routing: Optional[RoutingInfo] = None) -> torch.Tensor:
        """Router logit difference l1 - l0 [B, S] fp32 on this layer's input norm (RMSNorm with the
        norm's own scale: ``weight``, or ``1 + weight`` for Gemma's offset norms; a plain RMSNorm where the
        block has no input norm (OLMo-2) or one without a weight (OLMo)). ``routing``: the forward's
        routing, through which the layers sharing the model's router share its weight difference."""
        ln1 = self._gmod_norm("attn_in")
        router = self.gmod_router_module()
        shared = routing if router is self._gmod_state.router else None
        w = getattr(ln1, "weight", None)
        if not isinstance(w, torch.Tensor):
            return router(hidden_states, None, 1e-6 if ln1 is None else _norm_eps(ln1), routing=shared)
        w = w + 1.0 if getattr(self, "_gmod_norm_offset", False) else w
        return router(hidden_states, w, _norm_eps(ln1), routing=shared)

    def _gmod_rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        rotary = self._gmod_state.rotary
        if rotary is None:
            raise RuntimeError(
                "gmod: this MoD layer needs the model's rotary embedding module (positions='compact', or "
                "no position_embeddings given); convert the whole model with gmod_ext.convert"
            )
        if getattr(rotary, "mrope_section", None) is not None and position_ids.dim() == 2:
            # an M-RoPE rotary (time, height, width positions): the same 1-D positions on all three axes
            # (some releases' rotaries index a leading axis of 3 and do not broadcast 2-D ids)
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        layer_type = self.__dict__.get("_gmod_rotary_type")  # Gemma-3: one module, local / global angles
        return rotary(x, position_ids) if layer_type is None else rotary(x, position_ids, layer_type)

    def _gmod_check_alibi(self, alibi: Optional[AlibiBias]) -> None:
        if alibi is not None and self._gmod_state.config.positions == "compact":
            raise NotImplementedError(
                f"gmod: MoD layer {self.gmod_layer_idx} was given an ALiBi bias (BLOOM, MPT, Falcon with alibi=True) "
                "with positions='compact': ALiBi's distances come from the model's bias at the tokens' original "
                "positions; convert with positions='original' (the default)")

    def gmod_decode_keep(self, logits: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The decode rule, bool [B, S]: ``p >= config.decode_threshold`` or forced, never padding.

        Used by the cached decode step and, for positions ``>= gmod_prefill_len``, by a full
        forward, so both make bit-identical decisions from the same logits.
        """
        thr = float(self._gmod_state.config.decode_threshold)
        keep = torch.sigmoid(logits.detach()) >= thr
        if mask is not None:
            keep = (keep | (mask == ops.MASK_FORCED)) & (mask != ops.MASK_NEVER)
        return keep

    def _gmod_rotates(self, alibi: Optional[AlibiBias]) -> bool:
        """Whether this layer rotates q and k: not in a NoPE layer, nor where the model gives an ALiBi bias
        (Falcon rotates only without one)."""
        return alibi is None and self.__dict__.get("_gmod_uses_rope", True)

    def _gmod_positions(self, x, xs, idx, count, C, position_embeddings, position_ids, start=None, seg=None,
                        rotate=True, routing: Optional[RoutingInfo] = None):
        """cos / sin [B, C, r] of the kept tokens: gathered at their original positions, or the
        compact positions ``start + arange(C)`` (``start``: tokens already in this layer's cache;
        ``seg`` [B, C]: the kept tokens' packed-sequence ids, each sequence counting from 0); None, None
        where the layer does not rotate (``rotate``: :meth:`_gmod_rotates`). ``routing``: the forward's
        routing, through which its layers share the angles expanded to the batch (one copy per forward)."""
        B, S = x.shape[0], x.shape[1]
        cfg: GmodConfig = self._gmod_state.config
        if not rotate:  # a NoPE layer: no positions to gather (the model may have no rotary at all)
            return None, None
        if cfg.positions == "compact":
            pos = torch.arange(C, device=x.device).unsqueeze(0)
            if seg is not None:  # minus the slot where the token's sequence starts
                first = torch.ones(B, C, dtype=torch.bool, device=x.device)
                first[:, 1:] = seg[:, 1:] != seg[:, :-1]
                pos = pos - torch.where(first, pos, torch.zeros_like(pos)).cummax(1).values
            if start is not None:
                pos = pos + start.to(device=x.device, dtype=pos.dtype).unsqueeze(1)
            cos, sin = _cos_sin(self._gmod_rotary(xs, pos))
            return cos.expand(B, -1, -1), sin.expand(B, -1, -1)
        given = position_embeddings is not None
        if not given:
            if position_ids is None:
                position_ids = torch.arange(S, device=x.device).unsqueeze(0)
            position_embeddings = self._gmod_rotary(x, position_ids)
        cos, sin = _cos_sin(position_embeddings)
        if routing is not None and given and cos is position_embeddings[0] and (
                cos.shape[0] != B or not cos.is_contiguous() or not sin.is_contiguous()):
            # the model's [1, S, r] angles, the same for every layer: expanded to the batch once per forward
            key = ("batch_angles", id(cos), id(sin), B)
            cos, sin = routing.memo(key, lambda: _batch_angles(cos, sin, B), keep=(cos, sin))
        else:
            cos, sin = _batch_angles(cos, sin, B)
        return ops.gather_rows(cos, idx, count), ops.gather_rows(sin, idx, count)

    def _gmod_qkv(self, xs, cos, sin):
        """q, k, v [B, C, H, d] of the kept tokens, rotated by ``cos`` / ``sin`` (None: not rotated), the
        attention scale, and the output gate (Qwen3-Next) or None."""
        attn = self._gmod_attn()
        B, C = xs.shape[0], xs.shape[1]
        h_in = self._gmod_attn_in(xs)
        if mla.is_mla(attn):  # k / v: the latent's two halves, as the compact cache stores them (_gmod_kv)
            q, k, v = mla.qkv(attn, h_in, cos, sin)
            return q, k, v, float(attn.scaling), None
        head_dim = _head_dim(attn)
        gate = None
        if isinstance(getattr(attn, "q_proj", None), nn.Module):
            q_, k_ = attn.q_proj(h_in), attn.k_proj(h_in)
            # Gemma 4's full-attention layers with attention_k_eq_v have no v_proj: the values are the keys
            # as projected, before the key norm and the rotation
            v_ = k_ if attn.v_proj is None else attn.v_proj(h_in)
            if _output_gated(attn):  # Qwen3-Next / 3.5: per head, the query's d dims then its gate's d
                q_, gate = q_.view(B, C, -1, 2 * head_dim).chunk(2, dim=-1)
                q_, gate = q_.reshape(B, C, -1), gate.reshape(B, C, -1)
            elif isinstance(getattr(attn, "gate_proj", None), nn.Module):  # AFMoE: a projection of its own
                gate = attn.gate_proj(h_in)
        elif isinstance(getattr(attn, "c_attn", None), nn.Module):
            if getattr(attn, "multi_query", None) is False:  # GPTBigCode's multi-head variant: per head, q, k, v
                qkv = attn.c_attn(h_in).view(B, C, -1, 3 * head_dim)
                q_, k_, v_ = (t.reshape(B, C, -1) for t in qkv.chunk(3, dim=-1))
            else:  # GPT-2: all queries, then keys, then values (GPTBigCode's multi-query: one key / value head)
                kv = getattr(attn, "kv_dim", attn.split_size)
                q_, k_, v_ = attn.c_attn(h_in).split((attn.split_size, kv, kv), dim=-1)
        elif isinstance(getattr(attn, "query_key_value", None), nn.Module):
            qkv = attn.query_key_value(h_in)
            if getattr(attn, "new_decoder_architecture", False) is True:
                # Falcon-40B / 180B, Falcon-2: per key / value head, its group's queries, then its key and value
                Hk = (qkv.shape[-1] // head_dim - attn.num_heads) // 2
                g = qkv.view(B, C, Hk, -1, head_dim)
                q_, k_, v_ = (t.reshape(B, C, -1) for t in (g[:, :, :, :-2], g[:, :, :, -2], g[:, :, :, -1]))
            elif getattr(attn, "multi_query", False) is True:  # Falcon-7B: every query head, then one key, one value
                g = qkv.view(B, C, -1, head_dim)
                q_, k_, v_ = g[:, :, :-2].reshape(B, C, -1), g[:, :, -2], g[:, :, -1]
            else:  # GPT-NeoX (and Falcon's multi-head variant): per head, its q, k, v
                q_, k_, v_ = (t.reshape(B, C, -1) for t in qkv.view(B, C, -1, 3 * head_dim).chunk(3, dim=-1))
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module) and isinstance(getattr(attn, "mp_num", None), int):
            # CodeGen: mp_num model-parallel groups, each its share of the queries, then values, then keys
            g = attn.qkv_proj(h_in).view(B, C, attn.mp_num, -1)
            q_, v_, k_ = (t.reshape(B, C, -1) for t in g.split(g.shape[-1] // 3, dim=-1))
        elif isinstance(getattr(attn, "Wqkv", None), nn.Module):  # MPT: thirds, clipped where it says so
            qkv = attn.Wqkv(h_in)
            clip = getattr(attn, "clip_qkv", None)
            if isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip:
                qkv = qkv.clamp(min=-clip, max=clip)
            q_, k_, v_ = qkv.chunk(3, dim=-1)
        else:  # one fused projection (Phi-3): queries, then keys, then values
            qkv = attn.qkv_proj(h_in)
            nq = qkv.shape[-1] - 2 * _kv_heads(attn) * head_dim
            q_, k_, v_ = qkv.split([nq, (qkv.shape[-1] - nq) // 2, (qkv.shape[-1] - nq) // 2], dim=-1)
        q = _qk_norm(attn, "q_norm", q_, B, C, head_dim)
        k = _qk_norm(attn, "k_norm", k_, B, C, head_dim)
        v = _qk_norm(attn, "v_norm", v_, B, C, head_dim)  # Gemma 4 norms values per head (without a scale)
        rope = self.__dict__.get("_gmod_rope")
        if cos is None:
            pass  # a NoPE (or ALiBi) layer: no rotation
        elif rope is complex_rotation:  # (float32 complex, as the model's freqs_cis)
            q, k = rope(q, k, cos, sin, unsqueeze_dim=2)
        elif rope is not None:  # the model's own rotation (GLM's interleaved pairs)
            q, k = rope(q, k, cos.to(q.dtype), sin.to(q.dtype), unsqueeze_dim=2)
        else:
            q, k = _apply_rope(q, k, cos, sin)
        q, k = _post_rope_norm(attn, "query_layernorm", q), _post_rope_norm(attn, "key_layernorm", k)
        q, k = _post_rope_norm(attn, "qk_norm", q), _post_rope_norm(attn, "qk_norm", k)  # Llama-4's L2 norm
        scale = getattr(attn, "scaling", None)
        if scale is None:  # MPT's name (a setting, None: the default)
            scale = getattr(attn, "softmax_scale", None)
        if scale is None:
            scale = 1.0 if _unscaled(attn) else 1.0 / math.sqrt(head_dim)
        return q.contiguous(), k.contiguous(), v.contiguous(), float(scale), gate

    def _gmod_kv(self, k: torch.Tensor, v: torch.Tensor):
        """The keys and values to attend over, from what :meth:`_gmod_qkv` returned or the compact cache holds:
        themselves, or an MLA attention's latents expanded (values zero-padded to the key width)."""
        attn = self._gmod_attn()
        if diff_attention.is_differential(attn):  # DiffLlama: one attention over [v1 | v2] (2d wide)
            return k, diff_attention.values(v)
        return mla.expand(attn, k, v) if mla.is_mla(attn) else (k, v)

    def _gmod_heads_out(self, o: torch.Tensor) -> torch.Tensor:
        """[B, C, H, d] attention output as [B, C, H * dv]: MLA's values are narrower than its keys (cut back);
        DiffLlama's two halves combined (gmod_ext.diff_attention)."""
        attn = self._gmod_attn()
        if diff_attention.is_differential(attn):
            return diff_attention.combine(attn, o)
        dv = mla.value_dim(attn)
        if dv is not None:
            o = o[..., :dv]
        return o.reshape(o.shape[0], o.shape[1], -1)

    def _gmod_norm(self, role: str) -> Optional[nn.Module]:
        """The block's norm in ``role`` ("attn_in", "attn_out", "mlp_in", "mlp_out"), or None
        (:mod:`gmod_ext.block_layout`)."""
        name = getattr(self._gmod_block_layout(), role)
        return None if name is None else self._modules[name]

    def _gmod_block_layout(self):
        """The block's :class:`~gmod_ext.block_layout.BlockLayout`, recorded at conversion."""
        layout = self.__dict__.get("_gmod_layout")
        if layout is None:  # a MoD layer pickled before layouts were recorded: read it off the block now
            layout = self.__dict__["_gmod_layout"] = block_layout(self)
        return layout

    def _gmod_parallel(self) -> bool:
        return self._gmod_block_layout().parallel

    def _gmod_attn_in(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._gmod_norm("attn_in")
        return x if norm is None else norm(x)

    def _gmod_attn_out(self, o: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """What the attention adds to the residual stream: o_proj(o) (o_proj(o * sigmoid(gate)) with an
        output-gated attention: Qwen3-Next's gate from q_proj, AFMoE's from gate_proj; o_proj(attn_sub_norm(o))
        in BitNet), normed where the block norms the attention output (Gemma-2 / 3, GLM-4, OLMo-2), dropped out
        where it does (Phi-3, in training)."""
        if gate is not None:
            o = o * torch.sigmoid(gate)
        attn = self._gmod_attn()
        sub_norm = attn._modules.get("attn_sub_norm")  # BitNet normalises the attention output before o_proj
        if sub_norm is not None:
            o = sub_norm(o)
        a = _out_proj(attn)(o)
        bias = attn._parameters.get("dense_bias")  # GPT-NeoX-Japanese's last layer: a bias kept apart from dense
        if bias is not None:
            a = a + bias
        layout = self._gmod_block_layout()
        if layout.family in ("gpt2", "gptj"):  # inside their attention modules: GPT-2, GPT-J
            a = attn.resid_dropout(a)
        elif layout.attn in layout.adds_residual:
            # so does BLOOM's (with its float hidden_dropout), which adds the residual itself
            p = attn.__dict__.get("hidden_dropout")
            if isinstance(p, float) and p > 0:
                a = nn.functional.dropout(a, p=p, training=self.training)
        norm = self._gmod_norm("attn_out")
        if norm is not None:
            a = norm(a)
        return self._gmod_residual_scale(self._gmod_dropout(a, _ATTN_DROPOUTS))

    def _gmod_dropout(self, update: torch.Tensor, names: tuple) -> torch.Tensor:
        """The block's residual dropout on an update, the first of ``names`` it has: Phi-3's
        ``resid_attn_dropout`` / ``resid_mlp_dropout``, GPT-NeoX's ``post_attention_dropout`` /
        ``post_mlp_dropout``, or Phi-1 / 2's one ``resid_dropout`` for both (each call draws its own mask,
        as the block does); OPT's family's float ``dropout``."""
        for name in names:
            drop = self._modules.get(name)
            if isinstance(drop, nn.Module):
                return drop(update)
        p = self.__dict__.get("dropout")  # OPT's family: a float, applied with the functional dropout
        if self._gmod_block_layout().mlp_act is not None and isinstance(p, float) and p > 0:
            return nn.functional.dropout(update, p=p, training=self.training)
        return update

    def _gmod_attn(self) -> nn.Module:
        """The block's attention module (``self_attn``; GPT-NeoX's ``attention``; GPT-Neo's ``attn.attention``:
        ``BlockLayout.attn``)."""
        name = self._gmod_block_layout().attn
        return self._modules[name] if "." not in name else self.get_submodule(name)

    def _gmod_residual_scale(self, update: torch.Tensor) -> torch.Tensor:
        """Granite's blocks add ``update * residual_multiplier`` to the residual stream, MiniCPM3's
        ``update * residual_scale`` (``scale_depth / sqrt(layers)``): a float setting of the block, 1 or absent
        elsewhere."""
        k = self.__dict__.get("residual_multiplier", self.__dict__.get("residual_scale"))
        return update if not isinstance(k, (int, float)) or isinstance(k, bool) or k == 1 else update * k

    def _gmod_per_layer_input(self, e: Optional[torch.Tensor], B: int, S: int) -> Optional[torch.Tensor]:
        """The block's per-layer input [B, S, P], contiguous, checked; None for a block without one."""
        if not block_extras.has_per_layer_input(self):
            return None
        if not isinstance(e, torch.Tensor):
            raise ValueError(
                f"gmod: MoD layer {self.gmod_layer_idx} ({self._gmod_base_class.__name__}) adds a per-layer input "
                "embedding to each token and was not given one (per_layer_input, [B, S, hidden_size_per_layer_input]"
                "): call it from its model, which computes them")
        P = int(self.hidden_size_per_layer_input)
        if e.dim() != 3 or tuple(e.shape) != (B, S, P):
            raise ValueError(f"gmod: MoD layer {self.gmod_layer_idx}: per_layer_input must be [B, S, P] = "
                             f"{[B, S, P]}, got {list(e.shape)}")
        return e.contiguous()

    def _gmod_mlp(self, h: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """What the MLP adds: mlp(N_mi(h)), then N_mo (each where the block has it), then Phi-3's dropout;
        a parallel block (Cohere) runs its MLP on the block's input instead: mlp(N_in(xs)); Gemma 4's MoE
        blocks add their experts' output before N_mo (:func:`gmod_ext.block_extras.moe_branch_update`)."""
        if block_extras.has_moe_branch(self):
            return self._gmod_norm("mlp_out")(block_extras.moe_branch_update(self, h))
        if self._gmod_parallel():
            h = xs
        norm_in, norm_out = self._gmod_norm("mlp_in"), self._gmod_norm("mlp_out")
        if norm_in is not None:
            h = norm_in(h)
        layout = self._gmod_block_layout()
        if layout.mlp_act is not None:  # OPT's family: fc2(act(fc1(h))), the activation dropped out (XGLM, BioGPT)
            first, second = (self._modules[n] for n in layout.mlp)
            mid = getattr(self, layout.mlp_act)(first(h))
            p = self.__dict__.get("activation_dropout")
            if isinstance(p, float) and p > 0:
                mid = nn.functional.dropout(mid, p=p, training=self.training)
            return self._gmod_residual_scale(self._gmod_dropout(second(mid), _MLP_DROPOUTS))
        m = None
        for name in layout.mlp:  # mlp, or Granite's experts + shared MLP (summed)
            module = self._modules[name]
            # BLOOM's and MPT's MLPs add the residual themselves (after their dropout): give them zeros
            part = module(h, torch.zeros_like(h)) if name in layout.adds_residual else module(h)
            if isinstance(part, tuple):  # (output, router scores): GPT-OSS's MoE, as its block unpacks it
                part = part[0]
            if part.shape != h.shape and part.numel() == h.numel():  # Llama-4's MoE: flat [B * C, D]
                part = part.view(h.shape)
            m = part if m is None else m + part
        if norm_out is not None:
            m = norm_out(m)
        return self._gmod_residual_scale(self._gmod_dropout(m, _MLP_DROPOUTS))

    def _gmod_streams(self, x: torch.Tensor) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """``(None, x)`` for a block on one residual stream ([B, S, D], checked); an AltUp block's (Gemma 3n)
        ``(streams [K, B, S, D], the active stream [B, S, D])``: it routes on the active stream."""
        if block_extras.has_altup(self):
            return block_extras.altup_split(self, x)
        if x.dim() != 3:
            raise ValueError(f"gmod: hidden_states must be [B, S, D], got {tuple(x.shape)}")
        return None, x.contiguous()

    def _gmod_gather(self, x: torch.Tensor, streams: Optional[torch.Tensor], idx, count):
        """``(None, the kept tokens' rows of x)``; for AltUp ``(the kept tokens' predicted streams [K, B, C, D],
        the active one)``: the block then runs on the active stream's prediction."""
        if streams is None:
            return None, ops.gather_rows(x, idx, count)
        pred = self.altup.predict(block_extras.gather_streams(streams, idx, count))
        return pred, pred[int(self.config.altup_active_idx)]

    def _gmod_residual(self, xs: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention: ``xs + a``, or with Gemma 3n's LAuReL branch
        ``(xs + a + laurel(N_in(xs))) / sqrt(2)``."""
        if block_extras.has_laurel(self):
            return block_extras.laurel_residual(self, xs, a, self._gmod_attn_in(xs))
        return xs + a

    def _gmod_tanh_norm(self, logits: torch.Tensor) -> torch.Tensor:
        """p-MoD's TanhNorm weight ``w = a tanh(l) + b`` [B, S] float32."""
        cfg: GmodConfig = self._gmod_state.config
        return cfg.pmod_a * torch.tanh(logits) + cfg.pmod_b

    @staticmethod
    def _gmod_string_scale(w: torch.Tensor, mask) -> torch.Tensor:
        """p-MoD's STRing: each skipped token's scale [B, S], its TanhNorm weight ``w`` (1 for padding)."""
        return (w if mask is None else torch.where(mask == ops.MASK_NEVER, torch.ones_like(w), w)).contiguous()

    def _gmod_merge_altup(self, streams, pred, xs, h, m, logits, idx, count, mask, e_sel):
        """AltUp (Gemma 3n): the block's gated output on the active stream's prediction (in float32, rounded
        once: gamma ``h + p m``, mod ``xs + p (h + m - xs)``, pmod with p-MoD's ``w``), corrected into the kept
        tokens' K streams (:func:`~gmod_ext.block_extras.altup_correct`) and scattered back; a skipped token's K
        streams stay as they were (pmod: scaled by STRing)."""
        cfg: GmodConfig = self._gmod_state.config
        gate_mode = "none" if cfg.gate == "none" else cfg.variant
        m = m.to(h.dtype)
        skip = None
        if gate_mode == "none":
            out = h + m
        else:
            g = torch.sigmoid(logits) if gate_mode in ("gamma", "mod") else self._gmod_tanh_norm(logits)
            g_sel = ops.gather_rows(g.unsqueeze(-1), idx, count)  # [B, C, 1] float32
            if gate_mode == "gamma":
                out = (h.float() + g_sel * m.float()).to(h.dtype)
            else:
                out = (xs.float() + g_sel * (h.float() + m.float() - xs.float())).to(h.dtype)
            if gate_mode == "pmod":
                skip = self._gmod_string_scale(g, mask)
        corrected = block_extras.altup_correct(self, pred, out, e_sel)
        return block_extras.scatter_streams(streams, corrected, idx, count, skip_scale=skip)

    def _gmod_merge(self, x, xs, h, a, m, logits, idx, count, mask):
        cfg: GmodConfig = self._gmod_state.config
        # under torch.autocast the branches come out of their linear layers in its dtype, while the residual
        # stream keeps the model's: the model's own residual adds promote them to it, and so does the merge
        h, a, m = h.to(x.dtype), a.to(x.dtype), m.to(x.dtype)
        gate_mode = "none" if cfg.gate == "none" else cfg.variant
        if gate_mode == "none":
            return ops.scatter_merge(x, h + m, idx, count)
        if gate_mode == "gamma":
            p_sel = ops.gather_rows(torch.sigmoid(logits).unsqueeze(-1), idx, count).squeeze(-1)
            return ops.scatter_merge(x, h, idx, count, delta=m, gate=p_sel)
        if gate_mode == "mod":
            p_sel = ops.gather_rows(torch.sigmoid(logits).unsqueeze(-1), idx, count).squeeze(-1)
            return ops.scatter_merge(x, xs, idx, count, delta=a + m, gate=p_sel)
        if gate_mode == "pmod":
            w = self._gmod_tanh_norm(logits)
            w_sel = ops.gather_rows(w.unsqueeze(-1), idx, count).squeeze(-1)
            return ops.scatter_merge(x, xs, idx, count, delta=a + m, gate=w_sel,
                                     skip_scale=self._gmod_string_scale(w, mask))
        raise ValueError(cfg.variant)  # pragma: no cover - validated in GmodConfig

    def _gmod_skip_all(self, x, logits, mask, streams: Optional[torch.Tensor] = None):
        """The layer's output when no token of the step is kept (decode): x (AltUp: its K ``streams``), or
        p-MoD's STRing of it."""
        cfg: GmodConfig = self._gmod_state.config
        if cfg.gate == "none" or cfg.variant != "pmod":
            return x if streams is None else streams
        B, _, D = x.shape
        skip = self._gmod_string_scale(self._gmod_tanh_norm(logits), mask)
        idx = torch.full((B, 1), -1, dtype=torch.int32, device=x.device)
        count = torch.zeros(B, dtype=torch.int32, device=x.device)
        if streams is not None:
            rows = torch.zeros(streams.shape[0], B, 1, D, dtype=x.dtype, device=x.device)
            return block_extras.scatter_streams(streams, rows, idx, count, skip_scale=skip)
        base = torch.zeros(B, 1, D, dtype=x.dtype, device=x.device)
        return ops.scatter_merge(x, base, idx, count, skip_scale=skip)

    def _gmod_record(self, sink: RoutingInfo, logits, idx, count, mask, C):
        S = logits.shape[1]
        i = self.gmod_layer_idx

        def aux_loss() -> torch.Tensor:
            sel = selection_mask(idx, count, S)
            valid = None if mask is None else (mask != ops.MASK_NEVER)
            return router_aux_loss(logits, sel, valid)

        compiling = torch.compiler.is_compiling()
        if torch.is_grad_enabled() or compiling:
            aux = aux_loss()
            sink.aux[i] = aux
            aux_value = aux.detach()
        else:  # no gradient to take (generation, evaluation): computed if read (a loss with labels, the statistics)
            sink.aux[i] = Deferred(aux_loss)
            aux = sink.aux
            aux_value = functools.partial(aux.__getitem__, i)
        # the statistics when read (gmod_stats, a logging callback), not on every forward; while compiling, now
        stats = functools.partial(routing_stats, logits.detach(), count, mask, aux_value, C)
        sink.stats[i] = stats() if compiling else LazyStats(stats)
        sink.selection[i] = (idx, count)

    def _gmod_sink(self, routing: Optional[RoutingInfo]) -> RoutingInfo:
        if routing is not None:
            return routing
        state: GmodState = self._gmod_state
        if state.scratch is None:
            state.scratch = RoutingInfo()
        return state.scratch

    # ------------------------------------------------------------------ MoD forward
    def gmod_forward(
        self,
        x: torch.Tensor,
        position_embeddings=None,
        position_ids: Optional[torch.Tensor] = None,
        routing: Optional[RoutingInfo] = None,
        kv_cache=None,
        alibi: Optional[AlibiBias] = None,
        per_layer_input: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The MoD layer on a whole sequence (training, no-cache inference, cached prefill).

        Routing: top-k at the layer's skip ratio over the routable tokens (eval mode with
        ``config.threshold``: routable tokens with p > threshold, at most the top-k count). With
        ``routing.prefill_len = P < S`` (the model keyword ``gmod_prefill_len``) only positions
        ``< P`` are routed that way (top-k among them); positions ``>= P`` follow the decode rule
        (:meth:`gmod_decode_keep`), as they would have been routed one by one with a KV cache.
        ``kv_cache``: a :class:`~gmod_ext.cache.GmodLayer` to append the kept tokens' keys and
        values to (the cached prefill; everything else is exactly the cache-less computation).
        ``alibi``: the ALiBi bias the model gave the layer (:mod:`gmod_ext.alibi`), read at the kept keys'
        original positions. ``per_layer_input`` [B, S, P]: the token's per-layer embeddings, for a block that
        takes them (Gemma 4: :mod:`gmod_ext.block_extras`).
        """
        state: GmodState = self._gmod_state
        cfg: GmodConfig = state.config
        streams, x = self._gmod_streams(x)
        B, S, _ = x.shape
        e = self._gmod_per_layer_input(per_layer_input, B, S)
        attn = self._gmod_attn()
        window = _binding_window(attn, S)
        softcap, sinks = attention_softcap(attn), attention_sinks(attn)
        self._gmod_check_alibi(alibi)
        # packed sequences (transformers applies their mask only without a KV cache; so do we)
        segments = None if routing is None or kv_cache is not None else getattr(routing, "segments", None)
        blocks = getattr(routing, "blocks", None)  # token-type blocks (prefill with a cache too, as transformers)
        if blocks is not None and getattr(routing, "blocks_sliding_only", False) and _sliding_window(attn) is None:
            blocks = None  # Gemma 4: bidirectional over an image in its sliding-window layers, causal elsewhere
        if self.training and _dropout_p(attn, ("attention_dropout", "dropout", "attn_dropout", "attn_dropout_p")) > 0:
            warnings.warn("gmod: attention dropout is not applied inside MoD layers", stacklevel=2)
        if self.training and _dropout_p(self, ("hidden_dropout",)) > 0 and not self._gmod_block_layout().adds_residual:
            warnings.warn("gmod: the block's residual dropout (hidden_dropout: Falcon, GPT-NeoX-Japanese) is not applied "
                          "inside MoD layers", stacklevel=2)

        sink = self._gmod_sink(routing)
        mask = None if routing is None else routing.mask
        max_forced = 0 if routing is None else routing.max_forced
        if mask is not None:
            mask = check_routing_mask(mask, (B, S))
        prefill_len = _prefill_len(routing)
        ratio = float(self.gmod_ratio)

        # ---- router + selection
        with nvtx_range("router"):
            logits = self.gmod_logits(x, routing)  # [B, S] fp32
        with nvtx_range("route"):
            codes = mask
            if prefill_len is not None and prefill_len < S:
                # positions >= P: the decode rule, written as forced (kept) / never (skipped) codes
                P = max(int(prefill_len), 0)
                tail = torch.arange(S, device=x.device) >= P
                keep_tail = self.gmod_decode_keep(logits, mask)
                base = codes if codes is not None else torch.zeros(B, S, dtype=torch.int8, device=x.device)
                decided = torch.where(keep_tail, ops.MASK_FORCED, ops.MASK_NEVER).to(torch.int8)
                codes = torch.where(tail.unsqueeze(0), decided, base).contiguous()
                C = capacity(P, ratio, max_forced) + (S - P)
            elif routing is not None and routing.rows is not None and len(routing.rows) == B:
                C = capacity_of_rows(routing.rows, ratio, S)  # the largest row's exact count
            else:
                C = capacity(S, ratio, max_forced)
            own = routing is not None and codes is routing.mask  # (the codes the forward hook set: shared)
            num_routed = _num_routed(codes, ratio, B, S, x.device, routing if own else None)
            threshold = None
            if cfg.threshold is not None and not self.training:
                threshold = logit(cfg.threshold)
            if segments is not None:
                # packed rows: each sequence keeps what it would keep alone (its own top-k), decided here
                # as forced / never codes; a row then holds at most (sequences - 1) more than one top-k
                codes = per_sequence_codes(logits, codes, segments, ratio, threshold)
                C = min(S, C + _max_segments(routing, segments, S) - 1)
                num_routed, threshold = torch.zeros_like(num_routed), None
            idx, count = ops.route(logits.detach(), C, num_routed, codes, threshold=threshold)

        # ---- the block on the selected tokens
        with nvtx_range("gather"):
            pred, xs = self._gmod_gather(x, streams, idx, count)  # xs [B, C, D]
            seg = blk = None
            if segments is not None:  # the kept tokens' sequence ids (slots past count: never read)
                seg = torch.gather(segments.to(x.device), 1, idx.clamp(min=0).long())
            if blocks is not None:  # the kept tokens' blocks (an image's tokens, a prefix-LM's prompt)
                blk = torch.gather(blocks.to(x.device), 1, idx.clamp(min=0).long())
            cos, sin = self._gmod_positions(x, xs, idx, count, C, position_embeddings, position_ids, seg=seg,
                                            rotate=self._gmod_rotates(alibi), routing=routing)
            chunk = _binding_chunk(attn, S)
            if chunk is not None:  # Llama-4's chunks: a query sees its own chunk (as ids, with packed sequences)
                ch = _chunk_ids(idx.clamp(min=0), routing, chunk)
                seg = ch if seg is None else seg.to(torch.int64) * (S + 1) + ch
        with nvtx_range("attention"):
            q, k, v, scale, gate = self._gmod_qkv(xs, cos, sin)
            q, k, v = _autocast_qkv(q, k, v)
            q = _temperature(attn, q, idx)
            if kv_cache is not None:  # cached prefill: no device sync (the lengths are read at the next step)
                kv_cache.append(k, v, count, idx=idx)
            k, v = self._gmod_kv(k, v)
            kb = None if alibi is None else key_bias(alibi.columns(attn, B, q.shape[2], S), idx)
            if window is not None or softcap is not None or sinks is not None or seg is not None or blk is not None \
                    or kb is not None:
                # positions (and sequence / block ids, ALiBi's bias) decide what a query sees
                o = position_masked_attention(q, k, v, idx, idx, count, scale, window=window, softcap=softcap,
                                              q_seg=seg, k_seg=seg, q_block=blk, k_block=blk, sinks=sinks,
                                              key_bias=kb, window_in_blocks=getattr(routing, "window_in_blocks", True))
            elif attention_backend(cfg.attention, q.device, q.dtype) == "sdpa" or not ops.attention_supports(q, v):
                o = _sdpa_causal(q, k, v, scale)  # (what the kernels lack: MLA's head dim 192, DiffLlama's 2d values)
            else:
                o, _ = ops.attention(q, k, v, count, count, scale)
            a = self._gmod_attn_out(self._gmod_heads_out(o), gate)
            h = self._gmod_residual(xs, a)
        with nvtx_range("mlp"):
            m = self._gmod_mlp(h, xs)
            e_sel = None if e is None else ops.gather_rows(e, idx, count)
            if e_sel is not None and pred is None:  # (AltUp: after the correction)
                m = m + block_extras.per_layer_update(self, h + m, e_sel)

        # ---- gating + merge
        with nvtx_range("merge"):
            if pred is not None:
                y = self._gmod_merge_altup(streams, pred, xs, h, m, logits, idx, count, mask, e_sel)
            else:
                y = block_extras.scale_output(self, self._gmod_merge(x, xs, h, a, m, logits, idx, count, mask))

        # ---- aux loss + statistics
        self._gmod_record(sink, logits, idx, count, mask, C)
        return self._gmod_aux_through_replay(y, routing)

    def _gmod_aux_through_replay(self, y: torch.Tensor, routing: Optional[RoutingInfo]) -> torch.Tensor:
        """Reentrant gradient checkpointing (:class:`~gmod_ext.router.AuxLossGradient`): a training forward
        without autograd (its first pass; transformers' checkpointing or the user's own) tells the model's loss
        hook so, which acts only if the model's loss has a graph all the same; the replay in the backward pass
        returns ``y`` through :class:`~gmod_ext.router.AuxLossThroughOutput`, which gives this layer's aux term
        its gradient."""
        if routing is None or not self.training:
            return y
        if not torch.is_grad_enabled():
            routing.aux_without_graph = True
            return y
        gradient = routing.aux_loss_gradient
        aux = routing.aux.get(self.gmod_layer_idx)
        if gradient is None or aux is None or not aux.requires_grad or torch._C._current_graph_task_id() == -1:
            return y
        return AuxLossThroughOutput.apply(y, aux, gradient)

    def gmod_forward_decode(
        self,
        x: torch.Tensor,
        cache,
        position_embeddings=None,
        position_ids: Optional[torch.Tensor] = None,
        routing: Optional[RoutingInfo] = None,
        alibi: Optional[AlibiBias] = None,
        per_layer_input: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """A step on a non-empty compact cache (decode, or any later chunk of S >= 1 tokens).

        Token t of row b is processed iff :meth:`gmod_decode_keep` (``p >= decode_threshold``,
        forced kept, padding never); the kept tokens' keys / values are appended to ``cache`` (a
        :class:`~gmod_ext.cache.GmodLayer`) and they attend to the row's compact cache with
        ``ops.attention(q_len=count, k_len=cache_len)`` (bottom-right aligned: causal among the
        step's tokens). Skipped tokens leave the layer unchanged and append nothing. One device
        sync (the per-row counts); when no row keeps a token the block is not run at all. ``alibi``: the
        model's ALiBi bias over all positions seen, read at the cached keys' recorded positions.
        """
        streams, x = self._gmod_streams(x)
        B, S, _ = x.shape
        e = self._gmod_per_layer_input(per_layer_input, B, S)
        attn = self._gmod_attn()
        self._gmod_check_alibi(alibi)
        sink = self._gmod_sink(routing)
        mask = None if routing is None else routing.mask
        if mask is not None:
            mask = check_routing_mask(mask, (B, S))
        if getattr(routing, "blocks", None) is not None:
            raise NotImplementedError(
                "gmod: tokens that attend both ways (token_type_ids: Gemma-3's image tokens, PaliGemma's prefix) in "
                "a step after the first one on a KV cache: MoD layers apply that bidirectional attention in the "
                "prefill only. Put the images and the prompt in the first call (as generate does), or run without "
                "a cache.")
        with nvtx_range("router"):
            logits = self.gmod_logits(x, routing)
        with nvtx_range("route"):
            keep = self.gmod_decode_keep(logits, mask)
            codes = torch.where(keep, ops.MASK_FORCED, ops.MASK_NEVER).to(torch.int8).contiguous()
            zero = torch.zeros(B, dtype=torch.int32, device=x.device)
            idx, count = ops.route(logits.detach(), S, zero, codes)
            counts = count.tolist()
            n = max(counts) if counts else 0
        if n == 0:
            self._gmod_record(sink, logits, idx, count, mask, S)
            if streams is not None:
                return self._gmod_skip_all(x, logits, mask, streams)
            return block_extras.scale_output(self, self._gmod_skip_all(x, logits, mask))
        if n < S:
            idx = idx[:, :n].contiguous()
        window = _binding_window(attn, cache.seen + S)
        chunk = _binding_chunk(attn, cache.seen + S)
        softcap, sinks = attention_softcap(attn), attention_sinks(attn)
        with nvtx_range("gather"):
            pred, xs = self._gmod_gather(x, streams, idx, count)  # xs [B, n, D]
            start = cache.stored_count() if cache.is_initialized else torch.zeros(B, dtype=torch.int32, device=x.device)
            cos, sin = self._gmod_positions(x, xs, idx, count, n, position_embeddings, position_ids, start=start,
                                            rotate=self._gmod_rotates(alibi), routing=routing)
        with nvtx_range("attention"):
            q, k, v, scale, gate = self._gmod_qkv(xs, cos, sin)
            q, k, v = _autocast_qkv(q, k, v)
            q = _temperature(attn, q, idx + cache.seen)
            cache.append(k, v, count, counts, idx=idx if S > 1 else None)  # S = 1: position `seen`
            kb = None
            if alibi is not None:  # the bias of every position seen, read at the cached keys' positions
                kb = key_bias(alibi.columns(attn, B, q.shape[2], cache.seen + S), cache.positions)
            keys, values = self._gmod_kv(cache.keys, cache.values)
            if window is not None or softcap is not None or sinks is not None or kb is not None or chunk is not None \
                    or not ops.attention_supports(q, values):  # (or what the kernels lack, as above)
                q_pos = idx.to(torch.int64) + cache.seen  # recorded positions decide
                q_ch = k_ch = None
                if chunk is not None:  # Llama-4: the query's own chunk only
                    q_ch, k_ch = _chunk_ids(q_pos, routing, chunk), _chunk_ids(cache.positions, routing, chunk)
                o = position_masked_attention(q, keys, values, q_pos, cache.positions, cache.cache_len,
                                              scale, window=window, softcap=softcap, sinks=sinks, key_bias=kb,
                                              q_seg=q_ch, k_seg=k_ch)
            else:
                o, _ = ops.attention(q, keys, values, count, cache.cache_len, scale)
            a = self._gmod_attn_out(self._gmod_heads_out(o), gate)
            h = self._gmod_residual(xs, a)
        with nvtx_range("mlp"):
            m = self._gmod_mlp(h, xs)
            e_sel = None if e is None else ops.gather_rows(e, idx, count)
            if e_sel is not None and pred is None:  # (AltUp: after the correction)
                m = m + block_extras.per_layer_update(self, h + m, e_sel)
        with nvtx_range("merge"):
            if pred is not None:
                y = self._gmod_merge_altup(streams, pred, xs, h, m, logits, idx, count, mask, e_sel)
            else:
                y = block_extras.scale_output(self, self._gmod_merge(x, xs, h, a, m, logits, idx, count, mask))
        self._gmod_record(sink, logits, idx, count, mask, n)
        return y


def _num_routed(codes: Optional[torch.Tensor], ratio: float, B: int, S: int, device: torch.device,
                routing: Optional[RoutingInfo]) -> torch.Tensor:
    """[B] int32: the routable tokens of each row that top-k keeps at skip ratio ``ratio`` (``codes``: the
    routing codes, None: every token routable). Every MoD layer of a forward with the same codes and ratio
    gets the same counts, so ``routing`` (given when ``codes`` are its own) keeps them for the next layer
    (:meth:`RoutingInfo.memo`): some ten small kernels once per forward instead of once per layer."""
    def compute() -> torch.Tensor:
        if codes is None:
            n_routable = torch.full((B,), S, dtype=torch.int64, device=device)
        else:
            n_routable = (codes == ops.MASK_ROUTABLE).sum(1)
        return (n_routable - num_skipped_tensor(n_routable, ratio)).to(torch.int32)

    if routing is None:
        return compute()
    return routing.memo(("num_routed", id(codes), float(ratio), B, S, str(device)), compute, keep=(codes,))


def _dropout_p(module: nn.Module, names: tuple) -> float:
    """The largest dropout probability among a module's settings ``names``: floats (OPT's attention keeps its
    dropout as ``dropout``, GPTBigCode's as ``attn_dropout``, Falcon's block ``hidden_dropout``) or dropout
    modules (Falcon's attention's ``attention_dropout``, Llama's float of the same name)."""
    p = 0.0
    for name in names:
        v = module.__dict__.get(name, module._modules.get(name))
        if isinstance(v, nn.Dropout):
            v = v.p
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            p = max(p, float(v))
    return p


def _max_segments(routing, segments: torch.Tensor, seq_len: int) -> int:
    """The most packed sequences in one row: the hook's count, else one host sync (the sequence length
    while compiling, where a sync would break the graph)."""
    n = getattr(routing, "max_segments", None)
    if n is not None:
        return int(n)
    return seq_len if torch.compiler.is_compiling() else max_segments(segments)


def _prefill_len(routing) -> Optional[int]:
    """``routing.prefill_len`` (set from the model keyword ``gmod_prefill_len``) as an int, or None."""
    p = getattr(routing, "prefill_len", None)
    if p is None:
        return None
    if isinstance(p, torch.Tensor):
        p = int(p.reshape(-1)[0].item()) if p.numel() else None
    return None if p is None else int(p)


def mod_class_for(base: type) -> type:
    """The (cached) class ``MoD<base>(MoDDecoderLayer, base)``; importable from this module."""
    if issubclass(base, MoDDecoderLayer):
        return base
    cls = _CLASS_CACHE.get(base)
    if cls is None:
        name = f"MoD{base.__name__}"
        cls = type(name, (MoDDecoderLayer, base), {"_gmod_base_class": base, "__module__": __name__})
        cls.__qualname__ = name
        _CLASS_CACHE[base] = cls
        globals().setdefault(name, cls)  # picklable as gmod_ext.mod_layer.<name>
    return cls


def _check_layer(layer: nn.Module) -> None:
    missing = []
    if block_layout(layer) is None:  # name what Llama's layout would need
        missing = [n for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                   if not isinstance(getattr(layer, n, None), nn.Module)] or ["a known norm layout (gmod_ext.block_layout)"]
    attn = attention_module(layer)
    if attn is not None:
        # separate q / k / v projections, or one fused qkv_proj (Phi-3) with a known key / value head count,
        # or GPT-NeoX's query_key_value (q, k, v per head), or GPT-2's c_attn, or MPT's Wqkv (thirds); the
        # output projection o_proj, dense, out_proj or c_proj
        fused = (isinstance(getattr(attn, "qkv_proj", None), nn.Module) and _kv_heads(attn) is not None) \
            or isinstance(getattr(attn, "query_key_value", None), nn.Module) \
            or isinstance(getattr(attn, "Wqkv", None), nn.Module) \
            or (isinstance(getattr(attn, "qkv_proj", None), nn.Module) and isinstance(getattr(attn, "mp_num", None), int)) \
            or (isinstance(getattr(attn, "c_attn", None), nn.Module) and isinstance(getattr(attn, "split_size", None), int))
        latent = mla.is_mla(attn)  # DeepSeek-V3's multi-head latent attention (gmod_ext.mla)
        names = ("o_proj",) if (fused and not hasattr(attn, "q_proj")) or latent else ("q_proj", "k_proj", "v_proj", "o_proj")
        missing += [f"self_attn.{n}" for n in names if not hasattr(attn, n)
                    and not (n == "o_proj" and out_projection(attn) is not None)]
        if not hasattr(attn, "head_dim") and not hasattr(attn, "head_size") and not latent:
            missing.append("self_attn.head_dim")
        if latent:
            mla.check(attn)
        if getattr(attn, "is_kv_shared_layer", False) is True:  # (gmod_ext.block_extras.kv_sharing_refusal)
            raise TypeError(f"gmod: {type(layer).__name__} attends over keys and values another layer computed for "
                            "every token (KV sharing: is_kv_shared_layer); a MoD layer computes its own for its kept "
                            "tokens, so it cannot replace this one")
    if missing:
        raise TypeError(f"gmod: {type(layer).__name__} is not a Llama-family decoder layer (missing {missing})")
    if attn is not None:
        attention_softcap(attn)  # a negative cap raises here, not at the first forward


def _kv_heads(attn: nn.Module) -> Optional[int]:
    """Key / value heads of a fused-projection attention (Phi-3 keeps them as ``num_key_value_heads``)."""
    n = getattr(attn, "num_key_value_heads", None)
    if n is None:
        n = getattr(getattr(attn, "config", None), "num_key_value_heads", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def _norm_is_offset(norm: nn.Module) -> bool:
    """Whether an RMSNorm scales by ``1 + weight`` (Gemma) rather than ``weight``: probed on a vector of
    ones (RMS 1), whose output is the norm's effective scale."""
    w = norm.weight.detach()
    with torch.no_grad():
        y = norm(torch.ones(1, w.shape[-1], dtype=w.dtype, device=w.device)).float().reshape(-1)
    if y.device.type == "meta":
        return "gemma" in type(norm).__name__.lower()
    wf = w.float().reshape(-1)
    return bool((y - (wf + 1.0)).abs().max() < (y - wf).abs().max())


def make_mod_layer(
    layer: nn.Module,
    ratio: float,
    *,
    layer_idx: Optional[int] = None,
    state: Optional[GmodState] = None,
    router: Optional[GmodRouter] = None,
    config: Optional[GmodConfig] = None,
    **config_kwargs,
) -> nn.Module:
    """Turn ``layer`` into a MoD layer in place and return it.

    ``ratio``: skip ratio in [0, 1). ``state``: the model's shared :class:`GmodState` (created from
    ``config`` / ``config_kwargs`` when omitted, e.g. for a standalone layer). ``router``: a
    per-layer router to register as ``layer.gmod_router``; when omitted and the state has no
    shared router, a new per-layer router is created.
    """
    _check_layer(layer)
    if isinstance(layer, MoDDecoderLayer):
        raise ValueError("gmod: layer is already a MoD layer")
    if not (0.0 <= float(ratio) < 1.0):
        raise ValueError(f"gmod: skip ratio {ratio} must be in [0, 1)")
    if layer_idx is None:
        layer_idx = getattr(attention_module(layer), "layer_idx", 0) or 0
    state_given = state is not None
    if state is None:
        cfg = config if config is not None else GmodConfig(**config_kwargs)
        state = GmodState(cfg)
    layout = block_layout(layer)
    D = block_hidden_size(layer)
    device = next(layer.parameters()).device
    if router is None and state.router is None:
        router = GmodRouter(D, init=state.config.router_init, device=device)
    layer.__class__ = mod_class_for(type(layer))
    layer._gmod_layout = layout
    norm_in = getattr(layer, layout.attn_in) if layout.attn_in is not None else None
    layer._gmod_norm_offset = isinstance(getattr(norm_in, "weight", None), torch.Tensor) and _norm_is_offset(norm_in)
    layer._gmod_rope = _model_rope(attention_module(layer))
    # a rotary module with angles per layer type (Gemma-3's local / global) is asked for this layer's
    attn = attention_module(layer)
    typed = state.rotary is not None and accepts(state.rotary.forward, "layer_type")
    layer._gmod_rotary_type = _layer_type(attn) if typed else None
    # a model converted whole tells whether it has a rotary module; a standalone layer is assumed to get
    # position embeddings from its caller; a layer type without rope settings gets none
    gets_angles = state.rotary is not None or not state_given
    gets_angles = gets_angles and not (typed and _typed_rope_is_none(attn, _layer_type(attn)))
    layer._gmod_uses_rope = _uses_rope(attn, model_has_rotary=gets_angles)
    layer._gmod_arity = _returned_arity(layer._gmod_base_class)  # a tuple-returning layer (Falcon) returns one too
    layer.gmod_layer_idx = int(layer_idx)
    layer.gmod_ratio = float(ratio)
    layer._gmod_state = state
    if router is not None:
        layer.gmod_router = router
    return layer


def unmake_mod_layer(layer: nn.Module) -> nn.Module:
    """Undo :func:`make_mod_layer` (drops a per-layer router)."""
    if not isinstance(layer, MoDDecoderLayer):
        return layer
    layer.__class__ = layer._gmod_base_class
    for name in ("gmod_layer_idx", "gmod_ratio", "_gmod_state", "_gmod_norm_offset", "_gmod_rope", "_gmod_layout", "_gmod_uses_rope",
                 "_gmod_rotary_type", "_gmod_arity"):
        layer.__dict__.pop(name, None)
    layer._modules.pop("gmod_router", None)
    return layer


def is_mod_layer(module: nn.Module) -> bool:
    return isinstance(module, MoDDecoderLayer)
