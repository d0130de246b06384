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


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("audit_architectures", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_audit_reports_converted_and_refused_architectures(tmp_path):
    """llama converts exactly, beam is refused; two that build only with ARCH_FIXES: Cohere Compass (its
    NoPE full-attention layers, which once failed inside the MoD layer) converts exactly, BLT (whose byte-level
    local encoder needs patch ids, which once crashed the check) is refused with the reason; Gemma 4's multimodal
    model (per-layer inputs, layer scalars) converts exactly. With --autocast bf16 each that converts is also
    within the flash rule of float32 under autocast and trains a step there (llama's line says by how much)."""
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "llama", "beam", "cohere_compass_text", "blt", "gemma4",
                           "--autocast", "bf16", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    assert doc["llama"].startswith("OK ") and float(doc["llama"].split()[1].rstrip(",")) < 1e-5
    words = doc["llama"].split()
    assert words[2] == "autocast" and 0 < float(words[3]) <= 2 * float(words[5].rstrip(")")) + 0.04
    assert doc["beam"].startswith("refused: gmod.convert: BeamForCausalLM") \
        and "not a block a MoD layer reproduces" in doc["beam"]
    assert doc["cohere_compass_text"].startswith("OK ") and float(doc["cohere_compass_text"].split()[1].rstrip(",")) < 1e-5
    assert doc["blt"].startswith("refused: gmod.convert: BltLocalEncoder") and "token ids alone" in doc["blt"]
    assert doc["gemma4"].startswith("OK ") and float(doc["gemma4"].split()[1].rstrip(",")) < 1e-5
    assert all("autocast" in doc[a] for a in ("llama", "cohere_compass_text", "gemma4"))
    assert "summary: OK 3, refused 2" in proc.stdout


def test_audit_exit_status_flags_a_silent_wrong_answer(tmp_path, monkeypatch):
    """The summary's exit status is what a CI job would read: a SILENT-WRONG line makes it 1."""
    mod = _load_script()

    class Done:
        def __init__(self, line):
            self.stdout, self.returncode = f"RESULT {line}\n", 0

    answers = {"a": "OK 3.0e-07", "b": "SILENT-WRONG 2.0e-03", "c": "OK 3.0e-07, autocast 7.0e-03 (dense 6.2e-03)",
               "d": "CRASH under autocast (training step): TypeError: dtype (float32: OK 3.0e-07)",
               "e": "AUTOCAST-WRONG 5.0e-02 (dense 6.2e-03) (float32: OK 3.0e-07)"}
    monkeypatch.setattr(mod.subprocess, "run", lambda cmd, **kw: Done(answers[cmd[-1]]))
    assert mod.main(["a"]) == 0
    assert mod.main(["a", "b"]) == 1
    assert mod.main(["a", "c", "--autocast", "bf16"]) == 0
    assert mod.main(["c", "d", "--autocast", "bf16"]) == 1
    assert mod.main(["c", "e", "--autocast", "bf16"]) == 1


def test_apply_fix_sets_fields_sub_config_fields_or_calls_a_function():
    """ARCH_FIXES entries: None leaves the config, a dict sets fields (a dict on a sub-config object sets its
    fields, a dict on a plain field replaces it), a function returns the fixed config."""
    from types import SimpleNamespace

    mod = _load_script()
    cfg = SimpleNamespace(a=1, sub=SimpleNamespace(x=1, y=2), rope={})
    assert mod.apply_fix(cfg, None) is cfg and cfg.a == 1
    assert mod.apply_fix(cfg, {"a": 5, "sub": {"x": 7}, "rope": {"full": None}}) is cfg
    assert (cfg.a, cfg.sub.x, cfg.sub.y, cfg.rope) == (5, 7, 2, {"full": None})
    assert mod.apply_fix(cfg, lambda c: "fixed") == "fixed"
    assert all(callable(f) or isinstance(f, dict) for f in mod.ARCH_FIXES.values())


def test_has_treats_a_per_layer_field_as_absent():
    """A heterogeneous config's per-layer field raises on global access (not AttributeError): the shrink skips it."""
    mod = _load_script()

    class PerLayer:
        @property
        def head_dim(self):
            raise RuntimeError("per-layer attribute")

    assert not mod._has(PerLayer(), "head_dim") and mod._has(PerLayer(), "__class__")


def test_rebuilt_builds_the_config_again_from_tiny_values_and_the_fix_fields():
    import dataclasses

    mod = _load_script()

    @dataclasses.dataclass
    class Config:
        hidden_size: int = 4096
        num_hidden_layers: int = 32
        extra: int = 0

    cfg = mod._rebuilt(extra=3, num_hidden_layers=2)(Config())
    assert cfg == Config(hidden_size=mod.TINY["hidden_size"], num_hidden_layers=2, extra=3)
