"""`python -m gmod_ext.bench model`: a LLaMA-7B-shaped model, gamma-MoD against dense.

The model is ``LlamaForCausalLM`` with LLaMA-7B's layer shape (D=4096, 32 heads, MLP 11008,
vocab 32000), random weights, bf16 on CUDA. **Decoder layers:** LLaMA-7B's 32 where its training
step fits in the GPU's memory, else fewer (issue 7: "reduced layers if needed"): ``--layers auto``,
the default at full size on CUDA, takes the most of 32 / 24 / 16 / 8 whose
estimated training memory (:func:`train_memory_bytes`: weights, grads and AdamW state, plus the
activations saved for the backward, measured per token on CPU) fits in 90 % of the free memory,
and confirms it with one training step (an out-of-memory error moves it to the next count). On an
80 GB H100 that is 16 layers (about 56 GB estimated), on a 141 GB H200 all 32. Fewer layers
understate gamma-MoD's speed-up: the LM head, embedding and loss do not shrink, and their share of
the step falls with depth. ``--layers N`` fixes the count (runs before 2026-11-25 used 8); 4 with
--quick on CUDA, tiny fp32 shapes on CPU. It is timed densely first, then converted in place with
``gmod_ext.convert(ratio=0.5, layers="arank")``: ARank on a calibration batch (random weights: the
highest-ranked ``ceil(L/8)`` layer stays dense, the choice is exercised rather than meaningful) and
timed again.

Inputs mimic a LLaVA sample: the first half of every row is an image-token span (routable), then a
question of S/8 tokens (labels -100: forced), then the answer (labelled, routable). The model is
converted with ``forced="ignored_labels"``, not convert's default ``"text"`` (which would also keep
the answer and leave only the image half routable): so every pass skips the same share of tokens
as in the earlier runs whose numbers the notes and the README report, and issue 7's targets (1.7x
prefill, 1.5x train step at ratio 0.5) are reachable at all (FLOPs bounds 1.81x and 1.57x). Passes:

  prefill     forward of the prompt building the KV cache (``use_cache=True``; a MoD model fills its
              compact cache), logits of the last position only (as ``generate`` does); no labels,
              so nothing is forced and each MoD layer keeps half of the tokens;
  fwd+bwd     forward with labels (LM loss + router aux loss) and backward, no KV cache;
  train step  fwd+bwd + AdamW step (fused AdamW on CUDA).

``--profile`` adds two tables from one fwd+bwd call per impl under torch.profiler: GPU time per kernel
group (GEMM, SDPA attention, each gmod op, torch elementwise / reductions), to show where the time
goes, and the matmuls by shape with their TFLOP/s (is a product slower per FLOP on the kept tokens?).

``x dense`` is the gamma-MoD time over the dense time; ``FLOPs`` the analytic matmul-FLOP ratio of
the same forward (from the tokens each MoD layer kept), the speed-up to expect if every part scaled.
"""
from __future__ import annotations

import math

import torch

from .common import Col, Ctx, Section, measure, missing, record_error

SIZES = {
    # L=None: --layers auto (the most of LAYER_CHOICES whose training fits in memory)
    "full": dict(B=4, S=2048, D=4096, H=32, Hk=32, I=11008, V=32000, L=None, cal_B=1, cal_S=512),
    "quick": dict(B=2, S=1024, D=4096, H=32, Hk=32, I=11008, V=32000, L=4, cal_B=1, cal_S=256),
    "cpu": dict(B=2, S=256, D=256, H=4, Hk=4, I=688, V=1024, L=4, cal_B=2, cal_S=64),
}
RATIO = 0.5
LAYER_CHOICES = (32, 24, 16, 8)  # --layers auto, most first: multiples of 8, so ceil(L/8) dense layers are 1/8
MEMORY_SHARE = 0.9  # of the free GPU memory the estimate may use (allocator fragmentation, cuBLAS workspace)
GMOD_OPS = ["router_logits", "route", "gather_rows", "attention", "scatter_merge", "kv_cache_append",
            "router_logits_backward", "gather_rows_backward", "attention_backward", "scatter_merge_backward"]

