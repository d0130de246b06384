"""The compact KV cache of a converted (gamma-MoD) model, and KV memory accounting.

A MoD layer processes only the tokens its router keeps, so its KV cache only needs those tokens.
:class:`GmodCache` is a ``transformers`` :class:`~transformers.DynamicCache` whose MoD-layer slots
are :class:`GmodLayer` objects:

* dense layers: the usual ``DynamicLayer`` (``[B, Hk, T, d]``, every position, padding included);
* MoD layers: a compact per-row buffer ``keys`` / ``values`` ``[B, capacity, Hk, d]`` (the layout
  of ``gmod_ext.ops``) with ``cache_len [B] int32`` (tokens stored per row). Row ``b`` holds, in
  order, the ``cache_len[b]`` tokens this layer processed; padding is never processed, so never
  stored. New tokens are written with ``ops.kv_cache_append``; attention of a step's kept tokens is
  ``ops.attention(q, keys, values, q_len=count, k_len=cache_len)`` (bottom-right aligned, so a
  step's kept tokens see every earlier kept token of their row and each other causally).
  The buffer grows by copying when a row would overflow (``capacity = needed + max(1, needed//32)``:
  at most ~3% slack, amortised copies). ``get_seq_length()`` of a MoD slot is the number of
  *positions* seen (as for a dense layer: Hugging Face derives positions and mask sizes from it), not
  the number of stored tokens.

Converted models use it automatically: ``model.generate(...)`` creates a :class:`GmodCache`
(``model.gmod_new_cache()`` makes one by hand), and a plain ``DynamicCache`` given to a converted
model has its MoD slots swapped for :class:`GmodLayer` on first use (:func:`gmod_layer_cache`).

Routing with a cache (what each MoD layer keeps), see :mod:`gmod_ext.mod_layer`
--------------------------------------------------------------------------------
* **prefill** (the first call on an empty cache): the training rule over the call's tokens:
  top-k at the layer's skip ratio (forced tokens kept, padding never), or ``config.threshold`` in
  eval mode (routable tokens with p > threshold, at most the top-k count);
* **decode** (every later call, any number of tokens; chunked prefill and multi-token steps
  included): each new token is processed iff ``p >= config.decode_threshold`` (default 0.5; forced
  tokens always, padding never); a skipped token leaves the layer unchanged and appends nothing.

Decision design (cache / no-cache equality)
-------------------------------------------
Each token's keep/skip decision in a layer is fixed at the step the token is first seen, and it is
a *causal* function of the prefix: for a prompt token, top-k among the prompt tokens (their router
scores depend only on the prompt); for a later token, ``p_t >= decode_threshold`` (``p_t`` depends
only on tokens ``<= t``: kept tokens attend causally, skipped tokens pass through). A full recompute
without a cache (``use_cache=False``) therefore makes the same decisions if it applies the same
rule with the same boundary ``P`` (the prompt length): positions ``< P`` by top-k among ``[0, P)``,
positions ``>= P`` by the decode threshold. The boundary travels as the model keyword
``gmod_prefill_len=P``; ``model.generate`` of a converted model sets it to the prompt length by
itself (with or without a cache), so ``generate(..., use_cache=False)`` reproduces the cached
generation token for token (up to floating-point near-ties of p around the threshold or of top-k
scores, which a full recompute may round differently). Without ``gmod_prefill_len`` a forward
routes top-k over the whole sequence (the training rule). With a cache, ``gmod_prefill_len=P``
smaller than the first call's length applies the decode rule to positions ``>= P`` of that call too;
a prefill split over several calls (chunked prefill) routes later chunks by the decode rule, so it
equals a no-cache recompute with ``P`` = the first chunk's length, not the prompt length.

Rollback (``crop``: assisted / speculative decoding, prompt-lookup decoding)
----------------------------------------------------------------------------
A MoD slot also records the position (in ``seen``'s count) of every token it stores,
``positions [B, capacity] int32``, ascending per row. ``crop`` removes the last positions: row b
keeps its stored tokens at positions ``< seen - removed`` (a prefix of its buffer, since tokens are
stored in position order), ``cache_len`` shrinks to match and ``seen`` goes back; what is left is
what the cache would hold had the removed positions never been fed (the decisions of the kept
positions did not depend on later tokens, see above). Hugging Face's assisted generation verifies a
draft in one multi-token decode step and crops the rejected tokens, so it gives the tokens of
plain greedy generation. Cropping into the prompt keeps the prompt tokens' top-k decisions, which
were made over the whole prompt.

Sliding windows
---------------
A MoD layer with a sliding window W sets its slot's ``window``; after each step the slot drops the
stored tokens at positions ``<= seen - W`` (no later query sees them), amortised over W // 8
positions (:meth:`GmodLayer.trim_window`: one device sync and one copy of the remaining rows).
``dropped`` counts them per row, so ``positions="compact"`` keeps numbering after them. While the
past is recorded (``activate_past_recording()``, which transformers calls for assisted generation)
the drop waits for ``crop``; a crop back past tokens already dropped raises.

Memory accounting: :func:`memory_report` / :func:`format_memory_report` (also
``gmod_ext.kv_memory_report``). Beam search works (``reorder_cache``).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "GmodLayer",
    "GmodCache",
    "gmod_layer_cache",
    "memory_report",
    "format_memory_report",
]


def _cache_utils():
    from transformers import cache_utils

    return cache_utils


def _tensor_bytes(t: Optional[torch.Tensor]) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    return int(t.numel()) * int(t.element_size())


def crop_removes_tokens(cu=None) -> bool:
    """Whether this transformers' layer ``crop(n)`` takes the number of tokens to remove (``n <= 0``:
    ``crop(-3)`` drops three, ``crop(0)`` nothing; 5.17 has it) rather than the length to keep
    (``crop(n >= 0)`` keeps n, ``crop(-3)`` drops three; 5.13 has that)."""
    cu = _cache_utils() if cu is None else cu
    crop = getattr(getattr(cu, "DynamicLayer", None), "crop", None)
    if crop is None:
        return True
    names = [n for n in inspect.signature(crop).parameters if n != "self"]
    return bool(names) and names[0] == "tokens_to_remove"


def crop_target(seen: int, arg: int, removes_tokens: bool) -> int:
    """The number of positions a cache of ``seen`` positions keeps after ``crop(arg)`` (see
    :func:`crop_removes_tokens` for the two meanings of ``arg``)."""
    if isinstance(arg, bool) or not isinstance(arg, int):
        try:
            arg = int(arg)
        except (TypeError, ValueError):
            raise TypeError(f"gmod: crop() takes an int, got {type(arg).__name__}") from None
    if removes_tokens:
        if arg > 0:
            raise ValueError(f"gmod: crop({arg}): pass a negative number of tokens to remove (crop(-{arg}))")
        return max(seen + arg, 0)
    return max(seen + arg, 0) if arg < 0 else min(arg, seen)


def _make_layer_class():
    cu = _cache_utils()
    removes_tokens = crop_removes_tokens(cu)

    class GmodLayer(cu.CacheLayerMixin):
        """The compact KV cache of one MoD layer.

        ``keys`` / ``values``: ``[B, capacity, Hk, d]`` (None before the first write), ``cache_len``:
        ``[B] int32`` on the cache's device, ``lens``: the same lengths as a Python list (kept in
        step with ``cache_len`` from the per-step counts the decode step reads anyway, so growing
        the buffer needs no extra device sync; None after a prefill or a crop until first needed),
        ``seen``: positions seen (prompt + generated, padding included), ``prefill_len``: the length
        of the first call (its tokens were routed by top-k), ``positions``: ``[B, capacity] int32``,
        the position of each stored token (valid below ``cache_len``; what ``crop`` reads).
        """

        is_sliding = False
        is_compileable = False
        is_croppable = True
        supports_early_init = False
        pos_tail_flush = 4096  # host-recorded positions held before they are written to the device

        def __init__(self, **kwargs):
            super().__init__()
            # the layer's sliding window (set by the MoD layer): stored tokens no later query can see
            # are dropped (trim_window); record_past (transformers' assisted generation sets it) defers
            # that to crop, so that a rejected draft can be rolled back
            self.window: Optional[int] = None
            self.record_past = False
            self._trim_floor = -1  # stored tokens at positions <= this were dropped
            self.dropped: Optional[torch.Tensor] = None  # [B] int32: tokens dropped per row (None: none yet)
            self.cache_len: Optional[torch.Tensor] = None
            self.lens: list[int] = []
            self.seen = 0
            self.prefill_len: Optional[int] = None
            # [B, capacity + 1] int32: the positions of the stored tokens, plus one column that the
            # slots past a step's count are written to (so the scatter needs no host-side count).
            self._pos: Optional[torch.Tensor] = None
            # (row, column, position) of the tokens stored by one-token decode steps since the last
            # flush into _pos: those steps know their counts on the host, so recording costs them
            # no device work (crop, positions and row selection flush first).
            self._pos_tail: list[tuple[int, int, int]] = []

        def __repr__(self):
            cap = 0 if self.keys is None else self.keys.shape[1]
            return f"GmodLayer(seen={self.seen}, lens={self.lens}, capacity={cap})"

        # ---- storage
        @property
        def capacity(self) -> int:
            return 0 if self.keys is None else int(self.keys.shape[1])

        @property
        def positions(self) -> Optional[torch.Tensor]:
            """``[B, capacity] int32``: the position of each stored token (row b: the first
            ``cache_len[b]`` entries, ascending); None before the first write."""
            if self._pos is None:
                return None
            self._flush_positions()
            return self._pos[:, : self.capacity]

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            """``key_states`` [B, T, Hk, d] (gmod layout): sets B, Hk, d, dtype and device."""
            B, _, Hk, d = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys = torch.zeros(B, 0, Hk, d, dtype=self.dtype, device=self.device)
            self.values = torch.zeros(B, 0, Hk, d, dtype=value_states.dtype, device=self.device)
            self.cache_len = torch.zeros(B, dtype=torch.int32, device=self.device)
            self._pos = torch.zeros(B, 1, dtype=torch.int32, device=self.device)
            self.lens = [0] * B
            self.is_initialized = True

        def reserve(self, needed: int) -> None:
            """Make room for ``needed`` tokens per row (grows with ~3% slack, copying the old rows)."""
            cap = self.capacity
            if needed <= cap:
                return
            new_cap = needed + max(1, needed // 32) if cap else needed
            B, _, Hk, d = self.keys.shape
            k = torch.zeros(B, new_cap, Hk, d, dtype=self.keys.dtype, device=self.keys.device)
            v = torch.zeros(B, new_cap, Hk, d, dtype=self.values.dtype, device=self.values.device)
            pos = torch.zeros(B, new_cap + 1, dtype=torch.int32, device=self._pos.device)
            if cap:
                used = max(self.lens) if self.lens else cap  # unknown lengths: copy everything
                k[:, :used] = self.keys[:, :used]
                v[:, :used] = self.values[:, :used]
                pos[:, :used] = self._pos[:, :used]
            self.keys, self.values, self._pos = k, v, pos

        def stored_count(self) -> torch.Tensor:
            """``[B] int32``: the tokens each row has stored so far, those a sliding window dropped
            included (the next compact position, ``positions="compact"``)."""
            if self.dropped is None:
                return self.cache_len
            return self.cache_len + self.dropped.to(self.cache_len.device)

        def host_lens(self) -> list[int]:
            """``cache_len`` as a Python list (a device sync if it is not known on the host yet)."""
            if self.lens is None:
                self.lens = [int(v) for v in self.cache_len.tolist()]
            return self.lens

        def append(
            self,
            k_new: torch.Tensor,
            v_new: torch.Tensor,
            count: torch.Tensor,
            counts: Optional[Sequence[int]] = None,
            idx: Optional[torch.Tensor] = None,
        ) -> None:
            """Append the first ``count[b]`` rows of ``k_new`` / ``v_new`` ``[B, T, Hk, d]`` to row b.

            ``counts``: ``count`` as a Python list if the caller has it (decode). Without it
            (prefill) no device sync happens: the buffer is sized for the worst case
            (``T`` more rows) and the host lengths are read at the next use. ``idx`` ``[B, >= T]``:
            the step's positions of those rows (ascending, relative to the step's first position
            ``seen``; the routing's ``idx``), recorded for ``crop``; None: ``0, 1, ..., count[b] - 1``
            (a one-token step passes None: with ``counts`` its positions are recorded on the host).
            """
            from . import ops

            if not self.is_initialized:
                self.lazy_initialization(k_new, v_new)
            B = self.keys.shape[0]
            if k_new.shape[0] != B:
                raise ValueError(f"gmod: the MoD KV cache holds {B} rows, the step has {k_new.shape[0]}")
            if counts is None:
                if self.lens is not None and not any(self.lens):
                    self.reserve(int(k_new.shape[1]))  # empty cache (prefill): exactly the step's width
                else:
                    self.reserve(max(self.host_lens()) + int(k_new.shape[1]))
                new_lens = None
            else:
                new_lens = [a + int(c) for a, c in zip(self.host_lens(), counts)]
                self.reserve(max(new_lens) if new_lens else 0)
            count = count.to(device=self.keys.device, dtype=torch.int32)
            if counts is not None and idx is None and int(k_new.shape[1]) == 1:
                # a one-token decode step (its token at position seen): recorded on the host
                old = self.host_lens()
                self._pos_tail.extend((b, old[b], self.seen) for b, c in enumerate(counts) if c)
                if len(self._pos_tail) >= self.pos_tail_flush:
                    self._flush_positions()
            else:
                self._record_positions(count, idx, int(k_new.shape[1]))
            ops.kv_cache_append(
                self.keys,
                self.values,
                self.cache_len,
                k_new.detach().to(self.keys.dtype).contiguous(),
                v_new.detach().to(self.values.dtype).contiguous(),
                count.contiguous(),
            )
            self.lens = new_lens

        def _flush_positions(self) -> None:
            if self._pos_tail:
                rows, cols, vals = zip(*self._pos_tail)
                dev = self._pos.device
                self._pos[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = torch.tensor(
                    vals, dtype=torch.int32, device=dev)
                self._pos_tail.clear()

        def _record_positions(self, count: torch.Tensor, idx: Optional[torch.Tensor], T: int) -> None:
            """Write ``seen + idx[b, c]`` at column ``cache_len[b] + c`` of row b for ``c < count[b]``
            (before ``kv_cache_append`` moves ``cache_len``); the other slots go to the spare column."""
            self._flush_positions()
            dev = self._pos.device
            c = torch.arange(T, device=dev, dtype=torch.int32)
            if idx is None:
                step_pos = c.unsqueeze(0).expand(count.shape[0], T)
            else:
                step_pos = idx[:, :T].to(device=dev, dtype=torch.int32)
            cols = self.cache_len.to(dev).unsqueeze(1) + c
            spare = self._pos.shape[1] - 1
            cols = torch.where(c.unsqueeze(0) < count.to(dev).unsqueeze(1), cols, spare)
            self._pos.scatter_(1, cols.long(), step_pos + self.seen)

        def activate_past_recording(self) -> None:
            """Keep every stored token until the next ``crop`` (transformers calls this for assisted
            generation): a rejected draft token may be rolled back past the window's edge."""
            self.record_past = True

        def trim_window(self, force: bool = False) -> None:
            """With a sliding window W: drop the stored tokens at positions ``<= seen - W``, which no later
            query (at a position ``>= seen``) can see. Amortised: only once W // 8 more positions have left
            the window since the last trim (or ``force``), so a row holds at most the tokens of its last
            ~1.125 W positions (a dense sliding-window layer holds W - 1); the buffer is reallocated to fit
            them plus the W // 8 positions until the next trim (no regrowth in between), one device sync.
            Not while recording the past (assisted generation): ``crop`` trims then."""
            W = self.window
            if W is None or not self.is_initialized or not self.capacity or self.record_past:
                return
            floor = self.seen - W
            every = max(1, W // 8)
            if floor <= self._trim_floor or (not force and floor - self._trim_floor < every):
                return
            self._flush_positions()
            cap = self.capacity
            dev = self._pos.device
            live = torch.arange(cap, device=dev) < self.cache_len.to(dev).unsqueeze(1)
            dead = (live & (self._pos[:, :cap] <= floor)).sum(1)  # a prefix of each row: positions ascend
            new_len = self.cache_len.to(dev, torch.int64) - dead
            lens = [int(v) for v in new_len.tolist()]
            need = max(lens) if lens else 0
            new_cap = need + max(need // 32, every + 1)
            src = (torch.arange(new_cap, device=dev).unsqueeze(0) + dead.unsqueeze(1)).clamp(max=cap - 1)
            B, _, Hk, d = self.keys.shape
            kv_src = src.to(self.keys.device)[:, :, None, None].expand(B, new_cap, Hk, d)
            self.keys = self.keys.gather(1, kv_src)
            self.values = self.values.gather(1, kv_src)
            pos = torch.zeros(B, new_cap + 1, dtype=torch.int32, device=dev)
            pos[:, :new_cap] = self._pos.gather(1, src)
            self._pos = pos
            self.dropped = (dead if self.dropped is None else self.dropped.to(dev) + dead).to(torch.int32)
            self.cache_len.copy_(new_len.to(self.cache_len.device, torch.int32))
            self.lens = lens
            self._trim_floor = floor

        def update(self, key_states, value_states, *args, **kwargs):
            raise NotImplementedError(
                "gmod: this cache slot belongs to a MoD layer (compact per-row KV cache written by the MoD layer "
                "itself); Cache.update() is only for dense layers"
            )

        # ---- Cache API
        def get_seq_length(self) -> int:
            return self.seen

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.seen + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.keys = self.values = None
            self.cache_len = None
            self._pos = None
            self._pos_tail = []
            self.lens = []
            self.seen = 0
            self.prefill_len = None
            self._trim_floor = -1
            self.dropped = None
            self.is_initialized = False

        def crop(self, tokens_to_remove: int) -> None:
            """Forget the last positions (``crop(-n)`` removes n; in transformers releases whose
            ``crop`` takes ``max_length``, ``crop(m >= 0)`` keeps m): each row keeps its stored tokens at positions below the new
            ``seen``. One device sync (the new lengths) when something is removed."""
            new_seen = crop_target(self.seen, tokens_to_remove, removes_tokens)
            if new_seen >= self.seen:
                self._trim_after_crop()
                return
            if self.window is not None and self._trim_floor > new_seen - self.window:
                raise RuntimeError(
                    f"gmod: cannot crop this MoD layer's KV cache back to {new_seen} positions: it has a sliding window "
                    f"of {self.window} and already dropped the tokens at positions <= {self._trim_floor}, which the "
                    "next query would see. Call cache.activate_past_recording() before the steps you may roll back "
                    "(transformers' assisted generation does)."
                )
            if self.is_initialized and self.capacity:
                self._flush_positions()
                cap = self.capacity
                live = torch.arange(cap, device=self._pos.device) < self.cache_len.to(self._pos.device).unsqueeze(1)
                new_len = (live & (self._pos[:, :cap] < new_seen)).sum(1, dtype=torch.int32)
                self.cache_len.copy_(new_len.to(self.cache_len.device))
                self.lens = [int(v) for v in new_len.tolist()]
            self.seen = new_seen
            if self.prefill_len is not None:
                self.prefill_len = min(self.prefill_len, new_seen)
            self._trim_after_crop()

        def _trim_after_crop(self) -> None:
            """A crop ends a step that could be rolled back (a later crop goes back no further than this
            one's length), so the window's drop happens here even while the past is recorded."""
            record, self.record_past = self.record_past, False
            try:
                self.trim_window()
            finally:
                self.record_past = record

        def _select_rows(self, index: torch.Tensor) -> None:
            if not self.is_initialized:
                return
            index = index.to(self.keys.device)
            self._flush_positions()
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)
            self.cache_len = self.cache_len.index_select(0, index)
            self._pos = self._pos.index_select(0, index.to(self._pos.device))
            if self.dropped is not None:
                self.dropped = self.dropped.index_select(0, index.to(self.dropped.device))
            if self.lens is not None:
                self.lens = [self.lens[i] for i in index.tolist()]

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self._select_rows(beam_idx.long())

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                n = int(self.keys.shape[0])
                self._select_rows(torch.arange(n).repeat_interleave(repeats))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                idx = torch.as_tensor(indices)
                if idx.dtype == torch.bool:
                    idx = idx.nonzero().flatten()
                self._select_rows(idx.long())

        def offload(self):
            super().offload()
            if self.is_initialized:
                self.cache_len = self.cache_len.to("cpu", non_blocking=True)
                self._pos = self._pos.to("cpu", non_blocking=True)

        def prefetch(self):
            super().prefetch()
            if self.is_initialized and self.cache_len.device != self.device:
                self.cache_len = self.cache_len.to(self.device, non_blocking=True)
                self._pos = self._pos.to(self.device, non_blocking=True)

        @property
        def batch_size(self) -> int:
            return int(self.keys.shape[0]) if self.is_initialized else -1

        # ---- accounting
        def memory(self) -> dict[str, Any]:
            if not self.is_initialized:
                return {"bytes": 0, "used_bytes": 0, "tokens": [], "capacity": 0, "dense_bytes": 0}
            B, cap, Hk, d = self.keys.shape
            per_token = Hk * d * (self.keys.element_size() + self.values.element_size())
            lens = self.host_lens()
            return {
                "bytes": _tensor_bytes(self.keys) + _tensor_bytes(self.values),
                "used_bytes": sum(lens) * per_token,
                "tokens": list(lens),
                "capacity": cap,
                # a dense layer with a sliding window W holds the last W - 1 positions (transformers')
                "dense_bytes": B * (self.seen if self.window is None else min(self.seen, self.window - 1)) * per_token,
            }

    GmodLayer.__module__ = __name__
    GmodLayer.__qualname__ = "GmodLayer"
    return GmodLayer


def _make_cache_class():
    cu = _cache_utils()

    class GmodCache(cu.DynamicCache):
        """A ``DynamicCache`` whose MoD-layer slots are compact :class:`GmodLayer` caches.

        ``GmodCache(model)`` for a converted model (or ``GmodCache(config=text_config,
        mod_layers=[...])``). Pass it as the model's KV cache (``model(..., cache=cache, use_cache=True)``
        on transformers >= 5.24, ``past_key_values=cache`` before) or let ``model.generate`` create it. ``cache.memory_report()`` /
        ``print(cache.format_memory_report())`` show the KV bytes per layer.
        """

        def __init__(self, model=None, *, config=None, mod_layers: Optional[Sequence[int]] = None, **kwargs):
            if model is not None and not isinstance(model, torch.nn.Module):
                raise TypeError("gmod: GmodCache(model) takes a converted model; use config=/mod_layers= otherwise")
            if model is not None:
                from ._hf import find_decoder

                parts = find_decoder(model)
                state = model.__dict__.get("gmod_state")
                if state is None:
                    raise ValueError("gmod: GmodCache(model): the model is not converted (gmod_ext.convert)")
                config = parts.text_config if config is None else config
                if mod_layers is None:  # on_cache="dense" / "error": MoD layers use no compact slot
                    mod_layers = list(state.config.layers) if state.config.on_cache == "compact" else []
            if config is None:
                raise ValueError("gmod: GmodCache needs a converted model or config=")
            super().__init__(config=config, **kwargs)
            layer_cls = GmodLayer_cls()
            self.gmod_mod_layers = sorted(int(i) for i in (mod_layers or []))
            n = len(self.layers)
            for i in self.gmod_mod_layers:
                if not 0 <= i < n:
                    raise ValueError(f"gmod: MoD layer {i} out of range for a cache of {n} layers")
                self.layers[i] = layer_cls()

        def memory_report(self) -> dict[str, Any]:
            return memory_report(self)

        def format_memory_report(self) -> str:
            return format_memory_report(self)

    GmodCache.__module__ = __name__
    GmodCache.__qualname__ = "GmodCache"
    return GmodCache


_CLASSES: dict[str, type] = {}


def GmodLayer_cls() -> type:
    cls = _CLASSES.get("GmodLayer")
    if cls is None:
        cls = _CLASSES["GmodLayer"] = _make_layer_class()
    return cls


def GmodCache_cls() -> type:
    cls = _CLASSES.get("GmodCache")
    if cls is None:
        cls = _CLASSES["GmodCache"] = _make_cache_class()
    return cls


def __getattr__(name):
    # GmodLayer / GmodCache subclass transformers classes: built on first use so that importing
    # gmod_ext.cache does not import transformers.
    if name == "GmodLayer":
        value = GmodLayer_cls()
    elif name == "GmodCache":
        value = GmodCache_cls()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def gmod_layer_cache(cache, layer_idx: int):
    """The :class:`GmodLayer` slot ``layer_idx`` of ``cache``; an unused ``DynamicLayer`` slot of a
    plain ``DynamicCache`` (or a missing slot of a lazily grown one) is replaced by a new one."""
    cu = _cache_utils()
    layer_cls = GmodLayer_cls()
    if not isinstance(cache, cu.Cache):
        raise TypeError(f"gmod: MoD layers need a transformers Cache as the KV cache (cache= / past_key_values=), "
                        f"got {type(cache).__name__}")
    layers = cache.layers
    if layer_idx < len(layers) and isinstance(layers[layer_idx], layer_cls):
        return layers[layer_idx]
    if layer_idx >= len(layers):
        if getattr(cache, "layer_class_to_replicate", None) is None:
            raise ValueError(f"gmod: the cache has {len(layers)} layers, MoD layer {layer_idx} has no slot")
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    slot = layers[layer_idx]
    if isinstance(slot, cu.DynamicLayer) and not slot.is_initialized and not hasattr(slot, "update_indexer"):
        # an unused dynamic (or dynamic sliding-window: MoD layers refuse sequences longer than the
        # window) slot
        layers[layer_idx] = layer_cls()
        return layers[layer_idx]
    raise TypeError(
        f"gmod: MoD layer {layer_idx} cannot use a {type(slot).__name__} cache slot ({type(cache).__name__}); MoD "
        "layers need a DynamicCache / GmodCache (model.gmod_new_cache()) whose slot is unused. Static and quantized "
        "caches are not supported for MoD layers."
    )


# --------------------------------------------------------------------------- accounting
def memory_report(cache) -> dict[str, Any]:
    """KV-cache memory of ``cache`` (a :class:`GmodCache`, or any DynamicCache-like cache).

    Returns ``{"layers": [{"layer", "kind" ("dense" | "mod" | "state": the fixed-size states of a hybrid
    model's linear-attention layers), "bytes", "used_bytes", "tokens" (per
    row), "dense_bytes"}], "total_bytes", "used_bytes", "dense_equivalent_bytes", "ratio",
    "used_ratio", "seq_len", "batch"}``. ``bytes``: the KV tensors the layer holds (a MoD layer's
    compact buffer including its growth slack; not its int32 position per stored token, which
    ``crop`` reads: 4 bytes against ``2 x Hk x d x`` the element size per token); ``used_bytes``:
    the stored tokens only; ``dense_bytes``: what a dense layer would hold for the same positions (prompt + generated,
    padding included). ``dense_equivalent_bytes`` is their sum; ``ratio = total_bytes /
    dense_equivalent_bytes`` (``used_ratio`` likewise with ``used_bytes``).
    """
    cu = _cache_utils()
    if not isinstance(cache, cu.Cache) and not isinstance(getattr(cache, "layers", None), (list, tuple)):
        hint = ""
        if cache is not None and any(hasattr(cache, n) for n in ("sequences", "cache", "past_key_values")):
            hint = " (a generate output: pass its cache, out.get('cache') or out.get('past_key_values'))"
        raise TypeError(f"gmod.kv_memory_report: expected a KV cache (GmodCache / DynamicCache), got "
                        f"{type(cache).__name__}{hint}")
    layer_cls = GmodLayer_cls()
    rows = []
    total = used = dense_total = 0
    seq_len = 0
    batch = 0
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if isinstance(layer, layer_cls):
            m = layer.memory()
            rows.append({"layer": i, "kind": "mod", **{k: m[k] for k in ("bytes", "used_bytes", "tokens", "dense_bytes")}})
            seq_len = max(seq_len, layer.seen)
            batch = max(batch, max(layer.batch_size, 0))
        else:
            keys = getattr(layer, "keys", None)
            values = getattr(layer, "values", None)
            nbytes = _tensor_bytes(keys) + _tensor_bytes(values)
            tokens: list[int] = []
            if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.numel():
                B, T = int(keys.shape[0]), int(keys.shape[-2])
                tokens = [T] * B
                batch = max(batch, B)
            try:
                seq_len = max(seq_len, int(layer.get_seq_length())) if isinstance(layer, cu.CacheLayerMixin) else seq_len
            except Exception:  # noqa: BLE001 - an odd layer type: no length
                pass
            kind = "dense"
            states = [getattr(layer, n, None) for n in ("conv_states", "recurrent_states")]
            if any(s is not None for s in states):  # a linear-attention / recurrent layer (hybrid models)
                kind = "state"  # fixed-size states, as large in the dense model
                for s in states:
                    nbytes += sum(_tensor_bytes(t) for t in (s.values() if isinstance(s, dict) else [s]))
            rows.append(
                {"layer": i, "kind": kind, "bytes": nbytes, "used_bytes": nbytes, "tokens": tokens, "dense_bytes": nbytes}
            )
        total += rows[-1]["bytes"]
        used += rows[-1]["used_bytes"]
        dense_total += rows[-1]["dense_bytes"]
    return {
        "layers": rows,
        "total_bytes": total,
        "used_bytes": used,
        "dense_equivalent_bytes": dense_total,
        "ratio": (total / dense_total) if dense_total else float("nan"),
        "used_ratio": (used / dense_total) if dense_total else float("nan"),
        "seq_len": seq_len,
        "batch": batch,
    }


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def format_memory_report(report_or_cache) -> str:
    """A printable table of :func:`memory_report` (pass the report or the cache)."""
    rep = report_or_cache if isinstance(report_or_cache, dict) else memory_report(report_or_cache)
    if not isinstance(rep.get("layers"), list):
        raise ValueError("gmod.format_memory_report: expected a report from gmod_ext.kv_memory_report (a dict with "
                         f"'layers') or a KV cache, got a dict with keys {sorted(map(str, rep))}")
    lines = [
        f"KV cache: batch {rep.get('batch', '?')}, {rep.get('seq_len', '?')} positions",
        f"{'layer':>5}  {'kind':<5}  {'bytes':>12}  {'used':>12}  {'dense':>12}  {'x dense':>7}  tokens/row",
    ]
    for r in rep["layers"]:
        frac = r["bytes"] / r["dense_bytes"] if r["dense_bytes"] else float("nan")
        toks = r["tokens"]
        tok_s = str(toks) if len(toks) <= 8 else f"[{', '.join(map(str, toks[:8]))}, ...]"
        lines.append(
            f"{r['layer']:>5}  {r['kind']:<5}  {_fmt_bytes(r['bytes']):>12}  {_fmt_bytes(r['used_bytes']):>12}  "
            f"{_fmt_bytes(r['dense_bytes']):>12}  {frac:>7.3f}  {tok_s}"
        )
    n_mod = sum(r["kind"] == "mod" for r in rep["layers"])
    lines.append(
        f"total {_fmt_bytes(rep['total_bytes'])} (used {_fmt_bytes(rep['used_bytes'])}) vs dense "
        f"{_fmt_bytes(rep['dense_equivalent_bytes'])}: ratio {rep['ratio']:.3f} (used {rep['used_ratio']:.3f}); "
        f"{n_mod} MoD / {len(rep['layers']) - n_mod} dense layers"
        + (f" ({n_state} of them linear-attention states)" if (n_state := sum(r["kind"] == "state" for r in rep["layers"]))
           else "")
    )
    return "\n".join(lines)
