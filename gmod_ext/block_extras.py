"""Parts of a decoder block besides its attention and MLP branches that MoD layers reproduce (Gemma 4's
blocks have all three), and the one they refuse.

* **Per-layer inputs** (``per_layer_input_gate``, ``per_layer_projection``, ``post_per_layer_input_norm``):
  after the MLP, the block adds ``N(proj(act(gate(h)) * e))``, where ``e`` [B, S, P] is the token's own
  per-layer embedding that the model hands each layer (the ``per_layer_input`` argument). It is part of the
  layer's update: a kept token gets it (computed on its gathered row of ``e``), a skipped token does not.
* **A layer scalar** (a ``layer_scalar`` buffer): the block returns ``layer_scalar * (x + update)``. It
  rescales the whole residual stream, the part every later layer adds its update to, so MoD layers apply it
  to every token, skipped ones included (``layer_scalar * x``): skipping drops the layer's update, not the
  stream's scale. With every token kept that is the block's function.
* **A parallel MoE branch** (``enable_moe_block``: Gemma 4's 26B-A4B): the MLP branch is
  ``N_mo(N_1(mlp(N_mi(h))) + N_2(experts(N_e(h), router(h))))``; the experts run on the kept tokens only.
* **KV sharing** (the attention's ``is_kv_shared_layer`` / ``store_full_length_kv``): the last layers of a
  Gemma 3n / 4 stack attend over the keys and values an earlier layer computed for *every* token. A MoD
  layer computes keys and values for its kept tokens only, so neither a layer that reuses them nor the layer
  that stores them (where another layer reuses them) can become a MoD layer: :func:`kv_sharing_refusal`.
* **AltUp** (Gemma 3n's ``altup``): the model carries ``K = altup_num_inputs`` hidden-state streams per token,
  ``[K, B, S, D]``. The block predicts all K from each other (``altup.predict``), runs attention and MLP on
  the active stream's prediction, and corrects the K predictions with its output (``altup.correct``); the
  per-layer input's update then goes to streams 1..K-1. A MoD layer routes on the active stream, runs all of
  that on the kept tokens' K streams (:func:`gather_streams`, :func:`altup_correct`) and leaves a skipped
  token's K streams as they were (p-MoD's STRing scales all K).
* **LAuReL** (Gemma 3n's ``laurel``, a low-rank branch beside the attention): the residual after attention is
  ``(x + attn + laurel(N_in(x))) / sqrt(2)`` (:func:`laurel_residual`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from . import ops
from .block_layout import attention_module

PER_LAYER_INPUT = "per_layer_input"  # the keyword (or second positional argument) the block takes it as
# the norms these parts bring (for gmod_ext.verify's hints, which name the norms no layout accounts for)
EXTRA_NORMS = ("post_per_layer_input_norm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2",
               "pre_feedforward_layernorm_2")


def has_per_layer_input(layer: nn.Module) -> bool:
    return bool(getattr(layer, "hidden_size_per_layer_input", 0)) and isinstance(
        getattr(layer, "per_layer_input_gate", None), nn.Module)


def per_layer_update(layer: nn.Module, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """What the per-layer input adds to the residual ``h`` [B, C, D] of the kept tokens, ``e`` [B, C, P]
    their per-layer embeddings."""
    gated = layer.act_fn(layer.per_layer_input_gate(h)) * e
    return layer.post_per_layer_input_norm(layer.per_layer_projection(gated))


def layer_scalar(layer: nn.Module) -> Optional[torch.Tensor]:
    """The block's ``layer_scalar`` (a tensor multiplying its output), or None."""
    s = getattr(layer, "layer_scalar", None)
    return s if isinstance(s, torch.Tensor) else None


def scale_output(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """``y * layer_scalar`` in ``y``'s dtype (as the block's in-place multiply), or ``y`` itself."""
    s = layer_scalar(layer)
    return y if s is None else y * s.to(y.dtype)


def has_moe_branch(layer: nn.Module) -> bool:
    return getattr(layer, "enable_moe_block", False) is True and isinstance(getattr(layer, "experts", None), nn.Module)


def moe_branch_update(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Gemma 4's MLP branch with its parallel experts on the kept tokens' residual ``h`` [B, C, D], before the
    block's post-feedforward norm: ``N_1(mlp(N_mi(h))) + N_2(experts(N_e(h), router(h)))``."""
    dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(h)))
    flat = h.reshape(-1, h.shape[-1])
    _, weights, index = layer.router(flat)
    experts = layer.experts(layer.pre_feedforward_layernorm_2(flat), index, weights)
    return dense + layer.post_feedforward_layernorm_2(experts.reshape(h.shape))


