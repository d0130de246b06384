"""Conversion guard: does a MoD layer compute what this model's decoder layer computes?

A MoD layer re-implements the decoder block on the kept tokens with the layer's own modules:
``h = x + o_proj(attention(rope(q), rope(k), v))`` with ``q, k, v`` projected from
``input_layernorm(x)``, then ``h + mlp(post_attention_layernorm(h))``. That is the Llama family
(Llama, Mistral, Qwen2 / Qwen3, Gemma, Mixtral, ...; Phi-3's fused ``qkv_proj`` too; GLM's
interleaved partial rotary through the model's own ``apply_rotary_pos_emb``), Gemma-2 / 3's block
with its extra norms (``post_attention_layernorm`` on the attention output, ``pre_`` /
``post_feedforward_layernorm`` around the MLP) and GLM-4's (``post_self_attn_layernorm`` /
``post_mlp_layernorm`` on the two updates), and the other layouts of :mod:`gmod_ext.block_layout`
(parallel blocks, post-norms only, Granite's residual multiplier, GPT-OSS's attention sinks). A block
that deviates from these (norms after the rotation, depth-scaled residual sums, ...) would convert without
complaint and give wrong outputs. :func:`check_decoder_layers` rules that out before
converting. (Attention logit soft-capping is read from the attention module and reproduced by the MoD
layer: with random weights the logits are too small for this check to see whether it is.)

How: the model runs once on a short random prompt while forward pre-hooks record what it passes to
one decoder layer of each kind (layer class, sliding window, ``config.layer_types`` entry, and the
scalar settings of the block and its attention, such as SmolLM3's per-layer ``use_rope``). A float32
copy of that layer then runs on those inputs twice: as it is (the reference), and as a MoD layer that
keeps every token without gating, which then must compute the same function. Their residual updates
(output - input) must agree to float32 rounding; a mismatch, or an error inside the MoD path, raises
``TypeError`` naming the layer and, where it can tell, the feature that is not reproduced. A model
whose ``forward`` takes ``token_type_ids`` (Gemma-3's and PaliGemma's multimodal models) runs once more
with token types on the prompt (a span marked as an image; for a prefix-LM, a prefix and a suffix), and
each kind of layer is checked again on that (MoD layers reproduce Gemma-3's bidirectional attention
within an image and PaliGemma's within its prefix: :data:`gmod_ext.router.TOKEN_TYPE_RULES`). A prefix-LM's
text model alone attends both ways (PaliGemma's config sets ``use_bidirectional_attention``; its outer
model's mask makes the suffix causal), so its first check runs through the whole model, every token
marked as suffix. The model's weights, modes and random number generators are left as they were.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ._hf import accepts
from .block_extras import EXTRA_NORMS
from .block_layout import ATTENTION_NAMES, KNOWN_NORMS, MLP_BRANCHES, attention_module
from .config import GmodConfig
from .mod_layer import _returned_arity, _sliding_window, make_mod_layer
from .router import TOKEN_TYPE_KEYWORDS, GmodState, RoutingInfo, set_token_type_blocks

__all__ = ["check_decoder_layers", "VERIFY_TOLERANCE"]

# max |MoD update - dense update| / max |dense update|, both in float32. The two paths differ only in
# the attention kernel (gmod.attention against the model's SDPA / eager attention): 2e-7 to 5e-7 on the
# CPU for Llama, Qwen3, Gemma, Mixtral; GLM's interleaved partial rotary rotated as Llama's (before the
# MoD layer used the model's own rotation) gave 4e-3, HunYuan's q / k norms after the rotation (before MoD layers
# applied them there) 0.5.
VERIFY_TOLERANCE = 1e-4
_PROMPT_LEN = 12


def _settings(module: nn.Module) -> tuple:
    """A module's own scalar settings (bool / int / float / str / None attributes, its index excluded):
    per-layer switches such as SmolLM3's ``use_rope`` (no rotary on every fourth layer) live there."""
    return tuple(sorted((k, v) for k, v in vars(module).items()
                        if not k.startswith("_") and k not in ("layer_idx", "training")
                        and (v is None or isinstance(v, (bool, int, float, str)))))


def _kind(parts, i: int) -> tuple:
    """Layers of one kind compute the same function of their weights: same class, window, layer type and
    per-layer settings of the block and of its attention (so a NoPE layer is checked on its own)."""
    layer = parts.layers[i]
    types = getattr(parts.text_config, "layer_types", None)
    layer_type = types[i] if isinstance(types, (list, tuple)) and i < len(types) else None
    attn = attention_module(layer)
    return (type(layer), _sliding_window(attn), layer_type, _settings(layer), _settings(attn))


