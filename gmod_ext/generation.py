"""``generate`` for converted models: the compact KV cache and cache / no-cache routing equality.

:func:`gmod_ext.convert` installs three plain callables on the converted model (plain objects
holding the model, like ``model.gmod_stats``: they survive deepcopy and pickling, and
:func:`gmod_ext.unconvert` removes them):

* ``model.gmod_new_cache()``: a new :class:`~gmod_ext.cache.GmodCache` for the model (dense
  layers ``DynamicLayer``, MoD layers compact :class:`~gmod_ext.cache.GmodLayer`);
* ``model._prepare_cache_for_generation``: ``generate`` creates a ``GmodCache`` where it would
  create a ``DynamicCache`` (default / "dynamic" / "offloaded" cache implementation); a cache the
  user passes is used as is (a plain ``DynamicCache`` gets compact MoD slots on first use);
* ``model.generate``: the model's own ``generate``, routing every forward it makes with
  ``gmod_prefill_len`` = the prompt length unless given (recorded on the model's ``gmod_state``
  for the duration of the call and read by the forward hook, not added to generate's model
  keywords: assisted generation copies those to the assistant model), so that MoD layers route
  prompt tokens by top-k among the prompt and every later token by ``p >= decode_threshold``,
  with or without a cache
  (``use_cache=False`` recomputes the whole sequence each step with the same decisions: see
  :mod:`gmod_ext.cache`). Streaming (``streamer=``), sampling, batches with padding, beam search
  and assisted / prompt-lookup decoding (the compact cache crops, :mod:`gmod_ext.cache`) go through
  unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

from ._hf import CACHE_KWARGS

__all__ = ["GmodGenerate", "GmodPrepareCache", "GmodNewCache", "install", "uninstall", "prompt_length"]

_INSTALLED = ("generate", "_prepare_cache_for_generation", "gmod_new_cache")
# transformers' continuous batching entry points (paged KV cache, requests flattened into one row)
_CONTINUOUS_BATCHING = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager")

CONTINUOUS_BATCHING_REFUSAL = (
    "continuous batching (model.generate_batch / init_continuous_batching) runs the requests flattened "
    "into one row over a paged KV cache; a converted model's MoD layers keep a compact KV cache per row of "
    "a batch, which paged caches do not have. Batch the prompts and call model.generate (left padding), "
    "or serve the model unconverted.")


class _Bound:
    def __init__(self, model):
        self.model = model

    def __repr__(self) -> str:
        return f"<gmod {type(self).__name__} of the converted model>"


class GmodNewCache(_Bound):
    """``model.gmod_new_cache(**kwargs)``: ``GmodCache(model, **kwargs)``."""

    def __call__(self, **kwargs):
        from .cache import GmodCache_cls

        return GmodCache_cls()(self.model, **kwargs)


class GmodPrepareCache(_Bound):
    """``generate``'s cache preparation, with a :class:`~gmod_ext.cache.GmodCache` instead of a
    ``DynamicCache``."""

    def __call__(self, generation_config, model_kwargs: dict, *args, **kwargs):
        from transformers import DynamicCache

        from .cache import GmodCache_cls

        model = self.model
        state = model.__dict__.get("gmod_state")
        out = type(model)._prepare_cache_for_generation(model, generation_config, model_kwargs, *args, **kwargs)
        # The cache generate() just made: model_kwargs["cache"] on transformers >= 5.24, else
        # model_kwargs["past_key_values"].
        key = next((n for n in CACHE_KWARGS if model_kwargs.get(n) is not None), None)
        cache = model_kwargs.get(key) if key is not None else None
        if (
            state is not None
            and state.config.on_cache == "compact"
            and type(cache) is DynamicCache
            and not getattr(cache, "_is_user_defined", False)
            and cache.get_seq_length() == 0
        ):
            model_kwargs[key] = GmodCache_cls()(model, offloading=bool(getattr(cache, "offloading", False)))
        return out


def prompt_length(args: tuple, kwargs: dict):
    """The prompt length of a ``generate(*args, **kwargs)`` call (None if unknown)."""
    for t in (args[0] if args else None, kwargs.get("inputs"), kwargs.get("input_ids"), kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return int(t.shape[1])
    return None


class GmodGenerate(_Bound):
    """``model.generate(...)`` of a converted model: the class's ``generate``, its forwards routed
    with ``gmod_prefill_len=<prompt length>`` (pass ``gmod_prefill_len=None`` to route every full
    forward by top-k over the whole sequence instead, the training rule)."""

    def __call__(self, *args, **kwargs) -> Any:
        model = self.model
        if "gmod_prefill_len" in kwargs:
            p = kwargs.pop("gmod_prefill_len")
        else:
            p = prompt_length(args, kwargs)
        state = model.__dict__.get("gmod_state")
        if state is None:  # pragma: no cover - unconverted under our feet
            return type(model).generate(model, *args, **kwargs)
        old = getattr(state, "generate_prefill_len", None)
        state.generate_prefill_len = p
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            state.generate_prefill_len = old


class GmodNoContinuousBatching(_Bound):
    """Transformers' continuous-batching entry points on a converted model: refused at the call (its
    manager would log the error from a worker thread and return empty results)."""

    def __init__(self, model, name: str):
        super().__init__(model)
        self.name = name

    def __call__(self, *args, **kwargs) -> Any:
        raise NotImplementedError(f"gmod: model.{self.name}: {CONTINUOUS_BATCHING_REFUSAL}")


def install(model) -> None:
    """Install ``gmod_new_cache`` (always) and the ``generate`` hooks (models with ``generate``)."""
    model.__dict__["gmod_new_cache"] = GmodNewCache(model)
    if callable(getattr(type(model), "generate", None)) and hasattr(type(model), "_prepare_cache_for_generation"):
        model.__dict__["generate"] = GmodGenerate(model)
        model.__dict__["_prepare_cache_for_generation"] = GmodPrepareCache(model)
    for name in _CONTINUOUS_BATCHING:
        if callable(getattr(type(model), name, None)):
            model.__dict__[name] = GmodNoContinuousBatching(model, name)


def uninstall(model) -> None:
    for name in _INSTALLED + _CONTINUOUS_BATCHING:
        model.__dict__.pop(name, None)
