"""Which of transformers' causal-LM architectures convert, and exactly?

For every architecture in transformers' causal-LM auto mapping (or those named on the command line),
in its own subprocess (memory and time capped, so that one huge default config cannot take the
machine down): build a tiny random model from its config (hidden 64, 4 layers, head dim 16, window 5
where it has one, 8 rotary dims where it says; ARCH_FIXES corrects the configs this leaves unbuildable),
convert every convertible layer keeping every token without gating, and compare the whole model's logits
on two 20-token prompts, one left-padded by 4, with the dense model's (at the tokens that are not
padding). Each line says one of:

  OK <err>            converts; relative logit error (float32 rounding is ~1e-6)
  SILENT-WRONG <err>  converts but computes something else: a bug (the converter's check should refuse)
  refused: ...        convert raised with its reason (TypeError / NotImplementedError / ValueError)
  CRASH ...           anything else: a bug
  build-fail: ...     the tiny config does not build that architecture (not about gmod_ext), and why
  NO-RESULT           killed (memory / time cap) before printing

With --autocast bf16 (or fp16), an architecture that converts is also run as transformers' Trainer runs
mixed precision (float32 weights, the forward under torch.autocast on the CPU): the converted model's
logits against the float32 dense model's, by the flash-attention rule (at most twice the dense model's own
error under autocast, plus a few roundings), then a training step of a ratio-0.5 conversion under autocast.
The line then ends with ``autocast <err> (dense <err>)``, or is one of:

  AUTOCAST-WRONG ...      under autocast the converted model is further from float32 than the rule allows
  CRASH under autocast ...

    python scripts/audit_architectures.py                 # all (~20 min on 2 CPU cores)
    python scripts/audit_architectures.py llama qwen3_5_text --json audit.json
    python scripts/audit_architectures.py --autocast bf16 # and each under mixed precision

Exit status 1 if any line is SILENT-WRONG, AUTOCAST-WRONG or CRASH.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from typing import Optional

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16,
            sliding_window=5, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, shared_expert_intermediate_size=32, n_group=1, topk_group=1,
            rotary_dim=8,  # (GPT-J / CodeGen rotate rotary_dim dims of the head: fewer than its 16)
            # multi-head latent attention (DeepSeek-V3's family): its latent and head parts, and its rotary
            # dims as the rotary module's head_dim (set below)
            kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def _shrink_sub_configs(cfg):
    """Multimodal configs: the text model and the towers beside it (built though unused on text) shrunk too."""
    for name in getattr(cfg, "sub_configs", {}):
        sub = getattr(cfg, name, None)
        if sub is not None and not isinstance(sub, dict):
            shrink(sub)
    return cfg


def _rebuilt(**fields):
    """A fix that builds the config again from TINY's values and fields, for configs that derive per-layer
    settings in __post_init__ from their default depth (fields set afterwards leave those stale)."""
    def fix(cfg):
        import dataclasses

        names = {f.name for f in dataclasses.fields(cfg)}
        return type(cfg)(**{**{k: v for k, v in TINY.items() if k in names}, **fields})
    return fix


def _text_fixed(fix):
    """A fix for a multimodal config: its sub-configs shrunk, then fix applied to its text config."""
    def apply(cfg):
        cfg = _shrink_sub_configs(cfg)
        cfg.text_config = fix(cfg.text_config)
        return cfg
    return apply


def _with_decoder_fields(cfg):
    """cfg with its shrunk decoder config's fields where it has none of its own, and one codebook (input ids are then
    [batch, seq] as for text)."""
    dec = shrink(cfg.decoder)
    dec.num_codebooks = 1
    for k, v in dec.to_dict().items():
        if not _has(cfg, k):
            setattr(cfg, k, v)
    return cfg


# Encoder-decoder families' decoders (BART's): num_hidden_layers / num_attention_heads alias the encoder's fields,
# so the decoder (the causal LM) keeps its default depth, heads and width unless set too.
_DECODER = dict(decoder_layers=4, decoder_attention_heads=4, decoder_ffn_dim=128, encoder_attention_heads=4,
                encoder_ffn_dim=128)
_GEMMA4_TEXT = _rebuilt(layer_types=["sliding_attention"] * 3 + ["full_attention"], global_head_dim=32,
                        vocab_size_per_layer_input=128, hidden_size_per_layer_input=8)
_DOTS3_TEXT = _rebuilt(num_key_value_heads=4, index_topk=8, index_head_dim=16, index_n_heads=4,
                       shared_experts_intermediate_size=32, swa_num_attention_heads=4, swa_num_key_value_heads=4,
                       swa_q_lora_rank=32, swa_kv_lora_rank=32, swa_head_dim=24, swa_qk_nope_head_dim=16,
                       swa_v_head_dim=16, swa_qk_rope_head_dim=8)
_QWEN4_TEXT = _rebuilt(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                       indexer_compress_ratio=4)
# Per-architecture corrections applied after TINY, for configs the generic shrink leaves unbuildable: a dict of
# field values (a dict value for a sub-config's field updates that sub-config), or a function of the config.
ARCH_FIXES = {
    **dict.fromkeys(["bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus",
                     "plbart", "whisper"], _DECODER),
    # hybrids whose first 4 layers are all recurrent (the cache then has no attention layer to measure): interleave
    # (Bamba's and GraniteMoeHybrid's Mamba heads times head_dim must also be mamba_expand * hidden_size)
    "bamba": dict(attn_layer_indices=[1, 3], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1),
    "bailing_hybrid": dict(layer_types=["linear_attention", "full_attention"] * 2),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"] * 2, mamba_n_heads=8, mamba_d_head=16,
                             mamba_d_state=16),
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"] * 2),
    # Zamba2's widths are derived in __post_init__ from the default hidden size: derive them again from TINY's
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid"] * 2, hybrid_layer_ids=[1, 3],
                   attention_hidden_size=128, mamba_headdim=16, kv_channels=16),
    # Zamba's too (its shared block's weights tie across hybrid layers, which needs two of them)
    "zamba": dict(layers_block_type=["linear_attention", "hybrid"] * 2, attention_hidden_size=128,
                  attention_head_dim=32, mamba_dt_rank=4),
    # Dory's input / recurrent / output layer counts must add up to num_hidden_layers (4)
    "dory": dict(n_input_layers=1, n_recurrent_layers=2, n_output_layers=1),
    # Dots1's shared expert width is moe_intermediate_size * n_shared_experts, whose default is None
    "dots1": dict(n_shared_experts=1),
    # DBRX reads rope_theta from attn_config, which no longer declares it, and clamps to clip_qkv even when None;
    # its experts are sized by ffn_config
    "dbrx": dict(attn_config=dict(rope_theta=10000.0, kv_n_heads=2, clip_qkv=8.0),
                 ffn_config=dict(hidden_size=64, ffn_hidden_size=128)),
    # Cohere Compass keys RoPE by layer type and has no default: here its sliding layers rotate, its full ones are NoPE
    "cohere_compass_text": dict(layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": None}),
    # multimodal models: their text and vision configs keep their default sizes
    **dict.fromkeys(["gemma3", "qwen3_5", "emu3", "fuyu", "mllama", "llama4", "qwen3_5_moe"],
                    _shrink_sub_configs),
    # Gemma 4's full-attention layers get their own head_dim (per_layer_config, built at init for 30 layers), and its
    # per-layer input embeddings are vocab_size_per_layer_input x (layers * hidden_size_per_layer_input)
    "gemma4_text": _GEMMA4_TEXT,
    "gemma4_unified_text": _GEMMA4_TEXT,
    **dict.fromkeys(["gemma4", "gemma4_unified"], _text_fixed(_GEMMA4_TEXT)),
    # Dots 3 Note: MLA with a per-layer-type (sliding) override built at init from swa_* sizes; keys for every head
    "dots3_note_text": _DOTS3_TEXT,
    "dots3_note": _text_fixed(_DOTS3_TEXT),
    # Qwen4-Exp's indexed attention layers need their query-sparse indexer's sizes, which default to None
    "qwen4_exp_text": _QWEN4_TEXT,
    "qwen4_exp": _text_fixed(_QWEN4_TEXT),
    # LongCat-Flash derives qk_head_dim (nope + rope) at init from the default sizes
    "longcat_flash": dict(qk_head_dim=24),
    # LFM2-MoE has no default layer_types (its model reads them): alternate its short convolutions with attention
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2, num_dense_layers=1),
    # HRM inflates num_hidden_layers to per-stack layers x cycles at init, RWKV derives its attention width, each from
    # the default sizes
    "hrm_text": _rebuilt(),
    "rwkv": _rebuilt(),
    # Gemma 3n: its last num_kv_shared_layers (default 15) reuse caches of both layer types; with 6 layers and 2
    # of them sharing, layers 2 and 3 store them and layers 0 and 1 can become MoD layers; per-layer inputs as
    # Gemma 4's
    "gemma3n_text": _rebuilt(num_hidden_layers=6, num_kv_shared_layers=2,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                             vocab_size_per_layer_input=128, hidden_size_per_layer_input=8, laurel_rank=8,
                             activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0]),
    # Reformer's LM head needs is_decoder, and its axial position embeddings' widths must add up to hidden_size
    "reformer": dict(is_decoder=True, attention_head_size=16, axial_pos_shape=(16, 16), axial_pos_embds_dim=(16, 48)),
    # X-MOD routes each token through a language adapter and has no default language
    "xmod": dict(default_language="en_XX"),
    # the auto mapping gives MusicGen's causal LM the composite config, whose decoder fields it reads
    **dict.fromkeys(["musicgen", "musicgen_melody"], _with_decoder_fields),
    # xLSTM derives embedding_dim from the default hidden size at init, and rounds its query / key width up to a
    # multiple of 64 where its recurrent state does not: a factor that gives exactly 64
    "xlstm": _rebuilt(qk_dim_factor=1.0),
    # BLT: a byte-level model of four transformers (sub-configs), hash n-gram embeddings of 500002 rows per group,
    # and a global model as wide as the local ones times cross_attn_k (2); its cache is built from the composite
    # config, which has no num_hidden_layers: no cache
    "blt": lambda cfg: apply_fix(_shrink_sub_configs(cfg), dict(
        encoder_hash_byte_group_vocab=64, global_config=dict(hidden_size=128, head_dim=32),
        encoder_config=dict(hidden_size_global=128), decoder_config=dict(hidden_size_global=128), use_cache=False)),
    # Mamba-2's heads times head_dim must be expand * hidden_size (128)
    "mamba2": dict(num_heads=8, n_groups=1),
}


def apply_fix(cfg, fix):
    """cfg with fix applied: None leaves it, a function returns the fixed config, a dict sets each field (a dict
    value on a field holding a sub-config sets that sub-config's fields) and returns cfg."""
    if fix is None:
        return cfg
    if callable(fix):
        return fix(cfg)
    for k, v in fix.items():
        sub = getattr(cfg, k, None)
        if isinstance(v, dict) and sub is not None and not isinstance(sub, dict):
            apply_fix(sub, v)
        else:
            setattr(cfg, k, v)
    return cfg


def tiny_config(arch: str):
    """The architecture's default config shrunk to TINY's sizes, then its ARCH_FIXES."""
    import transformers

    return apply_fix(shrink(transformers.AutoConfig.for_model(arch)), ARCH_FIXES.get(arch))


def shrink(cfg):
    """cfg with TINY's values on the fields it has, and 4 layer types where it lists them."""
    for k, v in TINY.items():
        if _has(cfg, k):
            try:
                setattr(cfg, k, v)
            except Exception:  # noqa: BLE001 - a validated field that refuses the tiny value
                pass
    mla = _has(cfg, "qk_rope_head_dim") and isinstance(cfg.qk_rope_head_dim, int)
    if mla and _has(cfg, "head_dim") and _has(cfg, "num_attention_heads"):
        cfg.head_dim = cfg.qk_rope_head_dim  # MLA: the rotary module's width is the rotated part's,
        cfg.num_key_value_heads = cfg.num_attention_heads  # and every head has its keys and values
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, list) and types:
        try:
            cfg.layer_types = (types * 4)[:4]
        except AttributeError:  # a read-only property derived from num_hidden_layers (Mamba's, Jamba's): already 4
            pass
    return cfg