def _to_float32(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_float32(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    return obj


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"a decoder layer returned {type(out).__name__}, not a tensor")
    return out


def _sees_later_tokens(kwargs: dict) -> bool:
    """Whether the 4-D attention mask the model passed lets a token attend to later tokens (a prefix-LM /
    bidirectional mask, e.g. PaliGemma's); bool masks (True = attend) and additive float masks."""
    m = kwargs.get("attention_mask")
    if isinstance(m, dict):  # a mask per attention type
        m = next((v for v in m.values() if isinstance(v, torch.Tensor)), None)
    if not isinstance(m, torch.Tensor) or m.dim() != 4:
        return False
    S, Sk = m.shape[-2], m.shape[-1]
    allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    later = torch.ones(S, Sk, dtype=torch.bool, device=m.device).triu(1 + Sk - S)
    return bool((allowed & later).any())


def _hints(layer: nn.Module, cfg: Any, kwargs: Optional[dict] = None) -> list[str]:
    """Features of this block that a MoD layer does not reproduce, where they can be told by name (or,
    for the attention mask, from what the model passed)."""
    hints = []
    attn = attention_module(layer)
    if getattr(attn, "is_causal", True) is False or getattr(getattr(attn, "config", None),
                                                             "use_bidirectional_attention", False) is True \
            or (kwargs is not None and _sees_later_tokens(kwargs)):
        hints.append("the attention lets tokens see later tokens (is_causal=False, a bidirectional or prefix-LM "
                     "mask); MoD layers attend causally, except within the blocks that token_type_ids marks by "
                     "Gemma-3's rule (each image) or PaliGemma's (the prefix), or Gemma 4's mm_token_type_ids")
    known = ATTENTION_NAMES + MLP_BRANCHES + KNOWN_NORMS + EXTRA_NORMS  # (block_layout, block_extras)
    extra = sorted(n for n, _ in layer.named_children() if n not in known and "norm" in n)
    if extra:
        hints.append(f"extra norms {extra} (MoD layers know the norm layouts of gmod_ext.block_layout)")

    def val(name):
        return getattr(cfg, name, None) if cfg is not None else None

    v = val("partial_rotary_factor")
    if isinstance(v, (int, float)) and float(v) != 1.0:
        hints.append(f"config.partial_rotary_factor = {v} (check the rotary layout: MoD layers rotate the first "
                     "dims in halves, or with the model's own apply_rotary_pos_emb where its attention calls one)")
    for name in ("parallel_attn", "parallel_block"):
        if val(name) is True:
            hints.append(f"config.{name} = True (MoD layers know the parallel blocks of Cohere, Phi-1/2, GPT-NeoX)")
    if getattr(attn, "is_sliding", None) is False:
        hints.append("a global layer of a sliding / global hybrid (is_sliding=False): MoD layers give it no window, "
                     "and rotate q / k unless its forward rotates under a condition on the module's settings "
                     "(EXAONE-4's and Cohere2's NoPE layers)")
    return hints


def _reference_attention(layer: nn.Module) -> None:
    """The float32 copy's attention must run in float32: flash-attention kernels take 16-bit inputs only."""
    cfg = getattr(attention_module(layer), "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if isinstance(impl, str) and "flash" in impl:
        try:
            cfg._attn_implementation = "sdpa"
        except Exception:  # noqa: BLE001  (a config without the setter: leave it, the check reports errors)
            pass


def _check_one(model_name: str, index: int, layer: nn.Module, args: tuple, kwargs: dict, rotary,
               cfg: Any, tolerance: float, routing: Optional[RoutingInfo] = None, positions: str = "original") -> None:
    where = f"gmod.convert: {model_name} decoder layer {index} ({type(layer).__name__})"
    advice = ("Keep this model dense, or pass verify=False to gmod.convert to convert it anyway (its outputs "
              "will not be the model's).")
    args, kwargs = _to_float32(args), _to_float32(kwargs)
    x = args[0] if args else kwargs.get("hidden_states")
    try:
        work = copy.deepcopy(layer).float().eval()  # deep: its attention config is its own, changed below
        _reference_attention(work)
        with torch.no_grad():
            raw = work(*args, **kwargs)
            ref = _first_tensor(raw) - x
    except Exception as err:  # noqa: BLE001  (e.g. quantized weights that cannot run in float32)
        raise TypeError(f"{where}: could not run a float32 copy of the layer to check it ({type(err).__name__}: "
                        f"{err}). Pass verify=False to gmod.convert to convert without the check.") from err
    arity = _returned_arity(type(layer))
    if not isinstance(raw, torch.Tensor) and not (type(raw) is tuple and arity == len(raw)):
        # its model reads out[0]: it would take a MoD layer's first row
        raise TypeError(f"{where} returns a {type(raw).__name__} (hidden states, attention weights, ...), whose "
                        "first element its model reads; a MoD layer returns the hidden states tensor, as the decoder "
                        "layers of transformers 5 do, or a tuple shaped like the one its forward's return statements "
                        f"write (Falcon's), and this one's does not say. {advice}")
    with torch.no_grad():
        # positions="compact" recomputes cos / sin with the model's rotary module: on the unpadded check
        # prompt, every token kept, the compact positions are the original ones, so it must agree too
        state = GmodState(GmodConfig(gate="none", router="per_layer", router_init="zeros", positions=positions),
                          rotary=rotary)
        make_mod_layer(work, 0.0, layer_idx=index, state=state)
        try:
            mod_kwargs = kwargs if routing is None else dict(kwargs, gmod_routing=routing)
            out = _first_tensor(work(*args, **mod_kwargs)) - x
        except Exception as err:  # noqa: BLE001
            hints = _hints(layer, cfg, kwargs)
            raise TypeError(f"{where}: a MoD layer cannot run this block ({type(err).__name__}: {err})"
                            + (f"; likely cause: {'; '.join(hints)}" if hints else "") + f". {advice}") from err
    scale = float(ref.abs().max())
    err = float((out - ref).abs().max()) / max(scale, 1e-30)
    if not err <= tolerance and positions == "compact":  # is it the angles? then say so
        try:
            _check_one(model_name, index, layer, args, kwargs, rotary, cfg, tolerance, routing, positions="original")
        except TypeError:
            pass
        else:
            raise TypeError(
                f"{where}: with positions='compact' its MoD layer computes rotary angles with the model's rotary "
                f"module, and they are not the ones this layer is given (its update differs by {err:.1e}; e.g. "
                "per-layer rotary bases). With positions='original' (the default: the layer's own cos / sin rows "
                "of the kept tokens) it converts exactly; convert with that.")
    if not err <= tolerance:  # NaN fails too
        hints = _hints(layer, cfg, kwargs)
        raise TypeError(
            f"{where} is not a block a MoD layer reproduces: keeping every token, the MoD layer's update differs "
            f"from the layer's own by {err:.1e} (relative, float32; rounding is ~1e-6)"
            + (f"; likely cause: {'; '.join(hints)}" if hints else "")
            + ". MoD layers compute x + attn(norm(x)), then + mlp(norm(.)), with rotary q/k and the norms where "
            f"the Llama family (Llama, Mistral, Qwen2/3, Gemma, Mixtral, Phi-3, ...), Gemma-2/3, GLM-4, Apertus or "
            f"OLMo-2 put them (gmod_ext.block_layout). {advice}")


def _check_token_types(model: nn.Module, parts, ids: torch.Tensor, indices: list, tolerance: float,
                       positions: str = "original") -> None:
    """Multimodal models that mark tokens with ``token_type_ids`` (Gemma-3's, PaliGemma's) let some tokens
    attend to later ones: the tokens of one image (Gemma-3), or of the prefix (PaliGemma: the image and the
    prompt), see each other in both directions. The language-model check prompt has no token types, so it
    cannot see that: run the whole model once more with token types on the prompt (Gemma-3: a span marked as
    an image; a prefix-LM: a prefix and a suffix; no pixels: the embeddings stay text embeddings), and check
    each kind of decoder layer again on what it then gets, the MoD layer told the blocks
    (:func:`gmod_ext.router.set_token_type_blocks`) as a converted model's forward tells it.
    """
    keyword = TOKEN_TYPE_KEYWORDS[parts.token_type_rule]  # Gemma 4's: mm_token_type_ids
    if parts.image_token_id is None or not accepts(model.forward, keyword):
        return
    types = _check_types(ids, parts.token_type_rule)
    seen: dict = {}

    def recorder(i):
        def hook(_module, args, kwargs):
            seen.setdefault(i, (args, dict(kwargs)))
        return hook

    handles = [parts.layers[i].register_forward_pre_hook(recorder(i), with_kwargs=True) for i in indices]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **{keyword: types})
    except Exception as err:  # noqa: BLE001  (a model that needs pixels with token types: say it was not checked)
        warnings.warn(f"gmod.convert: {type(model).__name__} takes {keyword}, but a check prompt with image "
                      f"token types did not run ({type(err).__name__}: {err}), so its attention over image tokens "
                      "was not checked", stacklevel=4)
        return
    finally:
        for h in handles:
            h.remove()
    routing = RoutingInfo()
    set_token_type_blocks(routing, types, parts.token_type_rule)
    for i in indices:
        if i not in seen:
            continue
        args, kwargs = seen[i]
        try:
            _check_one(type(model).__name__, i, parts.layers[i], args, kwargs, parts.rotary, parts.text_config,
                       tolerance, routing=routing, positions=positions)
        except TypeError as err:
            raise TypeError(
                f"gmod.convert: {type(model).__name__} on a prompt with token types ({keyword}, "
                f"{parts.token_type_rule!r} rule): {err}. Its mask lets some tokens attend to later ones (e.g. an "
                "image's tokens to each other in both directions, which MoD layers reproduce for Gemma-3's rule: "
                "consecutive image tokens form a block, and for PaliGemma's: the prefix is one block), and here the "
                "MoD layer did not reproduce it. Keep this model dense, convert its text-only language model, or "
                "pass verify=False to gmod.convert to convert it anyway.") from err


def _check_types(ids: torch.Tensor, rule: str) -> torch.Tensor:
    """token_type_ids for the check prompt ``ids`` under a TOKEN_TYPE_RULES rule: for "image" (1 marks image
    tokens) a span of 4 image tokens inside the text; for "prefix" (0 the prefix, 1 the suffix) a prefix of
    7 tokens then the suffix; for "causal" (a prefix-LM's causal run) every token in the suffix."""
    if rule in ("image", "vision", "vision_all"):  # (Gemma 4's mm_token_type_ids: 1 marks image tokens too)
        types = torch.zeros_like(ids)
        types[:, 3:7] = 1
    else:
        types = torch.ones_like(ids)
        if rule == "prefix":
            types[:, :7] = 0
    return types


def check_decoder_layers(model: nn.Module, parts, tolerance: float = VERIFY_TOLERANCE,
                         positions: str = "original") -> int:
    """Raise TypeError unless a MoD layer reproduces each kind of decoder layer of ``model`` (see the
    module docstring). ``parts``: :func:`gmod_ext._hf.find_decoder`'s result; ``positions``: the MoD
    layers' :attr:`GmodConfig.positions` (with "compact" the layers' rotary angles come from the model's
    rotary module, which must then be the one each layer uses). Returns the number of layer kinds checked."""
    kinds: dict = {}
    for i in parts.convertible:  # (a hybrid's linear-attention layers stay as they are)
        kinds.setdefault(_kind(parts, i), i)
    indices = sorted(kinds.values())
    emb = parts.text_model.get_input_embeddings() if hasattr(parts.text_model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"gmod.convert: {type(parts.text_model).__name__} has no input embedding to run a check prompt")
    device = weight.device
    if device.type == "meta":  # no values to compute with (a model built for loading weights later)
        warnings.warn("gmod.convert: the model is on the meta device, so its decoder block was not checked "
                      "(gmod_ext.verify); convert a model with weights to have it checked", stacklevel=3)
        return 0
    vocab = int(weight.shape[0])
    avoid = {parts.image_token_id} if parts.image_token_id is not None else set()

    captured: dict = {}

    def recorder(i):
        def hook(_module, args, kwargs):
            captured.setdefault(i, (args, dict(kwargs)))
        return hook

    modes = {m: m.training for m in model.modules()}  # (the whole model: the token-type check runs all of it)
    rng_devices = [device] if device.type == "cuda" else []
    handles = [parts.layers[i].register_forward_pre_hook(recorder(i), with_kwargs=True) for i in indices]
    try:
        with torch.random.fork_rng(devices=rng_devices):
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, max(2, min(vocab, 1000)), (1, _PROMPT_LEN), generator=g)
            for t in avoid:  # no image placeholder tokens (there are no image features to put there)
                ids[ids == t] = (t + 1) % max(2, min(vocab, 1000))
            model.eval()
            with torch.no_grad():
                ids = ids.to(device)
                try:
                    if parts.token_type_rule == "prefix" and accepts(model.forward, "token_type_ids"):
                        # a prefix-LM's text model alone attends both ways: its causal run is the whole model's,
                        # every token in the suffix
                        model(input_ids=ids, attention_mask=torch.ones_like(ids),
                              token_type_ids=_check_types(ids, "causal"), use_cache=False)
                    else:
                        parts.text_model(input_ids=ids, use_cache=False)
                except torch.OutOfMemoryError:
                    raise
                except Exception as err:  # noqa: BLE001 - the model's own forward (the hooks only record)
                    raise TypeError(
                        f"gmod.convert: {type(parts.text_model).__name__}, the stack of decoder layers found in "
                        f"{type(model).__name__}, does not run on token ids alone ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]}), so its layers cannot be checked; it needs inputs a "
                        "text prompt does not give (e.g. a byte-level model's patch ids)") from err
            missing = [i for i in indices if i not in captured]
            if missing:
                raise TypeError(f"gmod.convert: decoder layers {missing} did not run on a check prompt")
            for i in indices:
                args, kwargs = captured[i]
                _check_one(type(model).__name__, i, parts.layers[i], args, kwargs, parts.rotary,
                           parts.text_config, tolerance, positions=positions)
            _check_token_types(model, parts, ids.to(device), indices, tolerance, positions)
    finally:
        for h in handles:
            h.remove()
        for m, flag in modes.items():
            m.training = flag
    return len(indices)
