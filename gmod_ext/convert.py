"""One-call conversion of a Hugging Face decoder model into a gamma-MoD model.

    model = gmod_ext.convert(model, ratio=0.5, layers="arank", calibration_batches=batches)

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (and other
Llama-family ``*ForCausalLM``: Qwen3, Gemma, Gemma-2, Gemma-3, Gemma 4, Mixtral, Phi-3, GLM-4, OLMo-2, ...) and
``LlavaForConditionalGeneration`` (its language model; the README's "Which models convert" lists the rest).
Layers that cannot become MoD layers stay dense: linear-attention layers of hybrids, and layers that reuse or
store keys and values for other layers (KV sharing, :mod:`gmod_ext.block_extras`). Before converting,
:mod:`gmod_ext.verify` checks that a MoD layer reproduces the model's decoder layer and refuses the blocks it
does not (Beam's depth-scaled residual sums, DeepSeek-V3.2's sparse attention, ...) with TypeError.
The model is changed **in place** and returned:

* the chosen decoder layers become MoD layers (:mod:`gmod_ext.mod_layer`), keeping their modules
  and weights (state_dict keys unchanged; the original checkpoint still loads);
* the router: ``router="shared"`` registers one fp32 ``Linear(D, 2)`` as ``model.gmod_router``
  (gamma-MoD's shared router); ``"per_layer"`` gives each MoD layer its own ``gmod_router``;
* a forward pre-hook on the top-level model builds the routing mask of each call from the 2-D
  ``attention_mask`` (padding), ``labels`` / ``input_ids`` (forced tokens, see
  :mod:`gmod_ext.masks`) and the optional extra keywords ``gmod_forced_mask=`` (bool [B, S]) and
  ``gmod_routing_mask=`` (int8 codes [B, S]), and hands it to the decoder layers through the
  ``**kwargs`` that Hugging Face models pass down (keyword ``gmod_routing``);
* a forward hook adds ``aux_coef * sum_l aux_l`` (router cross-entropy, default 0.01) to
  ``output.loss`` when ``labels`` are given (the plain LM loss is ``loss - aux``; the aux term of
  the last call is in ``model.gmod_stats()["aux_loss"]``);
* ``model.config.gmod`` holds the settings (:class:`~gmod_ext.config.GmodConfig` as a dict);
* KV cache (``on_cache="compact"``, default): MoD layers keep a compact cache of the tokens they
  processed (:mod:`gmod_ext.cache`); ``config.use_cache`` is left as it is (True for Hugging Face
  models), ``model.generate`` creates a :class:`~gmod_ext.cache.GmodCache` and routes with
  ``gmod_prefill_len`` = the prompt length (:mod:`gmod_ext.generation`), ``model.gmod_new_cache()``
  makes a cache by hand. With ``on_cache="error"`` ``config.use_cache`` / ``generation_config.use_cache`` are set to
  False (a cache raises NotImplementedError in MoD layers); ``"dense"`` runs MoD layers densely;
* the extra model keyword ``gmod_prefill_len=P`` (int): positions ``>= P`` of a full forward are
  routed by the decode rule ``p >= decode_threshold`` (as with a cache), positions ``< P`` by top-k
  among them; ``generate`` sets it to the prompt length;
* ``model.gmod_stats()`` returns the last forward's router statistics per MoD layer.

``save_pretrained`` stores the routers with the other weights and ``config.gmod`` in config.json;
:func:`from_pretrained` rebuilds the converted model and loads everything.

Notes and limits:

* training works with ``model.gradient_checkpointing_enable()`` (Hugging Face's default non-reentrant
  checkpointing: the replay routes identically, the aux term keeps its gradient; and ``use_reentrant=True``,
  PEFT's default, where the aux term's gradient reaches the replayed layers through a hook on the loss:
  :class:`~gmod_ext.router.AuxLossGradient`), mixed precision under ``torch.autocast`` (float32 weights;
  the MoD attention takes q / k / v in autocast's dtype, the merge promotes the branches to the residual
  stream's), ``torch.compile`` (the MoD layer compiles with ``fullgraph=True``), DDP and FSDP2
  (``fully_shard``, tested on CPU/gloo);
* MoD layers ignore the 4-D attention mask Hugging Face builds (they use the routing mask: causal over
  kept tokens, padding excluded). Packed sequences (``position_ids`` that restart and no
  ``attention_mask``, as ``DataCollatorWithFlattening`` makes them) are found as transformers finds
  them, and kept tokens attend within their own sequence (without a KV cache, as the model's mask);
  each sequence is routed on its own (its own top-k, as if it were alone). Image tokens
  marked by ``token_type_ids`` (Gemma-3's multimodal model) attend to the kept tokens of their own
  image in both directions, and so do the tokens of a prefix-LM's prefix (PaliGemma: type 0, the image and
  the prompt; a first call of several tokens without token types is refused), in the first call on a KV
  cache or without one, as the model's mask. A sliding
  window (Mistral, Qwen2, Gemma-2 / 3's local layers) and logit soft-capping (Gemma-2) are reproduced
  from the kept tokens' positions (:mod:`gmod_ext.masked_attention`; the window counts original
  positions, also with ``positions="compact"``), in plain torch rather than the fused kernels;
* ``output_attentions=True`` is refused (MoD layers do not run ``self_attn``, so Hugging Face would return
  the dense layers' maps only, misnumbered);
* with a KV cache, MoD layers need a ``DynamicCache`` / ``GmodCache`` (static and quantized caches are
  refused); ``crop`` (assisted / speculative decoding) works; a MoD layer with a sliding window drops
  the cached tokens that have left it; a prefill split over several calls routes the later chunks by
  the decode rule;
* the converted model stays an instance of its class; deepcopy and ``torch.save(model)`` work.
"""
from __future__ import annotations

