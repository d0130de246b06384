"""Locate the parts of a Hugging Face decoder model (no transformers import needed).

Supported: ``*ForCausalLM`` of the Llama family (Llama, Mistral, Qwen2, ... : ``model.model.layers``)
and ``LlavaForConditionalGeneration`` (``model.model.language_model.layers``); any other module whose
``layers`` hold decoder blocks of a known layout (:mod:`gmod_ext.block_layout`) is found by a search
(OPT's ``model.decoder.layers``, BLIP-2's ``language_model.model.decoder.layers``, BioGPT's
``biogpt.layers``); GPT-2 calls its stack ``transformer.h``.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from typing import Optional

from torch import nn

from .block_extras import kv_sharing_refusal
from .block_layout import block_hidden_size, block_layout, first_child, layout_refusal


@dataclasses.dataclass
class DecoderParts:
    text_model: nn.Module  # the module that owns `layers` (LlamaModel, ...; GPT2Model's is called `h`)
    layers: nn.ModuleList
    rotary: Optional[nn.Module]
    text_config: object  # the config of the decoder stack
    hidden_size: int
    image_token_id: Optional[int]
    # the layers a MoD layer can replace: those with self-attention and a known norm layout (all of them
    # but the linear-attention / recurrent layers of hybrid models such as Qwen3.5)
    convertible: tuple = ()
    # why layers with a layout are still not convertible: {index: reason} (KV sharing: gmod_ext.block_extras)
    refusals: dict = dataclasses.field(default_factory=dict)
    # how its token_type_ids mark the tokens that attend both ways (gmod_ext.router.TOKEN_TYPE_RULES)
    token_type_rule: str = "image"


# The oldest transformers release the model tests pass on (checked 2026-11-25: the whole suite on 4.57.6,
# 5.0, 5.17 and 5.24; the generation, crop, verify and cache tests and the demo's on 5.3, 5.4, 5.5, 5.7,
# 5.9 - 5.12 and 5.13.1; a conversion by hand on 4.51): 4.51 decoder layers return tuples and caches have
# no per-layer classes (the compact cache's base); 4.57 broke from_pretrained, gradient checkpointing and
# several architectures; 5.0 generated with a plain DynamicCache (tokens differing from the model's
# own); 5.3 - 5.4 Granite's
# model indexed the layers' outputs; 5.5 - 5.12 the demo's training reached different accuracies
# (not traced). Before ~5.17 Qwen2-VL's rotary returned per-section cos / sin, which the converter's
# check refuses with its reason, so that one stays a clear error, not a wrong answer (the only
# failures of those tests on 5.13.1).
MIN_TRANSFORMERS = (5, 13)


def _transformers_version() -> str:
    """The imported transformers' version ("" when transformers is not imported)."""
    tf = sys.modules.get("transformers")
    return str(getattr(tf, "__version__", "")) if tf is not None else ""


def check_transformers_version(fn: str) -> None:
    """Raise a clear error if the transformers in this process is older than :data:`MIN_TRANSFORMERS`
    (nothing to check when transformers is not imported: a model that is not a transformers model)."""
    version = _transformers_version()
    nums = re.findall(r"\d+", version)[:2]
    if len(nums) == 2 and tuple(int(n) for n in nums) < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise RuntimeError(
            f"gmod.{fn}: transformers {version} is older than {need}, the oldest release gmod_ext is tested "
            f"with (older ones differ in what MoD layers and the compact KV cache build on: decoder layer outputs, "
            f"the cache API, generation's cache set-up); upgrade: pip install 'transformers>={need}'")


def _is_decoder_layer(m: nn.Module) -> bool:
    return block_layout(m) is not None


STACK_NAMES = ("layers", "h", "blocks")  # the decoder stack's attribute: ``layers``, GPT-2's ``h``, MPT's ``blocks``


def _stack(m: nn.Module) -> Optional[nn.ModuleList]:
    """``m``'s decoder layer stack (a ModuleList named as in :data:`STACK_NAMES`), or None."""
    return first_child(m, STACK_NAMES, nn.ModuleList)


