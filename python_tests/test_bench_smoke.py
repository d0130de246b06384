"""Smoke test of the benchmarks: `python -m gmod_ext.bench ops|attention --quick --device cpu --json PATH`
must exit 0, print its tables and write a JSON with the expected keys (tiny CPU sizes, a few seconds)."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP_KEYS = {"benchmark", "status", "meta", "copy_GBps", "sections", "mismatches", "errors"}
SECTIONS = {
    "ops": {"copy": "copy bandwidth", "ops": "router_logits", "route": "B x S", "overhead": "x floor"},
    "attention": {"copy": "copy bandwidth", "prefill": "TFLOP/s", "decode": "cache"},
}


def _run(bench: str, tmp_path: pathlib.Path, *extra: str, env_extra: dict | None = None):
    out = tmp_path / f"{bench}.json"
    env = dict(os.environ, **(env_extra or {}))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "gmod_ext.bench", bench, "--quick", "--device", "cpu", "--json", str(out), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return proc, out


@pytest.mark.parametrize("bench", ["ops", "attention"])
def test_bench_cpu_quick(bench, tmp_path):
    proc, out = _run(bench, tmp_path)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    assert "MISMATCH" not in proc.stdout
    for needle in SECTIONS[bench].values():
        assert needle in proc.stdout, f"{needle!r} missing from the printed tables:\n{proc.stdout}"
    assert "status: ok" in proc.stdout
    doc = json.loads(out.read_text())
    assert TOP_KEYS <= set(doc), set(doc)
    assert doc["benchmark"] == bench and doc["status"] == "ok"
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["size_mode"] == "cpu"
    assert doc["copy_GBps"] > 0
    assert set(SECTIONS[bench]) == set(doc["sections"])
    for name, sec in doc["sections"].items():
        assert {"title", "columns", "rows"} <= set(sec)
        assert sec["rows"], f"section {name} has no rows"
    if bench == "ops":
        rows = doc["sections"]["ops"]["rows"]
        assert {(r["op"], r["pass"]) for r in rows} == {
            (op, p) for op in ("router_logits", "gather_rows", "scatter_merge", "rope") for p in ("fwd", "bwd")}
        for r in rows:
            assert isinstance(r["gmod_ms"], float) and r["gmod_ms"] > 0
            assert isinstance(r["torch_ms"], float) and r["bytes"] > 0 and r["GBps"] > 0
            assert r["check"].startswith(("ok", "exact")), r
        assert all(r["check"] == "ok" for r in doc["sections"]["route"]["rows"])
        gm = [r for r in doc["sections"]["overhead"]["rows"] if r["impl"] == "gmod"][0]
        assert gm["x_floor"] > 0 and gm["check"].startswith("ok")
    else:
        rows = doc["sections"]["prefill"]["rows"]
        gm = [r for r in rows if r["impl"] == "gmod"]
        assert {r["pass"] for r in gm} == {"fwd", "bwd"}
        assert all(isinstance(r["ms"], float) and r["TFLOPs"] > 0 and r["check"].startswith("ok") for r in gm)
        assert any(r["impl"] == "sdpa-math" for r in rows)
        dec = [r for r in doc["sections"]["decode"]["rows"] if r["impl"] == "gmod"]
        assert dec and all(r["GBps"] > 0 and r["check"].startswith("ok") for r in dec)
        # one same-size copy row per decode shape, and every timed row compared with it
        copies = {(r["B"], r["L"]): r for r in doc["sections"]["decode"]["rows"] if r["impl"] == "copy"}
        assert set(copies) == {(r["B"], r["L"]) for r in dec}
        for r in dec:
            c = copies[(r["B"], r["L"])]
            assert c["check"] == "ok" and c["MB"] == r["MB"]
            assert abs(r["pct_copy_size"] - 100.0 * c["ms"] / r["ms"]) < 1e-6 * r["pct_copy_size"]


def test_bench_attention_experiments_rows(tmp_path):
    """--experiments adds gmod-exp rows (the other kernel plans, via flags the extension reads at every
    call): forward and backward at d = 64 / 128 (the mma.sync kernels), and each decode shape with the
    plainly launched combine, each checked against the baseline and compared with the default gmod row
    (vs_default). On CPU the flags change nothing, so
    the ratio is near 1; the code path is what runs here."""
    proc, out = _run("attention", tmp_path, "--experiments")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["sections"]["prefill"]["rows"]
    exp = [r for r in rows if r["impl"] == "gmod-exp"]
    assert {(r["pass"], r["d"]) for r in exp} == {("fwd", 64), ("fwd", 128), ("bwd", 64), ("bwd", 128)}
    for r in exp:
        assert r["check"].startswith("ok") and isinstance(r["ms"], float) and r["vs_default"] > 0, r
    dec = json.loads(out.read_text())["sections"]["decode"]["rows"]
    dexp = [r for r in dec if r["impl"] == "gmod-exp"]  # GMOD_ATTN_DECODE_STAGES=3: one per decode shape
    assert len(dexp) == len({(r["B"], r["L"]) for r in dec}) >= 1
    for r in dexp:
        assert r["check"].startswith("ok") and isinstance(r["ms"], float) and r["vs_default"] > 0, r
        assert r["GBps"] > 0 and r["pct_copy_size"] > 0
    plain = json.loads(_run("attention", tmp_path)[1].read_text())["sections"]
    assert not any(r["impl"] == "gmod-exp" for sec in ("prefill", "decode") for r in plain[sec]["rows"])


def test_bench_missing_kernel_rows(tmp_path):
    """An op without a kernel for the device prints 'n/a (no ... kernel)' and the baselines still run."""
    proc, out = _run("attention", tmp_path, env_extra={"GMOD_BENCH_HIDE_OPS": "attention,attention_backward"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "n/a (no CPU kernel)" in proc.stdout
    doc = json.loads(out.read_text())
    rows = doc["sections"]["prefill"]["rows"]
    assert all(r["ms"] == "n/a (no CPU kernel)" for r in rows if r["impl"] == "gmod")
    assert all(isinstance(r["ms"], float) for r in rows if r["impl"] == "sdpa-math")


def test_bench_help_explains_columns():
    proc = subprocess.run([sys.executable, "-m", "gmod_ext.bench", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for word in ("% copy", "x floor", "TFLOP/s", "vs flash", "MISMATCH", "bytes that must move"):
        assert word in proc.stdout, word


@pytest.mark.parametrize("name,group", [
    ("void gmod::attn::gmod_attn_fwd_tc_kernel<gmod::attn::TcFwdTraits<128, 2, 64>, __nv_bfloat16>(Params)",
     "gmod_attn_fwd_tc_kernel"),
    ("void gmod::(anonymous namespace)::gmod_scatter_merge_kernel<c10::BFloat16, float>(const T1*, int)",
     "gmod_scatter_merge_kernel"),
    ("gmod::cuda::gmod_validate_route_kernel(const int*, long)", "gmod_validate_route_kernel"),
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "GEMM (cuBLAS)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM (cuBLAS)"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention (SDPA)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps<float, float, float, float>>>", "torch reductions"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>>", "torch elementwise"),
    ("void at::native::index_elementwise_kernel<128, 4>", "torch elementwise"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<OpaqueType<2>, unsigned int, 4, 64, 64>",
     "torch copy/index"),
    ("some_kernel_nobody_knows", "other"),
])
def test_profile_kernel_groups(name, group):
    """bench model --profile sums GPU time per kernel group: each kind of kernel lands in its group, and a
    gmod kernel is listed under its own name (without template arguments)."""
    from gmod_ext.bench.model import kernel_group

    assert kernel_group(name) == group


def test_profile_gemm_rows_by_shape():
    """bench model --profile lists the matmuls by shape: dims from the recorded input shapes of mm / addmm /
    bmm (addmm's bias first), calls and time summed per shape, TFLOP/s = 2 M K N x calls / time. Checked
    on a CPU profile of known products (CPU time standing in for GPU time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from gmod_ext.bench.model import gemm_dims, gemm_rows

    assert gemm_dims("aten::mm", [[8, 16], [16, 4]]) == (1, 8, 16, 4)
    assert gemm_dims("aten::addmm", [[4], [8, 16], [16, 4], [], []]) == (1, 8, 16, 4)
    assert gemm_dims("aten::bmm", [[3, 8, 16], [3, 16, 4]]) == (3, 8, 16, 4)
    assert gemm_dims("aten::mm", [[8, 16], [15, 4]]) is None and gemm_dims("aten::mm", []) is None
    assert gemm_dims("aten::add", [[8], [8]]) is None
    a, b, c = torch.randn(64, 96), torch.randn(96, 32), torch.randn(2, 64, 96)
    bias = torch.randn(32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            torch.mm(a, b)
        torch.addmm(bias, a, b)
        torch.bmm(c, c.transpose(1, 2))
    rows = gemm_rows(prof.key_averages(group_by_input_shape=True), device=False)
    by = {(r["op"], r["shape"]): r for r in rows}
    assert by[("mm", "64 x 96 x 32")]["calls"] == 3
    assert by[("addmm", "64 x 96 x 32")]["calls"] == 1
    assert by[("bmm", "2 x 64 x 96 x 64")]["calls"] == 1
    r = by[("mm", "64 x 96 x 32")]
    assert r["TFLOPs"] == pytest.approx(2 * 64 * 96 * 32 * 3 / (r["ms"] * 1e-3) / 1e12)
    assert [x["ms"] for x in rows] == sorted((x["ms"] for x in rows), reverse=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the probe's failure path (no GPU)")
def test_experiment_probe_failure_becomes_a_row_error():
    """On CUDA an --experiments kernel first runs in a fresh process (a fault there must not poison the
    benchmark's CUDA context). Where it fails (here: no GPU at all), the probe returns the error's last
    line, once per flag (cached), and the experiment's rows carry that error instead of a timing."""
    from types import SimpleNamespace

    from gmod_ext.bench import attention as ba

    ctx = SimpleNamespace(cuda=True, errors=[], sync=lambda: None)
    exp = ("GMOD_ATTN_FWD_IMPL", "wgmma", (64, 128))
    ba._probes.pop(exp[:2], None)
    err = ba._probe_error(ctx, exp)
    assert isinstance(err, str) and err
    assert ba._probe_error(ctx, exp) == err  # cached
    row = {}
    assert ba._run_gmod(ctx, row, "attention fwd (experiment)", lambda: 1 / 0, None, 1.0, exp) is None
    assert row["ms"].startswith("ERROR") and "probe" in row["ms"] + ctx.errors[0]["error"]
    ba._probes.pop(exp[:2], None)


def test_bench_layer_attention_option(tmp_path):
    """bench layer --attention sets the gmod MoD rows' GmodConfig.attention (the README's NVTX-filtered ncu
    command needs gmod: "auto" runs SDPA on CUDA); the note names the kernel that ran, and the rows still
    match their baselines."""
    proc, out = _run("layer", tmp_path, "--attention", "sdpa")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "gmod MoD attention: sdpa (GmodConfig.attention='sdpa')" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["status"] == "ok" and not doc["mismatches"], doc["status"]
    bad = subprocess.run([sys.executable, "-m", "gmod_ext.bench", "layer", "--attention", "flash"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'flash'" in bad.stderr


def test_experiment_probe_code_runs_on_cpu():
    """The probe's own code (the forward and backward ops' calls and their outputs unpacked) runs and
    prints OK where the ops run: a probe that always failed would hide every experiment's timing."""
    from gmod_ext.bench import attention as ba

    res = subprocess.run([sys.executable, "-c", ba._PROBE_CODE.format(d=64, device="cpu")], capture_output=True,
                         text=True, timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-2000:]


# ----------------------------------------------------------------------------- bench model --layers auto
def _saved_activation_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves for the backward of a training forward, parameters
    excluded (what the forward adds to memory until the backward frees it)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("dims", [(256, 688, 1024), (128, 512, 3000)])
def test_train_memory_estimate_matches_saved_activations(dims):
    """bench model --layers auto picks the layer count from train_memory_bytes: its activation term must
    match what autograd really saves for transformers' Llama (bf16, SDPA), per layer and for the rest."""
    import torch

    from gmod_ext.bench.model import build_model, param_count, train_memory_bytes

    D, I, V = dims
    z = dict(B=1, S=96, D=D, H=D // 64, Hk=D // 128, I=I, V=V)
    got, est = {}, {}
    for L in (1, 3):
        model = build_model(dict(z, L=L), torch.device("cpu"), torch.bfloat16, seed=L)
        assert sum(p.numel() for p in model.parameters()) == param_count(z, L)
        model.train()
        ids = torch.randint(0, V, (z["B"], z["S"]), generator=torch.Generator().manual_seed(L))
        got[L] = _saved_activation_bytes(model, ids)
        est[L] = train_memory_bytes(z, L, 2)["activations"]
    per_layer, rest = (got[3] - got[1]) / 2, got[1] - (got[3] - got[1]) / 2
    est_layer, est_rest = (est[3] - est[1]) / 2, est[1] - (est[3] - est[1]) / 2
    assert abs(est_layer - per_layer) <= 0.03 * per_layer, (est_layer, per_layer)
    assert abs(est_rest - rest) <= 0.05 * rest, (est_rest, rest)


def test_fit_layers_takes_the_most_layers_that_fit():
    """--layers auto: counts whose estimate exceeds the free memory are not tried; an out-of-memory error in
    the trial step moves to the next count; the notes say why; nothing fits -> a clear error."""
    import torch

    from gmod_ext.bench import model as mb

    z = dict(mb.SIZES["full"])
    assert mb.param_count(z, 32) == 6_738_415_616  # LLaMA-7B's published parameter count
    est = {L: mb.train_memory_bytes(z, L, 2)["total"] for L in mb.LAYER_CHOICES}
    assert est[32] > est[24] > est[16] > est[8]
    built, tried = [], []

    def build(L):
        built.append(L)
        return f"model{L}"

    def trial_oom_above(limit):
        def trial(m):
            L = int(m[5:])
            tried.append(L)
            if L > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return trial

    # everything fits by the estimate; the trial fails at 32 and 24
    model, L, notes = mb.fit_layers(z, None, torch.bfloat16, 0, None, None, free_bytes=2 * est[32],
                                    build=build, trial=trial_oom_above(16))
    assert (model, L) == ("model16", 16) and tried == [32, 24, 16]
    assert len(notes) == 2 and "32 layers: out of memory" in notes[0] and "24 layers" in notes[1]
    # an 80 GB GPU: the estimate rules out 32 and 24 without building them
    built.clear(), tried.clear()
    free = int(est[24] / mb.MEMORY_SHARE) - 1
    model, L, notes = mb.fit_layers(z, None, torch.bfloat16, 0, None, None, free_bytes=free, build=build,
                                    trial=trial_oom_above(64))
    assert L == 16 and built == [16] and "32/24 layers skipped" in notes[0]
    # nothing fits: the smallest count is still tried, then a RuntimeError that lists the attempts
    with pytest.raises(RuntimeError, match="not even the smallest"):
        mb.fit_layers(z, None, torch.bfloat16, 0, None, None, free_bytes=1, build=build, trial=trial_oom_above(0))


def test_layers_option_parsing():
    from gmod_ext.bench.__main__ import _parser

    p = _parser()
    assert p.parse_args(["model"]).layers is None
    assert p.parse_args(["model", "--layers", "auto"]).layers is None
    assert p.parse_args(["model", "--layers", "16"]).layers == 16
    for bad in ("0", "x", "-3"):
        with pytest.raises(SystemExit):
            p.parse_args(["model", "--layers", bad])
