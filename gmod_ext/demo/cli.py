"""``python -m gmod_ext demo``: its options and the run from model to report (the steps are listed in
:mod:`gmod_ext.demo`)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from ..costs import arch_of, forward_flops, kv_estimate
from .data import BUILTIN_TEXT, FORCED_CHOICES
from .loop import (Run, accuracy_of, cache_module, dense_cache_bytes, evaluate, generate, kept_counts,
                   kept_for_generation, to_device, train)
from .models import build_builtin_model, load_user_model, task_for
from .report import fmt_bytes, fmt_flops, jsonable, plot_demo

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


BUILTIN_MAX_SEQ_LEN = BUILTIN_TEXT["max_position_embeddings"]


def _arg_error(msg: str):
    """A bad command-line value: one line on stderr, exit status 2 (argparse's), no traceback."""
    print(f"python -m gmod_ext demo: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        _arg_error(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        _arg_error(f"--device {name} but torch sees no GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        _arg_error(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        _arg_error(f"--device {name!r}: the demo runs on cpu or cuda")
    return dev


def validate_args(args: argparse.Namespace) -> None:
    """Check every numeric / path option before anything runs (exit 2 with a one-line message)."""
    import math

    if not (0.0 <= args.ratio < 1.0):
        _arg_error(f"--ratio {args.ratio} must be in [0, 1)")
    for opt, value, lo in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                           ("--gen-batch-size", args.gen_batch_size, 1), ("--seq-len", args.seq_len, 1),
                           ("--baseline-steps", args.baseline_steps, 0), ("--pretrain-steps", args.pretrain_steps, 0),
                           ("--keep-dense", args.keep_dense, 0), ("--threads", args.threads, 1)):
        if value is not None and value < lo:
            _arg_error(f"{opt} {value} must be >= {lo}")
    if args.model is None and args.seq_len > BUILTIN_MAX_SEQ_LEN:
        _arg_error(f"--seq-len {args.seq_len} is longer than the built-in model's {BUILTIN_MAX_SEQ_LEN} positions")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        _arg_error(f"--lr {args.lr} must be a finite number > 0")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        _arg_error(f"--out {args.out} exists and is not a folder (report.json and the PNG go into a folder)")


def run_demo(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    import transformers

    import gmod_ext

    transformers.logging.set_verbosity_error()
    validate_args(args)
    device = _resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        _arg_error(f"--out {args.out}: cannot create the folder ({err.strerror or err})")
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
    try:
        task = task_for(model, args.seq_len, args.seed, grid, forced=args.forced)
    except ValueError as err:  # --seq-len too short for the task's layout: the message says by how much
        if not str(err).startswith("gmod demo:"):
            raise
        _arg_error(str(err)[len("gmod demo:"):].strip())
    explicit_mask = not task.vision  # LLaVA: the converter builds the mask from labels + image token id
    model.to(device=device, dtype=dtype)
    a = arch_of(model)
    if args.keep_dense is not None and args.keep_dense > a["L"]:
        _arg_error(f"--keep-dense {args.keep_dense} is more than the model's {a['L']} decoder layers")
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
        calib.append(to_device({k: v for k, v in b.items() if k not in ("labels", "gmod_routing_mask")}, device, dtype))
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
    except ValueError as err:  # an option value convert refuses (e.g. --keep-dense above the layer count)
        if not str(err).startswith("gmod"):
            raise
        _arg_error(str(err))
    t_convert = time.perf_counter() - t0
    gcfg = model.config.gmod
    ranks = [float(r) for r in gcfg["arank"]]
    mod_layers = list(gcfg["layers"])
    log(f"ARank + convert: {t_convert:.1f} s; MoD layers {mod_layers} of {a['L']}")

    # ---------------------------------------------------------------- 3. fine-tune gamma-MoD and dense
    last = {}

    def grab(m, batch):  # the last training forward's kept-token counts and per-row lengths
        last["kept"] = kept_counts(m)
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
    held = to_device(task.batch(max(64, 16 * args.batch_size), torch.Generator().manual_seed(args.seed + 3)), device, dtype)
    ev_mod = evaluate(model, held, converted=True, explicit_mask=explicit_mask)
    ev_dense = evaluate(dense, held, converted=False, explicit_mask=False)

    # ---------------------------------------------------------------- 4. generate
    gen_p = torch.Generator().manual_seed(args.seed + 2)
    prompts_cpu, answers = task.prompts(args.gen_batch_size, gen_p)
    prompts = to_device(prompts_cpu, device, dtype)
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
    acc_dense = accuracy_of(g_dense["sequences"], P, answers)
    acc_mod = accuracy_of(g_mod["sequences"], P, answers)

    # prefill routing of the prompts (inference: a LLaVA model converted with forced='text' keeps the text,
    # otherwise nothing is forced; top-k of the routable non-padding tokens)
    extra = {k: prompts[k] for k in ("pixel_values", "token_type_ids") if k in prompts}
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
          f"{skip_prefill.get(i, 0.0):>12.3f}  {'-' if tok is None else tok:>9}  {fmt_bytes(kvb):>19}")
    infer_forced = "text forced" if (task.vision and args.forced == "text") else "nothing forced"
    w("   skip train: fraction of the non-padding tokens a layer skipped in the last training step (forced")
    w("   tokens are kept, so it is below the ratio); skip routable: of the routable tokens;")
    w(f"   skip prefill: generation prompts (inference: {infer_forced}, top-k of the rest); KV tokens / used:")
    w("   what each layer's cache holds after generation, summed over the rows")
    w("")
    ntok = sum(last.get("tokens", []))
    w(f"FLOPs per forward (analytic matmul FLOPs, last training batch: {len(last.get('tokens', []))} rows, "
      f"{ntok} non-padding tokens)")
    w(f"  dense           {fmt_flops(fl['dense'])}  (decoder {fmt_flops(fl['decoder_dense'])}, lm_head "
      f"{fmt_flops(fl['lm_head'])}, vision tower + projector {fmt_flops(fl['vision'])})")
    w(f"  gamma-MoD       {fmt_flops(fl['gmod'])}  (decoder {fmt_flops(fl['decoder_gmod'])})")
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
    w(f"  dense KV cache        {fmt_bytes(dense_kv)}  (measured: the dense model's DynamicCache)")
    src = "estimated from the kept-token counts" if est else "measured: gmod_ext.kv_memory_report of its GmodCache"
    w(f"  gamma-MoD KV cache    {fmt_bytes(kv_report.get('used_bytes', kv_report['total_bytes']))} used, "
      f"{fmt_bytes(kv_report['total_bytes'])} allocated{est}  ({src})")
    w(f"  ratio                 {kv_report.get('used_ratio', kv_report['ratio']):.3f} used, "
      f"{kv_report['ratio']:.3f} allocated, of the dense equivalent {fmt_bytes(kv_report['dense_equivalent_bytes'])}")
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
        json.dump(jsonable(report), f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmod_ext demo")
    add_demo(p)
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

