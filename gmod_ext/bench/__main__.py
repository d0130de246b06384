"""python -m gmod_ext.bench ops|attention|layer|model [--quick] [--json PATH] [--device cuda|cpu] ...

Exit status: 0 all rows ran and every check passed; 1 a gmod op raised (ERROR rows);
2 a gmod result differs from its baseline (MISMATCH rows); 3 bad arguments / no such device.
Ops without a kernel for the device show "n/a (no CUDA kernel)" and are not failures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

from .._cli_types import finite_float, int_at_least
from . import attention as attention_bench
from . import common
from . import layer as layer_bench
from . import model as model_bench
from . import ops as ops_bench

BENCHES = {"ops": ops_bench, "attention": attention_bench, "layer": layer_bench, "model": model_bench}

TIMING_HELP = """\
timing: on CUDA, CUDA events around each call, a 256 MiB buffer read before each call so no input
or output is left in L2 (read, not written: a written buffer leaves dirty lines whose write-back
lands in the timed call; --flush-mode write keeps that for comparison), warm-up first, the median
of many repeats (min and 80th percentile in the JSON); --graph times CUDA-graph replays instead of
eager calls. On CPU, time.perf_counter medians. Sizes: full sizes on CUDA; --quick (and always on
CPU) small sizes for a smoke test.
Every gmod result is compared with its baseline once before it is timed; a difference prints
MISMATCH in the row and on stderr and makes the exit status 2.
index validation: the CUDA ops validate index / length values on the device and sync once per call
(GMOD_TRUST_INDICES=1 turns that off). The benchmark times the kernels, so it sets
GMOD_TRUST_INDICES=1 for itself unless --check-indices is given (then the sync is in every time).
"""


def _layers(text: str):
    """--layers: a positive int, or "auto" (None: the model bench's size default decides)."""
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'auto', got {text!r}") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"layers must be in [1, 256], got {n}")
    return n


_positive_float = finite_float(positive=True)
_positive_int = int_at_least(1)


def _json_path_error(path: str):
    """Why ``--json PATH`` cannot be written, checked before the run so that no measurement is lost."""
    if os.path.isdir(path):
        return f"--json {path} is a folder; expected a file path"
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):  # write_json creates missing folders
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--json {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK):
        return f"--json {path}: the folder {parent} is not writable"
    return None


