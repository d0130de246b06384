"""The main job and the end-to-end benchmarks, run as a user would (subprocesses, CPU, small sizes):

* ``python -m gmod_ext demo``: exits 0, prints the report (layers converted, ARank, skip ratio per
  layer, FLOPs, step times, generation, KV memory), writes the PNG and the JSON, and the loss of the
  gamma-MoD fine-tuning falls;
* the demo's KV-memory estimate (used when no compact cache is available) equals the compact
  cache's measured size, and the estimate path itself runs (cache hidden);
* ``python -m gmod_ext.bench layer|model --quick --device cpu --json``: exit 0, tables, JSON keys;
  the layer bench's "n/a (no CPU kernel)" rows when gmod ops are hidden.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOP_KEYS = {"benchmark", "status", "meta", "copy_GBps", "sections", "mismatches", "errors"}


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "2")
    return env


def _run(args, timeout=240, **env_extra):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(**env_extra), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc


# ----------------------------------------------------------------------------- demo
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = _run(["-m", "gmod_ext", "demo", "--steps", "20", "--pretrain-steps", "10", "--baseline-steps", "5",
                 "--batch-size", "4", "--seq-len", "48", "--device", "cpu", "--out", str(out), "--no-progress"])
    text = proc.stdout
    for needle in ("gamma-MoD demo report", "layers converted", "ARank", "skip train", "FLOPs per forward",
                   "training step", "generation (batch 4", "answer tokens right", "held-out batch", "KV memory", "dense KV cache",
                   "gamma-MoD KV cache", "total time"):
        assert needle in text, f"{needle!r} missing from the report:\n{text}"
    png, js = out / "gmod_demo.png", out / "report.json"
    assert png.exists() and png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    for key in ("layers_converted", "arank", "skip_ratio", "flops", "train", "generation", "heldout", "kv_memory",
                "elapsed_s"):
        assert key in doc, key
    L = doc["num_layers"]
    assert L == 8 and len(doc["arank"]) == L
    mod = doc["layers_converted"]
    assert mod and len(mod) == L - 1 and all(0 <= i < L for i in mod)  # ceil(8 / 8) = 1 layer stays dense
    # every MoD layer skipped tokens, dense layers none; the skip ratio of routable tokens is the ratio
    for i in mod:
        assert 0.2 < doc["skip_ratio"]["train"][str(i)] < 0.5
        assert abs(doc["skip_ratio"]["train_routable"][str(i)] - 0.5) < 0.05
    assert doc["flops"]["ratio"] < 0.85 and doc["flops"]["decoder_ratio"] < doc["flops"]["ratio"] + 1e-9
    tr = doc["train"]
    assert len(tr["gmod"]["losses"]) == 20 and len(tr["dense"]["losses"]) == 5
    assert tr["loss_fell"], tr["gmod"]["losses"]
    losses = tr["gmod"]["losses"]
    assert sum(losses[-5:]) / 5 < losses[0], losses
    assert tr["gmod"]["median_step_s"] > 0 and tr["dense"]["median_step_s"] > 0
    for m in ("dense", "gmod"):
        ho = doc["heldout"][m]
        assert 0 < ho["loss"] < 10 and 0 <= ho["answer_accuracy"] <= 1 and ho["samples"] >= 8
        assert 0 <= ho["first_token_accuracy"] <= 1
    gen = doc["generation"]
    assert gen["batch"] == 4 and gen["new_tokens"] == 8 and gen["gmod_s"] > 0
    kv = doc["kv_memory"]
    assert kv["dense_bytes"] > 0
    g = kv["gmod"]
    assert 0 < g["total_bytes"] < g["dense_equivalent_bytes"]
    assert g["dense_equivalent_bytes"] == kv["dense_bytes"]
    assert g["ratio"] < 0.9


def test_demo_text_forcing_keeps_the_answers(tmp_path):
    """The demo's default run (built-in LLaVA pretrained 150 steps, 7 of 8 layers MoD at ratio 0.5, 40
    fine-tuning steps). The dense model has learned the image classes (first answer token right > 0.6 of
    the time), so the run measures what gamma-MoD keeps. With the text forced (the default) gamma-MoD's
    answer-token accuracy stays within 0.1 of dense. With only the question forced (the answer tokens
    routed, convert's default before 2026-11-24) the held-out loss is over 3x higher and the image-dependent
    first token is lost: measured 1.50 vs 0.27 and 0.00 vs 0.58 (dense 0.11 and 0.88)."""
    out = tmp_path / "d"
    _run(["-m", "gmod_ext", "demo", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot"], timeout=500)
    doc = json.loads((out / "report.json").read_text())
    dense, mod = doc["heldout"]["dense"], doc["heldout"]["gmod"]
    assert doc["settings"]["forced"] == "text" and doc["train"]["pretrain"]["steps"] == 150
    assert dense["first_token_accuracy"] > 0.6, dense
    assert mod["answer_accuracy"] > dense["answer_accuracy"] - 0.1, (mod, dense)
    assert doc["flops"]["ratio"] < 0.75, doc["flops"]
    out2 = tmp_path / "d2"
    _run(["-m", "gmod_ext", "demo", "--device", "cpu", "--out", str(out2), "--no-progress", "--no-plot",
          "--forced", "ignored_labels", "--baseline-steps", "0", "--gen-batch-size", "1"], timeout=500)
    mod2 = json.loads((out2 / "report.json").read_text())["heldout"]["gmod"]
    assert mod2["loss"] > 3 * mod["loss"], (mod2, mod)
    assert mod2["first_token_accuracy"] < mod["first_token_accuracy"] - 0.2, (mod2, mod)


@pytest.mark.parametrize("kind", ["llama", "llava", "bloom", "paligemma"])
def test_demo_on_a_user_model_folder(tmp_path, kind):
    """``--model PATH``: a local Hugging Face folder (a Llama ``*ForCausalLM``, a LLaVA, BLOOM with ALiBi, or
    PaliGemma, a prefix-LM whose batches carry token_type_ids) runs the whole job. A text-only model gets
    "visual word" tokens as its image and the demo's own routing mask."""
    import transformers

    from gmod_ext.demo import build_builtin_model

    folder = tmp_path / kind
    if kind == "llava":
        model, _ = build_builtin_model(48)
    elif kind == "paligemma":
        torch.manual_seed(0)
        model = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
            text_config=dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=400,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            image_token_id=399, projection_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    elif kind == "bloom":
        torch.manual_seed(0)
        model = transformers.BloomForCausalLM(transformers.BloomConfig(
            hidden_size=64, n_layer=4, n_head=4, vocab_size=400, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=400, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    model.save_pretrained(folder)
    out = tmp_path / "out"
    proc = _run(["-m", "gmod_ext", "demo", "--model", str(folder), "--steps", "4", "--batch-size", "2", "--seq-len",
                 "48", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot"])
    assert str(folder) in proc.stdout and "gamma-MoD demo report" in proc.stdout
    doc = json.loads((out / "report.json").read_text())
    L = doc["num_layers"]
    assert doc["builtin"] is False and L == (8 if kind == "llava" else 4)
    assert len(doc["layers_converted"]) == L - 1  # ceil(L / 8) = 1 layer stays dense
    for i in doc["layers_converted"]:  # the image (or visual-word) tokens are routed at ratio 0.5
        assert abs(doc["skip_ratio"]["train_routable"][str(i)] - 0.5) < 0.05
    assert doc["train"]["pretrain"]["steps"] == 0 and len(doc["train"]["gmod"]["losses"]) == 4
    assert 0 < doc["kv_memory"]["gmod"]["total_bytes"] < doc["kv_memory"]["dense_bytes"]


def test_demo_model_path_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gmod_ext", "demo", "--model", str(tmp_path / "nope")], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is not a folder" in proc.stderr and "Traceback" not in proc.stderr
    # a model folder of an architecture the MoD layer does not wrap: a one-line reason, no traceback
    import transformers

    transformers.BeamForCausalLM(transformers.BeamConfig(  # depth-scaled residual sums
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=300)).save_pretrained(tmp_path / "beam")
    proc = subprocess.run([sys.executable, "-m", "gmod_ext", "demo", "--model", str(tmp_path / "beam")], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "gmod" in proc.stderr and "Beam" in proc.stderr, proc.stderr[-2000:]


def test_evaluate_accuracies_against_a_direct_count():
    """evaluate's loss, answer accuracy and first-answer-token accuracy, on a stub model with random logits,
    against a float64 cross-entropy and counts done row by row."""
    import types

    from gmod_ext.demo import evaluate

    g = torch.Generator().manual_seed(11)
    B, S, V = 5, 12, 7
    ids = torch.randint(0, V, (B, S), generator=g)
    labels = torch.full((B, S), -100)
    starts = [6, 8, 9, 6, 10]  # first labelled token per row (left padding varies the answer's start)
    for b, st in enumerate(starts):
        labels[b, st:] = ids[b, st:]
    logits = torch.randn(B, S, V, generator=g)
    for b in (0, 2):  # make the first answer token right in rows 0 and 2, wrong in the others
        logits[b, starts[b] - 1, ids[b, starts[b]]] = 50.0
    for b in (1, 3, 4):
        logits[b, starts[b] - 1, ids[b, starts[b]]] = -50.0

    class Stub(torch.nn.Module):
        def forward(self, **kw):
            return types.SimpleNamespace(logits=logits.clone())

    r = evaluate(Stub(), {"input_ids": ids, "labels": labels}, converted=False, explicit_mask=False)
    right, total, nll = 0, 0, 0.0
    for b, st in enumerate(starts):
        for t in range(st, S):
            lp = torch.log_softmax(logits[b, t - 1].double(), -1)
            nll -= float(lp[ids[b, t]])
            right += int(int(logits[b, t - 1].argmax()) == int(ids[b, t]))
            total += 1
    assert abs(r["loss"] - nll / total) < 1e-5 and abs(r["answer_accuracy"] - right / total) < 1e-6
    assert abs(r["first_token_accuracy"] - 2 / 5) < 1e-6 and r["samples"] == B


def test_synthetic_task_routing_codes():
    """The demo's routing mask per --forced mode, and its labels (the answer and EOS only)."""
    from gmod_ext.demo import SyntheticTask

    for forced in ("text", "ignored_labels", "none"):
        task = SyntheticTask(vocab_size=300, seq_len=40, n_image=9, vision=False, seed=3, forced=forced)
        b = task.batch(3, torch.Generator().manual_seed(5))
        codes, labels, am = b["gmod_routing_mask"], b["labels"], b["attention_mask"].bool()
        A = task.answer_len + 1
        assert (labels[:, -A:] == b["input_ids"][:, -A:]).all() and (labels[:, :-A] == -100).all()
        assert (codes[~am] == 2).all() and (codes[am] != 2).all()
        visual = torch.isin(b["input_ids"], task.visual_words) & am
        assert (visual.sum(1) == 9).all() and (codes[visual] == 0).all()
        prompt_text = am & ~visual
        prompt_text[:, -A:] = False
        answer_code = {"text": 1, "ignored_labels": 0, "none": 0}[forced]
        prompt_code = {"text": 1, "ignored_labels": 1, "none": 0}[forced]
        assert (codes[:, -A:] == answer_code).all(), forced
        assert (codes[prompt_text] == prompt_code).all(), forced
    with pytest.raises(ValueError, match="forced"):
        SyntheticTask(vocab_size=300, seq_len=40, n_image=9, vision=False, forced="question")


def test_demo_help():
    proc = _run(["-m", "gmod_ext", "demo", "--help"], timeout=60)
    for opt in ("--model", "--ratio", "--forced", "--steps", "--batch-size", "--seq-len", "--device", "--dtype", "--out",
                "--seed", "--no-plot", "ARank", "KV memory", "estimated"):
        assert opt in proc.stdout, opt
    top = _run(["-m", "gmod_ext", "--help"], timeout=60)
    assert "demo" in top.stdout and "arank" in top.stdout


def _tiny_run_args(out):
    return ["--steps", "3", "--pretrain-steps", "2", "--baseline-steps", "2", "--batch-size", "2", "--seq-len", "40",
            "--device", "cpu", "--out", str(out), "--no-progress", "--no-plot"]


def test_demo_kv_estimate_path(tmp_path, monkeypatch, capsys):
    """Without gmod_ext.cache's memory_report the demo generates without a cache and reports the
    analytic KV estimate, marked "(estimated)"; it matches the measured compact cache of a normal run."""
    from gmod_ext.demo import cli as demo  # run_demo looks cache_module up in its own module

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the demo must not change them either
    try:
        _kv_estimate_runs(demo, tmp_path, monkeypatch, capsys)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)


def _kv_estimate_runs(demo, tmp_path, monkeypatch, capsys):
    assert demo.main(_tiny_run_args(tmp_path / "measured")) == 0
    measured = json.loads((tmp_path / "measured" / "report.json").read_text())
    capsys.readouterr()
    monkeypatch.setattr(demo, "cache_module", lambda: None)
    assert demo.main(_tiny_run_args(tmp_path / "est")) == 0
    text = capsys.readouterr().out
    assert "(estimated)" in text and "without a KV cache" in text
    est = json.loads((tmp_path / "est" / "report.json").read_text())
    assert est["kv_memory"]["estimated"] is True and est["generation"]["gmod_uses_cache"] is False
    if measured["kv_memory"]["estimated"] is False:  # the compact cache exists: the estimate equals it
        m, e = measured["kv_memory"]["gmod"], measured["kv_memory"]["estimate"]
        assert m["used_bytes"] == e["used_bytes"], (m["layers"], e["layers"])
        assert [x["tokens"] for x in m["layers"]] == [x["tokens"] for x in e["layers"]]
        # and the no-cache run generated the same tokens with the same decisions
        assert est["kv_memory"]["gmod"]["used_bytes"] == m["used_bytes"]


def test_flops_and_kv_formulas():
    from gmod_ext.demo import forward_flops, kv_estimate, layer_flops

    a = dict(D=64, Hq=4, Hk=2, d=16, I=128, V=100, L=3)
    n = 10
    f1 = layer_flops(a, n)
    assert f1 == 2 * n * (64 * 64 + 2 * 64 * 32 + 64 * 64) + 4 * 4 * 16 * n * (n + 1) / 2 + 2 * n * 3 * 64 * 128
    fl = forward_flops(a, [n, n], {1: [5, 4]})
    assert fl["per_layer_dense"] == [2 * f1] * 3
    assert fl["per_layer_gmod"][1] == layer_flops(a, 5) + layer_flops(a, 4) + 2 * (2 * n * 64 * 2)
    assert fl["lm_head"] == 2 * 2 * n * 64 * 100 and fl["ratio"] < 1
    kv = kv_estimate(a, B=2, T=10, esize=4, mod_tokens={1: [5, 3]})
    per_tok = 2 * 2 * 16 * 4
    assert kv["layers"][0]["bytes"] == 2 * 10 * per_tok
    assert kv["layers"][1]["bytes"] == 2 * 5 * per_tok and kv["layers"][1]["used_bytes"] == 8 * per_tok
    assert kv["dense_equivalent_bytes"] == 3 * 2 * 10 * per_tok and kv["estimated"] is True


# ----------------------------------------------------------------------------- benchmarks
def _bench(name, tmp_path, *extra, **env_extra):
    out = tmp_path / f"{name}.json"
    proc = _run(["-m", "gmod_ext.bench", name, "--quick", "--device", "cpu", "--json", str(out), *extra],
                timeout=120, **env_extra)
    assert "MISMATCH" not in proc.stdout and "status: ok" in proc.stdout, proc.stdout[-3000:]
    doc = json.loads(out.read_text())
    assert TOP_KEYS <= set(doc) and doc["benchmark"] == name and doc["status"] == "ok"
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["size_mode"] == "cpu"
    return proc, doc


def test_bench_layer_quick(tmp_path):
    proc, doc = _bench("layer", tmp_path)
    assert "x kept" in proc.stdout and "(b) dense, kept C" in proc.stdout
    rows = doc["sections"]["layer"]["rows"]
    impls = {"(a) dense, all S", "(b) dense, kept C", "(c) torch MoD", "gmod MoD", "gmod MoD, torch rope",
             "gmod MoD, window S/8", "gmod MoD, packed S/8"}
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in impls for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert isinstance(r["ms"], float) and r["ms"] > 0 and r["TFLOPs"] > 0, r
        assert r["vs_kept"] > 0 and r["vs_dense"] > 0
    for impl in ("gmod MoD", "gmod MoD, torch rope", "gmod MoD, window S/8", "gmod MoD, packed S/8"):
        g = [r for r in rows if r["impl"] == impl and r["pass"] == "fwd"][0]
        assert g["check"].startswith("ok"), g
    b = [r for r in rows if r["impl"] == "(b) dense, kept C"]
    assert all(abs(r["vs_kept"] - 1.0) < 1e-12 for r in b)
    # kept rows: C = 128 of 256; the packed row's capacity has one slot more per extra sequence (7)
    assert all(r["tokens"] == (135 if r["impl"].endswith("packed S/8") else 128)
               for r in rows if r["impl"] != "(a) dense, all S")


def test_bench_layer_missing_kernel_rows(tmp_path):
    proc, doc = _bench("layer", tmp_path, GMOD_BENCH_HIDE_OPS="attention,attention_backward")
    assert "n/a (no CPU kernel" in proc.stdout
    rows = doc["sections"]["layer"]["rows"]
    gmod_attention = ("gmod MoD", "gmod MoD, torch rope")
    assert all(str(r["ms"]).startswith("n/a (no CPU kernel") for r in rows if r["impl"] in gmod_attention)
    # the windowed and packed layers' attention is plain torch: they run without the attention kernels
    assert all(isinstance(r["ms"], float) for r in rows if r["impl"] not in gmod_attention)


def test_bench_model_quick(tmp_path):
    proc, doc = _bench("model", tmp_path, "--layers", "5")  # not the size default (4): the option is used
    assert "5 decoder layers of 32 (--layers)" in proc.stdout and "x dense" in proc.stdout
    rows = doc["sections"]["model"]["rows"]
    assert {(r["impl"], r["pass"]) for r in rows} == {
        (i, p) for i in ("dense", "gamma-MoD", "gamma-MoD sdpa") for p in ("prefill", "fwd+bwd", "train step")}
    for r in rows:
        assert isinstance(r["ms"], float) and r["ms"] > 0 and r["ktok_s"] > 0, r
        assert r["x_dense"] > 0 and 0 < r["flops"] <= 1.0
    for r in rows:
        if r["impl"].startswith("gamma-MoD"):
            assert r["flops"] < 0.9 and "skip" in r["info"]
    by = {(r["impl"], r["pass"]): r for r in rows}
    for p in ("prefill", "fwd+bwd", "train step"):  # the same routing, so the same kept tokens
        assert by[("gamma-MoD sdpa", p)]["flops"] == by[("gamma-MoD", p)]["flops"]
    ar = doc["sections"]["arank"]["rows"]
    assert len(ar) == 5 and sum(r["kind"] == "MoD" for r in ar) == 4  # ceil(5 / 8) = 1 layer stays dense
