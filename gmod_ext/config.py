"""Settings of a gamma-MoD conversion and the capacity / ratio rules.

Everything here is plain Python (no transformers import). :class:`GmodConfig` is what
``gmod_ext.convert`` stores in ``model.config.gmod`` (as a dict) so that
``gmod_ext.from_pretrained`` can rebuild the same model.

Capacity rule (the number of tokens a MoD layer processes)
----------------------------------------------------------
For a row with ``R`` routable tokens (mask code 0), ``F`` forced tokens (code 1) and ``P`` padding
tokens (code 2), a MoD layer with skip ratio ``r`` keeps

    ``count = F + keep(R, r)``  with  ``keep(n, r) = n - floor(r * n)``

i.e. it skips ``floor(r * R)`` routable tokens, so ``r`` is the fraction of *routable* tokens
skipped, rounded down (at least ``ceil((1 - r) * R)`` routable tokens are kept; r = 0 keeps all).
``floor`` is taken with a 1e-9 tolerance so that e.g. 0.29 * 100 counts as 29.

The static capacity (output width ``C`` of ``ops.route`` / ``gather_rows``, a Python int per call)
is

    ``C = min(S, keep(S, r) + F_max)``

where ``S`` is the sequence length and ``F_max`` the largest number of forced tokens in one row of
the batch (0 when nothing is forced). ``keep`` is non-decreasing in n, so ``C >= count`` for every row:
no token that should be kept is ever dropped. Without forced tokens ``C`` depends on ``S`` and ``r`` only.

When a model forward has a routing mask (forced tokens or padding), ``gmod_ext.convert``'s hook also
reads each row's ``(F_b, R_b)`` once (``RoutingInfo.rows``, the forward's one host sync, which also gives ``F_max``), and
MoD layers use the tight capacity

    ``C = max_b (F_b + keep(R_b, r))``   (:func:`capacity_of_rows`)

the largest row's exact count, instead. The loose rule pays for ``F_max`` forced tokens on top of
``keep(S, r)`` routable ones that no row has at once: with a question span of S/8 forced tokens at
r = 0.5 it gives C = 5S/8 where every row keeps 9S/16, so 11 % of the rows every GEMM, norm and
attention of the layer processed were padding.

Packed rows (several sequences per row, ``RoutingInfo.segments``) apply the rule to each sequence:
a row keeps ``sum_s (F_s + keep(R_s, r))``, which exceeds ``F + keep(R, r)`` by less than one token
per sequence, so MoD layers add ``max_segments - 1`` to either capacity above.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from typing import Any, Mapping, Optional

VARIANTS = ("gamma", "mod", "pmod")
GATES = ("default", "none")
ROUTERS = ("shared", "per_layer")
POSITIONS = ("original", "compact")
FORCED = ("none", "text", "ignored_labels")
ON_CACHE = ("error", "dense", "compact")
ATTENTIONS = ("auto", "gmod", "sdpa")

_FLOOR_TOL = 1e-9


def _real(name: str, value) -> float:
    """``value`` as a float; TypeError naming ``name`` for a non-number (a str, None, a bool, a tensor, ...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"gmod: {name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _index(name: str, value) -> int:
    """``value`` as an int (Python / numpy ints, 0-d integer tensors); TypeError naming ``name`` otherwise
    (floats such as 1.5, strings, bools)."""
    if isinstance(value, bool):
        raise TypeError(f"gmod: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"gmod: {name} must be an integer, got {value!r} ({type(value).__name__})") from None


def num_skipped(n: int, ratio: float) -> int:
    """Routable tokens skipped out of ``n`` at skip ratio ``ratio``: ``floor(ratio * n)``."""
    return int(math.floor(ratio * n + _FLOOR_TOL))


def num_skipped_tensor(n, ratio: float):
    """``num_skipped`` for an int64 tensor of counts (no host sync): ``floor(ratio * n)`` per element, in
    float64 with the same tolerance, so the device and the Python rule agree on every count."""
    import torch

    return torch.floor(n.to(torch.float64) * ratio + _FLOOR_TOL).to(torch.int64)


def keep_count(n: int, ratio: float) -> int:
    """Routable tokens kept out of ``n``: ``n - floor(ratio * n)``."""
    return n - num_skipped(n, ratio)


def capacity(seq_len: int, ratio: float, max_forced: int = 0) -> int:
    """Static capacity ``C = min(S, keep(S, r) + F_max)`` (see the module docstring)."""
    return min(seq_len, keep_count(seq_len, ratio) + int(max_forced))


def capacity_of_rows(rows, ratio: float, seq_len: int) -> int:
    """Tight static capacity ``C = max_b (F_b + keep(R_b, r))`` from each row's forced / routable counts
    ``rows = [(F_b, R_b), ...]`` (Python ints), at least 1 and at most S (see the module docstring)."""
    return max(1, min(seq_len, max((int(f) + keep_count(int(r), ratio) for f, r in rows), default=0)))


def prd_keep_ratios(num_layers: int, rbar: float, r_min: float) -> list[float]:
    """p-MoD progressive ratio decay: retention ``R_l = max(R_min, 0.5*cos(pi*l/(L-1)) + rbar)``."""
    if num_layers == 1:
        return [max(r_min, 0.5 + rbar)]
    return [max(r_min, 0.5 * math.cos(math.pi * l / (num_layers - 1)) + rbar) for l in range(num_layers)]


def prd_skip_ratios(num_layers: int, rbar: float, r_min: float, r_max: float) -> dict[int, float]:
    """Per-layer *skip* ratios ``1 - R_l`` for the layers that become MoD layers.

    Layers with ``R_l > r_max`` stay dense and are absent from the result; ``R_l`` above 1 is
    clipped to 1 (keep all).
    """
    out = {}
    for l, keep in enumerate(prd_keep_ratios(num_layers, rbar, r_min)):
        if keep > r_max:
            continue
        out[l] = 1.0 - min(1.0, keep)
    return out


@dataclasses.dataclass
class GmodConfig:
    """How a model was converted. ``layers[i]`` is a MoD layer with skip ratio ``ratios[i]``.

    * ``variant``: "gamma" (h = x + Attn(LN1 x); y = h + p * MLP(LN2 h)), "mod" (y = x + p * f(x)),
      "pmod" (y = x + w * f(x), w = pmod_a * tanh(logit) + pmod_b; skipped tokens become w * x).
    * ``gate``: "default" (the variant's gating) or "none" (no gating: y = f(x) on kept tokens).
    * ``router``: "shared" (one router for all MoD layers, gamma-MoD) or "per_layer".
    * ``positions``: RoPE at the original positions ("original") or at arange(count) ("compact").
    * ``forced``: which tokens are always kept: "none"; "text" (every token that is not an image
      token: only the image is routed, as in the public gamma-MoD training code and p-MoD;
      :func:`gmod_ext.convert`'s default for gamma and pmod on a model with an image token);
      "ignored_labels" (tokens whose label is -100, i.e. the instruction / question text, except
      image tokens which stay routable; the labelled answer is routed too, and at inference, without
      labels, nothing is forced). An explicit ``gmod_forced_mask`` passed to the model's forward is
      always added.
    * ``threshold``: if set, eval-mode routing keeps routable tokens with p > threshold (at most
      the top-k count), gamma-MoD's inference rule; training always uses top-k.
    * ``on_cache``: what a MoD layer does when called with a KV cache: "compact" (its own compact
      KV cache of the tokens it processed, :mod:`gmod_ext.cache`; what ``gmod_ext.convert`` sets by
      default), "dense" (run the wrapped layer densely, updating the cache) or "error" (raise
      NotImplementedError; the default of a bare GmodConfig, e.g. for a standalone layer).
    * ``decode_threshold``: with a KV cache, a token after the prefill (decode) is processed by a
      MoD layer iff ``p >= decode_threshold`` (default 0.5, gamma-MoD; 0 keeps every token). A full
      forward given ``gmod_prefill_len=P`` applies the same rule to positions ``>= P``.
    * ``attention``: the kernel of a MoD layer's attention over its kept tokens in a whole-sequence
      forward (training, prefill): "gmod" (``gmod.attention``), "sdpa"
      (``torch.nn.functional.scaled_dot_product_attention``, causal, over the [B, C] compact rows; on
      an H100, torch 2.11 runs it at cuDNN's fused kernel's speed) or "auto" (the default): "sdpa" for
      bf16 / fp16 CUDA tensors, "gmod" otherwise. Why: on the H100 the cuDNN backend ran causal
      attention at 438-528 TFLOP/s forward and 286-438 backward, ``gmod.attention`` at 227-283 and
      153-200 (``bench attention``, 2026-11-24), and this is the case cuDNN covers (one length per row,
      from slot 0). Both compute the same function: every row has q_len = k_len = its kept count, so a
      kept query sees only the kept keys before it; the padding slots after a row's count, which SDPA
      fills and ``gmod.attention`` zeroes, are discarded by the merge, forward and backward. Decoding
      against the compact KV cache (q_len != k_len per row) always uses ``gmod.attention``, whose
      split-k decode kernels were written for it.
    """

    variant: str = "gamma"
    gate: str = "default"
    router: str = "shared"
    positions: str = "original"
    forced: str = "none"
    image_token_id: Optional[int] = None
    aux_coef: float = 0.01
    layers: list = dataclasses.field(default_factory=list)
    ratios: list = dataclasses.field(default_factory=list)
    num_layers: int = 0
    threshold: Optional[float] = None
    on_cache: str = "error"
    decode_threshold: float = 0.5
    pmod_a: float = 0.2
    pmod_b: float = 1.0
    router_init: str = "normal"
    arank: Optional[list] = None
    attention: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, allowed in (
            ("variant", VARIANTS),
            ("gate", GATES),
            ("router", ROUTERS),
            ("positions", POSITIONS),
            ("forced", FORCED),
            ("on_cache", ON_CACHE),
            ("attention", ATTENTIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"gmod: {name}={value!r} is not one of {allowed}")
        if self.router_init not in ("normal", "zeros"):
            raise ValueError(f"gmod: router_init={self.router_init!r} is not one of ('normal', 'zeros')")
        if not isinstance(self.layers, (list, tuple)) or not isinstance(self.ratios, (list, tuple)):
            raise TypeError(
                f"gmod: layers and ratios must be lists (got {type(self.layers).__name__} and "
                f"{type(self.ratios).__name__})")
        if len(self.layers) != len(self.ratios):
            raise ValueError("gmod: layers and ratios must have the same length")
        num_layers = _index("num_layers", self.num_layers)
        if num_layers < 0:
            raise ValueError(f"gmod: num_layers={num_layers} must be >= 0")
        layers = [_index("layers", i) for i in self.layers]
        bad = [i for i in layers if i < 0 or (num_layers and i >= num_layers)]
        if bad:
            where = f"[0, {num_layers})" if num_layers else "non-negative"
            raise ValueError(f"gmod: layer indices {bad} out of range (expected {where})")
        if len(set(layers)) != len(layers):
            dup = sorted({i for i in layers if layers.count(i) > 1})
            raise ValueError(f"gmod: layer indices {dup} are given more than once (each layer at most once)")
        for r in self.ratios:
            if not (0.0 <= _real("skip ratio", r) < 1.0):
                raise ValueError(f"gmod: skip ratio {r} must be in [0, 1)")
        if not (0.0 <= _real("decode_threshold", self.decode_threshold) <= 1.0):
            raise ValueError(f"gmod: decode_threshold={self.decode_threshold} must be a probability in [0, 1]")
        if self.threshold is not None and not (0.0 < _real("threshold", self.threshold) < 1.0):
            raise ValueError(f"gmod: threshold={self.threshold} must be a probability in (0, 1)")
        aux = _real("aux_coef", self.aux_coef)
        if not (math.isfinite(aux) and aux >= 0.0):
            raise ValueError(f"gmod: aux_coef={self.aux_coef} must be a finite number >= 0")
        for name in ("pmod_a", "pmod_b"):
            if not math.isfinite(_real(name, getattr(self, name))):
                raise ValueError(f"gmod: {name}={getattr(self, name)} must be a finite number")
        if self.image_token_id is not None:
            _index("image_token_id", self.image_token_id)
        if self.arank is not None and not isinstance(self.arank, (list, tuple)):
            raise TypeError(f"gmod: arank must be None or a list of floats (one per layer), got {type(self.arank).__name__}")

    def ratio_of(self, layer_idx: int) -> float:
        return float(self.ratios[self.layers.index(layer_idx)])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GmodConfig":
        if not isinstance(d, Mapping):
            raise TypeError(f"gmod: GmodConfig.from_dict needs a dict of settings, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