MODEL_COLS = [
    Col("impl", "impl", help="dense = the Hugging Face model as is (SDPA attention); gamma-MoD = the same model "
        "after gmod_ext.convert(ratio=0.5, layers='arank') with its default attention='auto' (the MoD layers' "
        "attention on torch's SDPA for bf16 / fp16 on CUDA, on gmod.attention elsewhere); gamma-MoD gmod / "
        "gamma-MoD sdpa = the same converted model with the other attention kernel (gmod_ext.set_attention)"),
    Col("pass", "pass", help="prefill = forward with use_cache=True, last-position logits; fwd+bwd = forward with "
        "labels + backward; train step = fwd+bwd + AdamW step"),
    Col("ms", "ms", "ms", "median time; 'n/a (no CUDA kernel)' when a gmod op has no kernel for the device"),
    Col("ktok_s", "ktok/s", ".1f", "B*S tokens / time, thousands per second"),
    Col("x_dense", "x dense", ".3f", "ms / the dense row's ms of the same pass (< 1: gamma-MoD is faster)"),
    Col("flops", "FLOPs", ".3f", "analytic matmul FLOPs of that forward, gamma-MoD / dense (from kept tokens)"),
    Col("peak_GB", "peak GB", ".2f", "CUDA: peak memory allocated during the timed calls, 10^9 bytes"),
    Col("info", "info", help="gamma-MoD: mean fraction of tokens skipped per MoD layer in that pass; loss"),
]
ARANK_COLS = [
    Col("layer", "layer"),
    Col("arank", "ARank", ".2f", "mean rank of the layer's causal attention maps (calibration batch)"),
    Col("kind", "kind", help="MoD or dense (the highest-ARank layers stay dense)"),
]
PROFILE_COLS = [
    Col("impl", "impl"),
    Col("pass", "pass"),
    Col("group", "kernel group", help="--profile: CUDA kernels grouped by kind (gmod ops by kernel name; GEMM = "
        "cuBLAS/nvjet/cutlass; attention = SDPA's flash / cuDNN / memory-efficient kernels; torch elementwise and "
        "reductions; other)"),
    Col("calls", "launches"),
    Col("ms", "ms", ".3f", "GPU time of the group in one call of the pass (profiled; the sum is near the timed ms)"),
    Col("share", "share", ".3f", "ms / the impl's total GPU time in that pass"),
]
GEMM_COLS = [
    Col("impl", "impl"),
    Col("op", "op", help="--profile: the aten matmul op (mm, addmm, bmm) whose kernels ran"),
    Col("shape", "M x K x N", help="the product's dims (batch x M x K x N for bmm); the input shapes torch.profiler "
        "recorded"),
    Col("calls", "calls"),
    Col("ms", "ms", ".3f", "GPU time of those calls (their kernels), one fwd+bwd"),
    Col("TFLOPs", "TFLOP/s", ".1f", "2 M K N per call over the GPU time: compare the same product across impls "
        "(gamma-MoD's run on the kept tokens, M = B x C)"),
]
TABLES = [("model", MODEL_COLS), ("arank", ARANK_COLS), ("profile", PROFILE_COLS), ("gemm", GEMM_COLS)]

# aten matmul ops -> (name, index of the first factor in the recorded input shapes)
_GEMM_OPS = {"aten::mm": ("mm", 0), "aten::addmm": ("addmm", 1), "aten::bmm": ("bmm", 0)}


def gemm_dims(op: str, shapes) -> tuple | None:
    """(batch, M, K, N) of an aten matmul op from its recorded input shapes, or None if they are not
    those of a matrix product (e.g. shapes were not recorded)."""
    if op not in _GEMM_OPS or not shapes:
        return None
    i = _GEMM_OPS[op][1]
    try:
        a, b = list(shapes[i]), list(shapes[i + 1])
    except (IndexError, TypeError):
        return None
    if op == "aten::bmm" and len(a) == 3 and len(b) == 3 and a[0] == b[0] and a[2] == b[1]:
        return (a[0], a[1], a[2], b[2])
    if len(a) == 2 and len(b) == 2 and a[1] == b[0]:
        return (1, a[0], a[1], b[1])
    return None