def _has(cfg, name: str) -> bool:
    try:
        return hasattr(cfg, name)
    except Exception:  # noqa: BLE001 - a per-layer field of a heterogeneous config (Gemma 4's) has no global value
        return False


def audit_one(arch: str, autocast: Optional[str] = None) -> str:
    import copy
    import warnings

    import torch
    import transformers

    import gmod_ext

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    try:
        cfg = tiny_config(arch)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
        ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[1, :4] = 0  # the second row left-padded: MoD layers must leave padding out, as the model's mask does
        ids[1, :4] = 0
        keep = mask.bool()
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).logits[keep]
    except Exception as err:  # noqa: BLE001 - the generic tiny config does not fit this architecture
        return f"build-fail: {type(err).__name__}: {' '.join(str(err).split())[:140]}"
    dense = copy.deepcopy(model) if autocast else None
    try:
        gmod_ext.convert(model, ratio=0.0, layers="all", gate="none", progress=False)
    except (TypeError, NotImplementedError, ValueError) as err:
        return "refused: " + " ".join(str(err).split())[:160]
    except Exception as err:  # noqa: BLE001
        return f"CRASH in convert: {type(err).__name__}: {str(err)[:160]}"
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits[keep]
    except Exception as err:  # noqa: BLE001
        return f"CRASH in the converted forward: {type(err).__name__}: {str(err)[:160]}"
    err = float((out - ref).abs().max() / ref.abs().max())
    if err >= 1e-4:
        return f"SILENT-WRONG {err:.1e}"
    if not autocast:
        return f"OK {err:.1e}"
    mixed = _under_autocast(dense, model, ids, mask, ref, AUTOCAST_DTYPES[autocast])
    if mixed.startswith(("AUTOCAST-WRONG", "CRASH")):
        return f"{mixed} (float32: OK {err:.1e})"
    return f"OK {err:.1e}, {mixed}"


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _under_autocast(dense, converted, ids, mask, ref, dtype_name: str) -> str:
    """The --autocast part of an architecture's line (see the module's docstring)."""
    import torch

    import gmod_ext

    dtype = getattr(torch, dtype_name)
    keep = mask.bool()
    peak = float(ref.abs().max())
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            dense_ac = dense(ids, attention_mask=mask).logits[keep].float()
            conv_ac = converted(ids, attention_mask=mask).logits[keep].float()
    except Exception as err:  # noqa: BLE001
        return f"CRASH under autocast (forward): {type(err).__name__}: {str(err)[:160]}"
    e_dense = float((dense_ac - ref).abs().max()) / peak
    e_conv = float((conv_ac - ref).abs().max()) / peak
    if not e_conv <= 2 * e_dense + 4 * torch.finfo(dtype).eps:
        return f"AUTOCAST-WRONG {e_conv:.1e} (dense {e_dense:.1e})"
    try:
        torch.manual_seed(0)
        train = dense.train()
        gmod_ext.convert(train, ratio=0.5, layers="all", router_init="normal", progress=False)
        with torch.autocast("cpu", dtype=dtype):
            loss = train(ids, attention_mask=mask, labels=ids.masked_fill(~keep, -100)).loss
        loss.backward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss {float(loss)}")
    except Exception as err:  # noqa: BLE001
        return f"CRASH under autocast (training step): {type(err).__name__}: {str(err)[:160]}"
    return f"autocast {e_conv:.1e} (dense {e_dense:.1e})"


