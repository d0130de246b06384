"""The demo's synthetic task: image + question -> answer samples with a learnable structure (see
:mod:`gmod_ext.demo`), as LLaVA-style batches (pixel values or "visual words", labels, routing mask)."""
from __future__ import annotations

import math
from typing import Optional

import torch

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
                 seed: int = 0, answer_len: int = ANSWER_LEN, forced: str = "text", prefix_lm: bool = False):
        if forced not in FORCED_CHOICES:
            raise ValueError(f"gmod demo: forced={forced!r}: use one of {FORCED_CHOICES}")
        self.forced = forced
        self.vision = bool(vision)
        # a prefix-LM (PaliGemma): batches carry token_type_ids, 0 for the prompt (image and question, which
        # attend to each other both ways) and 1 for the answer, as its processor makes them
        self.prefix_lm = bool(prefix_lm)
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
        if self.prefix_lm:  # the answer and EOS: the last answer_len + 1 positions (left padding)
            out["token_type_ids"] = torch.zeros_like(ids)
            if with_answer:
                out["token_type_ids"][:, width - self.answer_len - 1:] = 1
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

