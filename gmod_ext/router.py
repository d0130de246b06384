"""The gamma-MoD router, the per-forward routing record and the router auxiliary loss.

The router is an fp32 ``Linear(D, 2)`` applied to a layer's ``input_layernorm(x)``;
``p = softmax(logits)[..., 1] = sigmoid(l1 - l0)``. The RMSNorm and the projection are fused in
``ops.router_logits`` with ``weight = W[1] - W[0]`` (plus ``b1 - b0``), so the layer only ever
needs the logit difference ``l = l1 - l0``. The router stays float32 when the model is cast
(``model.to(torch.bfloat16)``, ``.half()``): see :meth:`GmodRouter._apply`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import num_skipped_tensor


class GmodRouter(nn.Module):
    """fp32 ``Linear(hidden_size, 2)``; :meth:`forward` returns ``l1 - l0`` of RMSNorm(x)."""

    def __init__(self, hidden_size: int, init: str = "normal", std: float = 0.02, device=None):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.weight = nn.Parameter(torch.empty(2, hidden_size, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(2, dtype=torch.float32, device=device))
        self.init = init
        self.std = std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        with torch.no_grad():
            if self.init == "zeros":
                self.weight.zero_()
            else:
                self.weight.normal_(0.0, self.std)
            self.bias.zero_()

    def difference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W[1] - W[0], b[1] - b[0])``: the [D] weight and 0-dim bias of the logit difference."""
        return self.weight[1] - self.weight[0], self.bias[1] - self.bias[0]

    def forward(self, x: torch.Tensor, norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                routing: Optional["RoutingInfo"] = None) -> torch.Tensor:
        """Router logit difference ``l1 - l0`` [B, S] float32 of ``RMSNorm(x) * norm_weight``.

        ``routing``: the forward's :class:`RoutingInfo`, for a router that several MoD layers share: the
        difference is then taken once per forward (:meth:`RoutingInfo.memo`), not once per layer (in a
        training step, some 14 small kernels per further layer, forward and backward)."""
        if routing is None:
            w, b = self.difference()
        else:
            key = ("router_difference", id(self), self.weight._version, self.bias._version, torch.is_grad_enabled())
            w, b = routing.memo(key, self.difference, keep=(self.weight, self.bias))
        return ops.router_logits(x, w, norm_weight, eps) + b

    def _apply(self, fn, recurse=True):
        # Keep the router in float32 under model.to(dtype) / .half() / .bfloat16(): probe what fn
        # does to a float32 tensor; if it changes the dtype, only follow the device move.
        ref = self.weight
        try:
            probe = fn(torch.zeros((), dtype=torch.float32, device=ref.device))
        except Exception:  # noqa: BLE001 - unknown transformation: apply it unchanged
            probe = None
        if isinstance(probe, torch.Tensor) and probe.dtype != torch.float32:
            device = probe.device
            return super()._apply(lambda t: t.to(device=device), recurse)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, out=2, dtype=float32"


