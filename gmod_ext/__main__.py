"""Command line: ``python -m gmod_ext <subcommand> ...`` (also the ``gmod-ext`` script).

Subcommands are registered in :data:`SUBCOMMANDS` as ``name -> (add_arguments, run)``; to add
one (e.g. ``demo``), write ``add_demo(parser)`` and ``run_demo(args) -> int`` and add an entry.

``demo``: the whole gamma-MoD job (ARank -> convert -> train -> generate -> report) on a built-in
tiny LLaVA-shaped model and synthetic image+text batches, see :mod:`gmod_ext.demo`.

``arank``: ARank per decoder layer of a model (default: a built-in tiny random Llama, no
download) on random calibration tokens; prints the table with the layers chosen to become MoD
layers and saves a bar chart (PNG, matplotlib Agg).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Optional

from ._cli_types import finite_float, int_at_least


# ----------------------------------------------------------------------------- arank
def tiny_model(arch: str = "llama", num_layers: int = 8, seed: int = 0, sharpen: bool = True):
    """A tiny random decoder model built from a config (no hub download).

    A random model's attention is nearly uniform, so every layer has full ARank. With ``sharpen``
    the q/k projections of deeper layers get larger weights (std 0.1 ... 1.1), which makes their
    attention peaked and their ARank lower, a synthetic stand-in for the redundancy of deeper
    layers that the paper measures on trained models.
    """
    import torch
    import transformers

    kw = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=512,
    )
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**kw)).eval()
    if sharpen:
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                std = 0.1 + 1.0 * i / max(1, num_layers - 1)
                layer.self_attn.q_proj.weight.normal_(0.0, std)
                layer.self_attn.k_proj.weight.normal_(0.0, std)
    return model


_positive_int = int_at_least(1)
_non_negative_int = int_at_least(0)
_finite_float = finite_float()


def add_arank(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (built-in random tiny model) or a local model folder")
    p.add_argument("--arch", default="llama", choices=["llama", "mistral", "qwen2"], help="architecture of --model tiny")
    p.add_argument("--tiny-layers", type=_positive_int, default=8, help="layers of the tiny model")
    p.add_argument("--batches", type=_positive_int, default=4, help="calibration batches")
    p.add_argument("--batch-size", type=_positive_int, default=2)
    p.add_argument("--seq-len", type=_positive_int, default=48)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--keep-dense", type=_non_negative_int, default=None,
                   help="keep the N highest-ARank layers dense (default ceil(L/8))")
    g.add_argument("--threshold", type=_finite_float, default=None, help="layers with ARank < T become MoD layers")
    p.add_argument("--plot", default="arank.png", help="PNG path of the bar chart")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--json", default=None, help="also write the ranks and the choice to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _arank_error(msg: str) -> int:
    print(f"python -m gmod_ext arank: error: {msg}", file=sys.stderr)
    return 2


def _check_output_path(opt: str, path: str) -> Optional[str]:
    """Why ``path`` cannot be written (checked before the ARank run, so that no result is lost), or None."""
    import os

    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{opt} {path} is a folder; expected a file path"
    if not os.path.isdir(parent):
        return f"{opt} {path}: the folder {parent} does not exist"
    if not os.access(parent, os.W_OK):
        return f"{opt} {path}: the folder {parent} is not writable"
    return None


def run_arank(args: argparse.Namespace) -> int:
    import os

    import torch

    from .arank import arank, choose_mod_layers, format_table, plot_arank

    for opt, path in (("--plot", None if args.no_plot else args.plot), ("--json", args.json)):
        why = _check_output_path(opt, path) if path else None
        if why:
            return _arank_error(why)
    if args.model == "tiny":
        model = tiny_model(args.arch, args.tiny_layers, args.seed)
        name = f"tiny-{args.arch}"
    else:
        import transformers

        if not os.path.isdir(args.model):
            return _arank_error(f"--model {args.model!r} is not a folder ('tiny' or a local model folder)")
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager").eval()
        except (OSError, ValueError) as err:
            return _arank_error(f"--model {args.model}: cannot load a causal LM from it: {str(err).splitlines()[0]}")
        name = args.model
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and args.seq_len > max_pos:
        return _arank_error(f"--seq-len {args.seq_len} is longer than the model's {max_pos} positions "
                            "(max_position_embeddings)")
    L = len(getattr(getattr(model, "model", None), "layers", []) or [])
    if args.keep_dense is not None and L and args.keep_dense > L:
        return _arank_error(f"--keep-dense {args.keep_dense} is more than the model's {L} layers")
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        {"input_ids": torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)} for _ in range(args.batches)
    ]
    ranks = arank(model, batches, progress=not args.no_progress)
    mod = choose_mod_layers(ranks, keep_dense=args.keep_dense, threshold=args.threshold)
    print(f"ARank of {name} ({args.batches} x {args.batch_size} samples of {args.seq_len} random tokens)")
    print(format_table(ranks, mod))
    print(f"MoD layers: {mod}")
    if not args.no_plot:
        plot_arank(ranks, args.plot, mod, title=f"ARank per layer: {name}")
        print(f"plot saved to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": name, "arank": ranks, "mod_layers": mod}, f, indent=2)
    return 0


# ----------------------------------------------------------------------------- demo
def add_demo(p: argparse.ArgumentParser) -> None:
    from .demo import add_demo as _add

    _add(p)


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo as _run

    return _run(args)


# ----------------------------------------------------------------------------- dispatch
SUBCOMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {
    "arank": (add_arank, run_arank, "ARank per decoder layer, the MoD layer choice and a plot"),
    "demo": (add_demo, run_demo, "the whole job on a built-in tiny LLaVA: ARank -> convert -> train -> generate -> report"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gmod_ext", description="gamma-MoD tools",
        epilog="benchmarks: python -m gmod_ext.bench {ops,attention,layer,model} [--quick] [--json PATH] "
               "(--help there explains every column); the GPU check, from a source checkout: bash scripts/gpu_check.sh")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True
    for name, (add, run, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
