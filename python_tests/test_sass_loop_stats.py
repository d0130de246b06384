"""scripts/sass_loop_stats.py: main-loop detection and instruction classes on hand-written SASS.

The script reads cuobjdump output; these tests feed its parser-free parts a small synthetic listing
(two loops, one with tensor-core MMAs, spills and a predicated branch) so the numbers it reports
for real builds rest on checked logic. A real disassembly runs only where cuobjdump and a CUDA
build exist (README, "The CUDA attention kernels").
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sass_loop_stats.py"


@pytest.fixture(scope="module")
def sls():
    spec = importlib.util.spec_from_file_location("sass_loop_stats", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _listing():
    # address, text: a setup block, a small loop without MMAs (0x40-0x60), the main loop
    # (0x80-0x110) with 2 HMMA, 1 LDSM, 1 LDGSTS, 1 MUFU, 1 LDL, 1 STL and 3 other instructions,
    # whose body also holds a forward branch, then the exit.
    return [
        (0x00, "S2R R0, SR_TID.X"),
        (0x10, "MOV R1, c[0x0][0x28]"),
        (0x40, "IADD3 R2, R2, 0x1, RZ"),
        (0x50, "ISETP.GE.AND P0, PT, R2, 0x8, PT"),
        (0x60, "@!P0 BRA 0x40"),
        (0x80, "LDGSTS.E.BYPASS.128 [R3+0x8800], desc[UR6][R4.64], !P1"),
        (0x90, "LDSM.16.M88.4 R8, [R3]"),
        (0xA0, "HMMA.16816.F32.BF16 R12, R8, R16, R12"),
        (0xB0, "@P2 BRA 0xd0"),
        (0xC0, "HMMA.16816.F32.BF16 R20, R8, R18, R20"),
        (0xD0, "MUFU.EX2 R24, R24"),
        (0xE0, "LDL R25, [R1+0x4]"),
        (0xF0, "STL [R1+0x8], R26"),
        (0x100, "FMUL R27, R27, R28"),
        (0x110, "@!P3 BRA 0x80"),
        (0x120, "EXIT"),
    ]


def test_opcode_strips_predicates_and_modifiers(sls):
    assert sls.opcode("@!P0 BRA 0x40") == "BRA"
    assert sls.opcode("@UP1 LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64]") == "LDGSTS"
    assert sls.opcode("HMMA.16816.F32.BF16 R12, R8, R16, R12") == "HMMA"


def test_main_loop_is_the_largest_loop_with_mma(sls):
    body = sls.main_loop(_listing())
    assert len(body) == 10 and body[0].startswith("LDGSTS") and body[-1] == "@!P3 BRA 0x80"
    s = sls.stats(body)
    assert s == {"HMMA": 2, "LDSM": 1, "LDGSTS": 1, "MUFU": 1, "spill": 2, "total": 10, "other": 3}


def test_main_loop_falls_back_to_the_largest_loop(sls):
    no_mma = [(a, t) for a, t in _listing() if "HMMA" not in t]
    body = sls.main_loop(no_mma)
    assert len(body) == 8 and sls.stats(body)["HMMA"] == 0
    straight = [(a, t) for a, t in _listing() if "BRA" not in t]
    assert sls.main_loop(straight) == []


def test_hgmma_counts_as_mma(sls):
    """The sm_90a wgmma kernel's loop has HGMMA instead of HMMA: it is found as the main loop and counted."""
    wg = [(a, t.replace("HMMA.16816.F32.BF16 R12, R8, R16, R12", "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], R24"))
          for a, t in _listing() if "HMMA.16816.F32.BF16 R20" not in t]
    body = sls.main_loop(wg)
    assert body[0].startswith("LDGSTS") and sls.stats(body)["HMMA"] == 1


def test_help_runs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--compare" in out.stdout and "main loop" in out.stdout
