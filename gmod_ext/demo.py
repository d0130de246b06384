"""``python -m gmod_ext demo``: the whole gamma-MoD job on a small LLaVA-shaped model, end to end.

    ARank -> convert (gamma-MoD) -> train -> generate -> report (text + JSON + PNG)

The default model is built from a config (no download): a ``LlavaForConditionalGeneration`` with a
tiny CLIP vision tower (2 layers, width 64, 8x8 patches) and a Llama language model (8 layers,
hidden 256, 4 query / 2 KV heads, MLP 688, vocab 512). ``--model PATH`` loads a local Hugging Face
folder instead (a LLaVA model, or a Llama-family ``*ForCausalLM``).

Data: synthetic image + question -> answer samples with a learnable structure, so the loss falls:

* an image of class ``c`` (one of 8): a fixed random low-resolution colour pattern of that class,
  upsampled, plus noise; it becomes ``grid**2`` image tokens (64 at the default ``--seq-len 96``,
  up to 144), the span of LLaVA's image token id (for a text-only model: "visual words", token ids
  drawn from a per-class set, like a discrete image tokenizer would give);
* a question: a query token (one of 4) followed by random filler words, of varying length (left
  padding). It does not change the answer: it is the instruction text that masked routing keeps;
* the answer: 8 tokens, then EOS: a start word that is a fixed function of the image class ``c``,
  followed by the next 7 words of a 64-word answer vocabulary. The first answer token needs the
  image; the rest follow from the token before, so the report also gives the first token's accuracy
  alone: it is what skipping image tokens can cost. (An earlier version made the start word depend on
  the query token too; the tiny model did not learn that within a few hundred steps, so the demo
  could not tell whether gamma-MoD kept the image information.)

Labels are -100 on the image and the question (LLaVA-style SFT). gamma-MoD's masked routing
(``--forced text``, the default) keeps every text token, question and answer, in every MoD layer and
routes the image tokens, as the public gamma-MoD training code does. ``--forced ignored_labels``
forces only the unlabelled text (the question) and routes the answer tokens too; with a router that
has not learned yet this skips half of the tokens that carry the loss (on this demo: held-out loss
1.50 where text forcing gives 0.27 and the dense model 0.11).

Steps (the built-in model):

1. *pretrain* the dense model (``--pretrain-steps``, 150): it stands in for a trained MLLM. It
   learns the image classes (its first answer token is right ~0.9 of the time), so the comparison
   shows what gamma-MoD keeps, and its attention maps, unlike a random model's, are no longer near
   uniform;
2. ARank of every decoder layer on calibration batches; the highest-ranked ``ceil(L/8)`` layers
   stay dense (``--keep-dense``), the others become MoD layers (``gmod_ext.convert``);
3. fine-tune the gamma-MoD model (``--steps``) and, from the same starting weights, the dense model
   (``--baseline-steps``), in lockstep on the same batches (so both see the same data and, on a
   shared machine, the same background load), timing every step;
4. generate the answers of a batch of 4 prompts with both models;
5. report: layers converted, ARank and skip ratio per layer, analytic FLOPs per forward (dense vs
   gamma-MoD, from the kept-token counts), time per training step and for generation, KV-cache
   memory dense vs gamma-MoD, answer accuracy; ``report.json`` and ``gmod_demo.png`` in ``--out``.

KV memory: when ``gmod_ext.cache`` provides ``memory_report`` (the compact MoD KV cache), the
converted model generates with its cache and the report shows that cache's measured size; otherwise
the model generates without a cache and the gamma-MoD KV memory is an estimate from the kept-token
counts (marked "(estimated)").
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Optional

import torch

from ._hf import find_decoder, output_cache

__all__ = ["add_demo", "run_demo", "SyntheticTask", "build_builtin_model", "forward_flops", "kv_estimate",
           "kept_for_generation", "cache_module", "dense_cache_bytes"]

IGNORE = -100
ANSWER_LEN = 8
NUM_CLASSES = 8
NUM_QUERIES = 4
PATCH = 8

BUILTIN_TEXT = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
BUILTIN_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      patch_size=PATCH)
BUILTIN_IMAGE_TOKEN = 511
FORCED_CHOICES = ("text", "ignored_labels", "none")


# ============================================================================ data
def image_grid_for(seq_len: int) -> int:
    """Side of the image-token grid of the built-in model for a total length ``seq_len``:
    about 2/3 of the sequence, clamped to 2..12 (4 to 144 image tokens)."""
    return max(2, min(12, int(math.sqrt(seq_len * 2.0 / 3.0))))


class SyntheticTask:
    """Synthetic image + question -> answer samples (see the module docstring).

    Sequence layout (left padded to ``seq_len``)::

        [pad ...] BOS  <image x n_image>  t  w w ... w  SEP  a_1 ... a_8  EOS
                       `---- routable ---'`------------ forced (text) -------------'
                                                                 `--- labelled ---'

    ``vision``: True for a LLaVA model (image tokens = ``image_token_id``, pixels in
    ``pixel_values``), False for a text-only model (image tokens = per-class "visual words").
    """

    def __init__(self, *, vocab_size: int, seq_len: int, n_image: int, vision: bool,
                 image_token_id: Optional[int] = None, image_size: Optional[int] = None,
                 bos: Optional[int] = None, eos: Optional[int] = None, pad: Optional[int] = None,
                 seed: int = 0, answer_len: int = ANSWER_LEN, forced: str = "text"):
        if forced not in FORCED_CHOICES:
            raise ValueError(f"gmod demo: forced={forced!r}: use one of {FORCED_CHOICES}")
        self.forced = forced
        self.vision = bool(vision)
        self.seq_len = int(seq_len)
        self.n_image = int(n_image)
        self.answer_len = int(answer_len)
        self.q_max = self.seq_len - self.n_image - self.answer_len - 3  # BOS, SEP, EOS
        if self.q_max < 2:
            raise ValueError(f"gmod demo: --seq-len {seq_len} is too short for {n_image} image tokens + "
                             f"{answer_len} answer tokens + a question (need >= {n_image + answer_len + 5})")
        self.q_min = max(2, self.q_max // 2)
        self.image_token_id = image_token_id
        self.image_size = image_size
        special = {x for x in (bos, eos, pad, image_token_id) if x is not None}
        free = [i for i in range(vocab_size) if i not in special]
        if len(free) < 64:
            raise ValueError(f"gmod demo: vocab of {vocab_size} tokens is too small for the synthetic task")
        self.pad = pad if pad is not None else free.pop(0)
        self.bos = bos if bos is not None else free.pop(0)
        self.eos = eos if eos is not None else free.pop(0)
        self.queries = torch.tensor(free[:NUM_QUERIES])
        self.sep = free[NUM_QUERIES]
        rest = free[NUM_QUERIES + 1:]
        n = len(rest)
        k = min(256, n // 3) if not self.vision else min(256, n // 2)
        self.words = torch.tensor(rest[:k])  # question filler words
        self.answer_words = torch.tensor(rest[k:k + min(k, 64)])  # a small answer vocabulary (64 words)
        self.visual_words = torch.tensor(rest[2 * k:3 * k]) if not self.vision else None
        g = torch.Generator().manual_seed(10_000 + seed)
        # answers: per class a start word, then consecutive words of the answer vocabulary: the first
        # answer token needs the image, the others follow from it; table[c, t] is the same for every t
        n_ans = len(self.answer_words)
        start = torch.randint(0, n_ans, (NUM_CLASSES, 1, 1), generator=g).expand(NUM_CLASSES, NUM_QUERIES, 1)
        self.table = self.answer_words[(start + torch.arange(self.answer_len)) % n_ans]
        if self.vision:
            side = max(1, self.image_size // PATCH)
            low = torch.randn(NUM_CLASSES, 3, side, side, generator=g)
            self.prototypes = torch.nn.functional.interpolate(low, size=self.image_size, mode="nearest")
        else:  # each class draws its visual words from its own set of 16
            per = max(2, min(16, len(self.visual_words) // NUM_CLASSES))
            self.class_words = torch.stack([
                self.visual_words[torch.randperm(len(self.visual_words), generator=g)[:per]] for _ in range(NUM_CLASSES)])

    # ------------------------------------------------------------------ sampling
    def _draw(self, B: int, gen: torch.Generator):
        c = torch.randint(0, NUM_CLASSES, (B,), generator=gen)
        t = torch.randint(0, NUM_QUERIES, (B,), generator=gen)
        qlen = torch.randint(self.q_min, self.q_max + 1, (B,), generator=gen)
        if self.vision:
            pixels = self.prototypes[c] + 0.5 * torch.randn(B, 3, self.image_size, self.image_size, generator=gen)
            img = torch.full((B, self.n_image), self.image_token_id, dtype=torch.long)
        else:
            pixels = None
            cw = self.class_words[c]  # [B, per]
            img = torch.gather(cw, 1, torch.randint(0, cw.shape[1], (B, self.n_image), generator=gen))
        return c, t, qlen, pixels, img

    def _rows(self, B, gen, with_answer: bool):
        c, t, qlen, pixels, img = self._draw(B, gen)
        answers = self.table[c, t]  # [B, A]
        rows, codes = [], []
        for b in range(B):
            q = torch.cat([self.queries[t[b]].view(1),
                           self.words[torch.randint(0, len(self.words), (int(qlen[b]) - 1,), generator=gen)]])
            parts = [torch.tensor([self.bos]), img[b], q, torch.tensor([self.sep])]
            prompt_code = 0 if self.forced == "none" else 1
            answer_code = 1 if self.forced == "text" else 0
            code = [prompt_code] + [0] * self.n_image + [prompt_code] * (len(q) + 1)
            if with_answer:
                parts += [answers[b], torch.tensor([self.eos])]
                code += [answer_code] * (self.answer_len + 1)
            rows.append(torch.cat(parts))
            codes.append(torch.tensor(code, dtype=torch.int8))
        width = max(len(r) for r in rows) if not with_answer else self.seq_len
        ids = torch.full((B, width), self.pad, dtype=torch.long)
        am = torch.zeros(B, width, dtype=torch.long)
        cm = torch.full((B, width), 2, dtype=torch.int8)
        for b, (r, cd) in enumerate(zip(rows, codes)):
            ids[b, width - len(r):] = r
            am[b, width - len(r):] = 1
            cm[b, width - len(r):] = cd
        out = {"input_ids": ids, "attention_mask": am}
        if pixels is not None:
            out["pixel_values"] = pixels
        return out, cm, answers

    def batch(self, B: int, gen: torch.Generator) -> dict:
        """A training batch: model kwargs (``labels`` included) + ``gmod_routing_mask`` (int8 codes:
        0 routable, 1 forced, 2 padding: with ``forced="text"`` the image is 0 and the text 1; with
        "ignored_labels" the answer and EOS are 0 too; with "none" everything but padding is 0)."""
        out, codes, _ = self._rows(B, gen, with_answer=True)
        labels = out["input_ids"].clone()
        n_prefix = self.seq_len - self.answer_len - 1
        labels[:, :n_prefix] = IGNORE  # only the answer and EOS (the last positions: left padding) are labelled
        out["labels"] = labels
        out["gmod_routing_mask"] = codes
        return out

    def prompts(self, B: int, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
        """Prompts (everything up to SEP, left padded) and their true answers [B, answer_len]."""
        out, _, answers = self._rows(B, gen, with_answer=False)
        return out, answers

    def describe(self) -> str:
        kind = "image tokens (LLaVA image token id, pixels through the vision tower)" if self.vision else \
            "visual-word tokens (per-class token sets)"
        return (f"{self.n_image} {kind} + {self.q_min}-{self.q_max} question tokens + {self.answer_len} answer "
                f"tokens; the answer is a fixed function of the image class (one of {NUM_CLASSES})")

    def routing(self) -> str:
        """Which tokens the MoD layers route and which they always keep (for the report)."""
        return {"text": "the image tokens are routed, every text token (question and answer) is forced",
                "ignored_labels": "the image and answer tokens are routed, the question is forced",
                "none": "every token is routed, nothing is forced"}[self.forced]


# ============================================================================ models
def build_builtin_model(seq_len: int, seed: int = 0):
    """The built-in tiny LLaVA (CLIP vision tower + Llama), random weights, float32."""
    import transformers

    grid = image_grid_for(seq_len)
    vc = transformers.CLIPVisionConfig(image_size=grid * PATCH, **BUILTIN_VISION)
    tc = transformers.LlamaConfig(**BUILTIN_TEXT)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_id=BUILTIN_IMAGE_TOKEN)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg)
    return model, grid


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def load_user_model(path: str):
    """A local Hugging Face model folder (no download): LLaVA or a Llama-family ``*ForCausalLM``."""
    import transformers

    if not os.path.isdir(path):
        raise SystemExit(f"gmod demo: --model {path!r} is not a folder (only local model folders are loaded)")
    cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForImageTextToText if hasattr(cfg, "vision_config") else \
            transformers.AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    try:  # a model gmod_ext cannot convert: say so now, not as a traceback from the report code
        find_decoder(model)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"gmod demo: --model {path}: {err} (the demo runs LLaVA or a Llama-family *ForCausalLM)")
    return model


def _task_for(model, seq_len: int, seed: int, grid: Optional[int] = None, forced: str = "text") -> SyntheticTask:
    cfg = model.config
    tc = _text_config(model)
    vocab = model.get_input_embeddings().num_embeddings
    vision = hasattr(cfg, "vision_config") and getattr(cfg, "vision_config", None) is not None

    def tok(name):
        for c in (tc, cfg, getattr(model, "generation_config", None)):
            v = getattr(c, name, None) if c is not None else None
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, int) and 0 <= v < vocab:
                return v
        return None

    if vision:
        vc = cfg.vision_config
        image_size = int(vc.image_size)
        patch = int(vc.patch_size)
        n = (image_size // patch) ** 2
        if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
            n += 1
        image_token_id = getattr(cfg, "image_token_id", None)
        if image_token_id is None:
            image_token_id = getattr(cfg, "image_token_index")
        return SyntheticTask(vocab_size=vocab, seq_len=seq_len, n_image=n, vision=True,
                             image_token_id=int(image_token_id), image_size=image_size,
                             bos=tok("bos_token_id"), eos=tok("eos_token_id"), pad=tok("pad_token_id"), seed=seed,
                             forced=forced)
    n = image_grid_for(seq_len) ** 2
    return SyntheticTask(vocab_size=vocab, seq_len=seq_len, n_image=n, vision=False,
                         bos=tok("bos_token_id"), eos=tok("eos_token_id"), pad=tok("pad_token_id"), seed=seed,
                         forced=forced)


# ============================================================================ FLOPs
def _arch(model) -> dict:
    tc = _text_config(model)
    D = int(tc.hidden_size)
    Hq = int(tc.num_attention_heads)
    Hk = int(getattr(tc, "num_key_value_heads", None) or Hq)
    d = int(getattr(tc, "head_dim", None) or D // Hq)
    I = int(tc.intermediate_size)
    V = int(model.get_input_embeddings().num_embeddings)
    L = int(tc.num_hidden_layers)
    a = dict(D=D, Hq=Hq, Hk=Hk, d=d, I=I, V=V, L=L)
    vc = getattr(model.config, "vision_config", None)
    if vc is not None:
        a["vision"] = dict(D=int(vc.hidden_size), I=int(vc.intermediate_size), L=int(vc.num_hidden_layers),
                           n=(int(vc.image_size) // int(vc.patch_size)) ** 2, p=int(vc.patch_size))
    return a


def layer_flops(a: dict, n: int) -> float:
    """Matmul FLOPs of one decoder layer on ``n`` tokens of one row: q/k/v/o projections, causal
    attention (n(n+1)/2 query-key pairs: QK^T and PV), gated MLP (3 matmuls)."""
    D, Hq, Hk, d, I = a["D"], a["Hq"], a["Hk"], a["d"], a["I"]
    proj = 2.0 * n * (D * Hq * d + 2 * D * Hk * d + Hq * d * D)
    attn = 4.0 * Hq * d * n * (n + 1) / 2.0
    mlp = 2.0 * n * 3 * D * I
    return proj + attn + mlp


def vision_flops(a: dict, rows: int) -> float:
    """Vision tower (CLIP: patch embedding + layers on patches + CLS, full attention) + the LLaVA
    projector (2 linears) for ``rows`` images; the same for dense and gamma-MoD."""
    v = a.get("vision")
    if not v:
        return 0.0
    Dv, Iv, Lv, npatch, p = v["D"], v["I"], v["L"], v["n"], v["p"]
    n = npatch + 1
    per = 2.0 * npatch * 3 * p * p * Dv
    per += Lv * (2.0 * n * (4 * Dv * Dv + 2 * Dv * Iv) + 4.0 * Dv * n * n)
    per += 2.0 * npatch * (Dv * a["D"] + a["D"] * a["D"])
    return rows * per


def forward_flops(a: dict, tokens: list[int], kept: dict[int, list[int]], with_lm_head: bool = True) -> dict:
    """Analytic matmul FLOPs of one forward of a batch.

    ``tokens[b]``: non-padding tokens of row b (what a dense layer processes; padding is not
    counted); ``kept[layer][b]``: tokens that MoD layer ``layer`` processed in row b (its router,
    ``Linear(D, 2)`` on every token, is added). Returns per-layer and total numbers for dense and
    gamma-MoD.
    """
    dense_layers, mod_layers = [], []
    for li in range(a["L"]):
        dl = sum(layer_flops(a, n) for n in tokens)
        dense_layers.append(dl)
        if li in kept:
            ml = sum(layer_flops(a, n) for n in kept[li]) + sum(2.0 * n * a["D"] * 2 for n in tokens)
        else:
            ml = dl
        mod_layers.append(ml)
    head = 2.0 * sum(tokens) * a["D"] * a["V"] if with_lm_head else 0.0
    vis = vision_flops(a, len(tokens))
    dense = sum(dense_layers) + head + vis
    mod = sum(mod_layers) + head + vis
    return {"dense": dense, "gmod": mod, "ratio": mod / dense if dense else float("nan"),
            "decoder_dense": sum(dense_layers), "decoder_gmod": sum(mod_layers),
            "decoder_ratio": sum(mod_layers) / sum(dense_layers) if sum(dense_layers) else float("nan"),
            "lm_head": head, "vision": vis, "per_layer_dense": dense_layers, "per_layer_gmod": mod_layers}


# ============================================================================ KV memory
def cache_module():
    """``gmod_ext.cache`` when it provides ``memory_report`` (the compact MoD KV cache), else None.

    Checked at run time, so the demo also runs (with an estimate) on a tree without the cache."""
    try:
        from . import cache as cache_mod  # noqa: PLC0415
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


def kv_estimate(a: dict, B: int, T: int, esize: int, mod_tokens: dict[int, list[int]]) -> dict:
    """Analytic KV memory after generation: a dense layer holds ``B x T`` positions (as a dense
    Hugging Face cache does, padding included); a MoD layer holds only the tokens it processed,
    laid out per row up to the longest row (``B x max_b kept_b``)."""
    per_tok = 2 * a["Hk"] * a["d"] * esize
    layers = []
    for li in range(a["L"]):
        dense_b = B * T * per_tok
        if li in mod_tokens:
            toks = [int(t) for t in mod_tokens[li]]
            held = max(toks) if toks else 0
            layers.append({"layer": li, "kind": "mod", "tokens": toks, "bytes": B * held * per_tok,
                           "used_bytes": sum(toks) * per_tok, "dense_bytes": dense_b})
        else:
            layers.append({"layer": li, "kind": "dense", "tokens": [T] * B, "bytes": dense_b, "used_bytes": dense_b,
                           "dense_bytes": dense_b})
    total = sum(x["bytes"] for x in layers)
    used = sum(x["used_bytes"] for x in layers)
    dense = sum(x["dense_bytes"] for x in layers)
    return {"layers": layers, "total_bytes": total, "used_bytes": used, "dense_equivalent_bytes": dense,
            "ratio": total / dense if dense else float("nan"), "used_ratio": used / dense if dense else float("nan"),
            "seq_len": T, "batch": B, "estimated": True}


# ============================================================================ helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def _model_inputs(batch: dict, converted: bool, explicit_mask: bool) -> dict:
    b = dict(batch)
    mask = b.pop("gmod_routing_mask", None)
    if converted and explicit_mask and mask is not None:
        b["gmod_routing_mask"] = mask
    return b


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, f in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


def _fmt_flops(f: float) -> str:
    for unit, s in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= s:
            return f"{f / s:.3f} {unit}"
    return f"{f:.0f} FLOP"


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return _jsonable(v.tolist())
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


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
        batch = _to(task.batch(batch_size, gen), device, dtype)
        post = {}
        for r in runs:
            if i >= r.steps:
                continue
            model, opt = r.model, opts[r.name]
            inputs = _model_inputs(batch, r.converted, r.explicit_mask)
            inputs["use_cache"] = False  # training needs no KV cache
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs)
            loss = out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
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
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(**prompts, **kw)
        _sync(device)
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
    inputs = _model_inputs(batch, converted, explicit_mask)
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


def _accuracy(seqs: torch.Tensor, prompt_len: int, answers: torch.Tensor) -> float:
    gen = seqs[:, prompt_len:prompt_len + answers.shape[1]].cpu()
    if gen.shape != answers.shape:
        return float("nan")
    return float((gen == answers).float().mean())


@torch.no_grad()
def _kept_counts(model) -> dict[int, list[int]]:
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
    try:
        model(input_ids=fed, attention_mask=am, use_cache=False, gmod_prefill_len=int(prompt_len), **kw)
    except TypeError:  # a converter without gmod_prefill_len: top-k over the whole sequence
        model(input_ids=fed, attention_mask=am, use_cache=False, **kw)
    return _kept_counts(model)


# ============================================================================ plot
def plot_demo(path: str, ranks, mod_layers, skip_per_layer: dict, losses: dict, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    L = len(ranks)
    mod = set(mod_layers)
    fig, axes = plt.subplots(1, 3, figsize=(max(12.0, 0.6 * L + 9), 3.6))
    colors = ["tab:orange" if i in mod else "tab:blue" for i in range(L)]
    ax = axes[0]
    ax.bar(range(L), ranks, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("ARank")
    ax.set_title("ARank per layer")
    ax.legend(handles=[Patch(color="tab:blue", label="dense"), Patch(color="tab:orange", label="MoD")], fontsize=8)
    ax = axes[1]
    vals = [skip_per_layer.get(i, 0.0) for i in range(L)]
    ax.bar(range(L), vals, color=colors)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens skipped")
    ax.set_title("skip ratio per layer (last training step)")
    ax = axes[2]
    for name, ys in losses.items():
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ============================================================================ CLI
DESCRIPTION = """\
The gamma-MoD job end to end on a small LLaVA-shaped model (built from a config, no download) and
synthetic image+question->answer batches: pretrain the dense model briefly, compute ARank per
layer, convert the low-ARank layers into MoD layers (gmod_ext.convert, gamma-MoD, shared router,
masked routing: image tokens routed, text kept), fine-tune the gamma-MoD model and the dense
baseline, generate a batch of answers with both, and print a report: layers converted, ARank and skip ratio per layer,
analytic FLOPs per forward, time per training step and for generation, KV memory dense vs gamma-MoD.
Writes report.json and gmod_demo.png to --out."""

EPILOG = """\
notes:
  FLOPs are analytic matmul FLOPs (projections, causal attention pairs, MLP, lm_head, vision tower)
  from the tokens each layer processed in the last training forward; padding is not counted.
  KV memory: measured from gmod_ext.cache's memory_report when the compact MoD cache is available,
  otherwise estimated from the kept-token counts and marked "(estimated)".
  On CPU the gmod ops run their C++ reference kernels: expect gamma-MoD steps to take about as long
  as dense ones at these tiny sizes; the speed-up needs the CUDA kernels and real sizes.
examples:
  python -m gmod_ext demo
  python -m gmod_ext demo --steps 100 --ratio 0.3 --out /tmp/demo
  python -m gmod_ext demo --forced ignored_labels      # route the answer tokens too, and compare
  python -m gmod_ext demo --model ./my-llava-checkpoint --steps 20 --batch-size 2 --seq-len 700
"""


def add_demo(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.epilog = EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a local Hugging Face model folder (LLaVA or Llama-family *ForCausalLM), loaded with "
                        "from_pretrained(local_files_only=True); default: the built-in tiny LLaVA")
    p.add_argument("--ratio", type=float, default=0.5, help="skip ratio of routable tokens per MoD layer (default 0.5)")
    p.add_argument("--forced", default="text", choices=FORCED_CHOICES,
                   help="tokens every MoD layer keeps: text (default: question and answer; only image tokens are "
                        "routed), ignored_labels (only the unlabelled question: answers are routed too) or none")
    p.add_argument("--keep-dense", type=int, default=None,
                   help="keep the N highest-ARank layers dense (default ceil(layers / 8), the paper's 4 of 32)")
    p.add_argument("--steps", type=int, default=40, help="gamma-MoD fine-tuning steps (default 40)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="dense-baseline fine-tuning steps (default: --steps; 0 skips the baseline's training)")
    p.add_argument("--pretrain-steps", type=int, default=None,
                   help="dense training before ARank (default 150 for the built-in model, enough for it to learn "
                        "the image classes; 0 with --model)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default 8)")
    p.add_argument("--gen-batch-size", type=int, default=4, help="prompts generated at once (default 4)")
    p.add_argument("--seq-len", type=int, default=96,
                   help="tokens per training sample (default 96: 64 image tokens + question + 8 answer tokens); "
                        "the built-in model's image grid grows with it (up to 144 image tokens)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-3 built-in, 1e-4 --model)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--out", default="gmod_demo_out", help="output folder for report.json and gmod_demo.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's choice)")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gmod demo: --device cuda but torch sees no GPU")
    return dev


def run_demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import transformers

    import gmod_ext

    transformers.logging.set_verbosity_error()
    device = _resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (0.0 <= args.ratio < 1.0):
        raise SystemExit(f"gmod demo: --ratio {args.ratio} must be in [0, 1)")
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress
    builtin = args.model is None
    pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else (150 if builtin else 0)
    baseline_steps = args.steps if args.baseline_steps is None else args.baseline_steps
    lr = args.lr if args.lr is not None else (2e-3 if builtin else 1e-4)
    gen = torch.Generator().manual_seed(args.seed)

    def log(msg=""):
        print(msg, flush=True)

    # ---------------------------------------------------------------- model + data
    if builtin:
        model, grid = build_builtin_model(args.seq_len, args.seed)
        name = "built-in tiny LLaVA (CLIP vision tower 2x64, Llama 8 layers D=256, 4/2 heads, vocab 512)"
    else:
        model = load_user_model(args.model)
        grid = None
        name = args.model
    task = _task_for(model, args.seq_len, args.seed, grid, forced=args.forced)
    explicit_mask = not task.vision  # LLaVA: the converter builds the mask from labels + image token id
    model.to(device=device, dtype=dtype)
    a = _arch(model)
    n_params = sum(p.numel() for p in model.parameters())
    where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    log(f"gmod demo: {name}, {n_params / 1e6:.1f}M parameters, {device} {str(dtype)[6:]}, {where}")
    log(f"data: {task.describe()}; batch {args.batch_size} x {args.seq_len} tokens")

    # ---------------------------------------------------------------- 1. pretrain (dense)
    pre = {"losses": [], "median_step_s": float("nan")}
    if pretrain_steps > 0:
        pre = train([Run("loss", model, steps=pretrain_steps, lr=lr)], task, batch_size=args.batch_size, gen=gen,
                    device=device, dtype=dtype, desc="pretrain (dense)", progress=progress)["loss"]
        log(f"pretrain: {pretrain_steps} steps, loss {pre['losses'][0]:.3f} -> {pre['losses'][-1]:.3f}")

    # ---------------------------------------------------------------- 2. ARank + convert
    calib = []
    for _ in range(2):
        b = task.batch(max(2, min(4, args.batch_size)), gen)
        calib.append(_to({k: v for k, v in b.items() if k not in ("labels", "gmod_routing_mask")}, device, dtype))
    dense = copy.deepcopy(model)
    t0 = time.perf_counter()
    image_token_id = task.image_token_id if task.vision else None
    try:
        gmod_ext.convert(model, ratio=args.ratio, layers="arank", calibration_batches=calib,
                         keep_dense=args.keep_dense, image_token_id=image_token_id,
                         forced=args.forced if task.vision else "none", progress=progress)
    except TypeError as err:  # gmod_ext.verify refused the model's decoder block: the reason is in the message
        if not str(err).startswith("gmod"):
            raise
        raise SystemExit(f"gmod demo: {err}") from None
    t_convert = time.perf_counter() - t0
    gcfg = model.config.gmod
    ranks = [float(r) for r in gcfg["arank"]]
    mod_layers = list(gcfg["layers"])
    log(f"ARank + convert: {t_convert:.1f} s; MoD layers {mod_layers} of {a['L']}")

    # ---------------------------------------------------------------- 3. fine-tune gamma-MoD and dense
    last = {}

    def grab(m, batch):  # the last training forward's kept-token counts and per-row lengths
        last["kept"] = _kept_counts(m)
        last["tokens"] = [int(x) for x in batch["attention_mask"].sum(1).tolist()]
        last["stats"] = m.gmod_stats()

    runs = [Run("gamma-MoD", model, steps=args.steps, lr=lr, converted=True, explicit_mask=explicit_mask,
                on_step=grab)]
    if baseline_steps > 0:
        runs.append(Run("dense", dense, steps=baseline_steps, lr=lr))
    res = train(runs, task, batch_size=args.batch_size, gen=torch.Generator().manual_seed(args.seed + 1),
                device=device, dtype=dtype, desc="fine-tune gamma-MoD + dense" if baseline_steps > 0 else
                "fine-tune gamma-MoD", progress=progress)
    ft = res["gamma-MoD"]
    base = res.get("dense", {"losses": [], "median_step_s": float("nan"), "step_s": []})

    # held-out batch: loss and teacher-forced answer accuracy of both models
    held = _to(task.batch(max(64, 16 * args.batch_size), torch.Generator().manual_seed(args.seed + 3)), device, dtype)
    ev_mod = evaluate(model, held, converted=True, explicit_mask=explicit_mask)
    ev_dense = evaluate(dense, held, converted=False, explicit_mask=False)

    # ---------------------------------------------------------------- 4. generate
    gen_p = torch.Generator().manual_seed(args.seed + 2)
    prompts_cpu, answers = task.prompts(args.gen_batch_size, gen_p)
    prompts = _to(prompts_cpu, device, dtype)
    P = prompts["input_ids"].shape[1]
    new = task.answer_len
    pad = task.pad
    cache_mod = cache_module()
    notes = []
    g_dense = generate(dense, prompts, new, use_cache=True, pad=pad, device=device, return_cache=True)
    g_dense_nc = generate(dense, prompts, new, use_cache=False, pad=pad, device=device)
    mod_cache_used = False
    kv_report = None
    if cache_mod is not None:
        try:
            g_mod = generate(model, prompts, new, use_cache=True, pad=pad, device=device, return_cache=True)
            kv_report = dict(cache_mod.memory_report(g_mod["cache"]))
            kv_report["estimated"] = False
            mod_cache_used = True
        except Exception as err:  # noqa: BLE001  (cache present but unusable here: fall back, say why)
            notes.append(f"gmod_ext.cache is present but generation with it failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else ''}); generated without a cache")
            g_mod = None
    else:
        notes.append("gmod_ext.cache (compact MoD KV cache) is not available: gamma-MoD generates without a KV "
                     "cache (each step re-runs the whole sequence) and its KV memory is estimated")
        g_mod = None
    if g_mod is None:
        g_mod = generate(model, prompts, new, use_cache=False, pad=pad, device=device)
    acc_dense = _accuracy(g_dense["sequences"], P, answers)
    acc_mod = _accuracy(g_mod["sequences"], P, answers)

    # prefill routing of the prompts (inference: a LLaVA model converted with forced='text' keeps the text,
    # otherwise nothing is forced; top-k of the routable non-padding tokens)
    extra = {"pixel_values": prompts["pixel_values"]} if "pixel_values" in prompts else {}
    model.eval()
    with torch.no_grad():
        model(**prompts, use_cache=False)
    prefill_stats = model.gmod_stats()
    T_cache = P + new - 1  # positions a dense cache holds after generation (the last token is not fed back)
    # the analytic estimate, always computed (the report's numbers when no compact cache is available;
    # otherwise kept in the JSON next to the measured cache, as a cross-check)
    mod_tokens = kept_for_generation(model, g_mod["sequences"], prompts["attention_mask"], P, extra)
    kv_est = kv_estimate(a, args.gen_batch_size, T_cache, torch.empty((), dtype=dtype).element_size(), mod_tokens)
    if kv_report is None:
        kv_report = kv_est
    dense_kv = dense_cache_bytes(g_dense["cache"])

    # ---------------------------------------------------------------- 5. report
    fl = forward_flops(a, last.get("tokens", []), last.get("kept", {}))
    stats = last.get("stats", {"layers": {}})
    skip_train = {int(k): v["skip_ratio"] for k, v in stats["layers"].items()}
    rskip_train = {int(k): v["routable_skip_ratio"] for k, v in stats["layers"].items()}
    skip_prefill = {int(k): v["skip_ratio"] for k, v in prefill_stats["layers"].items()}
    kv_layers = {x.get("layer", i): x for i, x in enumerate(kv_report.get("layers", []) or []) if isinstance(x, dict)}
    est = " (estimated)" if kv_report.get("estimated", True) else ""

    lines = []
    w = lines.append
    bar = "=" * 78
    w(bar)
    w("gamma-MoD demo report")
    w(bar)
    w(f"model           {name}")
    w(f"                {n_params / 1e6:.2f}M parameters; {a['L']} decoder layers, D={a['D']}, heads {a['Hq']}/{a['Hk']} "
      f"(head dim {a['d']}), MLP {a['I']}, vocab {a['V']}")
    w(f"device          {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
      if device.type == "cpu" else f"device          {device} ({torch.cuda.get_device_name(device)})")
    w(f"dtype           {str(dtype)[6:]}")
    w(f"data            {task.describe()}")
    n_dense = a["L"] - len(mod_layers)
    w(f"layers converted {len(mod_layers)} of {a['L']}: {mod_layers}  (by ARank: the {n_dense} highest-ranked "
      f"layer{'s stay' if n_dense != 1 else ' stays'} dense)")
    w(f"routing         gamma-MoD, one shared router, skip ratio {args.ratio} of the routable tokens per MoD layer: "
      f"{task.routing()} (--forced {args.forced})")
    w("")
    w(f"{'layer':>5}  {'ARank':>7}  {'kind':<5}  {'skip train':>10}  {'skip routable':>13}  {'skip prefill':>12}  "
      f"{'KV tokens':>9}  {'KV used' + est:>19}")
    for i in range(a["L"]):
        kind = "MoD" if i in mod_layers else "dense"
        kvl = kv_layers.get(i, {})
        tok = kvl.get("tokens")
        if isinstance(tok, (list, tuple)):
            tok = sum(int(t) for t in tok)
        kvb = kvl.get("used_bytes", kvl.get("bytes"))
        w(f"{i:>5}  {ranks[i]:>7.2f}  {kind:<5}  {skip_train.get(i, 0.0):>10.3f}  {rskip_train.get(i, 0.0):>13.3f}  "
          f"{skip_prefill.get(i, 0.0):>12.3f}  {'-' if tok is None else tok:>9}  {_fmt_bytes(kvb):>19}")
    infer_forced = "text forced" if (task.vision and args.forced == "text") else "nothing forced"
    w("   skip train: fraction of the non-padding tokens a layer skipped in the last training step (forced")
    w("   tokens are kept, so it is below the ratio); skip routable: of the routable tokens;")
    w(f"   skip prefill: generation prompts (inference: {infer_forced}, top-k of the rest); KV tokens / used:")
    w("   what each layer's cache holds after generation, summed over the rows")
    w("")
    ntok = sum(last.get("tokens", []))
    w(f"FLOPs per forward (analytic matmul FLOPs, last training batch: {len(last.get('tokens', []))} rows, "
      f"{ntok} non-padding tokens)")
    w(f"  dense           {_fmt_flops(fl['dense'])}  (decoder {_fmt_flops(fl['decoder_dense'])}, lm_head "
      f"{_fmt_flops(fl['lm_head'])}, vision tower + projector {_fmt_flops(fl['vision'])})")
    w(f"  gamma-MoD       {_fmt_flops(fl['gmod'])}  (decoder {_fmt_flops(fl['decoder_gmod'])})")
    w(f"  ratio           {fl['ratio']:.3f} of dense (decoder layers alone {fl['decoder_ratio']:.3f})")
    w("")
    w(f"training step (median, batch {args.batch_size} x {args.seq_len}, fwd + bwd + AdamW)")
    w(f"  dense           {base['median_step_s'] * 1e3:.1f} ms" if baseline_steps > 0 else "  dense           (not run)")
    w(f"  gamma-MoD       {ft['median_step_s'] * 1e3:.1f} ms")
    if baseline_steps > 0:
        w(f"  ratio           {ft['median_step_s'] / base['median_step_s']:.3f} of dense")
    w("loss")
    if pre["losses"]:
        w(f"  pretrain dense  {pre['losses'][0]:.3f} -> {pre['losses'][-1]:.3f} ({pretrain_steps} steps)")
    k = max(1, min(5, len(ft["losses"]) // 4))
    w(f"  gamma-MoD       {ft['losses'][0]:.3f} -> {statistics.mean(ft['losses'][-k:]):.3f} "
      f"(first step -> mean of the last {k}; {args.steps} steps)")
    if base["losses"]:
        kb = max(1, min(5, len(base["losses"]) // 4))
        w(f"  dense           {base['losses'][0]:.3f} -> {statistics.mean(base['losses'][-kb:]):.3f} "
          f"({baseline_steps} steps)")
    w(f"held-out batch ({ev_mod['samples']} samples): loss dense {ev_dense['loss']:.3f}, gamma-MoD {ev_mod['loss']:.3f}; "
      f"answer-token accuracy (teacher forced) dense {ev_dense['answer_accuracy']:.3f}, "
      f"gamma-MoD {ev_mod['answer_accuracy']:.3f}")
    w(f"  first answer token alone (the one that needs the image): dense "
      f"{ev_dense['first_token_accuracy']:.3f}, gamma-MoD {ev_mod['first_token_accuracy']:.3f}")
    w("")
    w(f"generation (batch {args.gen_batch_size}, prompt {P} tokens, {new} new tokens, greedy)")
    mc = "compact KV cache" if mod_cache_used else "no cache"
    for label, g_ in (("dense, KV cache", g_dense), ("dense, no cache", g_dense_nc), (f"gamma-MoD, {mc}", g_mod)):
        w(f"  {label:<27} {g_['seconds'] * 1e3:9.1f} ms  ({g_['seconds'] * 1e3 / new:.1f} ms/token)")
    w(f"  {'answer tokens right':<27} dense {acc_dense:.2f}, gamma-MoD {acc_mod:.2f}  (greedy, "
      f"{args.gen_batch_size} x {new} tokens)")
    w("")
    w(f"KV memory after generation ({args.gen_batch_size} rows x {T_cache} positions)")
    w(f"  dense KV cache        {_fmt_bytes(dense_kv)}  (measured: the dense model's DynamicCache)")
    src = "estimated from the kept-token counts" if est else "measured: gmod_ext.kv_memory_report of its GmodCache"
    w(f"  gamma-MoD KV cache    {_fmt_bytes(kv_report.get('used_bytes', kv_report['total_bytes']))} used, "
      f"{_fmt_bytes(kv_report['total_bytes'])} allocated{est}  ({src})")
    w(f"  ratio                 {kv_report.get('used_ratio', kv_report['ratio']):.3f} used, "
      f"{kv_report['ratio']:.3f} allocated, of the dense equivalent {_fmt_bytes(kv_report['dense_equivalent_bytes'])}")
    if kv_report.get("estimated", True):
        w("   estimated: dense layers hold every position; a MoD layer holds the prompt tokens it kept at prefill")
        w("   (top-k) + the generated tokens with router p >= 0.5 at that layer (the decode rule)")
    for n_ in notes:
        w(f"note: {n_}")

    elapsed = time.perf_counter() - t_start
    png = os.path.join(args.out, "gmod_demo.png")
    js = os.path.join(args.out, "report.json")
    if not args.no_plot:
        try:
            plot_demo(png, ranks, mod_layers, skip_train,
                      {"gamma-MoD": ft["losses"], "dense": base["losses"]},
                      f"gamma-MoD demo: {len(mod_layers)}/{a['L']} MoD layers, ratio {args.ratio}")
            w(f"plot            {png}")
        except ImportError as err:  # matplotlib is optional (gmod_ext[plot])
            png = None
            w(f"plot            not written: {err} (pip install matplotlib)")
    w(f"json            {js}")
    w(f"total time      {elapsed:.1f} s")
    w(bar)
    log("\n".join(lines))

    report = {
        "model": name,
        "builtin": builtin,
        "params": n_params,
        "arch": a,
        "device": str(device),
        "dtype": str(dtype)[6:],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gmod_build": gmod_ext.BUILD_INFO,
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "data": task.describe(),
        "ratio": args.ratio,
        "layers_converted": mod_layers,
        "num_layers": a["L"],
        "arank": ranks,
        "skip_ratio": {"train": skip_train, "train_routable": rskip_train, "prefill": skip_prefill},
        "kept_tokens_train": last.get("kept", {}),
        "tokens_train": last.get("tokens", []),
        "flops": fl,
        "train": {
            "pretrain": {"steps": pretrain_steps, "losses": pre["losses"]},
            "gmod": {"steps": args.steps, "losses": ft["losses"], "step_s": ft["step_s"],
                     "median_step_s": ft["median_step_s"], "skip_ratios": ft["skip_ratios"]},
            "dense": {"steps": baseline_steps, "losses": base["losses"], "step_s": base.get("step_s", []),
                      "median_step_s": base["median_step_s"]},
            "step_time_ratio": (ft["median_step_s"] / base["median_step_s"]) if baseline_steps > 0 else None,
            "loss_fell": bool(ft["losses"] and statistics.mean(ft["losses"][-k:]) < ft["losses"][0]),
        },
        "generation": {
            "batch": args.gen_batch_size, "prompt_len": P, "new_tokens": new,
            "dense_cache_s": g_dense["seconds"], "dense_nocache_s": g_dense_nc["seconds"],
            "gmod_s": g_mod["seconds"], "gmod_uses_cache": mod_cache_used,
            "accuracy": {"dense": acc_dense, "gmod": acc_mod},
        },
        "heldout": {"dense": ev_dense, "gmod": ev_mod},
        "kv_memory": {"dense_bytes": dense_kv, "gmod": kv_report, "estimated": bool(kv_report.get("estimated", True)),
                      "positions": T_cache, "estimate": kv_est},
        "notes": notes,
        "files": {"json": js, "png": None if args.no_plot else png},
        "elapsed_s": elapsed,
    }
    with open(js, "w") as f:
        json.dump(_jsonable(report), f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmod_ext demo")
    add_demo(p)
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