import inspect
import math
import numbers
import os
import types
import warnings
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import generation
from ._hf import check_transformers_version, find_decoder
from .alibi import uses_alibi
from .config import ATTENTIONS, GATES, ON_CACHE, POSITIONS, ROUTERS, VARIANTS, FORCED, GmodConfig, prd_skip_ratios
from .masks import explicit_codes_and_rows, routing_codes_and_rows
from .mod_layer import make_mod_layer, unmake_mod_layer
from .router import (AuxLossGradient, GmodRouter, GmodState, RoutingInfo, TOKEN_TYPE_KEYWORDS, max_segments,
                     packed_segments, set_token_type_blocks)
from .verify import check_decoder_layers

__all__ = ["convert", "unconvert", "from_pretrained", "gmod_stats", "is_converted", "GmodStatsCallback"]

# Which tokens a variant always keeps when ``forced`` is not given (models with an image token; a
# text-only model gets the fallback, since "text" would force every token there).
# gamma: "text". The public gamma-MoD training code adds 1 to the router probability of every token
# after the image and the system prompt, which is the whole conversation, answers included, and routes
# only the image tokens. Question-only forcing ("ignored_labels", this package's default before
# 2026-11-24) also routes the answer tokens, which carry the loss, and a skipped token sends the
# router no gradient. Measured on `python -m gmod_ext demo` (built-in LLaVA pretrained 150 steps,
# 7 of 8 layers MoD at ratio 0.5, 40 fine-tuning steps, CPU): held-out loss 1.50 with question-only
# forcing against 0.27 with the text forced (dense 0.11), and the answer's first token, the one that
# needs the image, right 0.00 against 0.58 of the time (dense 0.88).
_DEFAULT_FORCED = {"gamma": "text", "mod": "none", "pmod": "text"}
_DEFAULT_FORCED_TEXT_ONLY = {"gamma": "ignored_labels", "mod": "none", "pmod": "none"}


def is_converted(model: nn.Module) -> bool:
    return isinstance(getattr(model, "__dict__", {}).get("gmod_state"), GmodState)


def _check_model(fn: str, model) -> None:
    if isinstance(model, nn.Module):
        return
    hint = ""
    if isinstance(model, (str, os.PathLike)):
        hint = " (a path or hub id: load the model first, e.g. AutoModelForCausalLM.from_pretrained(path))"
    elif isinstance(model, type):
        hint = " (a class: pass an instance)"
    raise TypeError(f"gmod.{fn}: model must be a torch.nn.Module (a Hugging Face model), got {model!r:.80}"
                    f" ({type(model).__name__}){hint}")


def _check_choice(name: str, value, allowed, none_ok: bool = False) -> None:
    if none_ok and value is None:
        return
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"gmod.convert: {name}={value!r} is not one of {tuple(allowed)}")


def _check_real(name: str, value, lo=None, hi=None, lo_open=False, hi_open=False, none_ok=False) -> None:
    if none_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gmod.convert: {name} must be a number, got {value!r:.80} ({type(value).__name__})")
    v = float(value)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lb = "(-inf" if lo is None else f"{'(' if lo_open else '['}{lo}"
        ub = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
        raise ValueError(f"gmod.convert: {name}={value!r} must be a finite number in {lb}, {ub}")


def _check_ratio(ratio):
    """``ratio``: a number in [0, 1), a sequence of them (one per MoD layer) or {layer: ratio}. Returns it
    normalized: a Python float, a list of floats or the dict."""
    what = "a skip ratio in [0, 1), a list of them (one per MoD layer) or a dict {layer index: ratio}"
    if isinstance(ratio, dict):
        values = list(ratio.values())
        for k in ratio:
            if isinstance(k, bool) or not isinstance(k, numbers.Integral):
                raise TypeError(f"gmod.convert: ratio dict keys must be layer indices (ints), got {k!r}")
    elif isinstance(ratio, bool) or isinstance(ratio, (str, bytes)) or ratio is None or (
            isinstance(ratio, torch.Tensor) and ratio.dim() != 1):
        raise TypeError(f"gmod.convert: ratio must be {what}, got {ratio!r:.80} ({type(ratio).__name__})")
    elif isinstance(ratio, numbers.Real):
        values = [ratio]
    elif isinstance(ratio, torch.Tensor):
        values = ratio.tolist()
    else:
        try:
            values = list(ratio)
        except TypeError:
            raise TypeError(f"gmod.convert: ratio must be {what}, got {ratio!r:.80} ({type(ratio).__name__})") from None
    for r in values:
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise TypeError(f"gmod.convert: ratio must be {what}, got an element {r!r:.80} ({type(r).__name__})")
        if not (0.0 <= float(r) < 1.0):  # NaN fails too
            raise ValueError(f"gmod.convert: skip ratio {r!r} must be in [0, 1)")
    if isinstance(ratio, dict):
        return ratio
    if isinstance(ratio, numbers.Real):
        return float(ratio)
    return [float(r) for r in values]


def _check_layers(layers, L: int) -> None:
    if isinstance(layers, str):
        if layers not in ("arank", "all"):
            raise ValueError(f"gmod.convert: layers={layers!r}: use 'arank', 'all' or a list of indices")
        return
    if isinstance(layers, torch.Tensor):
        if layers.dtype.is_floating_point or layers.dtype.is_complex or layers.dtype == torch.bool or layers.dim() != 1:
            raise TypeError(f"gmod.convert: layers as a tensor must be 1-D integer indices, got {layers.dtype} "
                            f"{tuple(layers.shape)}")
        items = [int(i) for i in layers.tolist()]
    else:
        try:
            items = list(layers)
        except TypeError:
            raise TypeError(f"gmod.convert: layers must be 'arank', 'all' or a list of layer indices (ints), got "
                            f"{layers!r:.80} ({type(layers).__name__})") from None
        for i in items:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"gmod.convert: layers must be a list of layer indices (ints), got an element "
                                f"{i!r:.80} ({type(i).__name__})")
        items = [int(i) for i in items]
    bad = [i for i in items if not (0 <= i < L)]
    if bad:
        raise ValueError(f"gmod.convert: layer indices {bad} out of range [0, {L})")
    dup = sorted({i for i in items if items.count(i) > 1})
    if dup:
        raise ValueError(f"gmod.convert: layer indices {dup} are given more than once (each layer at most once)")


