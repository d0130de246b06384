"""The Mixture-of-Depths decoder layer for Llama-family Hugging Face models.

:func:`make_mod_layer` turns a ``LlamaDecoderLayer`` / ``MistralDecoderLayer`` /
``Qwen2DecoderLayer`` (or any layer with the same parts: ``input_layernorm`` (RMSNorm),
``self_attn.{q,k,v,o}_proj`` (+ optional ``q_norm`` / ``k_norm``), ``post_attention_layernorm``,
``mlp``) into a MoD layer **in place**: the object's class becomes a subclass
``MoD<Layer>(MoDDecoderLayer, <Layer>)``, so it keeps its own modules and weights (the state_dict
keys of the original weights do not change; a per-layer router adds ``gmod_router.*``), is still an
instance of the original class (Hugging Face's output capturing, gradient checkpointing and FSDP
class plans keep working) and accepts the same call as the wrapped layer::

    layer(hidden_states, attention_mask=..., position_ids=..., past_key_values=..., use_cache=...,
          position_embeddings=(cos, sin), **kwargs) -> hidden_states [B, S, D]

Forward on the selected tokens (all through ``gmod_ext.ops``)::

    l = router_logits(x, W[1]-W[0], input_layernorm.weight, eps) + (b1-b0)     # [B, S] fp32
    idx, count = route(l, C, num_routed, mask)                                # top-k + forced
    xs = gather_rows(x); cos, sin = gather_rows(cos/sin) (or compact arange(count))
    q, k, v = proj(LN1(xs)); (q/k norm); RoPE; o = attention(q, k, v, count, count)  # causal, GQA
    h = xs + o_proj(o); m = mlp(LN2(h))
    y = scatter_merge(x, base, idx, count, delta, gate[, skip_scale])          # variant gating

Gating: gamma ``y = h + p*m``; mod ``y = xs + p*(h + m - xs)``; pmod ``y = xs + w*(h + m - xs)``,
``w = 0.2*tanh(l) + 1`` and skipped (non-padding) tokens ``w*x``; gate="none" ``y = h + m``.
Skipped tokens (and padding) leave the layer bit-identical (except pmod's STRing).

The layer ignores the 4-D ``attention_mask`` it is given: kept tokens attend causally to kept
tokens of the same row; padding (mask code 2) is never kept. The routing mask comes from the
``gmod_routing`` keyword (a :class:`~gmod_ext.router.RoutingInfo`) that a converted model's
forward hook injects; without it every token is routable.

KV cache: a MoD layer called with ``past_key_values`` goes to :meth:`MoDDecoderLayer.gmod_forward_with_cache`,
the hook for the compact per-layer KV cache (not written yet): it raises NotImplementedError
(``on_cache="error"``, default) or runs the wrapped layer densely (``on_cache="dense"``). A
converted model has ``config.use_cache = False`` so ordinary forwards do not create a cache.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import nn

from . import ops
from .config import GmodConfig, capacity
from .masks import check_routing_mask
from .router import GmodRouter, GmodState, RoutingInfo, logit, router_aux_loss, selection_mask

__all__ = ["MoDDecoderLayer", "make_mod_layer", "unmake_mod_layer", "is_mod_layer", "mod_class_for"]

_CLASS_CACHE: dict[type, type] = {}


def _norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return 1e-6


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """RoPE on [B, C, H, d] with cos/sin [B, C, r] (r <= d: partial rotary on the first r dims)."""
    cos = cos.unsqueeze(2).to(q.dtype)
    sin = sin.unsqueeze(2).to(q.dtype)
    r = cos.shape[-1]
    if r == q.shape[-1]:
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    q_rot, q_pass = q[..., :r], q[..., r:]
    k_rot, k_pass = k[..., :r], k[..., r:]
    q = torch.cat((q_rot * cos + _rotate_half(q_rot) * sin, q_pass), dim=-1)
    k = torch.cat((k_rot * cos + _rotate_half(k_rot) * sin, k_pass), dim=-1)
    return q, k


def _qk_norm(attn: nn.Module, name: str, t: torch.Tensor, B: int, C: int, head_dim: int) -> torch.Tensor:
    """Projection [B, C, H*d] -> [B, C, H, d] with the optional q/k norm: per head (Qwen3 style,
    norm over head_dim) or over the whole projection (OLMo-2 style, applied before the split)."""
    norm = getattr(attn, name, None)
    if norm is None:
        return t.view(B, C, -1, head_dim)
    w = getattr(norm, "weight", None)
    if isinstance(w, torch.Tensor) and w.numel() != head_dim:
        return norm(t).view(B, C, -1, head_dim)
    return norm(t.view(B, C, -1, head_dim))


def _sliding_window(attn: nn.Module) -> Optional[int]:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    cfg = getattr(attn, "config", None)
    return getattr(cfg, "sliding_window", None) if cfg is not None else None


class MoDDecoderLayer:
    """Mixin of the MoD layer classes (``isinstance(layer, MoDDecoderLayer)`` tells a MoD layer).

    Instance attributes set by :func:`make_mod_layer`: ``gmod_layer_idx``, ``gmod_ratio`` (skip
    ratio), ``_gmod_state`` (:class:`~gmod_ext.router.GmodState`, shared with the model) and, for a
    per-layer router, the submodule ``gmod_router``.
    """

    _gmod_base_class: type = None

    # ------------------------------------------------------------------ call
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values=None,
        use_cache: Optional[bool] = False,
        position_embeddings: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        **kwargs,
    ) -> torch.Tensor:
        routing = kwargs.pop("gmod_routing", None)
        if past_key_values is not None:
            return self.gmod_forward_with_cache(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                routing=routing,
                **kwargs,
            )
        return self.gmod_forward(hidden_states, position_embeddings, position_ids=position_ids, routing=routing)

    def gmod_forward_with_cache(self, hidden_states, *, past_key_values, routing=None, **kwargs):
        """Hook for inference with a KV cache (prefill / decode).

        The compact per-layer KV cache (only the tokens this layer processed; decode keeps a new
        token if p >= 0.5, see DESIGN.md) will be implemented here with ``ops.kv_cache_append`` and
        ``ops.attention(q_len < k_len)``. Until then: ``on_cache="error"`` raises, ``on_cache="dense"``
        runs the wrapped layer densely (every token processed, ungated).
        """
        cfg: GmodConfig = self._gmod_state.config
        if cfg.on_cache == "dense":
            return super().forward(hidden_states, past_key_values=past_key_values, **kwargs)
        raise NotImplementedError(
            f"gmod: MoD layer {self.gmod_layer_idx} was called with a KV cache (past_key_values), but the "
            "compact MoD KV cache is not implemented yet. Run the model with use_cache=False "
            "(e.g. model.generate(..., use_cache=False)), or convert with on_cache='dense' to process "
            "every token of MoD layers densely when a cache is given."
        )

    # ------------------------------------------------------------------ parts
    def gmod_router_module(self) -> GmodRouter:
        router = self._modules.get("gmod_router")
        if router is None:
            router = self._gmod_state.router
        if router is None:
            raise RuntimeError(f"gmod: MoD layer {self.gmod_layer_idx} has no router")
        return router

    def gmod_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logit difference l1 - l0 [B, S] fp32 on this layer's input norm."""
        ln1 = self.input_layernorm
        return self.gmod_router_module()(hidden_states, ln1.weight, _norm_eps(ln1))

    def _gmod_rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        rotary = self._gmod_state.rotary
        if rotary is None:
            raise RuntimeError(
                "gmod: this MoD layer needs the model's rotary embedding module (positions='compact', or "
                "no position_embeddings given); convert the whole model with gmod_ext.convert"
            )
        return rotary(x, position_ids)

    # ------------------------------------------------------------------ MoD forward
    def gmod_forward(
        self,
        x: torch.Tensor,
        position_embeddings=None,
        position_ids: Optional[torch.Tensor] = None,
        routing: Optional[RoutingInfo] = None,
    ) -> torch.Tensor:
        state: GmodState = self._gmod_state
        cfg: GmodConfig = state.config
        if x.dim() != 3:
            raise ValueError(f"gmod: hidden_states must be [B, S, D], got {tuple(x.shape)}")
        B, S, _ = x.shape
        x = x.contiguous()
        attn = self.self_attn
        window = _sliding_window(attn)
        if window is not None and S > window:
            raise NotImplementedError(
                f"gmod: sequence length {S} exceeds the sliding window {window}; MoD layers attend over all "
                "kept tokens (no sliding window). Use shorter sequences or keep this layer dense."
            )
        if self.training and getattr(attn, "attention_dropout", 0.0):
            warnings.warn("gmod: attention dropout is not applied inside MoD layers", stacklevel=2)

        sink = routing
        if sink is None:
            if state.scratch is None:
                state.scratch = RoutingInfo()
            sink = state.scratch
        mask = None if routing is None else routing.mask
        max_forced = 0 if routing is None else routing.max_forced
        if mask is not None:
            mask = check_routing_mask(mask, (B, S))
        ratio = float(self.gmod_ratio)

        # ---- router + selection
        logits = self.gmod_logits(x)  # [B, S] fp32
        if mask is None:
            n_routable = torch.full((B,), S, dtype=torch.int64, device=x.device)
        else:
            n_routable = (mask == ops.MASK_ROUTABLE).sum(1)
        skipped = torch.floor(n_routable.to(torch.float64) * ratio + 1e-9).to(torch.int64)
        num_routed = (n_routable - skipped).to(torch.int32)
        C = capacity(S, ratio, max_forced)
        threshold = None
        if cfg.threshold is not None and not self.training:
            threshold = logit(cfg.threshold)
        idx, count = ops.route(logits.detach(), C, num_routed, mask, threshold=threshold)

        # ---- the block on the selected tokens
        xs = ops.gather_rows(x, idx, count)  # [B, C, D]
        if cfg.positions == "compact":
            pos = torch.arange(C, device=x.device).unsqueeze(0)
            cos, sin = self._gmod_rotary(xs, pos)
            cos = cos.expand(B, -1, -1)
            sin = sin.expand(B, -1, -1)
        else:
            if position_embeddings is None:
                if position_ids is None:
                    position_ids = torch.arange(S, device=x.device).unsqueeze(0)
                position_embeddings = self._gmod_rotary(x, position_ids)
            cos, sin = position_embeddings
            cos = ops.gather_rows(cos.expand(B, -1, -1).contiguous(), idx, count)
            sin = ops.gather_rows(sin.expand(B, -1, -1).contiguous(), idx, count)

        head_dim = attn.head_dim
        h_in = self.input_layernorm(xs)
        q = _qk_norm(attn, "q_norm", attn.q_proj(h_in), B, C, head_dim)
        k = _qk_norm(attn, "k_norm", attn.k_proj(h_in), B, C, head_dim)
        v = attn.v_proj(h_in).view(B, C, -1, head_dim)
        q, k = _apply_rope(q, k, cos, sin)
        scale = getattr(attn, "scaling", None)
        if scale is None:
            scale = 1.0 / math.sqrt(head_dim)
        o, _ = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), count, count, float(scale))
        a = attn.o_proj(o.reshape(B, C, -1))
        h = xs + a
        m = self.mlp(self.post_attention_layernorm(h))

        # ---- gating + merge
        gate_mode = "none" if cfg.gate == "none" else cfg.variant
        if gate_mode == "none":
            y = ops.scatter_merge(x, h + m, idx, count)
        elif gate_mode == "gamma":
            p_sel = ops.gather_rows(torch.sigmoid(logits).unsqueeze(-1), idx, count).squeeze(-1)
            y = ops.scatter_merge(x, h, idx, count, delta=m, gate=p_sel)
        elif gate_mode == "mod":
            p_sel = ops.gather_rows(torch.sigmoid(logits).unsqueeze(-1), idx, count).squeeze(-1)
            y = ops.scatter_merge(x, xs, idx, count, delta=a + m, gate=p_sel)
        elif gate_mode == "pmod":
            w = cfg.pmod_a * torch.tanh(logits) + cfg.pmod_b  # [B, S] fp32 TanhNorm
            w_sel = ops.gather_rows(w.unsqueeze(-1), idx, count).squeeze(-1)
            skip = w if mask is None else torch.where(mask == ops.MASK_NEVER, torch.ones_like(w), w)
            y = ops.scatter_merge(x, xs, idx, count, delta=a + m, gate=w_sel, skip_scale=skip.contiguous())
        else:  # pragma: no cover - validated in GmodConfig
            raise ValueError(cfg.variant)

        # ---- aux loss + statistics
        sel = selection_mask(idx, count, S)
        valid = None if mask is None else (mask != ops.MASK_NEVER)
        aux = router_aux_loss(logits, sel, valid)
        with torch.no_grad():
            vf = torch.ones_like(logits) if valid is None else valid.to(torch.float32)
            n_valid = vf.sum().clamp(min=1.0)
            n_forced = (
                torch.zeros_like(count) if mask is None else (mask == ops.MASK_FORCED).sum(1).to(count.dtype)
            )
            kept_routable = (count - n_forced).sum().to(torch.float32)
            sink.stats[self.gmod_layer_idx] = {
                "skip_ratio": 1.0 - count.sum().to(torch.float32) / n_valid,
                "routable_skip_ratio": 1.0 - kept_routable / n_routable.sum().to(torch.float32).clamp(min=1.0),
                "mean_p": (torch.sigmoid(logits.detach()) * vf).sum() / n_valid,
                "aux_loss": aux.detach(),
                "capacity": torch.tensor(C),
            }
        sink.aux[self.gmod_layer_idx] = aux
        sink.selection[self.gmod_layer_idx] = (idx, count)
        return y


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
    missing = [
        n
        for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        if not isinstance(getattr(layer, n, None), nn.Module)
    ]
    attn = getattr(layer, "self_attn", None)
    if attn is not None:
        missing += [f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj") if not hasattr(attn, n)]
        if not hasattr(attn, "head_dim"):
            missing.append("self_attn.head_dim")
    ln = getattr(layer, "input_layernorm", None)
    if ln is not None and not isinstance(getattr(ln, "weight", None), torch.Tensor):
        missing.append("input_layernorm.weight (an RMSNorm with a weight)")
    if missing:
        raise TypeError(f"gmod: {type(layer).__name__} is not a Llama-family decoder layer (missing {missing})")


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
        layer_idx = getattr(getattr(layer, "self_attn", None), "layer_idx", 0) or 0
    if state is None:
        cfg = config if config is not None else GmodConfig(**config_kwargs)
        state = GmodState(cfg)
    D = layer.input_layernorm.weight.shape[-1]
    device = layer.input_layernorm.weight.device
    if router is None and state.router is None:
        router = GmodRouter(D, init=state.config.router_init, device=device)
    layer.__class__ = mod_class_for(type(layer))
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
    for name in ("gmod_layer_idx", "gmod_ratio", "_gmod_state"):
        layer.__dict__.pop(name, None)
    layer._modules.pop("gmod_router", None)
    return layer


def is_mod_layer(module: nn.Module) -> bool:
    return isinstance(module, MoDDecoderLayer)
