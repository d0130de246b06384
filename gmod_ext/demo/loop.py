"""The demo's training, generation and evaluation loops, and what it measures of a generation's KV
cache."""
from __future__ import annotations

import statistics
import sys
import time
from typing import Optional

import torch

from .._hf import output_cache
from .data import IGNORE, SyntheticTask

def cache_module():
    """``gmod_ext.cache`` when it provides ``memory_report`` (the compact MoD KV cache), else None.

    Checked at run time, so the demo also runs (with an estimate) on a tree without the cache."""
    try:
        from .. import cache as cache_mod  # noqa: PLC0415
    except Exception:  # noqa: BLE001  (missing, or broken: fall back to the estimate)
        return None
    return cache_mod if hasattr(cache_mod, "memory_report") else None


def dense_cache_bytes(cache) -> Optional[int]:
    """Bytes held by the key/value tensors of a Hugging Face cache (DynamicCache and friends)."""
    if cache is None:
        return None
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for attr in ("key_cache", "value_cache"):  # older transformers
        for t in getattr(cache, attr, []) or []:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def model_inputs(batch: dict, converted: bool, explicit_mask: bool) -> dict:
    b = dict(batch)
    mask = b.pop("gmod_routing_mask", None)
    if converted and explicit_mask and mask is not None:
        b["gmod_routing_mask"] = mask
    return b



class Run:
    """One model being trained by :func:`train` (its optimizer, losses and step times)."""

    def __init__(self, name: str, model, *, steps: int, lr: float, converted: bool = False,
                 explicit_mask: bool = False, on_step=None):
        self.name, self.model, self.steps, self.lr = name, model, int(steps), float(lr)
        self.converted, self.explicit_mask, self.on_step = converted, explicit_mask, on_step
        self.losses: list[float] = []
        self.times: list[float] = []
        self.skips: list[float] = []

    def result(self) -> dict:
        timed = self.times[2:] if len(self.times) > 4 else self.times
        return {"losses": self.losses, "step_s": self.times, "skip_ratios": self.skips,
                "median_step_s": statistics.median(timed) if timed else float("nan")}


def train(runs: list, task: SyntheticTask, *, batch_size: int, gen: torch.Generator, device, dtype, desc: str,
          progress: bool) -> dict:
    """AdamW training of one or more models on the same fresh synthetic batches, in lockstep.

    Step ``i`` draws one batch and runs it through every model that still has steps to do, one
    after the other, so that dense and gamma-MoD see the same data and, on a shared machine, the
    same background load (their step times are compared). Returns ``{name: Run.result()}``.
    """
    from tqdm.auto import tqdm

    opts = {}
    for r in runs:
        r.model.train()
        opts[r.name] = torch.optim.AdamW([p for p in r.model.parameters() if p.requires_grad], lr=r.lr,
                                         weight_decay=0.0)
    steps = max(r.steps for r in runs) if runs else 0
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stderr)
    for i in bar:
        batch = to_device(task.batch(batch_size, gen), device, dtype)
        post = {}
        for r in runs:
            if i >= r.steps:
                continue
            model, opt = r.model, opts[r.name]
            inputs = model_inputs(batch, r.converted, r.explicit_mask)
            inputs["use_cache"] = False  # training needs no KV cache
            sync(device)
            t0 = time.perf_counter()
            out = model(**inputs)
            loss = out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            r.times.append(time.perf_counter() - t0)
            lv = float(loss.detach())
            r.losses.append(lv)
            post[r.name if len(runs) > 1 else "loss"] = f"{lv:.3f}"
            if r.converted:
                st = model.gmod_stats()
                r.skips.append(st["skip_ratio"])
                post["skip"] = f"{st['skip_ratio']:.2f}"
            if r.on_step is not None:
                r.on_step(model, batch)
            del out, loss
        bar.set_postfix(post)
    bar.close()
    opts.clear()
    return {r.name: r.result() for r in runs}