def _resolve_layers(model, parts, layers, calibration_batches, keep_dense, arank_threshold, progress):
    L = len(parts.layers)
    ranks = None
    if isinstance(layers, str):
        if layers == "all":
            chosen = list(parts.convertible)
        elif layers == "arank":
            if calibration_batches is None:
                raise ValueError(
                    "gmod.convert: layers='arank' needs calibration_batches (model inputs: dicts or input_ids "
                    "tensors); or pass layers='all' / a list of layer indices"
                )
            from .arank import arank, choose_mod_layers

            ranks = arank(model, calibration_batches, progress=progress)
            chosen = choose_mod_layers(ranks, keep_dense=keep_dense, threshold=arank_threshold)
        else:
            raise ValueError(f"gmod.convert: layers={layers!r}: use 'arank', 'all' or a list of indices")
    else:
        chosen = sorted({int(i) for i in (layers.tolist() if isinstance(layers, torch.Tensor) else layers)})
        bad = [i for i in chosen if not (0 <= i < L)]
        if bad:
            raise ValueError(f"gmod.convert: layer indices {bad} out of range [0, {L})")
    other = [i for i in chosen if i not in parts.convertible]
    shared = [i for i in other if i in parts.refusals]
    if shared:
        raise ValueError(f"gmod.convert: layers {shared} cannot become MoD layers: {parts.refusals[shared[0]]}; these "
                         f"can: {list(parts.convertible)}")
    if other:
        raise ValueError(
            f"gmod.convert: layers {other} ({type(parts.layers[other[0]]).__name__} without self-attention, e.g. the "
            f"linear-attention layers of a hybrid model) cannot become MoD layers; these can: "
            f"{list(parts.convertible)}")
    return chosen, ranks