def gemm_rows(averages, top: int = 12, device: bool = True) -> list:
    """Rows {op, shape, calls, ms, TFLOPs} of the matmul ops in ``prof.key_averages(group_by_input_shape=True)``,
    largest GPU time first (``device=False``: CPU time, for tests without a GPU)."""
    rows = []
    for ev in averages:
        dims = gemm_dims(ev.key, getattr(ev, "input_shapes", None))
        if dims is None:
            continue
        if device:
            us = getattr(ev, "device_time_total", None)
            if us is None:
                us = getattr(ev, "cuda_time_total", 0.0)
        else:
            us = ev.cpu_time_total
        bt, m, k, n = dims
        ms = us / 1e3
        flops = 2.0 * bt * m * k * n * ev.count
        shape = (f"{bt} x " if bt > 1 else "") + f"{m} x {k} x {n}"
        rows.append({"op": _GEMM_OPS[ev.key][0], "shape": shape, "calls": ev.count, "ms": ms,
                     "TFLOPs": flops / (ms * 1e-3) / 1e12 if ms > 0 else None})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def kernel_group(name: str) -> str:
    """A CUDA kernel's name -> the group --profile sums it under."""
    n = name.lower()
    base = name.replace("(anonymous namespace)::", "").split("<")[0].split("(")[0]
    if "gmod_" in base:  # a gmod kernel: its own name, e.g. gmod_attn_fwd_tc_kernel
        return base.split()[-1].rsplit("::", 1)[-1]
    if any(s in n for s in ("nvjet", "gemm", "cutlass", "cublas", "sm90_xmma", "sm80_xmma")):
        return "GEMM (cuBLAS)"
    if any(s in n for s in ("flash", "fmha", "cudnn", "attention", "mem_eff")):
        return "attention (SDPA)"
    if "adam" in n or "multi_tensor_apply" in n:
        return "optimizer"
    if "reduce" in n:
        return "torch reductions"
    if "elementwise" in n or "vectorized" in n or "unrolled" in n:
        return "torch elementwise"
    if "copy" in n or "cat" in n or "index" in n or "scatter" in n or "gather" in n:
        return "torch copy/index"
    return "other"


