"""scripts/gpu_check.sh, the one command a GPU session runs, exercised on the CPU.

A GPU call is scarce (30 minutes a session), so the script's own logic must not be what fails there:
its step selection, the benchmark steps (which run on the CPU at tiny shapes), and the summary that
parses their JSON and prints it last. The CUDA-only steps (build with nvcc, sanitizers, ncu) are not
run here.
"""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path, steps: str, timeout: int = 600):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, GMOD_GPU_CHECK_STEPS=steps)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _steps(tmp_path) -> dict:
    rows = [l.split("\t") for l in (tmp_path / "out" / "steps.tsv").read_text().splitlines() if l.strip()]
    return {r[0]: r[1] for r in rows}


def test_help_lists_the_steps():
    proc = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for word in ("GMOD_GPU_CHECK_STEPS", "bench_attention", "wgmma_selftest", "decode_sweep", "ncu_nvtx", "demo",
                 "Exit status"):
        assert word in proc.stdout, word


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.cuda.is_available(), reason="needs nvcc and no GPU")
def test_wgmma_selftest_step_builds_and_says_why_it_cannot_run_here(tmp_path):
    """The wgmma_selftest step compiles scripts/wgmma_selftest.cu for sm_90a with nvcc alone; on a machine
    without an sm_90 GPU the program refuses to run (exit 99) and the step is a FAIL that says so."""
    proc = _run(tmp_path, "wgmma_selftest", timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _steps(tmp_path) == {"wgmma_selftest": "FAIL"}
    log = (tmp_path / "out" / "wgmma_selftest.log").read_text()
    assert "needs a compute capability 9.0 GPU" in log, log[-2000:]


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    proc = _run(tmp_path, "bench_opz", timeout=60)
    assert proc.returncode == 2
    assert "unknown step 'bench_opz'" in proc.stderr and "bench_ops" in proc.stderr
    assert not (tmp_path / "out" / "steps.tsv").read_text().strip()  # no step ran


def test_pack_leaves_two_files_holding_everything(tmp_path, monkeypatch):
    """GMOD_GPU_CHECK_PACK=1: the device tool brings back at most 8 files, so $OUT ends with summary.txt and
    gpu_check.tgz, and the archive holds every log the steps wrote."""
    monkeypatch.setenv("GMOD_GPU_CHECK_PACK", "1")
    proc = _run(tmp_path, "info", timeout=120)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.tgz", "summary.txt"], proc.stdout[-2000:]
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {pathlib.PurePosixPath(n).name for n in tar.getnames()}
    assert {"steps.tsv", "info.log", "summary.txt"} <= names


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark steps run at full size: "
                    "there, run scripts/gpu_check.sh itself")
def test_benchmark_steps_and_summary_on_cpu(tmp_path):
    proc = _run(tmp_path, "bench,bench_layer,bench_model")
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert _steps(tmp_path) == {s: "ok" for s in ("bench_ops", "bench_attention", "bench_layer", "bench_model")}
    out = tmp_path / "out"
    for name in ("bench_ops", "bench_attention", "bench_layer", "bench_model"):
        doc = json.loads((out / f"{name}.json").read_text())
        assert doc["status"] == "ok" and not doc["mismatches"], (name, doc["mismatches"])
    # bench_attention runs with --experiments: the gmod-exp rows are in its JSON
    att = json.loads((out / "bench_attention.json").read_text())
    assert any(r["impl"] == "gmod-exp" for r in att["sections"]["prefill"]["rows"])
    # the summary is the last thing printed (the device tool returns only the output's tail), and
    # it carries a line per benchmark, the model's speed-ups against issue 7's targets among them
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().splitlines()[-1].startswith("overall: ok (")
    assert summary.strip() in proc.stdout
    for needle in ("-- ops (ok)", "-- attention (ok)", "-- kernel experiments", "-- layer (ok)", "-- model (ok)",
                   "same-size copy", "train step"):
        assert needle in summary, (needle, summary[-2000:])
    model_rows = json.loads((out / "bench_model.json").read_text())["sections"]["model"]["rows"]
    prefill = next(r for r in model_rows if r["impl"] != "dense" and r["pass"] == "prefill")
    assert f"{1.0 / prefill['x_dense']:.2f}x" in summary


