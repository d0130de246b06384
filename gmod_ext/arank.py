"""ARank: attention-map rank per decoder layer, to choose which layers become MoD layers.

For every layer the eager attention probabilities of each calibration sample are taken per head,
restricted to the sample's non-padding tokens, the lower triangle kept and the diagonal zeroed
(``tril(A, -1)``), and ``torch.linalg.matrix_rank`` computed in float32. The layer's ARank is the
mean over heads and samples. Low-ARank layers are redundant and become MoD layers; gamma-MoD keeps
the highest-ranked few dense (:func:`choose_mod_layers`).

The attention maps come from forward hooks on each attention module (``self_attn``) with the model switched to
``attn_implementation="eager"`` for the calibration (restored afterwards), so only one layer's
maps are alive at a time. Run it on the unconverted model (MoD layers have no dense maps).
"""
from __future__ import annotations

import math
import numbers
import sys as _sys
import types
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from ._hf import find_decoder
from .block_layout import attention_module

__all__ = ["arank", "choose_mod_layers", "format_table", "plot_arank", "attention_rank"]


def attention_rank(attn: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-head rank of one sample's attention map ``attn`` [H, S, S] -> float32 [H].

    ``valid`` [S] bool selects the non-padding tokens (rows and columns).
    """
    if valid is not None and not bool(valid.all()):
        keep = valid.nonzero().squeeze(-1)
        attn = attn.index_select(-2, keep).index_select(-1, keep)
    a = torch.tril(attn.float(), diagonal=-1)
    if a.shape[-1] == 0:
        return torch.zeros(a.shape[0])
    return torch.linalg.matrix_rank(a).float()


def _as_batches(batches) -> list:
    if isinstance(batches, (torch.Tensor, Mapping)):
        return [batches]
    if batches is None or isinstance(batches, (str, bytes)):
        raise TypeError(f"gmod.arank: batches must be an iterable of model inputs (dicts of forward keywords or "
                        f"input_ids tensors [B, S]), got {type(batches).__name__}")
    try:
        return list(batches)
    except TypeError:
        raise TypeError(f"gmod.arank: batches must be an iterable of model inputs (dicts of forward keywords or "
                        f"input_ids tensors [B, S]), got {type(batches).__name__}") from None


def _check_batch(i: int, batch, vocab: Optional[int], image_token_id: Optional[int], model_device) -> None:
    """Raise ValueError / TypeError naming batch ``i`` and what is wrong with it, before the model runs."""
    where = f"gmod.arank: batch {i}"
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where} is a {type(batch).__name__}; expected a dict of forward keywords or an input_ids "
                        "tensor [B, S]")
    ids, embeds = batch.get("input_ids"), batch.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    if not isinstance(ref, torch.Tensor):
        raise ValueError(f"{where} has no input_ids / inputs_embeds tensor (keys: {sorted(map(str, batch))})")
    for name, t in batch.items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta" and model_device is not None \
                and model_device.type != "meta":
            raise ValueError(f"{where}: {name} is on the meta device (no data); the model is on {model_device}")
    if ids is not None:
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{where}: input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{where}: input_ids has shape {tuple(ids.shape)}, expected [B, S]")
    elif embeds.dim() != 3:
        raise ValueError(f"{where}: inputs_embeds has shape {tuple(embeds.shape)}, expected [B, S, D]")
    B, S = ref.shape[0], ref.shape[1]
    if B == 0 or S == 0:
        raise ValueError(f"{where} is empty (shape {tuple(ref.shape)}); every batch needs B >= 1 and S >= 1")
    if ids is not None and vocab is not None and ids.device.type != "meta":
        text = ids if image_token_id is None else ids[ids != image_token_id]
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= vocab):
            raise ValueError(f"{where}: input_ids must be in [0, {vocab}) (the vocabulary), got values in "
                             f"[{int(text.min())}, {int(text.max())}]")
    am = batch.get("attention_mask")
    if isinstance(am, torch.Tensor) and am.dim() == 2:
        if tuple(am.shape) != (B, S):
            raise ValueError(f"{where}: attention_mask has shape {tuple(am.shape)}, expected [{B}, {S}] like the "
                             "inputs")
        if am.device.type != "meta":
            empty = (am == 0).all(1).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"{where}: rows {empty} are all padding (attention_mask all 0): no tokens to rank")


def _set_attn(model, impl) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # pragma: no cover - very old transformers
        model.config._attn_implementation = impl


def arank(
    model: torch.nn.Module,
    batches: Union[Iterable, torch.Tensor, dict],
    *,
    max_batches: Optional[int] = None,
    progress: bool = True,
    desc: str = "ARank",
) -> list[float]:
    """ARank of every decoder layer of ``model`` (list, one float per layer).

    ``batches``: an iterable of model inputs: each a dict of forward kwargs (``input_ids``,
    ``attention_mask``, ``pixel_values``, ...) or a tensor of ``input_ids``. A tqdm bar shows the
    progress (``progress=False`` hides it).
    """
    from tqdm.auto import tqdm

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gmod.arank: model must be a torch.nn.Module (a Hugging Face model), got {type(model).__name__}")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral)
                                    or max_batches < 1):
        raise ValueError(f"gmod.arank: max_batches={max_batches!r} must be None or an int >= 1")
    parts = find_decoder(model)
    L = len(parts.layers)
    totals = [0.0] * L
    samples = [0] * L
    current = {"valid": None}

    def make_hook(li):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                return
            valid = current["valid"]
            for b in range(weights.shape[0]):
                v = None if valid is None else valid[b].to(weights.device)
                ranks = attention_rank(weights[b].detach(), v)
                totals[li] += float(ranks.mean())
                samples[li] += 1

        return hook

    batches = _as_batches(batches)
    if max_batches is not None:
        batches = batches[:max_batches]
    if not batches:
        raise ValueError("gmod.arank: no calibration batches (an empty list); pass at least one model input "
                         "(a dict of forward keywords or an input_ids tensor [B, S])")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(emb, "num_embeddings", None)
    weight = getattr(emb, "weight", None)
    model_device = weight.device if isinstance(weight, torch.Tensor) else None
    for i, batch in enumerate(batches):
        _check_batch(i, batch, vocab, parts.image_token_id, model_device)
    # layers without self-attention (a hybrid model's linear-attention layers) get no ARank (NaN)
    handles = [attention_module(parts.layers[i]).register_forward_hook(make_hook(i)) for i in parts.convertible]
    prev_impl = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    try:
        _set_attn(model, "eager")
        model.eval()
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress):
                if isinstance(batch, torch.Tensor):
                    batch = {"input_ids": batch}
                am = batch.get("attention_mask")
                current["valid"] = am.bool() if isinstance(am, torch.Tensor) and am.dim() == 2 else None
                kwargs = dict(batch)
                kwargs.pop("labels", None)
                kwargs["use_cache"] = False
                model(**kwargs)
    finally:
        for h in handles:
            h.remove()
        if prev_impl is not None and prev_impl != "eager":
            _set_attn(model, prev_impl)
        model.train(was_training)
    if not any(samples):
        raise RuntimeError(
            "gmod.arank: no attention maps were captured (are the layers already MoD layers, or does the "
            "model not support eager attention?)"
        )
    return [t / n if n else float("nan") for t, n in zip(totals, samples)]


def choose_mod_layers(
    ranks: Sequence[float], keep_dense: Optional[int] = None, threshold: Optional[float] = None
) -> list[int]:
    """Layers that become MoD layers (sorted).

    ``threshold``: every layer with ARank < threshold (the paper cut is 110 on LLaVA-HR).
    Otherwise keep the ``keep_dense`` highest-ranked layers dense (default ``ceil(L / 8)``, the
    paper's 4 of 32); ties go to the lower layer index. Layers without an ARank (NaN: no attention
    maps, the linear-attention layers of a hybrid model) stay dense and do not count in L.
    """
    if len(ranks) == 0:
        raise ValueError("gmod: choose_mod_layers needs one ARank per layer, got an empty list")
    ranked = [i for i, r in enumerate(ranks) if r == r]
    L = len(ranked)
    if L == 0:
        raise ValueError("gmod: choose_mod_layers: no layer has an ARank (every value is NaN)")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold):
            raise ValueError(f"gmod: arank threshold={threshold!r} must be a finite number")
        return [i for i in ranked if ranks[i] < threshold]
    if keep_dense is not None and (isinstance(keep_dense, bool) or not isinstance(keep_dense, numbers.Integral)):
        raise TypeError(f"gmod: keep_dense must be an int, got {keep_dense!r}")
    n = max(1, math.ceil(L / 8)) if keep_dense is None else int(keep_dense)
    if not (0 <= n <= L):
        raise ValueError(f"gmod: keep_dense={n} must be in [0, {L}]")
    order = sorted(ranked, key=lambda i: (-float(ranks[i]), i))
    dense = set(order[:n])
    return [i for i in ranked if i not in dense]


def format_table(ranks: Sequence[float], mod_layers: Optional[Sequence[int]] = None) -> str:
    mod = set(mod_layers or [])
    lines = [f"{'layer':>5}  {'ARank':>9}  kind", f"{'-' * 5}  {'-' * 9}  -----"]
    for i, r in enumerate(ranks):
        kind = "MoD" if i in mod else "dense"
        lines.append(f"{i:>5}  {r:>9.2f}  {kind}")
    return "\n".join(lines)


def plot_arank(
    ranks: Sequence[float], path: str, mod_layers: Optional[Sequence[int]] = None, title: str = "ARank per layer"
) -> str:
    """Bar chart of the ARank per layer (MoD layers in one colour, dense in another) saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    mod = set(mod_layers or [])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(ranks) + 2), 3.2))
    colors = ["tab:orange" if i in mod else "tab:blue" for i in range(len(ranks))]
    ax.bar(range(len(ranks)), ranks, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("ARank (mean over heads, samples)")
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:blue", label="dense"), Patch(color="tab:orange", label="MoD")], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class _CallableModule(types.ModuleType):
    """``gmod_ext.arank`` is both this module and, when called, :func:`arank`."""

    def __call__(self, *args, **kwargs):
        return arank(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