def profile_breakdown(fn, ctx: Ctx) -> tuple[list, list]:
    """[(group, launches, ms)] of one call of fn, by GPU time, largest first; and the matmul ops by
    shape (gemm_rows), from the same call."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    ctx.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        ctx.sync()
    groups: dict = {}
    for e in prof.events():
        if "cuda" not in str(getattr(e, "device_type", "")).lower():
            continue
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        g = groups.setdefault(kernel_group(e.name), [0, 0.0])
        g[0] += 1
        g[1] += t / 1e3  # us -> ms
    by_group = sorted(((k, n, ms) for k, (n, ms) in groups.items()), key=lambda r: -r[2])
    return by_group, gemm_rows(prof.key_averages(group_by_input_shape=True))


def build_model(z: dict, dev: torch.device, dt: torch.dtype, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=z["D"], intermediate_size=z["I"], num_attention_heads=z["H"], num_key_value_heads=z["Hk"],
        num_hidden_layers=z["L"], vocab_size=z["V"], max_position_embeddings=max(4096, z["S"]),
        attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dt)
    return model.to(device=dev, dtype=dt)


def param_count(z: dict, L: int) -> int:
    """Parameters of the Llama model of these sizes with L decoder layers (untied embedding and LM head)."""
    D, I, V, d = z["D"], z["I"], z["V"], z["D"] // z["H"]
    attn = D * z["H"] * d + 2 * D * z["Hk"] * d + z["H"] * d * D  # q, k, v, o
    return L * (attn + 3 * D * I + 2 * D) + 2 * V * D + D


def train_memory_bytes(z: dict, L: int, esize: int) -> dict:
    """Estimated peak memory of a training step (fwd+bwd + AdamW) of the dense model, in bytes, by part.

    weights, grads and the two AdamW moments in the parameters' dtype (``esize`` bytes: fused AdamW
    keeps bf16 moments for bf16 weights); activations saved for the backward per token, counted with
    ``torch.autograd.graph.saved_tensors_hooks`` on CPU for transformers' Llama with SDPA (bf16, D 128 to
    4096, MHA and GQA; per layer the fit is exact to ~0.3 %, python_tests/test_bench_smoke.py checks it):
    per layer (10 D + 2 Dk + 4 I) elements, Dk = kv heads x head dim (the RMSNorm inputs in fp32, q, k /
    v, RoPE, the MLP's gate / up / act products), plus about 5 D elements and the fp32 logits (4 V bytes)
    for the embedding, final norm and loss; and a transient of the backward: the fp32 and the
    dtype-sized gradient of the logits, and one MLP-width gradient. A dense step is the largest of the
    benchmark's passes (gamma-MoD saves activations for the kept tokens only)."""
    T = z["B"] * z["S"]
    D, I, V = z["D"], z["I"], z["V"]
    Dk = z["Hk"] * (D // z["H"])
    states = 4 * esize * param_count(z, L)
    act = T * (L * (10 * D + 2 * Dk + 4 * I) * esize + 5 * D * esize + 4 * V)
    transient = T * (V * (4 + esize) + I * esize)
    return {"states": states, "activations": act, "transient": transient, "total": states + act + transient}


def _trial_step(model, ids, labels) -> None:
    """One dense training step (fwd+bwd + fused AdamW) and nothing kept: the largest pass, run once to
    see that it fits before anything is timed."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    model.train()
    model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del opt
    model.eval()


def fit_layers(z: dict, dev: torch.device, dt: torch.dtype, seed: int, ids, labels, free_bytes: int,
               build=None, trial=None) -> tuple:
    """(model, L, notes) for ``--layers auto``: the model with the most layers of LAYER_CHOICES whose
    estimated training memory fits in MEMORY_SHARE of ``free_bytes`` and whose trial step then runs
    (CUDA out-of-memory there: the next count). ``build`` / ``trial`` default to build_model /
    _trial_step (tests pass their own)."""
    import gc

    build = build or (lambda L: build_model(dict(z, L=L), dev, dt, seed))
    trial = trial or (lambda m: _trial_step(m, ids, labels))
    esize = torch.empty((), dtype=dt).element_size()
    budget = MEMORY_SHARE * free_bytes
    fits = [L for L in LAYER_CHOICES if train_memory_bytes(z, L, esize)["total"] <= budget]
    notes = []
    if len(fits) < len(LAYER_CHOICES):
        skipped = [L for L in LAYER_CHOICES if L not in fits]
        notes.append(f"{'/'.join(map(str, skipped))} layers skipped: estimated training memory "
                     f"{train_memory_bytes(z, skipped[-1], esize)['total'] / 1e9:.1f} GB and up, over "
                     f"{MEMORY_SHARE:.0%} of the {free_bytes / 1e9:.1f} GB free")
    for L in fits or [LAYER_CHOICES[-1]]:
        model = build(L)
        try:
            trial(model)
        except torch.cuda.OutOfMemoryError:
            notes.append(f"{L} layers: out of memory in the trial step (estimated "
                         f"{train_memory_bytes(z, L, esize)['total'] / 1e9:.1f} GB)")
        else:
            return model, L, notes
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise RuntimeError("bench model: not even the smallest layer count fits: " + "; ".join(notes))


def make_inputs(z: dict, B: int, S: int, dev: torch.device, gen: torch.Generator) -> dict:
    """LLaVA-like rows: image span (routable), question (forced via labels -100), answer (labelled)."""
    V = z["V"]
    image_token = V - 1
    ids = torch.randint(0, V - 1, (B, S), generator=gen)
    n_img = S // 2
    n_q = max(1, S // 8)
    ids[:, :n_img] = image_token
    labels = ids.clone()
    labels[:, :n_img + n_q] = -100
    return {"input_ids": ids.to(dev), "labels": labels.to(dev), "image_token_id": image_token}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _arch(z: dict) -> dict:
    return dict(D=z["D"], Hq=z["H"], Hk=z["Hk"], d=z["D"] // z["H"], I=z["I"], V=z["V"], L=z["L"])


def run(ctx: Ctx):
    import transformers

    import gmod_ext
    from ..costs import forward_flops

    transformers.logging.set_verbosity_error()
    z = dict(SIZES[ctx.size_mode])
    B, S = z["B"], z["S"]
    dev, dt = ctx.device, ctx.dtype
    gen = torch.Generator().manual_seed(ctx.seed)
    data = make_inputs(z, B, S, dev, gen)
    image_token = data.pop("image_token_id")
    ids, labels = data["input_ids"], data["labels"]
    layer_notes, model = [], None
    if isinstance(ctx.layers, int):
        z["L"] = ctx.layers
        how = "--layers"
    elif z["L"] is None and ctx.cuda:  # auto: the most layers whose training fits
        free, _ = torch.cuda.mem_get_info(dev)
        model, z["L"], layer_notes = fit_layers(z, dev, dt, ctx.seed, ids, labels, free)
        est = train_memory_bytes(z, z["L"], torch.empty((), dtype=dt).element_size())["total"]
        how = f"auto: the most of {'/'.join(map(str, LAYER_CHOICES))} whose training fits, est. {est / 1e9:.1f} GB"
    else:
        z["L"] = z["L"] or LAYER_CHOICES[-1]
        how = "size default"
    if model is None:
        model = build_model(z, dev, dt, ctx.seed)
    n_params = sum(p.numel() for p in model.parameters())
    sec = Section("model", f"LLaMA-7B-shaped model, {z['L']} decoder layers of 32 ({how}), D={z['D']} "
                  f"H={z['H']} MLP {z['I']} vocab {z['V']} ({_count(n_params)} params), B={B} S={S}, "
                  f"gamma-MoD ratio {RATIO}, {str(dt)[6:]}", MODEL_COLS)
    sec.notes.extend(layer_notes)
    if ctx.size_mode == "cpu":
        sec.notes.append("CPU: tiny shapes and the gmod ops' C++ reference kernels: not representative of the GPU")
    arank_sec = Section("arank", "ARank per layer and the MoD layer choice (random weights)", ARANK_COLS)
    prof_sec = Section("profile", "GPU time by kernel group, one fwd+bwd call (torch.profiler)", PROFILE_COLS)
    gemm_sec = Section("gemm", "the matmuls of one fwd+bwd call by shape, largest GPU time first (torch.profiler)",
                       GEMM_COLS)
    a = _arch(z)
    tokens = [S] * B

    def sync_peak_reset():
        if ctx.cuda:
            ctx.sync()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)

    def peak():
        return torch.cuda.max_memory_allocated(dev) / 1e9 if ctx.cuda else None

    def passes(m, converted: bool):
        # fused on CUDA (one kernel per step, as a trainer would set it); the same optimizer for both impls
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6, fused=ctx.cuda or None)

        def prefill():
            with torch.no_grad():
                return m(input_ids=ids, use_cache=True, logits_to_keep=1)

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            out = m(input_ids=ids, labels=labels, use_cache=False)
            out.loss.backward()
            return out.loss

        def step():
            loss = fwd_bwd()
            opt.step()
            return loss

        return opt, [("prefill", prefill, False), ("fwd+bwd", fwd_bwd, True), ("train step", step, True)]

    def time_passes(m, impl: str, converted: bool, profile: bool = True) -> dict:
        res = {}
        opt, ps = passes(m, converted)
        for name, fn, train in ps:
            row = sec.add(impl=impl, **{"pass": name})
            res[name] = row
            try:
                m.train(train)
                sync_peak_reset()
                out = fn()
                info = []
                if converted:
                    st = m.gmod_stats()
                    info.append(f"skip {st['skip_ratio']:.3f}")
                    kept = {li: [int(c) for c in cnt.tolist()]
                            for li, (_, cnt) in sorted(m.gmod_state.current.selection.items())}
                    fl = forward_flops(a, tokens, kept, with_lm_head=(name != "prefill"))
                    if name == "prefill":  # logits of the last position only
                        extra = 2.0 * B * a["D"] * a["V"]
                        fl["ratio"] = (fl["gmod"] + extra) / (fl["dense"] + extra)
                    row["flops"] = fl["ratio"]
                if isinstance(out, torch.Tensor):
                    lv = float(out.detach())
                    info.append(f"loss {lv:.3f}")
                    if not math.isfinite(lv):
                        ctx.mismatches.append({"bench": f"model {impl} {name}", "detail": f"loss {lv}"})
                row["info"] = ", ".join(info) if info else None
                del out
                t = measure(fn, ctx)
                row.update(ms=t.ms, ktok_s=B * S / (t.ms * 1e-3) / 1e3, peak_GB=peak(), timing=t.as_json())
                if profile and ctx.profile and ctx.cuda and name == "fwd+bwd":
                    try:  # a profiler failure costs the profile rows, not the timed row
                        groups, gemms = profile_breakdown(fn, ctx)
                    except Exception as err:  # noqa: BLE001
                        prof_sec.add(impl=impl, group=record_error(ctx, f"model {impl} profile", err), **{"pass": name})
                        groups, gemms = [], []
                    for r in gemms:
                        gemm_sec.add(impl=impl, **r)
                    total = sum(ms for _, _, ms in groups) or float("nan")
                    for g, n, ms in groups:
                        prof_sec.add(impl=impl, group=g, calls=n, ms=ms, share=ms / total, **{"pass": name})
                    if groups:
                        prof_sec.add(impl=impl, group="total", calls=sum(n for _, n, _ in groups), ms=total,
                                     share=1.0, **{"pass": name})
            except Exception as err:  # noqa: BLE001
                row["ms"] = record_error(ctx, f"model {impl} {name}", err)
            finally:
                opt.zero_grad(set_to_none=True)
        del opt
        m.eval()
        return res

    dense_rows = time_passes(model, "dense", False)

    na = missing(GMOD_OPS, ctx)
    if na:
        for name in dense_rows:
            sec.add(impl="gamma-MoD", **{"pass": name}, ms=na)
        yield sec
        return
    try:
        cal = make_inputs(z, z["cal_B"], z["cal_S"], dev, gen)
        cal.pop("image_token_id")
        cal.pop("labels")
        if ctx.cuda:
            torch.cuda.empty_cache()
        gmod_ext.convert(model, ratio=RATIO, layers="arank", calibration_batches=[cal], image_token_id=image_token,
                         forced="ignored_labels", progress=False)
    except Exception as err:  # noqa: BLE001
        msg = record_error(ctx, "model convert", err)
        for name in dense_rows:
            sec.add(impl="gamma-MoD", **{"pass": name}, ms=msg)
        yield sec
        return
    gcfg = model.config.gmod
    mod_layers = list(gcfg["layers"])
    for i, r in enumerate(gcfg["arank"]):
        arank_sec.add(layer=i, arank=float(r), kind="MoD" if i in mod_layers else "dense")
    sec.notes.append(f"MoD layers {mod_layers} of {z['L']} (ARank on a {z['cal_B']}x{z['cal_S']} calibration batch; "
                     f"random weights, so the choice is exercised, not meaningful)")
    from ..mod_layer import attention_backend

    default = attention_backend("auto", dev, dt)
    other = "gmod" if default == "sdpa" else "sdpa"
    sec.notes.append(f"gamma-MoD: MoD-layer attention on {default} (attention='auto' for {str(dt)[6:]} on "
                     f"{dev.type}); gamma-MoD {other}: the same model on {other}")
    mod_rows = list(time_passes(model, "gamma-MoD", True).values())
    # The same converted model with its MoD layers' attention on the other kernel: the same function
    # (GmodConfig.attention), so the gap between the two rows is the attention kernel's.
    # (Not profiled: --profile's tables are for the default impl, and gpu_check's step has a time limit.)
    gmod_ext.set_attention(model, other)
    mod_rows += list(time_passes(model, f"gamma-MoD {other}", True, profile=False).values())
    gmod_ext.set_attention(model, "auto")
    for row in mod_rows:
        d = dense_rows[row["pass"]].get("ms")
        if isinstance(row.get("ms"), float) and isinstance(d, float):
            row["x_dense"] = row["ms"] / d
    for row in dense_rows.values():
        if isinstance(row.get("ms"), float):
            row["x_dense"] = 1.0
            row["flops"] = 1.0
    yield sec
    yield arank_sec
    if prof_sec.rows:
        yield prof_sec
    if gemm_sec.rows:
        yield gemm_sec
