"""CUDA kernels run on the CPU through the host emulation (csrc/cuda/emu/).

csrc/cuda/emu/attention_emu_test.cpp compiles the kernel headers (SIMT and tensor-core forward,
split-k decode and combine, backward) as plain C++ against csrc/cuda/emu/cuda_emu.h, which emulates
threads, barriers, shuffles, ldmatrix / mma.sync.m16n8k16 fragments, cp.async and (for the sm_90a
forward and backward) wgmma.mma_async with its shared-memory descriptors, and compares every
output with a float64 reference on random problems (lengths 0 and 1, GQA, decode packing, splits,
causal offsets across tiles, NaN-poisoned padding). This test builds it with the host compiler and
runs its CI-sized sets (modes ci, wgmma-ci, wgmmabwd-ci, deepdecode), so the kernels' index math,
fragment layouts and synchronisation order are checked on every CI run, GPU or not.

csrc/cuda/emu/router_logits_emu_test.cpp does the same for the
router_logits row-block kernel, forward and backward (CPT 1 / 2 / 4, partial warps, several row
chunks, every dtype), and csrc/cuda/emu/rope_emu_test.cpp for gmod.rope's kernel (every vector width,
partial rotary, the grid-stride loop). Skipped when no C++20 compiler or no CUDA headers (cuda_bf16.h) are found.

CI-sized sets: the emulation (one OS thread per CUDA thread) keeps both cores of the CI machine busy, so
its cost is the number of emulated blocks, and the full sets took 12 of CI's 40 minutes. The CI sets are
the full sets' cases (same shapes, lengths and offsets) with: the forward only where other cases run
the same backward kernels (the backward costs 5-10x the forward here); the backward of the opt-in 128-key
tiles from the reference's o / lse (the 64-key pass runs the same forward kernels on the same problems);
the mma.sync backward's four extra edge cases per head dim (hpc 1, q_len > k_len, square) on fp16 d = 64
of the 64-key tiles only (the full set: one dtype per head dim on both tile sizes), one of the 128-key
tiles' two offset sweeps and none of their short chunks; the wgmma backward's forward on the wgmma kernel. They
reach every kernel instantiation / launch form the full sets reach (each mode prints how many;
GMOD_EMU_KERNELS=1 lists them), save the mma.sync backward with cp.async copies landing at once (which
the full wgmma mode runs incidentally). GMOD_EMU_FULL=1 runs the full sets (quick, wgmma, wgmmabwd).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "csrc" / "cuda" / "emu"


def _cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return Path(c) / "include"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


def _build(tmp_path_factory, name: str) -> Path:
    inc, cxx = _cuda_include(), _compiler()
    if inc is None or cxx is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (set CUDA_HOME)")
    exe = tmp_path_factory.mktemp("emu") / name
    src = EMU / f"{name}.cpp"
    # -O1: a third less build time than -O2 (about 40 s of 60), the same run time (the emulation is syscall-bound)
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", f"-I{ROOT / 'csrc' / 'include'}", f"-I{inc}", str(src), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"building the emulator failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return exe


FULL = os.environ.get("GMOD_EMU_FULL") == "1"


def _run(exe: Path, *args: str) -> str:
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=1200)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"emulated kernels disagree with the float64 reference:\n{out[-6000:]}"
    assert " 0 failures" in out and "FAIL" not in out, out[-3000:]
    return out


@pytest.fixture(scope="module")
def attention_emu(tmp_path_factory):
    return _build(tmp_path_factory, "attention_emu_test")


def test_attention_kernels_match_reference_in_emulation(attention_emu):
    out = _run(attention_emu, "quick" if FULL else "ci")
    # ci: 109 of quick's 140 cases, some forward-only, reaching all 128 of quick's kernel launch forms
    want = "128 kernel launch forms\n140 cases, 0 failures" if FULL else "128 kernel launch forms\n109 cases, 0 failures"
    assert want in out, out[-2000:]


def test_wgmma_forward_matches_reference_in_emulation(attention_emu):
    """The sm_90a wgmma prefill forward (attention_fwd_wgmma_kernel.cuh), with wgmma emulated from the
    PTX ISA's descriptor format, canonical 128-byte-swizzle layouts and fragment layouts, results
    delivered only at wgmma.wait_group (accumulators read NaN before): d = 64 / 128, bf16 / fp16, GQA,
    causal offsets across its 128 x 128 tiles, empty rows, a negative scale; then the backward. Six
    cases x (3 K/V stages, 2 stages, 3 stages with cp.async landing at once). wgmma-ci: the same cases,
    forward only (12 launch forms: 4 dtype / head dim / scale-sign instantiations x the 3 pipelines);
    wgmma (GMOD_EMU_FULL=1): each with the mma.sync backward too."""
    out = _run(attention_emu, "wgmma" if FULL else "wgmma-ci")
    want = "28 kernel launch forms\n18 cases, 0 failures" if FULL else "12 kernel launch forms\n18 cases, 0 failures"
    assert want in out, out[-2000:]


def test_wgmma_backward_matches_reference_in_emulation(attention_emu):
    """The sm_90a wgmma backward dk/dv kernel (attention_bwd_wgmma_kernel.cuh): S^T / dP^T from two
    K-major shared operands, dV / dK with register A and N-major B, dQ = dS K with an M-major A read back
    from the dS^T tile (imm-trans-a) and fp32 atomics; d = 64 / 128, bf16 / fp16, GQA 1 / 2 / 4 with
    dK / dV written directly and atomically, causal offsets across its 128-key / 64-query tiles, empty
    rows, a negative scale. Seven cases x (copies landing at their wait, copies landing at once). The
    forward is the mma.sync one; in wgmmabwd-ci the wgmma one except on the five small cases with copies
    landing at once (28 launch forms, against 26 in wgmmabwd)."""
    out = _run(attention_emu, "wgmmabwd" if FULL else "wgmmabwd-ci")
    forms = "26 kernel launch forms" if FULL else "28 kernel launch forms"
    assert "14 wgmma backward runs" in out and f"{forms}\n14 cases, 0 failures" in out, out[-2000:]


def test_deep_decode_matches_reference_in_emulation(attention_emu):
    """The key-split tensor-core decode with a ring of 3 K / V buffers (TcDecodeKeySplitDeepTile,
    GMOD_ATTN_DECODE_STAGES=3: two tiles in flight): splits of 1, 2, 3, 4 and 11 key tiles, no split,
    k_len cutting a split short, rows with 0 / 1 keys, 16 packed rows of a causal chunk, d = 32 / 64 / 96 /
    128, bf16 / fp16; eight cases with copies landing at their wait (a read before the wait sees the
    poison) and the same with copies landing at once (a copy into a buffer still being read shows).
    Forward only: the backward does not depend on the decode's buffers. Mutation-checked: loading the next
    tile into the buffer of tile nb + 1, waiting for one group fewer, or committing no group for a missing
    prologue tile each fail 6-16 of the 16 runs."""
    out = _run(attention_emu, "deepdecode")
    # per copy mode: 7 cases with splits (split kernel + combine: 2 forms each) and 1 without (the plain kernel)
    assert "30 kernel launch forms\n16 cases, 0 failures" in out, out[-2000:]


def test_wgmma_selftest_passes_in_emulation(tmp_path_factory):
    """scripts/wgmma_selftest.cu (the GPU step that checks each wgmma operand form of the sm_90a kernels on
    its own) built against the host emulation: every case must pass here, so that a FAIL on the H100 means
    the hardware reads that form differently from cuda_emu.h, not a bug of the self-test."""
    inc, cxx = _cuda_include(), _compiler()
    if inc is None or cxx is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (set CUDA_HOME)")
    exe = tmp_path_factory.mktemp("wgmma_selftest") / "wgmma_selftest_emu"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", "-x", "c++", "-DGMOD_SELFTEST_EMU", f"-I{ROOT / 'csrc' / 'cuda'}",
           f"-I{ROOT / 'csrc' / 'include'}", f"-I{inc}", str(ROOT / "scripts" / "wgmma_selftest.cu"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "0 of 6 wgmma cases failed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count("PASS") == 6


def test_router_logits_kernel_matches_reference_in_emulation(tmp_path_factory):
    out = _run(_build(tmp_path_factory, "router_logits_emu_test"), "all")
    assert "cpt=2" in out and "cpt=4" in out, "the wide-D cases did not run"


def test_rope_kernel_matches_the_per_pair_formula_in_emulation(tmp_path_factory):
    """csrc/cuda/emu/rope_emu_test.cpp: gmod.rope's CUDA kernel at every vector width, full and partial rotary,
    a grid-stride loop, forward and backward, bit for bit against a plain loop over the same formula."""
    out = _run(_build(tmp_path_factory, "rope_emu_test"), "all")
    assert out.count(": ok") == 22 and "V=8" in out and "V=1" in out and "blocks=2" in out
