"""scripts/audit_architectures.py (each transformers causal-LM architecture converted in a capped
subprocess, keep-all logits against the dense model's): runs, reports per architecture, writes JSON,
and its exit status fails on a silent wrong answer or a crash."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "audit_architectures.py"


def test_audit_reports_converted_and_refused_architectures(tmp_path):
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "llama", "beam", "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["llama"].startswith("OK ") and float(doc["llama"].split()[1]) < 1e-5
    assert doc["beam"].startswith("refused: gmod.convert: BeamForCausalLM") \
        and "not a block a MoD layer reproduces" in doc["beam"]
    assert "summary: OK 1, refused 1" in proc.stdout


def test_audit_exit_status_flags_a_silent_wrong_answer(tmp_path, monkeypatch):
    """The summary's exit status is what a CI job would read: a SILENT-WRONG line makes it 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("audit_architectures", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Done:
        def __init__(self, line):
            self.stdout, self.returncode = f"RESULT {line}\n", 0

    answers = {"a": "OK 3.0e-07", "b": "SILENT-WRONG 2.0e-03"}
    monkeypatch.setattr(mod.subprocess, "run", lambda cmd, **kw: Done(answers[cmd[-1]]))
    assert mod.main(["a"]) == 0
    assert mod.main(["a", "b"]) == 1