def selection_mask(idx: torch.Tensor, count: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, S] float32: 1 where the token was selected (``idx[b, :count[b]]``), else 0."""
    B, C = idx.shape
    zeros = torch.zeros(B, seq_len, 1, dtype=torch.float32, device=idx.device)
    ones = torch.ones(B, C, 1, dtype=torch.float32, device=idx.device)
    return ops.scatter_merge(zeros, ones, idx, count).squeeze(-1)


def router_aux_loss(
    logits: torch.Tensor, selected: torch.Tensor, valid: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """2-class cross-entropy of the router logits against the top-k selection.

    ``logits`` [B, S] is ``l1 - l0`` (CE of ``(l0, l1)`` only depends on the difference, so this is
    binary cross-entropy with logits), ``selected`` [B, S] in {0, 1} (forced tokens included),
    ``valid`` [B, S] bool excludes padding. Mean over valid tokens.
    """
    ce = F.binary_cross_entropy_with_logits(logits.float(), selected.float(), reduction="none")
    if valid is None:
        return ce.mean()
    v = valid.to(ce.dtype)
    return (ce * v).sum() / v.sum().clamp(min=1.0)


def routing_stats(logits: torch.Tensor, count: torch.Tensor, mask: Optional[torch.Tensor], aux,
                  capacity: int) -> dict[str, torch.Tensor]:
    """One MoD layer's routing statistics (0-dim tensors) from what it routed with: ``logits`` [B, S], the
    kept ``count`` [B], the codes ``mask`` [B, S] or None, its aux loss (or a function returning it) and
    capacity."""
    if callable(aux):
        aux = aux()
    with torch.no_grad():
        S = logits.shape[1]
        valid = None if mask is None else (mask != ops.MASK_NEVER)
        vf = torch.ones_like(logits) if valid is None else valid.to(torch.float32)
        n_valid = vf.sum().clamp(min=1.0)
        if mask is None:
            n_forced = torch.zeros_like(count)
            n_routable = torch.full_like(count, S)
        else:
            n_forced = (mask == ops.MASK_FORCED).sum(1).to(count.dtype)
            n_routable = (mask == ops.MASK_ROUTABLE).sum(1).to(count.dtype)
        kept_routable = (count - n_forced).sum().to(torch.float32)
        return {
            "skip_ratio": 1.0 - count.sum().to(torch.float32) / n_valid,
            "routable_skip_ratio": 1.0 - kept_routable / n_routable.sum().to(torch.float32).clamp(min=1.0),
            "mean_p": (torch.sigmoid(logits.detach()) * vf).sum() / n_valid,
            "aux_loss": aux.detach(),
            "capacity": torch.tensor(capacity),
        }


class LazyStats(Mapping):
    """A layer's :func:`routing_stats`, computed when first read. Most forwards (a training step that logs
    every N steps, serving) never read them, and computing them takes some ten small kernels per MoD layer
    (on the H100, some 0.7 ms of a 7B-shaped training step over 16 MoD layers); holding the layer's logits,
    counts and codes until then costs a few bytes per token."""

    def __init__(self, compute: Callable[[], dict]):
        self._compute: Optional[Callable[[], dict]] = compute
        self._values: Optional[dict] = None

    def _get(self) -> dict:
        if self._values is None:
            self._values, self._compute = self._compute(), None
        return self._values

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return f"LazyStats({'computed' if self._values is not None else 'not computed yet'})"


class Deferred:
    """A value of :class:`DeferredValues` to compute when first read."""

    __slots__ = ("compute",)

    def __init__(self, compute: Callable[[], object]):
        self.compute = compute


class DeferredValues(dict):
    """A dict whose :class:`Deferred` values are computed when first read (then kept). A MoD layer's aux loss
    term in a forward without autograd (generation, evaluation) is one: nothing can take its gradient, and
    only a loss with labels (the model's hook) or the statistics read it; a decode step would otherwise
    spend some eight small kernels per MoD layer on it."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        if isinstance(value, Deferred):
            value = value.compute()
            super().__setitem__(key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


class RoutingInfo:
    """What one model forward routes with, and what its MoD layers record.

    ``mask`` [B, S] int8 codes (0 routable, 1 forced, 2 padding) or None (all routable);
    ``max_forced`` the largest forced count of a row (Python int, used for the static capacity);
    ``rows`` each row's (forced, routable) counts (Python ints) when known: MoD layers then use the tight
    capacity ``max_b (F_b + keep(R_b, r))`` (:func:`gmod_ext.config.capacity_of_rows`);
    ``segments`` [B, S] the packed-sequence id of each token (:func:`packed_segments`) or None, and
    ``max_segments`` the most sequences one row holds (MoD layers route each sequence on its own:
    :func:`per_sequence_codes`);
    ``blocks`` [B, S] the bidirectional block of each token (:func:`token_type_blocks`: an image's tokens, or
    a prefix-LM's prompt) or None, and ``window_in_blocks`` whether a sliding window also limits what a
    block's tokens see of each other (Gemma-3: yes; PaliGemma-2: no).
    MoD layers write ``aux[layer]`` (differentiable aux loss term), ``stats[layer]`` (a mapping of detached
    tensors, :class:`LazyStats`: computed when read) and ``selection[layer] = (idx, count)`` (what ``ops.route`` chose). A gradient-checkpointing replay overwrites them with equal values.
    """

    def __init__(self, mask: Optional[torch.Tensor] = None, max_forced: int = 0, rows: Optional[list] = None):
        self.mask = mask
        self.max_forced = int(max_forced)
        self.rows = rows  # [(F_b, R_b)] Python ints, or None: the tight capacity when given
        # [B, S] sequence id of each token of packed rows (position_ids that restart, no attention_mask),
        # or None: MoD layers then attend only within a sequence, as transformers' packed mask does
        self.segments: Optional[torch.Tensor] = None
        self.max_segments: Optional[int] = None  # the most sequences in one row (a Python int), when known
        # [B, S] block id of each token (-1: not in a block) when the model marks tokens that attend both ways
        # with token_type_ids (Gemma-3's images, PaliGemma's prefix): kept tokens of one block see each other
        # both ways, as its mask says
        self.blocks: Optional[torch.Tensor] = None
        self.window_in_blocks = True
        # whether the blocks apply in sliding-window layers only (Gemma 4: its full-attention layers are causal)
        self.blocks_sliding_only = False
        # [B] leading padding tokens of each row over the whole sequence so far, when the call gave a 2-D
        # attention mask: Llama-4's attention chunks count from the first real token, as its mask does
        self.left_pad: Optional[torch.Tensor] = None
        self.aux: DeferredValues = DeferredValues()  # layer -> aux loss term (computed when read in no-grad forwards)
        self.stats: dict[int, Mapping[str, torch.Tensor]] = {}
        self.selection: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (idx, count)
        self._memo: dict = {}  # what the MoD layers of this forward share: see memo()
        # reentrant gradient checkpointing (see AuxLossGradient): set by a MoD layer whose aux loss was recorded
        # without autograd in training, and by the model's loss hook
        self.aux_without_graph = False
        self.aux_loss_gradient: Optional[AuxLossGradient] = None

    def memo(self, key, compute: Callable[[], object], keep: tuple = ()):
        """``compute()``, once per forward: the first MoD layer that asks computes it and the forward's
        later layers reuse it (the shared router's weight difference, the routed counts of the forward's
        codes, the batch-expanded rotary angles). ``key`` names the value, with the ids of the tensors it is
        made from; ``keep`` holds those tensors, so no other tensor takes their ids while the entry lives.
        The converted model's end-of-forward hook empties it (:meth:`clear_memo`).

        Not kept while compiling (a dict on this object would be state the compiled graph has to guard) nor
        during a backward pass: a gradient-checkpointing replay recomputes each value in its own graph (a
        reentrant replay runs a layer's forward again, with gradients, inside the backward pass)."""
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() != -1:
            return compute()
        hit = self._memo.get(key)
        if hit is not None:
            return hit[1]
        value = compute()
        self._memo[key] = (keep, value)
        return value

    def clear_memo(self) -> None:
        self._memo.clear()

    def aux_total(self) -> Optional[torch.Tensor]:
        if not self.aux:
            return None
        vals = [self.aux[k] for k in sorted(self.aux)]
        total = vals[0]
        for v in vals[1:]:
            total = total + v.to(total.device)
        return total

    def __repr__(self) -> str:
        shape = None if self.mask is None else tuple(self.mask.shape)
        return f"RoutingInfo(mask={shape}, max_forced={self.max_forced}, layers={sorted(self.stats)})"


class AuxLossGradient:
    """The aux loss's share of the gradient under reentrant gradient checkpointing.

    ``torch.utils.checkpoint(..., use_reentrant=True)`` (PEFT's default for k-bit training) runs each layer's
    forward without autograd and runs it again, with autograd, inside the backward pass, backpropagating only
    what the layer returns. A MoD layer's aux loss is not among that: the model adds the sum of the layers'
    terms to its loss, and on that first pass they have no graph. So the converted model's loss hook
    registers :meth:`capture` on the loss it returns: the first thing a backward pass through that loss
    computes is its gradient, which times ``aux_coef`` is each layer term's gradient. Each layer's replay
    then returns its output through :class:`AuxLossThroughOutput`, which hands its own aux term that
    gradient. A backward pass of some other loss (without the model's aux term) leaves it unset: no aux
    gradient, as that loss says."""

    def __init__(self, coef: float):
        self.coef = float(coef)
        self.value: Optional[torch.Tensor] = None

    def capture(self, grad: torch.Tensor) -> None:
        self.value = grad.detach() * self.coef


class AuxLossThroughOutput(torch.autograd.Function):
    """``y`` unchanged (a copy); backward passes ``y``'s gradient through and gives ``aux`` (a layer's aux
    loss term, recomputed with autograd in a reentrant replay) the gradient an :class:`AuxLossGradient` holds."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, gradient: AuxLossGradient) -> torch.Tensor:
        ctx.gradient = gradient
        ctx.aux_like = (aux.shape, aux.dtype, aux.device)
        return y.clone()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        value = ctx.gradient.value
        if value is None:
            return grad_y, None, None
        shape, dtype, device = ctx.aux_like
        return grad_y, value.to(device=device, dtype=dtype).expand(shape), None


def packed_segments(position_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S] int64 sequence ids of packed rows from ``position_ids`` [B, S] (or [1, S]): a new sequence
    starts wherever the position does not go up by exactly one (transformers' rule for a batch given
    ``position_ids`` and no attention mask), or None when no row holds more than one sequence (one
    host sync, skipped while compiling: then the ids are always returned)."""
    first = position_ids[:, :1] - 1
    seg = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    if not torch.compiler.is_compiling() and not bool((seg[:, -1] != 0).any()):
        return None
    return seg


def max_segments(segments: torch.Tensor) -> int:
    """The most packed sequences one row holds (ids from :func:`packed_segments`): one host sync."""
    return int(segments[:, -1].max()) + 1 if segments.numel() else 1


def per_sequence_codes(
    scores: torch.Tensor,
    codes: Optional[torch.Tensor],
    segments: torch.Tensor,
    ratio: float,
    threshold: Optional[float] = None,
) -> torch.Tensor:
    """Routing codes that make ``ops.route`` choose for each packed sequence as if it were alone.

    ``ops.route`` ranks a row's tokens against each other; in a packed row (``segments`` [B, S], ids
    from :func:`packed_segments`) that would let one sequence's tokens take another's places. Here
    each sequence keeps its forced tokens plus its own ``keep(R_s, ratio)`` best routable tokens (R_s:
    its routable count; with ``threshold``, only those scoring above it), with ``ops.route``'s rules
    (ties to the lower index, NaN last). Returns [B, S] int8 codes: forced for every token to keep,
    never for the rest; route them with ``num_routed = 0`` and a capacity of at least
    ``max_b (F_b + sum_s keep(R_s))``, which is at most the per-row count plus (sequences - 1).
    No host sync.
    """
    B, S = scores.shape
    dev = scores.device
    seg = segments.to(dev).long()
    if codes is None:
        routable = torch.ones(B, S, dtype=torch.bool, device=dev)
        forced = torch.zeros(B, S, dtype=torch.bool, device=dev)
    else:
        routable, forced = codes == ops.MASK_ROUTABLE, codes == ops.MASK_FORCED
    s = scores.detach()
    nan = torch.isnan(s)
    # best first (stable: ties keep the lower index first), then grouped by sequence with its routable
    # numbers first and NaN after them (a second stable sort keeps the score order inside each group)
    order = torch.sort(s.masked_fill(nan, float("-inf")), dim=1, descending=True, stable=True).indices
    group = seg * 4 + (~routable).long() * 2 + nan.long()
    order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
    seg_sorted = seg.gather(1, order)
    size = torch.zeros(B, S, dtype=torch.long, device=dev).scatter_add_(1, seg, torch.ones_like(seg))
    start = size.cumsum(1) - size  # where each sequence's group begins in the sorted order
    rank = torch.arange(S, device=dev).unsqueeze(0) - start.gather(1, seg_sorted)
    n_routable = torch.zeros(B, S, dtype=torch.long, device=dev).scatter_add_(1, seg, routable.long())
    keep_n = n_routable - num_skipped_tensor(n_routable, ratio)  # keep(R_s, r)
    keep_sorted = routable.gather(1, order) & (rank < keep_n.gather(1, seg_sorted))
    if threshold is not None:
        keep_sorted &= s.gather(1, order) > threshold
    keep = torch.zeros(B, S, dtype=torch.bool, device=dev).scatter_(1, order, keep_sorted)
    return torch.where(forced | keep, ops.MASK_FORCED, ops.MASK_NEVER).to(torch.int8)


def image_blocks(token_type_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S] int64 image block ids from ``token_type_ids`` [B, S] (1 marks an image token): each run of
    consecutive image tokens is one block, numbered from 0 per row; -1 elsewhere (Gemma-3's rule for the
    tokens that attend to each other in both directions). None when no token is an image token (one
    host sync, skipped while compiling)."""
    is_image = token_type_ids == 1
    if not torch.compiler.is_compiling() and not bool(is_image.any()):
        return None
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return torch.where(is_image, starts.long().cumsum(-1) - 1, torch.full_like(token_type_ids, -1, dtype=torch.long))


def prefix_blocks(token_type_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S] int64 block ids from a prefix-LM's ``token_type_ids`` [B, S] (PaliGemma: 0 marks the prefix,
    i.e. the image and the prompt text, 1 the suffix): the prefix is block 0, the suffix -1, so the prefix
    tokens see each other both ways and the suffix attends causally (PaliGemma's ``block_sequence_ids``).
    None when no token is in the prefix (one host sync, skipped while compiling)."""
    prefix = token_type_ids == 0
    if not torch.compiler.is_compiling() and not bool(prefix.any()):
        return None
    return torch.where(prefix, 0, -1).long()


def vision_blocks(mm_token_type_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, S] int64 block ids from Gemma 4's ``mm_token_type_ids`` [B, S] (1 an image token, 2 a video token,
    0 text, 3 audio): each run of consecutive image / video tokens is one block, as :func:`image_blocks`."""
    return image_blocks(((mm_token_type_ids == 1) | (mm_token_type_ids == 2)).long())


# how a multimodal model's token_type_ids mark the tokens that attend to each other both ways
# (gmod_ext._hf.token_type_rule tells a model's rule): "image" each run of image tokens (Gemma-3),
# "prefix" the whole prefix of a prefix-LM (PaliGemma); the second item says whether a sliding window
# limits a block (Gemma-3's local layers: AND(window, OR(causal, block)); PaliGemma-2's:
# OR(AND(window, causal), block)); "vision" (Gemma 4 with use_bidirectional_attention="vision") each run of
# image or video tokens, in its sliding-window layers only (its full-attention layers are causal), read from
# mm_token_type_ids; "vision_all" the same blocks in every layer (Gemma 4 unified's forward builds Gemma-3's
# mask from them)
TOKEN_TYPE_RULES = {"image": (image_blocks, True), "prefix": (prefix_blocks, False), "vision": (vision_blocks, True),
                    "vision_all": (vision_blocks, True)}
TOKEN_TYPE_KEYWORDS = {"image": "token_type_ids", "prefix": "token_type_ids", "vision": "mm_token_type_ids",
                       "vision_all": "mm_token_type_ids"}
BLOCKS_IN_SLIDING_LAYERS_ONLY = ("vision",)


def set_token_type_blocks(info: "RoutingInfo", token_types: torch.Tensor, rule: str) -> None:
    """Set ``info``'s ``blocks``, ``window_in_blocks`` and ``blocks_sliding_only`` from a rule's token types."""
    info.blocks, info.window_in_blocks = token_type_blocks(token_types, rule)
    info.blocks_sliding_only = rule in BLOCKS_IN_SLIDING_LAYERS_ONLY


def token_type_blocks(token_type_ids: torch.Tensor, rule: str) -> tuple[Optional[torch.Tensor], bool]:
    """(block ids [B, S] or None, window_in_blocks) of ``token_type_ids`` under ``rule`` (TOKEN_TYPE_RULES)."""
    if rule not in TOKEN_TYPE_RULES:
        raise ValueError(f"gmod: unknown token type rule {rule!r}; known: {sorted(TOKEN_TYPE_RULES)}")
    blocks, window_in_blocks = TOKEN_TYPE_RULES[rule]
    return blocks(token_type_ids), window_in_blocks


class GmodState:
    """Model-level plain object (not a module) shared by a converted model's MoD layers."""

    def __init__(self, config, router: Optional[GmodRouter] = None, rotary: Optional[nn.Module] = None):
        self.config = config
        self.router = router  # the shared router (also registered on the model), or None
        self.rotary = rotary  # the model's rotary embedding module (for positions="compact")
        self.current: Optional[RoutingInfo] = None  # the last hooked forward
        # the routing of the hooked forward now running (None between forwards): MoD layers of models whose
        # decoder stack does not pass keywords through to its layers (Falcon, GPT-NeoX-Japanese) read it
        self.active: Optional[RoutingInfo] = None
        self.scratch: Optional[RoutingInfo] = None  # layers called without a hooked forward
        self.forward_params: Optional[dict] = None  # forward() parameter names per hooked class
        # The prompt length while model.generate runs (gmod_ext.generation): the forward hook's default
        # for the gmod_prefill_len keyword, so that generate's model keywords (which assisted
        # generation copies to the assistant model) carry nothing of ours.
        self.generate_prefill_len: Optional[int] = None
        # how the model's token_type_ids mark tokens that attend both ways (TOKEN_TYPE_RULES; set by convert)
        self.token_type_rule = "image"

    def __getstate__(self):
        # The last forward's record (tensors with autograd history) is transient: deepcopy /
        # pickling of the model (torch.save, EMA copies) drops it.
        d = dict(self.__dict__)
        d["current"] = None
        d["active"] = None
        d["scratch"] = None
        d["generate_prefill_len"] = None
        return d


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))
