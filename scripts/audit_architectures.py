"""Which of transformers' causal-LM architectures convert, and exactly?

For every architecture in transformers' causal-LM auto mapping (or those named on the command line),
in its own subprocess (memory and time capped, so that one huge default config cannot take the
machine down): build a tiny random model from its config (hidden 64, 4 layers, head dim 16, window 5
where it has one, 8 rotary dims where it says), convert every convertible layer keeping every token without gating, and compare
the whole model's logits on two 20-token prompts, one left-padded by 4, with the dense model's (at the
tokens that are not padding). Each line says one of:

  OK <err>            converts; relative logit error (float32 rounding is ~1e-6)
  SILENT-WRONG <err>  converts but computes something else: a bug (the converter's check should refuse)
  refused: ...        convert raised with its reason (TypeError / NotImplementedError / ValueError)
  CRASH ...           anything else: a bug
  build-fail: ...     the generic tiny config does not build that architecture (not about gmod_ext), and why
  NO-RESULT           killed (memory / time cap) before printing

    python scripts/audit_architectures.py                 # all (~20 min on 2 CPU cores)
    python scripts/audit_architectures.py llama qwen3_5_text --json audit.json

Exit status 1 if any line is SILENT-WRONG or CRASH.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=16,
            sliding_window=5, moe_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
            num_experts_per_tok=2, shared_expert_intermediate_size=32, n_group=1, topk_group=1,
            rotary_dim=8,  # (GPT-J / CodeGen rotate rotary_dim dims of the head: fewer than its 16)
            # multi-head latent attention (DeepSeek-V3's family): its latent and head parts, and its rotary
            # dims as the rotary module's head_dim (set below)
            kv_lora_rank=32, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


def audit_one(arch: str) -> str:
    import warnings

    import torch
    import transformers

    import gmod_ext

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.for_model(arch)
        for k, v in TINY.items():
            if hasattr(cfg, k):
                try:
                    setattr(cfg, k, v)
                except Exception:  # noqa: BLE001 - a validated field that refuses the tiny value
                    pass
        if isinstance(getattr(cfg, "qk_rope_head_dim", None), int) and hasattr(cfg, "head_dim"):
            cfg.head_dim = cfg.qk_rope_head_dim  # MLA: the rotary module's width is the rotated part's,
            cfg.num_key_value_heads = cfg.num_attention_heads  # and every head has its keys and values
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, list) and types:
            cfg.layer_types = (types * 4)[:4]
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
    return f"OK {err:.1e}" if err < 1e-4 else f"SILENT-WRONG {err:.1e}"


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
    p.add_argument("--memory-gib", type=float, default=6.0, help="address-space cap per architecture")
    p.add_argument("--json", default=None, help="also write {arch: result} to this file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the worker
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + audit_one(args.one), flush=True)
        return 0
    archs = args.archs
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    results = {}
    for arch in archs:
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", arch], capture_output=True,
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
    bad = [a for a, r in results.items() if r.startswith(("SILENT-WRONG", "CRASH"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