def _parser() -> argparse.ArgumentParser:
    cols = "\n".join(
        f"--- {name} tables ---\n" + common.columns_help(mod.TABLES) for name, mod in BENCHES.items())
    p = argparse.ArgumentParser(
        prog="python -m gmod_ext.bench",
        description="Benchmarks of the gmod_ext ops, a MoD layer and a MoD model against their floors and torch baselines.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TIMING_HELP + "\ncolumns:\n" + cols)
    p.add_argument("bench", choices=sorted(BENCHES),
                   help="ops: memory-bound MoD ops; attention: gmod.attention; layer: a LLaMA-7B-shaped MoD "
                        "decoder layer vs dense / kept-tokens dense / plain-torch MoD; model: a LLaMA-7B-shaped "
                        "model (as many of its 32 layers as fit for training) gamma-MoD vs dense, prefill and "
                        "training step")
    default_dev = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", choices=["cuda", "cpu"], default=default_dev, help=f"default: {default_dev}")
    p.add_argument("--quick", action="store_true", help="small sizes (always on for --device cpu)")
    p.add_argument("--json", metavar="PATH", help="write every number (and the timing details) here")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="activations (default bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--graph", action="store_true",
                   help="CUDA: time CUDA-graph replays (falls back to eager). The copy baseline measured 2426 GB/s "
                        "replayed against 3000 eager on the H100 (the ops' own times did not change): read %% copy "
                        "from eager runs")
    p.add_argument("--no-flush", action="store_true", help="CUDA: do not flush L2 between repeats")
    p.add_argument("--flush-mode", choices=["read", "write"], default="read",
                   help="CUDA: evict L2 by reading a 256 MiB buffer (default) or by writing it (leaves up to 50 MB "
                        "of dirty lines whose write-back is billed to the timed call; the benchmarks before "
                        "2026-11-24 did this)")
    p.add_argument("--budget-ms", type=_positive_float, help="time spent on the repeats of one measurement")
    p.add_argument("--threads", type=_positive_int, help="CPU: torch threads (default 1, for stable medians)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experiments", action="store_true",
                   help="attention: also time the other kernel plans as gmod-exp rows, in the same process: the "
                        "d = 64 / 128 forward and backward on the mma.sync kernels (GMOD_ATTN_FWD_IMPL=mma, "
                        "GMOD_ATTN_BWD_IMPL=mma; the default on an H100 / H200 is the sm_90a wgmma kernels) and "
                        "the key-split decode with three K / V buffers (GMOD_ATTN_DECODE_STAGES=3); vs_default = "
                        "gmod-exp / gmod")
    p.add_argument("--profile", action="store_true",
                   help="model: also profile one fwd+bwd per impl (torch.profiler) and print GPU time per kernel "
                        "group (GEMM, attention, gmod ops, elementwise, ...): where gamma-MoD's time goes; and "
                        "the matmuls by shape with their TFLOP/s")
    p.add_argument("--layers", type=_layers, default=None, metavar="N|auto",
                   help="model: decoder layers. auto (the default at full size on CUDA): the most of 32 / 24 / "
                        "16 / 8 whose training step fits in the GPU's memory (estimated, then one trial step; "
                        "16 on an 80 GB H100, 32 on a 141 GB H200). Default 4 with --quick and on CPU")
    p.add_argument("--attention", choices=["auto", "gmod", "sdpa"], default="auto",
                   help="layer: the attention kernel of the gmod MoD rows (GmodConfig.attention; auto runs SDPA "
                        "for bf16 / fp16 on CUDA). gmod: gmod.attention, e.g. to profile it inside the layer")
    p.add_argument("--check-indices", action="store_true",
                   help="keep the CUDA ops' index validation (one host sync per call) in the timed calls")
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.json and _json_path_error(args.json):
        parser.error(_json_path_error(args.json))
    if not args.check_indices:
        # Read once per process by the extension, at the first CUDA op call: set before any.
        os.environ["GMOD_TRUST_INDICES"] = "1"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("python -m gmod_ext.bench: --device cuda but torch sees no GPU", file=sys.stderr)
        return 3
    ctx = common.make_ctx(args)
    m = common.meta(ctx)
    print(f"gmod_ext.bench {args.bench}: {m['device']} ({m['device_name']}), torch {m['torch']}, "
          f"{m['dtype']}, sizes {m['size_mode']}, gmod build {m['gmod_build']}")
    print(f"timing: {m['timing']['method']}, L2 flush {m['timing']['l2_flush_mode'] or False}, "
          f"graph {m['timing']['cuda_graph']}, index validation {m['timing']['index_validation']}, {ctx.min_reps}-{ctx.max_reps} repeats / ~{ctx.budget_ms:.0f} ms each\n",
          flush=True)
    sections = []
    t0 = time.time()
    crashed = None
    try:
        for sec in BENCHES[args.bench].run(ctx):
            sections.append(sec)
            print(common.render(sec) + "\n", flush=True)
    except Exception as err:  # noqa: BLE001  (keep what was measured; report the crash)
        crashed = err
        traceback.print_exc()
        ctx.errors.append({"bench": args.bench, "error": f"crashed: {type(err).__name__}: {err}"[:300]})
    elapsed = time.time() - t0
    if args.json:
        common.write_json(args.json, args.bench, ctx, sections, {"elapsed_s": elapsed})
        print(f"wrote {args.json}")
    if ctx.mismatches:
        bar = "!" * 78
        print(f"{bar}\n!!! MISMATCH: {len(ctx.mismatches)} gmod result(s) differ from the baseline; "
              f"their timings are worthless:")
        for mm in ctx.mismatches:
            print(f"!!!   {mm['bench']}: {mm['detail']}")
        print(bar)
    if ctx.errors:
        print(f"ERRORS ({len(ctx.errors)}): " + "; ".join(f"{e['bench']}: {e['error']}" for e in ctx.errors))
    status = "MISMATCH" if ctx.mismatches else ("ERROR" if ctx.errors else "ok")
    print(f"status: {status} ({elapsed:.1f} s)")
    if ctx.mismatches:
        return 2
    return 1 if (ctx.errors or crashed) else 0


if __name__ == "__main__":
    sys.exit(main())