def _shares_kv(attn: Optional[nn.Module]) -> tuple:
    return (getattr(attn, "is_kv_shared_layer", False) is True, getattr(attn, "store_full_length_kv", False) is True)


def kv_sharing_refusal(layers, i: int) -> Optional[str]:
    """Why layer ``i`` of the stack ``layers`` cannot become a MoD layer because of KV sharing, or None."""
    reuses, stores = _shares_kv(attention_module(layers[i]))
    if reuses:
        return (f"layer {i} attends over keys and values an earlier layer computed for every token (KV sharing: "
                "is_kv_shared_layer), not its own")
    if stores and any(_shares_kv(attention_module(m))[0] for m in layers):
        return (f"layer {i} stores its keys and values of every token for later layers to reuse (KV sharing: "
                "store_full_length_kv), and a MoD layer computes them for its kept tokens only")
    return None


def has_altup(layer: nn.Module) -> bool:
    altup = getattr(layer, "altup", None)
    return isinstance(altup, nn.Module) and callable(getattr(altup, "predict", None)) \
        and callable(getattr(altup, "correct", None))


def altup_split(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(streams [K, B, S, D], the active stream [B, S, D])`` of an AltUp block's input, checked."""
    cfg = layer.config
    K, a = int(cfg.altup_num_inputs), int(cfg.altup_active_idx)
    if x.dim() != 4 or x.shape[0] != K:
        raise ValueError(f"gmod: an AltUp block (Gemma 3n) takes its {K} hidden-state streams as [K, B, S, D] = "
                         f"[{K}, B, S, D], got {tuple(x.shape)}")
    x = x.contiguous()
    return x, x[a]


def gather_streams(streams: torch.Tensor, idx: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[K, B, C, D]: the kept tokens' rows of each of the K streams (rows past a row's count: zeros)."""
    K, B, S, D = streams.shape
    rows = ops.gather_rows(streams.reshape(K * B, S, D), idx.repeat(K, 1), count.repeat(K))
    return rows.view(K, B, idx.shape[1], D)


def scatter_streams(streams: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
                    skip_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The K streams with each kept token's rows replaced by ``rows`` [K, B, C, D]; a skipped token's rows kept
    (times ``skip_scale`` [B, S] where given: p-MoD's STRing)."""
    K, B, S, D = streams.shape
    skip = None if skip_scale is None else skip_scale.repeat(K, 1)
    out = ops.scatter_merge(streams.reshape(K * B, S, D), rows.reshape(K * B, -1, D).to(streams.dtype),
                            idx.repeat(K, 1), count.repeat(K), skip_scale=skip)
    return out.view(K, B, S, D)


def has_laurel(layer: nn.Module) -> bool:
    return isinstance(getattr(layer, "laurel", None), nn.Module)


def laurel_residual(layer: nn.Module, xs: torch.Tensor, a: torch.Tensor, normed: torch.Tensor) -> torch.Tensor:
    """Gemma 3n's residual after attention: ``(xs + a + laurel(normed)) / sqrt(2)``, ``normed = N_in(xs)``."""
    return (xs + a + layer.laurel(normed)) / math.sqrt(2)


def altup_correct(layer: nn.Module, predictions: torch.Tensor, out: torch.Tensor,
                  e: Optional[torch.Tensor]) -> torch.Tensor:
    """The kept tokens' K corrected streams [K, B, C, D] from their ``predictions`` and the block's output
    ``out`` [B, C, D] on the active one; with per-layer inputs ``e`` [B, C, P], streams 1..K-1 get their update
    (computed from the corrected active stream, scaled where ``altup_correct_scale``)."""
    corrected = layer.altup.correct(predictions, out.to(predictions.dtype))
    if e is None:
        return corrected
    first = corrected[int(layer.config.altup_active_idx)]
    if getattr(layer.config, "altup_correct_scale", False):
        first = layer.altup.scale_corrected_output(first)
    update = per_layer_update(layer, first, e)
    return torch.cat([corrected[:1], corrected[1:] + update.to(corrected.dtype)], dim=0)