def _limit_memory(gib: float):
    def apply():
        limit = int(gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return apply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archs", nargs="*", help="model_type names (default: every causal-LM architecture)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per architecture")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="address-space cap per architecture (default 6, or 12 with --autocast: a dense copy of the "
                        "model and autocast's bfloat16 weight copies)")
    p.add_argument("--json", default=None, help="also write {arch: result} to this file")
    p.add_argument("--autocast", choices=sorted(AUTOCAST_DTYPES), default=None,
                   help="also check each converting architecture under torch.autocast in this dtype")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the worker
    args = p.parse_args(argv)
    if args.memory_gib is None:
        args.memory_gib = 12.0 if args.autocast else 6.0
    if args.one:
        print("RESULT " + audit_one(args.one, args.autocast), flush=True)
        return 0
    archs = args.archs
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = {}
    for arch in archs:
        try:
            extra = ["--autocast", args.autocast] if args.autocast else []
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *extra, "--one", arch], capture_output=True,
                                  text=True, timeout=args.timeout, preexec_fn=_limit_memory(args.memory_gib))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            results[arch] = lines[-1][len("RESULT "):] if lines else f"NO-RESULT (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            results[arch] = f"NO-RESULT (over {args.timeout:.0f} s)"
        print(f"{arch:28s} {results[arch]}", flush=True)
    counts = {}
    for r in results.values():
        key = r.split(" ")[0].rstrip(":")
        counts[key] = counts.get(key, 0) + 1
    print("summary: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    bad = [a for a, r in results.items() if r.startswith(("SILENT-WRONG", "AUTOCAST-WRONG", "CRASH"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
