"""The demo's models: the built-in tiny LLaVA (from a config, random weights), a user's local
Hugging Face folder, and the synthetic task that fits a model's vocabulary and vision tower."""
from __future__ import annotations

import os
from typing import Optional

import torch

from .._hf import find_decoder, token_type_rule
from .data import BUILTIN_IMAGE_TOKEN, BUILTIN_TEXT, BUILTIN_VISION, PATCH, SyntheticTask, image_grid_for

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


def text_config(model):
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


def task_for(model, seq_len: int, seed: int, grid: Optional[int] = None, forced: str = "text") -> SyntheticTask:
    cfg = model.config
    tc = text_config(model)
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
                             forced=forced, prefix_lm=token_type_rule(model) == "prefix")
    n = image_grid_for(seq_len) ** 2
    return SyntheticTask(vocab_size=vocab, seq_len=seq_len, n_image=n, vision=False,
                         bos=tok("bos_token_id"), eos=tok("eos_token_id"), pad=tok("pad_token_id"), seed=seed,
                         forced=forced)