def convert(
    model: nn.Module,
    ratio: Union[float, Sequence[float], dict] = 0.5,
    layers: Union[str, Sequence[int]] = "arank",
    variant: str = "gamma",
    router: str = "shared",
    positions: str = "original",
    calibration_batches=None,
    *,
    gate: str = "default",
    forced: Optional[str] = None,
    image_token_id: Optional[int] = None,
    aux_coef: float = 0.01,
    keep_dense: Optional[int] = None,
    arank_threshold: Optional[float] = None,
    schedule: Optional[str] = None,
    prd_rbar: Optional[float] = None,
    prd_min: float = 0.1,
    prd_max: float = 0.9,
    threshold: Optional[float] = None,
    router_init: Optional[str] = None,
    on_cache: str = "compact",
    decode_threshold: float = 0.5,
    attention: str = "auto",
    progress: bool = True,
    verify: bool = True,
) -> nn.Module:
    """Convert ``model`` in place into a MoD model and return it.

    ratio: skip ratio of routable tokens per MoD layer, in [0, 1) (float, or one value per chosen
        layer, or {layer: ratio}). See :mod:`gmod_ext.config` for the exact capacity rule.
    layers: "arank" (ARank on ``calibration_batches``; keep the ``keep_dense`` highest-ranked
        layers dense, default ceil(L/8), or those with ARank >= ``arank_threshold``), "all", or a
        list of layer indices.
        Hybrid models (Qwen3.5, Qwen3-Next): only the full-attention layers can be chosen; ``"all"`` means
        those, and ARank ranks those.
    variant: "gamma" (default), "mod" or "pmod"; ``gate="none"`` disables gating (exact-equality tests).
    router: "shared" (one router, gamma-MoD) or "per_layer".
    positions: "original" (RoPE at the tokens' original positions) or "compact" (arange(count)).
    forced: "none" | "text" | "ignored_labels"; default per variant: gamma and pmod "text" (every
        token that is not an image token is kept, in training and at inference: only image tokens
        are routed, as in the public gamma-MoD training code and in p-MoD), mod "none". A model without an
        image token id gets gamma "ignored_labels" (the label -100 prompt forced, answers routed)
        and pmod "none".
    image_token_id: defaults to ``config.image_token_id`` / ``image_token_index`` (LLaVA).
    schedule: "constant" (default) or "prd" (default for pmod): p-MoD progressive ratio decay,
        retention ``R_l = max(prd_min, 0.5*cos(pi*l/(L-1)) + prd_rbar)`` (``prd_rbar`` defaults to
        ``1 - ratio``), layers with ``R_l > prd_max`` stay dense, others skip ``1 - R_l``.
    threshold: eval-mode routing keeps routable tokens with p > threshold (capped at top-k).
    router_init: "normal" (std 0.02, default) or "zeros" (default for pmod: w = 1 exactly).
    on_cache: "compact" (compact MoD KV cache, default), "dense" or "error", see
        :meth:`MoDDecoderLayer.gmod_forward_with_cache`.
    decode_threshold: with a cache, a new token runs a MoD layer iff p >= decode_threshold.
    attention: "auto" (default: "sdpa" for bf16 / fp16 on CUDA, else "gmod"), "gmod" (``gmod.attention``)
        or "sdpa" (torch's fused SDPA kernels, cuDNN on an H100) for the MoD layers' attention in
        whole-sequence forwards; decoding against the compact KV cache always uses ``gmod.attention``.
        Same function, see :class:`~gmod_ext.config.GmodConfig`; :func:`set_attention` switches it on a
        converted model.
    verify: first check that a MoD layer computes what each kind of decoder layer of this model computes
        (a float32 copy of the layer, every token kept, on a short random prompt; see
        :mod:`gmod_ext.verify`) and raise TypeError if not, e.g. for Beam's depth-scaled residual
        sums. ``verify=False`` skips it.
    """
    _check_model("convert", model)
    check_transformers_version("convert")
    if is_converted(model):
        raise ValueError("gmod.convert: the model is already converted")
    # Every argument is checked before anything runs (ARank, verify) or changes: a bad one raises here.
    for name, value, allowed in (("variant", variant, VARIANTS), ("router", router, ROUTERS),
                                 ("positions", positions, POSITIONS), ("gate", gate, GATES),
                                 ("on_cache", on_cache, ON_CACHE), ("attention", attention, ATTENTIONS)):
        _check_choice(name, value, allowed)
    _check_choice("forced", forced, FORCED, none_ok=True)
    _check_choice("router_init", router_init, ("normal", "zeros"), none_ok=True)
    _check_choice("schedule", schedule, ("constant", "prd"), none_ok=True)
    ratio = _check_ratio(ratio)
    _check_real("aux_coef", aux_coef, lo=0.0)
    _check_real("threshold", threshold, lo=0.0, hi=1.0, lo_open=True, hi_open=True, none_ok=True)
    _check_real("decode_threshold", decode_threshold, lo=0.0, hi=1.0)
    _check_real("arank_threshold", arank_threshold, none_ok=True)
    _check_real("prd_rbar", prd_rbar, none_ok=True)
    _check_real("prd_min", prd_min, lo=0.0, hi=1.0)
    _check_real("prd_max", prd_max, lo=0.0, hi=1.0)
    if float(prd_min) > float(prd_max):
        raise ValueError(f"gmod.convert: prd_min={prd_min} > prd_max={prd_max} would leave every layer dense")
    if keep_dense is not None and (isinstance(keep_dense, bool) or not isinstance(keep_dense, numbers.Integral)
                                   or keep_dense < 0):
        raise ValueError(f"gmod.convert: keep_dense={keep_dense!r} must be None or an int >= 0")
    if image_token_id is not None and (isinstance(image_token_id, bool)
                                       or not isinstance(image_token_id, numbers.Integral)):
        raise TypeError(f"gmod.convert: image_token_id must be an int token id or None, got {image_token_id!r:.80}")
    parts = find_decoder(model)
    L = len(parts.layers)
    _check_layers(layers, L)
    if positions == "compact" and L and uses_alibi(parts.layers[0]):
        raise ValueError(
            f"gmod.convert: {type(model).__name__} attends with an ALiBi bias (a penalty on each query-key distance, "
            "given to its layers by the model at the tokens' original positions); positions='compact' would renumber "
            "the kept tokens, which ALiBi layers cannot. Convert with positions='original' (the default)")
    if isinstance(layers, str) and layers == "arank" and calibration_batches is None:
        raise ValueError(
            "gmod.convert: layers='arank' needs calibration_batches (model inputs: dicts or input_ids "
            "tensors); or pass layers='all' / a list of layer indices"
        )
    if verify:  # before ARank: an unsupported block should fail here, with the reason
        check_decoder_layers(model, parts, positions=positions)
    if positions == "compact" and getattr(parts.rotary, "mrope_section", None) is not None:
        warnings.warn(
            f"gmod.convert: {type(model).__name__} rotates by 3-D (time, height, width) positions on image tokens "
            "(M-RoPE); positions='compact' gives the kept tokens 1-D positions, so an image's tokens lose their "
            "2-D layout in MoD layers (text-only prompts are unaffected). positions='original' keeps the model's "
            "own positions.", stacklevel=2)
    if image_token_id is None:
        image_token_id = parts.image_token_id
    if forced is None:
        table = _DEFAULT_FORCED if image_token_id is not None else _DEFAULT_FORCED_TEXT_ONLY
        forced = table.get(variant, "none")
    if forced == "text" and image_token_id is None:
        raise ValueError("gmod.convert: forced='text' needs an image_token_id (the model config has none)")
    if schedule is None:
        schedule = "prd" if variant == "pmod" else "constant"
    if router_init is None:
        router_init = "zeros" if variant == "pmod" else "normal"

    chosen, ranks = _resolve_layers(model, parts, layers, calibration_batches, keep_dense, arank_threshold, progress)
    if schedule == "prd":
        if not isinstance(ratio, (int, float)):
            raise ValueError("gmod.convert: schedule='prd' needs a float ratio (prd_rbar defaults to 1 - ratio)")
        rbar = (1.0 - float(ratio)) if prd_rbar is None else float(prd_rbar)
        prd = prd_skip_ratios(L, rbar, prd_min, prd_max)
        chosen = [i for i in chosen if i in prd]
        ratios = [prd[i] for i in chosen]
    elif schedule == "constant":
        if isinstance(ratio, dict):
            missing = [i for i in chosen if i not in ratio]
            if missing:
                raise ValueError(f"gmod.convert: no ratio given for layers {missing}")
            ratios = [float(ratio[i]) for i in chosen]
        elif isinstance(ratio, (int, float)):
            ratios = [float(ratio)] * len(chosen)
        else:
            ratios = [float(r) for r in ratio]
            if len(ratios) != len(chosen):
                raise ValueError(f"gmod.convert: {len(ratios)} ratios for {len(chosen)} layers {chosen}")
    else:
        raise ValueError(f"gmod.convert: schedule={schedule!r}: use 'constant' or 'prd'")

    cfg = GmodConfig(
        variant=variant,
        gate=gate,
        router=router,
        positions=positions,
        forced=forced,
        image_token_id=image_token_id,
        aux_coef=float(aux_coef),
        layers=chosen,
        ratios=ratios,
        num_layers=L,
        threshold=threshold,
        on_cache=on_cache,
        decode_threshold=float(decode_threshold),
        router_init=router_init,
        attention=attention,
        arank=None if ranks is None else [float(r) for r in ranks],
    )
    return apply_gmod_config(model, cfg)


