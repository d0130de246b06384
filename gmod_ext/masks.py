"""Routing masks: which tokens a MoD layer may skip.

Codes (``ops.MASK_*``): 0 routable, 1 forced keep, 2 never processed (padding). Padding wins over
forced. Sources of forced tokens:

* an explicit boolean mask (``gmod_forced_mask=`` on the converted model's forward);
* ``mode="text"``: every token that is not an image token (``input_ids != image_token_id``):
  image tokens are routable, text is forced (the gamma-MoD training code's masked routing, which
  keeps the whole conversation; p-MoD's vision-only routing);
* ``mode="ignored_labels"``: tokens whose ``labels == -100`` (the instruction / question text in
  LLaVA-style SFT data) are forced, except image tokens (also -100 there) which stay routable; the
  labelled answer tokens are routed too. Labels are used unshifted (``labels[b, t]`` belongs to
  token t, as in Hugging Face's causal-LM convention). Without labels (inference) nothing is forced.

Padding comes from a 2-D ``attention_mask`` (0 = padding); other mask shapes are ignored.
"""
from __future__ import annotations

from typing import Optional

import torch

from .ops import MASK_FORCED, MASK_NEVER, MASK_ROUTABLE  # noqa: F401

IGNORE_INDEX = -100


def forced_from_image_tokens(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Text forced, image tokens routable: ``input_ids != image_token_id``."""
    return input_ids != image_token_id


def forced_from_labels(
    labels: torch.Tensor, input_ids: Optional[torch.Tensor] = None, image_token_id: Optional[int] = None
) -> torch.Tensor:
    """``labels == -100`` forced, except image tokens (which stay routable)."""
    forced = labels == IGNORE_INDEX
    if input_ids is not None and image_token_id is not None:
        forced = forced & (input_ids != image_token_id)
    return forced


def build_routing_mask(shape: tuple[int, int], device, **kwargs) -> tuple[Optional[torch.Tensor], int]:
    """Return ``(codes [B, S] int8 or None, max_forced)``.

    Keywords: ``attention_mask``, ``input_ids``, ``labels``, ``forced_mask``, ``mode`` ("none",
    "text", "ignored_labels") and ``image_token_id``. ``None`` means every token is routable
    (nothing given). ``max_forced`` is the largest number of forced (code 1) tokens in one row, a
    Python int (one host sync when a mask is built).
    """
    codes = routing_codes(shape, device, **kwargs)
    return codes, 0 if codes is None else int((codes == MASK_FORCED).sum(1).max().item())


def routing_codes_and_rows(shape, device, **kwargs) -> tuple[Optional[torch.Tensor], int, Optional[list]]:
    """:func:`build_routing_mask` (same keywords) plus each row's counts (:func:`row_forced_routable`)
    in a single host sync: ``(codes or None, max_forced, rows or None)``, ``max_forced`` read off ``rows``."""
    codes = routing_codes(shape, device, **kwargs)
    if codes is None:
        return None, 0, None
    rows = row_forced_routable(codes)
    return codes, max(f for f, _ in rows), rows


def routing_codes(
    shape: tuple[int, int],
    device,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    input_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    forced_mask: Optional[torch.Tensor] = None,
    mode: str = "none",
    image_token_id: Optional[int] = None,
) -> Optional[torch.Tensor]:
    """The [B, S] int8 code mask (0 routable, 1 forced, 2 padding) of :func:`build_routing_mask`, or
    None when every token is routable; no host sync."""
    B, S = shape
    forced = None

    def _check(name, t):
        if tuple(t.shape[:2]) != (B, S) or t.dim() != 2:
            raise ValueError(f"gmod: {name} has shape {tuple(t.shape)}, expected [{B}, {S}]")
        return t.to(device)

    if mode == "text":
        if input_ids is not None and image_token_id is not None:
            forced = forced_from_image_tokens(_check("input_ids", input_ids), image_token_id)
    elif mode == "ignored_labels":
        if labels is not None:
            ids = _check("input_ids", input_ids) if input_ids is not None else None
            forced = forced_from_labels(_check("labels", labels), ids, image_token_id)
    elif mode != "none":
        raise ValueError(f"gmod: unknown forced mode {mode!r}")
    if forced_mask is not None:
        fm = _check("gmod_forced_mask", forced_mask).bool()
        forced = fm if forced is None else (forced | fm)

    pad = None
    if attention_mask is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        pad = _check("attention_mask", attention_mask) == 0

    if forced is None and pad is None:
        return None
    codes = torch.zeros((B, S), dtype=torch.int8, device=device)
    if forced is not None:
        codes.masked_fill_(forced, MASK_FORCED)
    if pad is not None:
        codes.masked_fill_(pad, MASK_NEVER)
    return codes


def check_routing_mask(mask: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Validate an explicit [B, S] code mask and return it as int8."""
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"gmod: routing mask has shape {tuple(mask.shape)}, expected {list(shape)}")
    return mask.to(torch.int8)


def _row_counts(codes: torch.Tensor, invalid: bool = False) -> list:
    """Per row of a [B, S] code mask: [forced, routable (, codes outside 0..2)], in one host sync."""
    cols = [(codes == MASK_FORCED).sum(1), (codes == MASK_ROUTABLE).sum(1)]
    if invalid:
        cols.append(((codes < MASK_ROUTABLE) | (codes > MASK_NEVER)).sum(1))
    return torch.stack(cols, dim=1).tolist()


def row_forced_routable(codes: torch.Tensor) -> list:
    """``[(F_b, R_b), ...]``: forced (code 1) and routable (code 0) tokens of each row of a [B, S] code
    mask, as Python ints (one host sync), for the tight capacity (:func:`gmod_ext.config.capacity_of_rows`)."""
    return [tuple(r) for r in _row_counts(codes)]


def explicit_codes_and_rows(mask: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, list]:
    """A caller's ``gmod_routing_mask``: shape and codes checked, returned as int8 with each row's
    ``(F_b, R_b)``, in the one host sync :func:`row_forced_routable` costs. The codes are checked before
    the int8 cast, which would wrap e.g. 256 to 0."""
    if mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        check_routing_mask(mask, shape)  # raises, naming both shapes
    counts = _row_counts(mask, invalid=True)
    if any(c[2] for c in counts):
        b, t = (int(v) for v in ((mask < MASK_ROUTABLE) | (mask > MASK_NEVER)).nonzero()[0].tolist())
        raise ValueError(f"gmod: gmod_routing_mask[{b}, {t}] = {int(mask[b, t])} is not a routing code "
                         "(0 routable, 1 forced keep, 2 padding / never processed)")
    return mask.to(torch.int8), [(f, r) for f, r, _ in counts]
