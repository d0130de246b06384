"""scripts/decode_split_sweep.py (the decode split-count sweep a GPU session runs): --help explains
it, and without a GPU it says so and exits with 3 instead of failing later."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "decode_split_sweep.py"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_help_names_the_env_flag_and_the_model():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    assert "GMOD_ATTN_DECODE_SPLITS" in res.stdout and "decode_num_splits" in res.stdout
    assert "--splits" in res.stdout and "--json" in res.stdout
    assert "--stages" in res.stdout and "GMOD_ATTN_DECODE_STAGES" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_without_a_gpu_exits_3_with_a_message():
    res = _run("--B", "1", "--L", "4096")
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert "needs a CUDA device" in res.stderr