def apply_gmod_config(model: nn.Module, cfg: GmodConfig) -> nn.Module:
    """Convert ``model`` with fully resolved settings (explicit layers and ratios)."""
    if is_converted(model):
        raise ValueError("gmod: the model is already converted")
    cfg.validate()
    parts = find_decoder(model)
    if cfg.num_layers and cfg.num_layers != len(parts.layers):
        raise ValueError(f"gmod: settings are for {cfg.num_layers} layers, the model has {len(parts.layers)}")
    bad = [i for i in cfg.layers if not (0 <= int(i) < len(parts.layers))]
    if bad:
        raise ValueError(f"gmod: layer indices {bad} out of range [0, {len(parts.layers)})")
    had_gmod = hasattr(model.config, "gmod")
    try:
        return _apply(model, cfg, parts)
    except BaseException:
        _rollback(model, parts, had_gmod)  # leave no half-converted model behind
        raise


def _rollback(model: nn.Module, parts, had_gmod: bool) -> None:
    state = model.__dict__.get("gmod_state")
    for h in getattr(state, "handles", None) or []:
        h.remove()
    for layer in parts.layers:
        unmake_mod_layer(layer)
    model._modules.pop("gmod_router", None)
    model.__dict__.pop("gmod_state", None)
    parts.text_model.__dict__.pop("gmod_state", None)
    model.__dict__.pop("gmod_stats", None)
    generation.uninstall(model)
    if not had_gmod and hasattr(model.config, "gmod"):
        del model.config.gmod