@torch.no_grad()
def generate(model, prompts: dict, new_tokens: int, *, use_cache: bool, pad: int, device,
             return_cache: bool = False, reps: int = 3) -> dict:
    """Greedy generation of exactly ``new_tokens`` tokens; the median time of ``reps`` calls after a
    one-token warm-up (fewer repeats when one call takes over 2 s)."""
    model.eval()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
              pad_token_id=pad)
    if return_cache:
        kw["return_dict_in_generate"] = True
    model.generate(**prompts, **dict(kw, max_new_tokens=1, min_new_tokens=1))  # warm-up
    times = []
    out = None
    for _ in range(max(1, reps)):
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(**prompts, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > 2.0:
            break
    seqs = out.sequences if return_cache else out
    cache = output_cache(out) if return_cache else None
    return {"sequences": seqs, "seconds": statistics.median(times), "times": times, "cache": cache}


@torch.no_grad()
def evaluate(model, batch: dict, *, converted: bool, explicit_mask: bool) -> dict:
    """Held-out loss (plain LM cross-entropy, no router aux term) and teacher-forced accuracy on the
    answer tokens of one batch, and on the first answer token alone (the one that needs the image)."""
    import torch.nn.functional as F

    model.eval()
    inputs = model_inputs(batch, converted, explicit_mask)
    inputs["use_cache"] = False
    labels = inputs.pop("labels")
    out = model(**inputs)
    logits = out.logits[:, :-1].float()
    tgt = labels[:, 1:]
    m = tgt != IGNORE
    loss = F.cross_entropy(logits[m], tgt[m])
    right = logits.argmax(-1) == tgt
    acc = right[m].float().mean()
    # the first labelled token of each row: the answer's start word, the one token that needs the image
    first = m.float().argmax(1)
    acc_first = right.gather(1, first.unsqueeze(1))[m.any(1)].float().mean()
    return {"loss": float(loss), "answer_accuracy": float(acc), "first_token_accuracy": float(acc_first),
            "samples": int(labels.shape[0])}


def accuracy_of(seqs: torch.Tensor, prompt_len: int, answers: torch.Tensor) -> float:
    gen = seqs[:, prompt_len:prompt_len + answers.shape[1]].cpu()
    if gen.shape != answers.shape:
        return float("nan")
    return float((gen == answers).float().mean())


@torch.no_grad()
def kept_counts(model) -> dict[int, list[int]]:
    info = model.gmod_state.current
    if info is None:
        return {}
    return {li: [int(c) for c in cnt.tolist()] for li, (_, cnt) in sorted(info.selection.items())}


@torch.no_grad()
def kept_for_generation(model, seqs: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                        extra: Optional[dict] = None) -> dict[int, list[int]]:
    """Per MoD layer and row: the tokens that layer processes while ``generate`` produces ``seqs``,
    i.e. what its compact KV cache holds afterwards (estimate used when no cache is available).

    One forward over the positions that generation feeds to the model (the prompt and every
    generated token but the last) with ``gmod_prefill_len=prompt_len``: the prompt is routed by top-k
    among the prompt tokens, each later token by ``p >= decode_threshold``, the same decisions as a
    cached generation (see :mod:`gmod_ext.cache`); the kept-token counts of that forward are the
    answer (up to floating-point near-ties)."""
    model.eval()
    fed = seqs[:, : seqs.shape[1] - 1]
    am = torch.cat([attention_mask, torch.ones(seqs.shape[0], fed.shape[1] - attention_mask.shape[1],
                                               dtype=attention_mask.dtype, device=attention_mask.device)], 1)
    kw = dict(extra or {})
    types = kw.get("token_type_ids")
    if isinstance(types, torch.Tensor):  # generated tokens are the suffix of a prefix-LM (type 1)
        kw["token_type_ids"] = torch.cat([types, types.new_ones(types.shape[0], fed.shape[1] - types.shape[1])], 1)
    try:
        model(input_ids=fed, attention_mask=am, use_cache=False, gmod_prefill_len=int(prompt_len), **kw)
    except TypeError:  # a converter without gmod_prefill_len: top-k over the whole sequence
        model(input_ids=fed, attention_mask=am, use_cache=False, **kw)
    return kept_counts(model)

