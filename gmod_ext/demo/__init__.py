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

from ..costs import forward_flops, kv_estimate, layer_flops
from .cli import add_demo, main, run_demo
from .data import SyntheticTask
from .loop import cache_module, dense_cache_bytes, evaluate, kept_for_generation
from .models import build_builtin_model

__all__ = ["add_demo", "run_demo", "main", "SyntheticTask", "build_builtin_model", "forward_flops", "kv_estimate",
           "layer_flops", "evaluate", "kept_for_generation", "cache_module", "dense_cache_bytes"]