def _apply(model: nn.Module, cfg: GmodConfig, parts) -> nn.Module:
    cfg.num_layers = len(parts.layers)
    device = next(parts.layers[0].parameters()).device
    shared = None
    if cfg.router == "shared" and cfg.layers:
        shared = GmodRouter(parts.hidden_size, init=cfg.router_init, device=device)
        model.gmod_router = shared  # registered: state_dict key "gmod_router.weight" / ".bias"
    state = GmodState(cfg, router=shared, rotary=parts.rotary)
    state.token_type_rule = parts.token_type_rule
    for i, r in zip(cfg.layers, cfg.ratios):
        per_layer = None
        if cfg.router == "per_layer":
            per_layer = GmodRouter(parts.hidden_size, init=cfg.router_init, device=device)
        make_mod_layer(parts.layers[i], r, layer_idx=i, state=state, router=per_layer)

    # The top-level model builds the routing mask (it sees labels / input_ids / attention_mask) and
    # adds the aux loss; the decoder stack gets the same pre-hook so that calling it directly
    # (model.model(...)) still excludes padding (it passes an existing gmod_routing through).
    state.handles = [
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        model.register_forward_hook(_post_hook, with_kwargs=True),
        model.register_forward_hook(_end_hook, always_call=True),
    ]
    if parts.text_model is not model:
        parts.text_model.gmod_state = state
        state.handles.append(parts.text_model.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        state.handles.append(parts.text_model.register_forward_hook(_end_hook, always_call=True))
    model.gmod_state = state
    model.gmod_stats = _StatsMethod(model)
    generation.install(model)

    model.config.gmod = cfg.to_dict()
    if cfg.on_cache == "error":
        for c in {id(model.config): model.config, id(parts.text_config): parts.text_config}.values():
            if c is not None and hasattr(c, "use_cache"):
                c.use_cache = False
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.use_cache = False
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` (routers are dropped; the wrapped layers are unchanged)."""
    _check_model("unconvert", model)
    state = model.__dict__.get("gmod_state")
    if state is None:
        return model
    for h in getattr(state, "handles", []):
        h.remove()
    for layer in find_decoder(model).layers:
        unmake_mod_layer(layer)
    model._modules.pop("gmod_router", None)
    model.__dict__.pop("gmod_state", None)
    find_decoder(model).text_model.__dict__.pop("gmod_state", None)
    model.__dict__.pop("gmod_stats", None)
    generation.uninstall(model)
    if hasattr(model.config, "gmod"):
        del model.config.gmod
    return model


def set_attention(model: nn.Module, attention: str) -> nn.Module:
    """Switch the attention kernel of a converted model's MoD layers ("auto", "gmod" or "sdpa", see
    :class:`~gmod_ext.config.GmodConfig`) in place; the weights and the routing are unchanged."""
    _check_model("set_attention", model)
    state = model.__dict__.get("gmod_state")
    if state is None:
        raise ValueError("gmod.set_attention: the model is not converted (call gmod_ext.convert first)")
    if attention not in ATTENTIONS:
        raise ValueError(f"gmod.set_attention: attention={attention!r} is not one of {ATTENTIONS}")
    state.config.attention = attention
    model.config.gmod = state.config.to_dict()
    return model


# --------------------------------------------------------------------------- hooks
def _named_inputs(state: GmodState, module, args, kwargs) -> dict:
    cache = state.forward_params
    if not isinstance(cache, dict):
        cache = state.forward_params = {}
    params = cache.get(type(module))
    if params is None:
        params = cache[type(module)] = list(inspect.signature(module.forward).parameters)
    named = dict(zip(params, args))
    named.update(kwargs)
    return named


def _pre_hook(module, args, kwargs):
    state: GmodState = module.__dict__["gmod_state"]
    cfg = state.config
    kwargs = dict(kwargs)
    forced_mask = kwargs.pop("gmod_forced_mask", None)
    routing_mask = kwargs.pop("gmod_routing_mask", None)
    given_prefill = "gmod_prefill_len" in kwargs
    if given_prefill:
        prefill_len = kwargs.pop("gmod_prefill_len")
    else:  # inside model.generate: the prompt length it recorded (gmod_ext.generation)
        prefill_len = getattr(state, "generate_prefill_len", None)
    if not isinstance(kwargs.get("gmod_routing"), RoutingInfo) and state.active is not None \
            and forced_mask is None and routing_mask is None and not given_prefill:
        # the text model, called by the hooked outer model's forward while its routing is in flight, without
        # the keyword (MPT's and Falcon's heads do not pass extra keywords on): that routing, made from the
        # outer call's own keywords (gmod_prefill_len, gmod_forced_mask, labels), not a new one without them
        if _same_rows(state.active, _named_inputs(state, module, args, kwargs)):
            kwargs["gmod_routing"] = state.active
    if isinstance(kwargs.get("gmod_routing"), RoutingInfo):
        state.current = state.active = kwargs["gmod_routing"]
        if prefill_len is not None:
            state.current.prefill_len = prefill_len
        return args, kwargs
    named = _named_inputs(state, module, args, kwargs)
    ids = named.get("input_ids")
    embeds = named.get("inputs_embeds")
    ref = ids if isinstance(ids, torch.Tensor) else embeds
    if not isinstance(ref, torch.Tensor):
        return args, kwargs
    if ref.dim() < 2 or ref.shape[0] == 0 or ref.shape[1] == 0:
        which = "input_ids" if ref is ids else "inputs_embeds"
        raise ValueError(f"gmod: {which} has shape {tuple(ref.shape)}; a converted model needs a non-empty "
                         "batch [B, S, ...] with B >= 1 and S >= 1")
    shape = tuple(ref.shape[:2])
    if prefill_len is not None:
        _check_prefill_len(prefill_len)
    if forced_mask is not None:
        _check_mask_arg("gmod_forced_mask", forced_mask, ref, allow_bool=True)
    _check_not_paged(named)
    attention_mask = named.get("attention_mask")
    _check_attention_mask(attention_mask)
    _check_no_attention_maps(module, named)
    # each row's left padding, counted on the whole 2-D mask (past tokens too): Llama-4's chunks start after it
    left_pad = (attention_mask.cumsum(-1) == 0).sum(-1) if isinstance(attention_mask, torch.Tensor) \
        and attention_mask.dim() == 2 else None
    if (
        isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 2
        and attention_mask.shape[1] > shape[1]
    ):
        # with a KV cache the 2-D mask covers past + current tokens: the current ones are the last S
        attention_mask = attention_mask[:, -shape[1] :]
    # The code mask and each row's (forced, routable) counts, read in one host sync: the counts give
    # the tight capacity (RoutingInfo.rows) and F_max.
    if routing_mask is not None:
        _check_mask_arg("gmod_routing_mask", routing_mask, ref, allow_bool=False)
        codes, rows = explicit_codes_and_rows(routing_mask.to(ref.device), shape)
        max_forced = max(f for f, _ in rows)
    else:
        codes, max_forced, rows = routing_codes_and_rows(
            shape,
            ref.device,
            attention_mask=attention_mask,
            input_ids=ids if isinstance(ids, torch.Tensor) else None,
            labels=named.get("labels"),
            forced_mask=forced_mask,
            mode=cfg.forced,
            image_token_id=cfg.image_token_id,
        )
    info = RoutingInfo(codes, max_forced, rows=rows)
    info.left_pad = left_pad
    position_ids = named.get("position_ids")
    if (attention_mask is None and isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
            and position_ids.shape[1] == shape[1] and position_ids.shape[0] in (1, shape[0])
            and not position_ids.is_floating_point()):
        # position_ids that restart and no attention mask: packed sequences (transformers' padding-free
        # collators); MoD layers attend within each sequence when no KV cache is used, as the model's mask does
        info.segments = packed_segments(position_ids.expand(shape[0], -1))
        if info.segments is not None and not torch.compiler.is_compiling():
            info.max_segments = max_segments(info.segments)  # sizes the per-sequence routing's capacity
    token_type_ids = named.get(TOKEN_TYPE_KEYWORDS[state.token_type_rule])
    if cfg.image_token_id is not None and isinstance(token_type_ids, torch.Tensor) \
            and tuple(token_type_ids.shape) == shape:
        # tokens that attend both ways, marked by token_type_ids (Gemma-3: each image's tokens, 1; PaliGemma:
        # the prefix, 0; Gemma 4: mm_token_type_ids): kept tokens of one block see each other both ways, as in
        # the model's mask (in a model without images, e.g. GPT-2, token types are segment embeddings)
        set_token_type_blocks(info, token_type_ids.to(ref.device), state.token_type_rule)
    elif state.token_type_rule == "prefix" and shape[1] > 1 and _cache_is_empty(named):
        raise ValueError(
            f"gmod: {type(module).__name__} is a prefix-LM (PaliGemma): token_type_ids say which tokens form the "
            "prefix (0: the image and the prompt, which attend to each other both ways) and which the suffix (1: "
            f"attends causally), and this call of {shape[1]} tokens has none of shape {list(shape)}. Without them "
            "Hugging Face's own model attends both ways or causally depending on the attention implementation and "
            "the padding. Pass the token_type_ids its processor returns (all 0 for a prompt to generate from).")
    if prefill_len is not None:
        info.prefill_len = prefill_len  # read by MoDDecoderLayer.gmod_forward (see gmod_ext.cache)
    state.current = state.active = info
    state.scratch = None
    kwargs["gmod_routing"] = info
    return args, kwargs


def _cache_is_empty(named: dict) -> bool:
    """Whether a call's KV cache (either keyword) holds no tokens yet, or it has none."""
    cache = next((named[k] for k in ("cache", "past_key_values") if named.get(k) is not None), None)
    length = getattr(cache, "get_seq_length", None)
    return cache is None or not callable(length) or int(length()) == 0


def _same_rows(routing: RoutingInfo, named: dict) -> bool:
    """Whether a call's ``input_ids`` / ``inputs_embeds`` have the [B, S] that ``routing`` was made for (True
    when the routing has no mask to tell)."""
    ref = next((t for t in (named.get("input_ids"), named.get("inputs_embeds")) if isinstance(t, torch.Tensor)), None)
    return routing.mask is None or (ref is not None and tuple(ref.shape[:2]) == tuple(routing.mask.shape))


def _end_hook(module, args, output):
    """After a hooked forward (also when it raised): no routing is in flight any more (``GmodState.active``),
    and what its layers shared (:meth:`RoutingInfo.memo`) is let go."""
    state = module.__dict__["gmod_state"]
    if state.active is not None:
        state.active.clear_memo()
    state.active = None


def _check_not_paged(named: dict) -> None:
    """Continuous batching (``model.generate_batch``, transformers' ContinuousBatchingManager) runs the
    model on one flattened row of many requests with a paged KV cache and a 4-D mask it builds: MoD
    layers keep a compact cache per request row and route per row, which that layout does not have."""
    for key in ("cache", "past_key_values"):
        cache = named.get(key)
        if cache is not None and "Paged" in type(cache).__name__:
            raise NotImplementedError(f"gmod: a {type(cache).__name__}: {generation.CONTINUOUS_BATCHING_REFUSAL}")


def _check_attention_mask(mask) -> None:
    """A converted model takes the 2-D padding mask (or none). A prepared 4-D mask (or a dict of them)
    decides token by token what each position sees; the MoD layers attend over their kept tokens by the
    rules they know (padding, packed sequences from position_ids, image blocks from token_type_ids), so
    such a mask would be ignored there: refused instead."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return
    what = "given as a dict" if isinstance(mask, dict) else (
        f"of shape {tuple(mask.shape)}" if hasattr(mask, "shape") else f"given as {type(mask).__name__}")
    raise NotImplementedError(
        f"gmod: an attention_mask {what}; a converted model takes the 2-D padding mask [B, S] (1 = token, "
        "0 = padding). Its MoD layers attend over the tokens they keep by rules of their own (causal, padding, "
        "sliding windows, packed sequences from position_ids, image blocks from token_type_ids), so a custom "
        "4-D mask cannot be applied there. Pass the 2-D mask, or position_ids for packed sequences.")


def _check_no_attention_maps(module, named: dict) -> None:
    """``output_attentions=True`` (the keyword or the config's): Hugging Face collects the maps from the
    attention modules that run, and a MoD layer does not run its ``self_attn``, so the tuple it returned
    would hold the dense layers' maps only, numbered as if they were all the layers. Refused instead."""
    want = named.get("output_attentions")
    if want is None:
        want = getattr(getattr(module, "config", None), "output_attentions", False)
    if want is True:
        layers = list(module.__dict__["gmod_state"].config.layers or [])
        raise NotImplementedError(
            f"gmod: output_attentions=True on a converted model: its MoD layers ({layers}) compute no dense "
            "attention maps, so the maps returned would be the dense layers' only, misnumbered. For attention "
            "maps run the model before converting (gmod_ext.arank does), or gmod_ext.unconvert(model) first.")


def _check_prefill_len(p) -> None:
    if isinstance(p, torch.Tensor):
        if p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool or p.numel() != 1:
            raise TypeError(f"gmod: gmod_prefill_len must be an int (the prompt length), got a {p.dtype} tensor "
                            f"of shape {tuple(p.shape)}")
        return
    if isinstance(p, bool) or not isinstance(p, numbers.Integral):
        raise TypeError(f"gmod: gmod_prefill_len must be an int (the prompt length) or None, got {p!r:.80} "
                        f"({type(p).__name__})")
    if p < 0:
        raise ValueError(f"gmod: gmod_prefill_len={p} must be >= 0 (the prompt length)")


def _check_mask_arg(name: str, mask, ref: torch.Tensor, allow_bool: bool) -> None:
    what = "a bool tensor [B, S]" if allow_bool else "an integer tensor [B, S] of codes 0 / 1 / 2 (int8)"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"gmod: {name} must be {what}, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex or (mask.dtype == torch.bool and not allow_bool):
        hint = " (for a bool mask of tokens to keep, use gmod_forced_mask)" if mask.dtype == torch.bool else ""
        raise TypeError(f"gmod: {name} must be {what}, got dtype {mask.dtype}{hint}")
    if mask.device.type == "meta" and ref.device.type != "meta":
        raise ValueError(f"gmod: {name} is on the meta device (no data); the inputs are on {ref.device}")


def _post_hook(module, args, kwargs, output):
    state: GmodState = module.__dict__["gmod_state"]
    info = kwargs.get("gmod_routing")
    coef = state.config.aux_coef
    if not isinstance(info, RoutingInfo) or not coef:
        return None
    if _named_inputs(state, module, args, kwargs).get("labels") is None:
        return None
    aux = info.aux_total()
    if aux is None:
        return None
    if isinstance(output, tuple):
        if output and isinstance(output[0], torch.Tensor) and output[0].dim() == 0:
            return (_with_aux_gradient(info, output[0] + coef * aux.to(output[0].device), coef),) + tuple(output[1:])
        return None
    loss = getattr(output, "loss", None)
    if loss is not None:
        output.loss = _with_aux_gradient(info, loss + coef * aux.to(device=loss.device, dtype=loss.dtype), coef)
        return output
    return None


def _with_aux_gradient(info: RoutingInfo, loss: torch.Tensor, coef: float) -> torch.Tensor:
    """``loss``, and where MoD layers ran under reentrant gradient checkpointing (their aux terms recorded
    without autograd) a hook on it that hands the replays their aux terms' gradient (AuxLossGradient)."""
    if info.aux_without_graph and loss.requires_grad:
        info.aux_loss_gradient = AuxLossGradient(coef)
        loss.register_hook(info.aux_loss_gradient.capture)
    return loss


# --------------------------------------------------------------------------- stats
class _StatsMethod:
    """``model.gmod_stats()``: a plain callable holding the model (unlike a bound method it
    survives pickling (torch.save(model)) and deepcopy)."""

    def __init__(self, model):
        self.model = model

    def __call__(self) -> dict:
        return gmod_stats(self.model)

    def __repr__(self) -> str:
        return "<gmod_stats of the converted model>"


def gmod_stats(model: nn.Module) -> dict[str, Any]:
    """Router statistics of the last forward of a converted model.

    Returns ``{"layers": {layer: {"skip_ratio", "routable_skip_ratio", "mean_p", "aux_loss",
    "capacity"}}, "aux_loss": sum over MoD layers (before aux_coef), "skip_ratio": mean over MoD layers}``
    (Python floats; empty before the first forward). ``skip_ratio`` is the fraction of non-padding
    tokens a layer skipped, ``routable_skip_ratio`` the fraction of routable ones.
    """
    if hasattr(model, "module") and not is_converted(model):  # DDP / FSDP wrappers
        model = model.module
    state = model.__dict__.get("gmod_state")
    if state is None:
        raise ValueError("gmod_stats: the model is not converted")
    info = state.current if state.current is not None and state.current.stats else state.scratch
    if info is None or not info.stats:
        return {"layers": {}, "aux_loss": float("nan"), "skip_ratio": float("nan")}
    layers = {i: {k: float(v) for k, v in info.stats[i].items()} for i in sorted(info.stats)}
    aux = sum(v["aux_loss"] for v in layers.values())
    skip = sum(v["skip_ratio"] for v in layers.values()) / len(layers)
    return {"layers": layers, "aux_loss": aux, "skip_ratio": skip}


def _make_stats_callback():
    from transformers import TrainerCallback

    class GmodStatsCallback(TrainerCallback):
        """``transformers.Trainer`` callback adding ``gmod/aux_loss``, ``gmod/skip_ratio`` and per-layer
        ``gmod/skip_l{i}``, ``gmod/p_l{i}`` to every log line."""

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if model is None or logs is None:
                return
            try:
                st = gmod_stats(model)
            except ValueError:
                return
            logs["gmod/aux_loss"] = st["aux_loss"]
            logs["gmod/skip_ratio"] = st["skip_ratio"]
            for i, v in st["layers"].items():
                logs[f"gmod/skip_l{i}"] = v["skip_ratio"]
                logs[f"gmod/p_l{i}"] = v["mean_p"]

    return GmodStatsCallback


def __getattr__(name):
    # GmodStatsCallback subclasses transformers.TrainerCallback: built on first use so that
    # importing this module does not import transformers.
    if name == "GmodStatsCallback":
        cls = _make_stats_callback()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- save / load
def from_pretrained(path, cls=None, **kwargs) -> nn.Module:
    """Load a converted model saved with ``save_pretrained``: re-convert with the saved
    ``config.gmod`` settings, then load every weight (routers included) from the checkpoint.

    ``cls``: the model class (default: ``config.architectures[0]`` from transformers).
    ``kwargs`` go to ``cls.from_pretrained`` (``dtype=``, ...). Routers stay float32.
    """
    import transformers

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"gmod.from_pretrained: path must be a folder written by save_pretrained (str or "
                        f"os.PathLike), got {path!r:.80} ({type(path).__name__})")
    local = os.path.expanduser(os.fspath(path))
    if os.path.isfile(local):
        raise ValueError(f"gmod.from_pretrained: {path} is a file; expected the folder save_pretrained wrote "
                         "(with config.json)")
    # a hub id is "name" or "org/name"; anything else that is not a folder is a missing local path
    looks_local = os.path.isabs(local) or local.startswith((".", "~")) or local.count("/") > 1
    if not os.path.isdir(local) and looks_local:
        raise FileNotFoundError(f"gmod.from_pretrained: no such folder: {path}")
    if os.path.isdir(local) and "config" not in kwargs and not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(f"gmod.from_pretrained: {path} has no config.json (not a save_pretrained folder)")
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, nn.Module)
                                and hasattr(cls, "from_pretrained")):
        raise TypeError(f"gmod.from_pretrained: cls must be a transformers model class, got {cls!r:.80}")

    config = kwargs.pop("config", None) or transformers.AutoConfig.from_pretrained(path)
    gm = getattr(config, "gmod", None)
    if gm is None:
        raise ValueError(f"gmod.from_pretrained: {path} has no 'gmod' settings in its config (not converted)")
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        if cls is None:
            raise ValueError(f"gmod.from_pretrained: cannot find the model class {arch!r}; pass cls=")
    gcfg = GmodConfig.from_dict(dict(gm))

    # A throwaway subclass whose __init__ converts the freshly built model, so that transformers'
    # own loader fills the original weights *and* the routers (same key renaming, sharding, dtype).
    def __init__(self, config, *args, **kw):
        cls.__init__(self, config, *args, **kw)
        apply_gmod_config(self, GmodConfig.from_dict(dict(config.gmod)))

    keep = set(getattr(cls, "_keep_in_fp32_modules_strict", None) or []) | {"gmod_router"}
    loader = type(cls.__name__, (cls,), {"__init__": __init__, "_keep_in_fp32_modules_strict": keep})
    loader.__module__ = cls.__module__
    model = loader.from_pretrained(path, config=config, **kwargs)
    model.__class__ = cls
    for mod in model.modules():
        if isinstance(mod, GmodRouter) and mod.weight.dtype != torch.float32:
            mod.float()  # pragma: no cover - only if a loader bypassed _apply
    if list(gcfg.layers) != list(model.gmod_state.config.layers):  # pragma: no cover
        raise RuntimeError("gmod.from_pretrained: layer settings changed while loading")
    return model


class _CallableModule(types.ModuleType):
    """``gmod_ext.convert`` is both this module and, when called, :func:`convert`."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