def test_demo_step_on_cpu(tmp_path, monkeypatch):
    """The named demo step runs the main job and puts its dense vs gamma-MoD numbers in the summary."""
    monkeypatch.setenv("GMOD_GPU_DEMO_ARGS", "--device cpu --steps 3 --pretrain-steps 2 --baseline-steps 2 "
                       "--seq-len 40 --batch-size 2 --gen-batch-size 2 --no-plot")
    proc = _run(tmp_path, "demo", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert _steps(tmp_path) == {"demo": "ok"}
    report = json.loads((tmp_path / "out" / "demo" / "report.json").read_text())
    summary = (tmp_path / "out" / "summary.txt").read_text()
    line = next(l for l in summary.splitlines() if l.startswith("demo "))
    assert "cpu float32, 3 steps" in line and "first answer token" in line, line
    assert f"gamma-MoD {report['heldout']['gmod']['loss']:.3f}" in line, line


def test_cuda_steps_fail_cleanly_without_the_tools(tmp_path):
    """Without compute-sanitizer / ncu the step is a recorded FAIL, the script goes on and exits 1; the
    tests step (pytest -m cuda) with every test skipped (no GPU) is a FAIL too, not a silent ok."""
    if shutil.which("compute-sanitizer") or shutil.which("ncu") or torch.cuda.is_available():
        pytest.skip("this machine has a GPU or the CUDA tools")
    proc = _run(tmp_path, "memcheck,ncu,tests,bench_attention_det")
    assert proc.returncode == 1, proc.stdout[-2000:]
    st = _steps(tmp_path)
    assert st == {"memcheck": "FAIL", "ncu": "FAIL", "tests": "FAIL", "tests_wgmma": "FAIL",
                  "bench_attention_det": "ok"}, st
    assert "no test passed" in (tmp_path / "out" / "steps.tsv").read_text()
    assert "overall: FAILURES" in proc.stdout


def test_sanitize_ops_script_on_cpu():
    """scripts/sanitize_ops.py (what memcheck / racecheck / ncu run) with --device cpu: every case,
    the opt-in kernel plans included, runs and matches the CPU kernels."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitize_ops.py"), "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "7 ok, 0 skipped, 0 failed" in proc.stdout, proc.stdout[-1000:]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import sanitize_ops
    finally:
        sys.path.pop(0)
    plans = [flags for flags, _, _ in sanitize_ops._attn_runs(False) if flags]
    # GMOD_ATTN_FWD_IMPL / GMOD_ATTN_BWD_IMPL=wgmma run only where they can (an sm_90 GPU with the sm_90a
    # kernels built).
    wgmma = {"GMOD_ATTN_FWD_IMPL", "GMOD_ATTN_BWD_IMPL"}
    others = {"GMOD_ATTN_FWD_BLOCK_N", "GMOD_ATTN_BWD_BLOCK_N", "GMOD_ATTN_DECODE_SPLITS", "GMOD_ATTN_PDL",
              "GMOD_ATTN_DECODE_STAGES"}
    assert {k for f in plans for k in f} - wgmma == others
    assert {k for f, _ in sanitize_ops._ATTN_PLANS for k in f} == wgmma | others


def test_ncu_summary_on_a_synthetic_csv(tmp_path):
    """scripts/ncu_summary.py on `ncu --csv --page details` rows: one line per launch in launch order,
    durations converted to us, template arguments kept (the tile plan) but shortened, stall reasons."""
    cols = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
            "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
    fwd = ("void gmod::attn::gmod_attn_fwd_tc_kernel<gmod::attn::TcFwdTraits<128, 128, 64>, __nv_bfloat16, "
           "false, false, true>(gmod::attn::AttnFwdParams)")
    dec = fwd.replace("false, false, true", "true, true, false")
    metrics = {
        (0, fwd): [("Duration", "msecond", "1.25"), ("Memory Throughput", "%", "41.2"),
                   ("Compute (SM) Throughput", "%", "77.5"), ("DRAM Throughput", "%", "12.0"),
                   ("Achieved Occupancy", "%", "12.4"), ("Registers Per Thread", "register/thread", "255"),
                   ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "%", "61.3"),
                   ("smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio", "", "0.31"),
                   ("smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio", "", "1.52"),
                   ("smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio", "", "0.07"),
                   ("smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio", "", "0.44")],
        (1, dec): [("Duration", "usecond", "9.80"), ("DRAM Throughput", "%", "70.1")],
        (2, "gmod_attn_decode_combine_kernel(gmod::attn::AttnFwdParams)"): [("Duration", "nsecond", "2,500")],
    }
    path = tmp_path / "ncu.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(cols)
        for (i, name), ms in metrics.items():
            for metric, unit, value in ms:
                w.writerow([i, 1, "python3", "h", name, 1, 7, "(128, 1, 1)", "(16, 32, 4)", 0, "9.0", "S", metric,
                            unit, value])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ncu_summary.py"), str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:2] == ["gmod_attn_fwd_tc_kernel<TcFwdTraits<128,128,64>,bf16,0,0,1>", "1250.0"]
    assert lines[1].split()[2:] == ["41.2", "77.5", "12.0", "61.3", "12.4", "255"]
    assert lines[2].split()[:2] == ["gmod_attn_fwd_tc_kernel<TcFwdTraits<128,128,64>,bf16,1,1,0>", "9.8"]
    assert lines[3].split()[:2] == ["gmod_attn_decode_combine_kernel", "2.5"]
    assert "3 kernels profiled" in lines
    stall = [l for l in lines if l.startswith("stalls")]
    assert len(stall) == 1 and stall[0].endswith("math_pipe_throttle 1.52, mio_throttle 0.44, barrier 0.31")


def test_decode_timeline_groups_kernels_into_calls():
    """scripts/decode_timeline.py splits the profiler's gmod_attn kernels into calls: a split kernel and the
    combine after it (gap = combine start - split end, negative when PDL overlaps them), a lone kernel
    when the cache is not split, and a combine cut off from its split kernel is dropped."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from decode_timeline import split_calls
    finally:
        sys.path.pop(0)
    ks = [("void gmod_attn_decode_combine_kernel<...>", 0.0, 3.0),  # its split kernel was before the profile
          ("void gmod_attn_fwd_tc_kernel<..., true, true>", 10.0, 22.0),
          ("void gmod_attn_decode_combine_kernel<...>", 25.0, 29.0),
          ("void gmod_attn_fwd_tc_kernel<..., true, true>", 40.0, 52.0),
          ("void gmod_attn_decode_combine_kernel<...>", 51.0, 54.5),  # PDL: starts before the split ends
          ("void gmod_attn_fwd_tc_kernel<..., true, false>", 60.0, 61.5)]
    calls = split_calls(ks)
    assert calls == [{"split": 12.0, "combine": 4.0, "gap": 3.0, "span": 19.0},
                     {"split": 12.0, "combine": 3.5, "gap": -1.0, "span": 14.5},
                     {"split": 1.5, "combine": None, "gap": None, "span": 1.5}]


def test_decode_timeline_rotation_count():
    """The rotate mode's distinct caches: together >= 4x the L2, at least 2, within the memory budget."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from decode_timeline import rotation_count
    finally:
        sys.path.pop(0)
    mib = 2**20
    l2 = 50 * mib
    n = rotation_count(16 * mib, l2, 10_000 * mib)  # batch 1 at 4k tokens: 16 MiB per cache
    assert n == 13 and n * 16 * mib >= 4 * l2 and (n - 1) * 16 * mib < 4 * l2
    assert rotation_count(512 * mib, l2, 10_000 * mib) == 2  # one cache already 10x the L2: still two
    assert rotation_count(16 * mib, l2, 100 * mib) == 6  # the memory budget caps it
    assert rotation_count(512 * mib, l2, 100 * mib) == 2  # never fewer than two
    assert rotation_count(mib // 8, l2, 10_000 * mib) == 256  # at most 256


def test_decode_timeline_dry_run_on_cpu(tmp_path):
    """The script's whole loop (both modes, both stage settings, the copy rows, the JSON) on the CPU
    kernels, so that a slip in it does not cost a GPU call; the profiler finds no CUDA kernels there."""
    out = tmp_path / "dt.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "decode_timeline.py"), "--device", "cpu",
                           "--B", "1", "--L", "256", "--Hq", "4", "--Hk", "2", "--d", "64", "--calls", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["pdl"], r["stages"]) for r in rows] == [("flush", 1, 2), ("flush", 1, 3), ("rotate", 1, 2),
                                                                  ("rotate", 1, 3)]
    assert [r["caches"] for r in rows] == [1, 1, 256, 256]  # 128 KiB caches: capped at 256
    for r in rows:
        assert r["event_us"] > 0 and r["copy_us"] > 0 and r["ideal_us"] > 0
        assert r["split_us"] is None and r["calls"] == 0  # no CUDA kernels on the CPU
    assert "rotate" in proc.stdout and "copy us" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_decode_timeline_step_without_a_gpu(tmp_path):
    proc = _run(tmp_path, "decode_timeline", timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert _steps(tmp_path) == {"decode_timeline": "FAIL"}
    assert "needs a CUDA device" in (tmp_path / "out" / "decode_timeline.log").read_text()


def _verdicts_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_verdicts
    finally:
        sys.path.pop(0)
    return gpu_verdicts


def _prefill_rows(p, gmod_vs_flash, exp_vs_default, exp_vs_flash, checks=None):
    shapes = [("8x1024", 128), ("4x2048", 128), ("2x4096", 64)]
    rows = []
    for i, (shape, d) in enumerate(shapes):
        rows.append({"shape": shape, "d": d, "pass": p, "impl": "gmod", "check": "ok (rel 1e-3)",
                     "vs_flash": gmod_vs_flash[i]})
        rows.append({"shape": shape, "d": d, "pass": p, "impl": "gmod-exp",
                     "check": (checks or ["ok"] * 3)[i], "vs_default": exp_vs_default[i],
                     "vs_flash": exp_vs_flash[i]})
        rows.append({"shape": shape, "d": d, "pass": p, "impl": "sdpa-flash", "vs_flash": 1.0})
    return rows


def test_gpu_verdicts_attention_rules():
    """scripts/gpu_verdicts.py: switch back to the mma.sync kernels only when every check is ok and they are
    faster at every shape; the target line names the shapes under it; the plain decode launch needs no loss
    below 0.99x and a gain."""
    v = _verdicts_module()
    att = {"sections": {"prefill": {"rows":
        _prefill_rows("fwd", [0.92, 0.91, 0.94], [1.2, 1.15, 1.1], [1.1, 1.05, 1.03])
        + _prefill_rows("bwd", [0.77, 0.75, 0.73], [1.2, 0.97, 1.1], [0.92, 0.73, 0.8],
                        checks=["ok", "ok", "MISMATCH dq"])},
        "decode": {"rows": [
            {"B": 1, "L": 4096, "impl": "gmod", "check": "ok", "pct_copy": 28.0},
            {"B": 1, "L": 4096, "impl": "gmod-exp", "check": "ok", "pct_copy": 33.0, "vs_default": 1.18},
            {"B": 32, "L": 4096, "impl": "gmod", "check": "ok", "pct_copy": 87.0},
            {"B": 32, "L": 4096, "impl": "gmod-exp", "check": "ok", "pct_copy": 86.8, "vs_default": 0.995}]}}}
    text = "\n".join(v.attention_lines(att) + v.decode_lines(att))
    assert "attention fwd: gmod vs SDPA flash 0.91-0.94 (target >= 1.0: not met at 3/3" in text
    assert "GMOD_ATTN_FWD_IMPL=mma: checks ok; vs the default 1.10-1.20, faster at 3/3 -> make it the default: YES" in text
    assert "best of the two vs flash 1.03-1.10: target met" in text
    bwd = [l for l in text.splitlines() if "GMOD_ATTN_BWD_IMPL" in l][0]
    assert "NOT all ok: MISMATCH dq" in bwd and "faster at 2/3" in bwd and bwd.endswith(
        "make it the default: NO (rule: every check ok and faster at every shape)")
    assert "decode: gmod 28-87% of copy bandwidth (target >= 70 at every shape: not met at 1/2: B1 L4096 28%)" in text
    assert "GMOD_ATTN_DECODE_STAGES=3: checks ok; vs the default 0.99-1.18 -> make it the default: YES" in text
    assert "per shape (B, cache: x the default): B1 L4096 1.18, B32 L4096 0.99" in text
    att["sections"]["decode"]["rows"][3]["vs_default"] = 0.97  # a loss beyond noise at batch 32
    assert "-> make it the default: NO" in "\n".join(v.decode_lines(att))


def test_gpu_verdicts_model_and_timeline(tmp_path):
    v = _verdicts_module()
    mod = {"sections": {"model": {"rows": [
        {"impl": "dense", "pass": "prefill", "x_dense": 1.0}, {"impl": "dense", "pass": "train step", "x_dense": 1.0},
        {"impl": "gamma-MoD", "pass": "prefill", "x_dense": 1 / 1.74},
        {"impl": "gamma-MoD", "pass": "train step", "x_dense": 1 / 1.46},
        {"impl": "gamma-MoD gmod", "pass": "train step", "x_dense": 1 / 1.49}]}}}
    tl = {"rows": [
        {"B": 1, "L": 4096, "mode": "flush", "pdl": 0, "event_us": 19.8, "copy_us": 8.7, "span_us": 9.0,
         "split_us": 6.0, "combine_us": 2.0, "ideal_us": 5.5},
        {"B": 1, "L": 4096, "mode": "rotate", "pdl": 0, "event_us": 11.0, "copy_us": 8.0, "span_us": 9.0,
         "split_us": 6.0, "combine_us": 2.0, "ideal_us": 5.5}]}
    (tmp_path / "bench_model.json").write_text(json.dumps(mod))
    (tmp_path / "decode_timeline.json").write_text(json.dumps(tl))
    text = "\n".join(v.verdicts(str(tmp_path)))
    assert "model: gamma-MoD vs dense: prefill 1.74x (target 1.7: met); train step 1.46x (target 1.5: NOT met)" in text
    assert "gamma-MoD gmod 1.49x -> keep the default: NO (switch auto to gmod)" in text
    assert "event 19.8 us, kernels 9.0 (split 6.0, combine 2.0), outside them 10.8, ideal 5.5" in text
    assert "B1 L4096 PDL 0 stages 2: rotating caches take 8.8 us off the call, 0.7 us off a same-size copy" in text
    assert "much more than a copy" in text
    # the command line: no JSON at all is said, not an error
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_verdicts.py"), str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "no benchmark JSON found" in proc.stdout
