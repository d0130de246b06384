"""The README's code is run, not just read: its Python examples execute (and do what their comments
say, checked against plain torch), the files it points to exist, and every GMOD_* switch the library
reads is documented there. A README that drifts from the code fails here first.
"""
from __future__ import annotations

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Switches the library reads that are test / benchmark hooks, not user settings.
UNDOCUMENTED_HOOKS = {"GMOD_BENCH_HIDE_OPS"}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)


def run_block(index: int, tmp_path, monkeypatch) -> dict:
    blocks = python_blocks()
    assert len(blocks) >= 2, "README: expected the quick start and the op example as ```python blocks"
    monkeypatch.chdir(tmp_path)  # the quick start saves a model into the working directory
    ns: dict = {"__name__": "__readme__"}
    exec(compile(blocks[index], f"README.md python block {index + 1}", "exec"), ns)  # noqa: S102
    return ns


def test_quick_start_runs_and_round_trips(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)  # the block draws its model and tokens: one fixed draw
    ns = run_block(0, tmp_path, monkeypatch)
    model, again, ids = ns["model"], ns["again"], ns["ids"]
    printed = capsys.readouterr().out
    assert "'skip_ratio'" in printed and "KV cache" in printed, printed  # gmod_stats() and the memory report

    layers = list(model.config.gmod["layers"])
    assert 0 < len(layers) < model.config.num_hidden_layers, layers  # ARank converted some, not all
    stats = model.gmod_stats()
    assert 0.0 < stats["skip_ratio"] < 1.0, stats  # the training forward skipped tokens
    assert torch.isfinite(ns["out"].loss)
    # every trainable parameter, routers included, got a gradient from the one backward
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]
    # the generated continuation has the 16 new tokens
    assert ns["gen"].sequences.shape == (4, 32 + 16)
    # prompt-lookup decoding gives plain greedy's tokens
    one = ns["one"]
    with torch.no_grad():
        greedy = model.generate(one, attention_mask=torch.ones_like(one), pad_token_id=0, max_new_tokens=16,
                                do_sample=False)
    assert ns["fast"].shape == (1, 32 + 16) and torch.equal(ns["fast"], greedy)

    # "routers + settings kept": the reloaded model is the same function
    assert list(again.config.gmod["layers"]) == layers
    model.eval(), again.eval()
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_op_example_runs_and_matches_plain_torch(tmp_path, monkeypatch):
    ns = run_block(1, tmp_path, monkeypatch)
    x, logits, idx, count, h, y = (ns[k] for k in ("x", "logits", "idx", "count", "h", "y"))
    # shapes and dtypes stated in the comments
    assert logits.shape == (2, 16) and logits.dtype == torch.float32
    assert h.shape == (2, 8, 64) and y.shape == (2, 16, 64)
    # "top half per row": the 8 highest logits of each row, in ascending position order
    assert count.tolist() == [8, 8]
    expect = torch.sort(torch.topk(logits, 8, dim=1).indices, dim=1).values
    assert torch.equal(idx.long(), expect)
    # gather and merge against indexing in plain torch
    rows = torch.arange(2)[:, None]
    torch.testing.assert_close(h, x[rows, expect], rtol=0, atol=0)
    ref = x.clone()
    ref[rows, expect] = h + torch.tanh(h)
    torch.testing.assert_close(y, ref)


def test_paths_in_readme_exist():
    paths = set(re.findall(r"(?<![\w/.])((?:scripts|csrc|gmod_ext|python_tests)/[\w/.-]*\w)(?![\w*/.<-])", README))
    assert paths, "README names no files?"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README points to files that do not exist: {missing}"


def test_every_switch_the_library_reads_is_documented():
    sources = [*ROOT.glob("gmod_ext/**/*.py"), *ROOT.glob("csrc/**/*.c*"), *ROOT.glob("csrc/**/*.h")]
    read = set()
    for f in sources:
        read |= set(re.findall(r"\"(GMOD_[A-Z0-9_]+)\"", f.read_text()))
    assert "GMOD_TRUST_INDICES" in read  # the scan finds the switches at all
    undocumented = sorted(read - UNDOCUMENTED_HOOKS - set(re.findall(r"GMOD_[A-Z0-9_]+", README)))
    assert not undocumented, f"GMOD_* switches read by the library but not in README.md: {undocumented}"


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m (gmod_ext[\w.]*)", README))))
def test_modules_run_by_readme_exist(module):
    import importlib.util

    assert importlib.util.find_spec(module) is not None, module