def find_decoder(model: nn.Module) -> DecoderParts:
    candidates = []
    for path in ("model.language_model", "language_model.model", "model", "language_model", "transformer", ""):
        m = model
        ok = True
        for part in filter(None, path.split(".")):
            m = getattr(m, part, None)
            if m is None:
                ok = False
                break
        if ok and _stack(m) is not None:
            candidates.append(m)
            break
    refusal = None  # why a stack that looks like decoder layers is not one gmod_ext converts
    if not candidates:
        for _, m in model.named_modules():
            layers = _stack(m)
            if layers is None:
                continue
            if any(_is_decoder_layer(layer) for layer in layers):
                candidates.append(m)
                break
            refusal = refusal or next((r for r in map(layout_refusal, layers) if r is not None), None)
    if not candidates and refusal:
        raise TypeError(f"gmod: {type(model).__name__}'s decoder layers are not ones MoD layers reproduce: {refusal}")
    if not candidates:
        raise TypeError(f"gmod: could not find a decoder layer stack in {type(model).__name__}")
    text_model = candidates[0]
    layers = _stack(text_model)
    refusals = {i: r for i in range(len(layers)) if _is_decoder_layer(layers[i])
                and (r := kv_sharing_refusal(layers, i)) is not None}
    convertible = tuple(i for i, layer in enumerate(layers) if _is_decoder_layer(layer) and i not in refusals)
    if not convertible and refusals:
        raise TypeError(f"gmod: none of {type(text_model).__name__}'s decoder layers can become a MoD layer: "
                        f"{next(iter(refusals.values()))}")
    if not convertible:
        refusal = next((r for r in map(layout_refusal, layers) if r is not None), None)
        raise TypeError(f"gmod: {type(text_model).__name__}'s layers are not Llama-family decoder layers"
                        + (f": {refusal}" if refusal else ""))
    cfg = getattr(text_model, "config", None) or getattr(model, "config", None)
    top_cfg = getattr(model, "config", None)
    image_token_id = None
    for c in (top_cfg, cfg):
        for name in ("image_token_id", "image_token_index"):
            v = getattr(c, name, None) if c is not None else None
            if isinstance(v, int):
                image_token_id = v
                break
        if image_token_id is not None:
            break
    hidden = block_hidden_size(layers[convertible[0]])
    if hidden is None:
        hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(hidden, int):
        raise TypeError(f"gmod: cannot tell the hidden size of {type(layers[convertible[0]]).__name__} (no norm weight, no "
                        "self_attn.o_proj weight, no config.hidden_size)")
    return DecoderParts(text_model, layers, getattr(text_model, "rotary_emb", None), cfg, hidden, image_token_id,
                        convertible, refusals, token_type_rule(model))


# Multimodal models whose mask is a prefix-LM's: token_type_ids 0 (the image and the prompt) attend to each
# other both ways, 1 (the suffix: the answer, generated tokens) causally. The other models that take
# token_type_ids with images mark each image (1) as its own block (Gemma-3). The converter's check
# (gmod_ext.verify) runs the model on a prompt with token types under the rule named here, so a model
# whose mask follows neither is refused, not converted wrong.
PREFIX_LM_MODEL_TYPES = ("paligemma",)
# Gemma 4 models whose forward applies the image blocks of mm_token_type_ids in every layer, not only in the
# sliding-window ones (transformers 5.24's gemma4_unified builds Gemma-3's mask from them)
VISION_BLOCKS_IN_ALL_LAYERS = ("gemma4_unified",)


def token_type_rule(model: nn.Module) -> str:
    """The rule of gmod_ext.router.TOKEN_TYPE_RULES that ``model``'s token types follow: Gemma 4's
    mm_token_type_ids where its text config says ``use_bidirectional_attention="vision"``."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) in PREFIX_LM_MODEL_TYPES:
        return "prefix"
    get_text = getattr(cfg, "get_text_config", None)
    text = get_text() if callable(get_text) else None
    if getattr(text, "use_bidirectional_attention", None) == "vision" and accepts(model.forward, "mm_token_type_ids"):
        # (the converter's check runs the model with image tokens under this rule, so a mask built otherwise is
        # refused, not converted wrong)
        return "vision_all" if getattr(cfg, "model_type", None) in VISION_BLOCKS_IN_ALL_LAYERS else "vision"
    return "image"


# ------------------------------------------------------------------ the KV cache's keyword
# transformers 5.24 renamed the KV cache argument of models and decoder layers from ``past_key_values``
# to ``cache`` (the old name is accepted with a deprecation warning until 5.40; outputs keep a
# ``past_key_values`` property); earlier releases only know ``past_key_values``. These helpers let the
# MoD layers and generation hooks work with both. GPT-NeoX's decoder layers call it ``layer_past``.
CACHE_KWARGS = ("cache", "past_key_values")
LAYER_CACHE_KWARGS = CACHE_KWARGS + ("layer_past",)


def accepts(fn, name: str) -> bool:
    """Whether callable ``fn`` (e.g. a module's ``forward``) has a parameter called ``name``."""
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def cache_kwarg_of(fn) -> str:
    """The name of the KV cache parameter of ``fn`` (a model's or decoder layer's ``forward``):
    ``"cache"`` when it has one (transformers >= 5.24), ``"layer_past"`` (GPT-NeoX's layers), else
    ``"past_key_values"``."""
    return next((n for n in ("cache", "layer_past") if accepts(fn, n)), "past_key_values")


def pop_cache(kwargs: dict):
    """Removes the KV cache from a decoder layer call's keywords under any of its names (``cache``,
    ``past_key_values``, ``layer_past``) and returns it (or None). Two at once is the caller's error,
    as in transformers."""
    given = [n for n in LAYER_CACHE_KWARGS if kwargs.get(n) is not None]
    if len(given) > 1:
        raise ValueError(f"gmod: the KV cache was given as {' and '.join(given)}; pass it once")
    found = None
    for n in LAYER_CACHE_KWARGS:
        v = kwargs.pop(n, None)
        if v is not None:
            found = v
    return found


def output_cache(out):
    """The KV cache a model output carries (``cache`` on transformers >= 5.24, ``past_key_values``
    before), or None. Reads the output's fields, not the deprecated ``past_key_values`` property."""
    get = out.get if hasattr(out, "get") else (lambda n: getattr(out, n, None))
    for n in CACHE_KWARGS:
        v = get(n)
        if v is not None:
            return v
    return None
