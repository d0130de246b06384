"""Bad input to the public API and the command lines raises a clear exception that names the argument
(CLI: a one-line ``error:`` message and a non-zero exit, no traceback), and a failed ``convert`` leaves
the model exactly as it was.

One parametrized case per input that used to crash deep inside torch / transformers, hang, or be
accepted silently. Tiny models only; the CLI cases run in-process except two subprocess checks."""
from __future__ import annotations

import logging
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import gmod_ext
from gmod_ext.arank import choose_mod_layers
from gmod_ext.config import GmodConfig
from gmod_ext.convert import is_converted

from gmod_hf_utils import make_batch, tiny_model, transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model():
    return tiny_model("llama").eval()


def _snapshot(model):
    """What convert changes: weights' keys, each decoder layer's class, hooks, attributes, config.gmod."""
    layers = [type(l) for l in model.model.layers]
    return (
        tuple(model.state_dict().keys()),
        layers,
        hasattr(model.config, "gmod"),
        sorted(k for k in model.__dict__ if k.startswith("gmod") or k in ("generate", "_prepare_cache_for_generation")),
        len(model._forward_pre_hooks),
        len(model._forward_hooks),
        len(model.model._forward_pre_hooks),
        model.config.use_cache,
    )


# ----------------------------------------------------------------------------- convert
CALIB = [torch.randint(0, 100, (2, 8))]


@pytest.mark.parametrize("version,ok", [("4.51.3", False), ("4.57.6", False), ("5.12.1", False), ("5.13.0", True),
                                        ("5.13.0rc1", True), ("5.24.0", True), ("6.0.0", True)])
def test_convert_needs_transformers_5_13(version, ok, monkeypatch):
    """Older transformers releases (where parts of the suite fail: tuple outputs, another cache API)
    fail with a message naming the version, before anything changes."""
    import gmod_ext._hf

    model = _model()
    before = _snapshot(model)
    monkeypatch.setattr(gmod_ext._hf, "_transformers_version", lambda: version)
    if ok:
        gmod_ext.convert(model, ratio=0.5, layers=[1], progress=False)
        assert is_converted(model)
    else:
        with pytest.raises(RuntimeError, match=rf"transformers {re.escape(version)} is older than 5\.13"):
            gmod_ext.convert(model, ratio=0.5, layers=[1], progress=False)
        assert _snapshot(model) == before

CONVERT_CASES = [
    # (id, kwargs, exception, message regex)
    ("ratio-str", dict(ratio="0.5", layers="all"), TypeError, r"ratio must be a skip ratio in \[0, 1\).*'0\.5'"),
    ("ratio-none", dict(ratio=None, layers="all"), TypeError, r"ratio must be .*None"),
    ("ratio-tensor-0d", dict(ratio=torch.tensor(0.5), layers="all"), TypeError, r"ratio must be .*Tensor"),
    ("ratio-list-element-str", dict(ratio=[0.5, "x"], layers=[0, 1]), TypeError, r"ratio must be .*got an element 'x'"),
    ("ratio-bool", dict(ratio=True, layers="all"), TypeError, r"ratio must be .*True"),
    ("ratio-dict-out-of-range", dict(ratio={0: 2.0}, layers=[0]), ValueError, r"skip ratio 2\.0 must be in \[0, 1\)"),
    ("pmod-ratio-1.5", dict(variant="pmod", ratio=1.5, layers="all"), ValueError, r"skip ratio 1\.5 must be in \[0, 1\)"),
    ("pmod-prd_rbar-nan", dict(variant="pmod", prd_rbar=float("nan"), layers="all"), ValueError, r"prd_rbar=nan"),
    ("pmod-prd_min-2", dict(variant="pmod", prd_min=2.0, layers="all"), ValueError, r"prd_min=2\.0 .*\[0\.0, 1\.0\]"),
    ("pmod-prd_min>prd_max", dict(variant="pmod", prd_min=0.8, prd_max=0.5, layers="all"), ValueError,
     r"prd_min=0\.8 > prd_max=0\.5"),
    ("aux_coef-negative", dict(aux_coef=-1.0, layers="all"), ValueError, r"aux_coef=-1\.0 must be a finite number"),
    ("aux_coef-nan", dict(aux_coef=float("nan"), layers="all"), ValueError, r"aux_coef=nan"),
    ("aux_coef-str", dict(aux_coef="x", layers="all"), TypeError, r"aux_coef must be a number, got 'x'"),
    ("threshold-str", dict(threshold="x", layers="all"), TypeError, r"threshold must be a number, got 'x'"),
    ("image_token_id-str", dict(image_token_id="x", layers="all"), TypeError, r"image_token_id must be an int"),
    ("keep_dense-negative", dict(keep_dense=-1, layers="all"), ValueError, r"keep_dense=-1 must be None or an int >= 0"),
    ("schedule-bogus-before-arank", dict(schedule="bogus", layers="arank", calibration_batches=CALIB), ValueError,
     r"schedule='bogus' is not one of \('constant', 'prd'\)"),
    ("variant-bogus-before-arank", dict(variant="bogus", layers="arank", calibration_batches=CALIB), ValueError,
     r"variant='bogus' is not one of"),
    ("layers-duplicated", dict(layers=[0, 0]), ValueError, r"layer indices \[0\] are given more than once"),
    ("layers-float", dict(layers=[1.5]), TypeError, r"layers must be a list of layer indices \(ints\).*1\.5"),
    ("layers-str-element", dict(layers=["1"]), TypeError, r"layers must be a list of layer indices.*'1'"),
    ("layers-bool-element", dict(layers=[True]), TypeError, r"layers must be a list of layer indices.*True"),
    ("layers-int", dict(layers=3), TypeError, r"layers must be 'arank', 'all' or a list of layer indices"),
    ("layers-none", dict(layers=None), TypeError, r"layers must be 'arank', 'all' or a list"),
    ("calib-empty", dict(layers="arank", calibration_batches=[]), ValueError, r"gmod\.arank: no calibration batches"),
    ("calib-1d", dict(layers="arank", calibration_batches=[torch.randint(0, 100, (8,))]), ValueError,
     r"batch 0: input_ids has shape \(8,\), expected \[B, S\]"),
    ("calib-float", dict(layers="arank", calibration_batches=[torch.randn(2, 8)]), TypeError,
     r"batch 0: input_ids must be integer token ids, got dtype torch\.float32"),
    ("calib-wrong-key", dict(layers="arank", calibration_batches=[{"ids": torch.randint(0, 100, (2, 8))}]), ValueError,
     r"batch 0 has no input_ids / inputs_embeds tensor \(keys: \['ids'\]\)"),
    ("calib-out-of-vocab", dict(layers="arank", calibration_batches=[torch.full((2, 8), 1000)]), ValueError,
     r"batch 0: input_ids must be in \[0, 128\)"),
    ("calib-meta", dict(layers="arank", calibration_batches=[torch.zeros(2, 8, dtype=torch.long, device="meta")]),
     ValueError, r"batch 0: input_ids is on the meta device"),
    ("calib-empty-batch", dict(layers="arank", calibration_batches=[torch.zeros(0, 8, dtype=torch.long)]), ValueError,
     r"batch 0 is empty \(shape \(0, 8\)\)"),
    ("calib-zero-length", dict(layers="arank", calibration_batches=[torch.zeros(2, 0, dtype=torch.long)]), ValueError,
     r"batch 0 is empty \(shape \(2, 0\)\)"),
    ("calib-mask-shape", dict(layers="arank", calibration_batches=[
        {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}]),
     ValueError, r"batch 0: attention_mask has shape \(3, 8\), expected \[2, 8\]"),
    ("calib-all-padding", dict(layers="arank", calibration_batches=[
        {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.zeros(2, 8, dtype=torch.long)}]),
     ValueError, r"batch 0: rows \[0, 1\] are all padding"),
    ("calib-str-element", dict(layers="arank", calibration_batches=["hello"]), TypeError,
     r"batch 0 is a str; expected a dict of forward keywords or an input_ids tensor"),
    ("calib-int", dict(layers="arank", calibration_batches=5), TypeError,
     r"batches must be an iterable of model inputs.*got int"),
]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in CONVERT_CASES], ids=[c[0] for c in CONVERT_CASES])
def test_convert_rejects_and_leaves_the_model_unchanged(kwargs, exc, match):
    model = _model()
    before = _snapshot(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        gmod_ext.convert(model, verify=False, progress=False, **kwargs)
    assert _snapshot(model) == before
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not is_converted(model)


def test_convert_accepts_array_like_ratios_and_layers():
    import numpy as np

    for ratio in (np.array([0.5, 0.25]), torch.tensor([0.5, 0.25]), (0.5, 0.25), np.float32(0.5), {1: 0.5, 3: 0.25}):
        model = _model()
        gmod_ext.convert(model, ratio=ratio, layers=np.array([1, 3]), verify=False)
        assert model.config.gmod["layers"] == [1, 3] and len(model.config.gmod["ratios"]) == 2


@pytest.mark.parametrize("bad,match", [
    (None, r"convert: model must be a torch\.nn\.Module.*None"),
    ("meta-llama/Llama-2-7b", r"model must be a torch\.nn\.Module.*load the model first"),
    ("class", r"model must be a torch\.nn\.Module.*pass an instance"),
], ids=["none", "str", "class"])
def test_convert_rejects_a_non_module(bad, match):
    if bad == "class":
        import transformers

        bad = transformers.LlamaForCausalLM
    with pytest.raises(TypeError, match=match):
        gmod_ext.convert(bad, layers="all")


def test_convert_rolls_back_a_failure_half_way(monkeypatch):
    """A layer that fails to convert after others did: the model is restored, not left half-converted."""
    import gmod_ext.convert as conv

    model = _model()
    before = _snapshot(model)
    real = conv.make_mod_layer
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "make_mod_layer", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        gmod_ext.convert(model, layers="all", verify=False, router="per_layer")
    assert _snapshot(model) == before
    monkeypatch.setattr(conv, "make_mod_layer", real)
    gmod_ext.convert(model, layers="all", verify=False)  # and it converts normally afterwards
    assert is_converted(model)


# ----------------------------------------------------------------------------- other entry points
def test_unconvert_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"unconvert: model must be a torch\.nn\.Module"):
        gmod_ext.unconvert(None)


@pytest.mark.parametrize("path,exc,match", [
    (None, TypeError, r"from_pretrained: path must be a folder.*None"),
    ("MISSING", FileNotFoundError, r"from_pretrained: no such folder"),
    ("FILE", ValueError, r"from_pretrained: .* is a file; expected the folder"),
    ("EMPTY", FileNotFoundError, r"from_pretrained: .* has no config\.json"),
], ids=["none", "missing-folder", "a-file", "empty-folder"])
def test_from_pretrained_bad_path(tmp_path, path, exc, match):
    if path == "MISSING":
        path = str(tmp_path / "nope")
    elif path == "FILE":
        path = tmp_path / "f.json"
        path.write_text("{}")
    elif path == "EMPTY":
        path = tmp_path
    with pytest.raises(exc, match=match):
        gmod_ext.from_pretrained(path)


@pytest.mark.parametrize("batches,kw,exc,match", [
    ([], {}, ValueError, r"no calibration batches"),
    (None, {}, TypeError, r"batches must be an iterable.*NoneType"),
    ([[1, 2, 3]], {}, TypeError, r"batch 0 is a list"),
    ([torch.randint(0, 100, (2, 8))] * 2, dict(max_batches=0), ValueError, r"max_batches=0 must be None or an int >= 1"),
    ([torch.randint(0, 100, (2, 8))] * 2, dict(max_batches=-1), ValueError, r"max_batches=-1"),
], ids=["empty", "none", "list-of-lists", "max_batches-0", "max_batches-negative"])
def test_arank_bad_batches(batches, kw, exc, match):
    with pytest.raises(exc, match=match):
        gmod_ext.arank(_model(), batches, progress=False, **kw)


@pytest.mark.parametrize("ranks,kw,exc,match", [
    ([1.0, 2.0], dict(threshold=float("nan")), ValueError, r"threshold=nan must be a finite number"),
    ([], {}, ValueError, r"needs one ARank per layer, got an empty list"),
    ([1.0, 2.0], dict(keep_dense=1.5), TypeError, r"keep_dense must be an int"),
], ids=["threshold-nan", "empty", "keep_dense-float"])
def test_choose_mod_layers_bad(ranks, kw, exc, match):
    with pytest.raises(exc, match=match):
        choose_mod_layers(ranks, **kw)


@pytest.mark.parametrize("arg,exc,match", [
    (None, TypeError, r"kv_memory_report: expected a KV cache .*got NoneType"),
    ([1, 2], TypeError, r"expected a KV cache .*got list"),
    ({}, ValueError, r"format_memory_report: expected a report from gmod_ext\.kv_memory_report"),
], ids=["none", "list", "empty-dict"])
def test_memory_report_bad(arg, exc, match):
    with pytest.raises(exc, match=match):
        gmod_ext.format_memory_report(arg)


def test_memory_report_of_a_generate_output_says_which_field():
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    with pytest.raises(TypeError, match=r"a generate output: pass its cache"):
        gmod_ext.kv_memory_report(GenerateDecoderOnlyOutput(sequences=torch.zeros(1, 2, dtype=torch.long)))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(aux_coef=-1), ValueError, r"aux_coef=-1 must be a finite number >= 0"),
    (dict(aux_coef=float("nan")), ValueError, r"aux_coef=nan"),
    (dict(threshold="0.5"), TypeError, r"threshold must be a number, got '0\.5'"),
    (dict(layers=[0], ratios=["x"]), TypeError, r"skip ratio must be a number, got 'x'"),
    (dict(layers=[-1], ratios=[0.5]), ValueError, r"layer indices \[-1\] out of range"),
    (dict(layers=[0, 0], ratios=[0.5, 0.5]), ValueError, r"layer indices \[0\] are given more than once"),
    (dict(layers=[5], ratios=[0.5], num_layers=4), ValueError, r"layer indices \[5\] out of range \(expected \[0, 4\)\)"),
    (dict(layers=[0.5], ratios=[0.5]), TypeError, r"layers must be an integer, got 0\.5"),
    (dict(layers="01", ratios="01"), TypeError, r"layers and ratios must be lists"),
    (dict(num_layers=-3), ValueError, r"num_layers=-3 must be >= 0"),
    (dict(pmod_a=float("nan")), ValueError, r"pmod_a=nan must be a finite number"),
    (dict(image_token_id="x"), TypeError, r"image_token_id must be an integer"),
    (dict(arank="x"), TypeError, r"arank must be None or a list"),
], ids=["aux-neg", "aux-nan", "threshold-str", "ratio-str", "layer-neg", "layer-dup", "layer-oob", "layer-float",
        "layers-str", "num_layers-neg", "pmod_a-nan", "image_token_id-str", "arank-str"])
def test_gmod_config_bad(kw, exc, match):
    with pytest.raises(exc, match=match):
        GmodConfig(**kw)


def test_gmod_config_from_dict_needs_a_dict():
    with pytest.raises(TypeError, match=r"from_dict needs a dict of settings, got NoneType"):
        GmodConfig.from_dict(None)


# ----------------------------------------------------------------------------- converted model's keywords
@pytest.fixture(scope="module")
def converted():
    model = _model()
    gmod_ext.convert(model, ratio=0.5, layers="all", verify=False)
    return model


S = 12
FORWARD_CASES = [
    ("routing-code-3", dict(gmod_routing_mask=torch.full((2, S), 3, dtype=torch.int8)), ValueError,
     r"gmod_routing_mask\[0, 0\] = 3 is not a routing code \(0 routable, 1 forced keep, 2 padding"),
    ("routing-code-256-int32", dict(gmod_routing_mask=torch.full((2, S), 256, dtype=torch.int32)), ValueError,
     r"gmod_routing_mask\[0, 0\] = 256 is not a routing code"),
    ("routing-float", dict(gmod_routing_mask=torch.full((2, S), 0.5)), TypeError,
     r"gmod_routing_mask must be an integer tensor \[B, S\] of codes 0 / 1 / 2 \(int8\), got dtype torch\.float32"),
    ("routing-bool", dict(gmod_routing_mask=torch.zeros(2, S, dtype=torch.bool)), TypeError,
     r"got dtype torch\.bool \(for a bool mask of tokens to keep, use gmod_forced_mask\)"),
    ("routing-meta", dict(gmod_routing_mask=torch.zeros(2, S, dtype=torch.int8, device="meta")), ValueError,
     r"gmod_routing_mask is on the meta device"),
    ("routing-list", dict(gmod_routing_mask=[[0] * S] * 2), TypeError, r"gmod_routing_mask must be an integer tensor.*got list"),
    ("forced-str", dict(gmod_forced_mask="x"), TypeError, r"gmod_forced_mask must be a bool tensor \[B, S\], got str"),
    ("prefill-negative", dict(gmod_prefill_len=-1), ValueError, r"gmod_prefill_len=-1 must be >= 0"),
    ("prefill-float", dict(gmod_prefill_len=1.5), TypeError, r"gmod_prefill_len must be an int .*1\.5"),
    ("prefill-str", dict(gmod_prefill_len="3"), TypeError, r"gmod_prefill_len must be an int .*'3'"),
    ("prefill-bool", dict(gmod_prefill_len=True), TypeError, r"gmod_prefill_len must be an int .*True"),
    ("prefill-float-tensor", dict(gmod_prefill_len=torch.tensor(3.0)), TypeError, r"gmod_prefill_len must be an int"),
    # a custom 4-D mask (or one mask per layer type) cannot reach the kept tokens: refused, not ignored
    ("mask-4d", dict(attention_mask=torch.ones(2, 1, S, S, dtype=torch.bool).tril()), NotImplementedError,
     r"attention_mask of shape \(2, 1, 12, 12\).*2-D"),
    ("mask-dict", dict(attention_mask={"full_attention": torch.ones(2, 1, S, S)}), NotImplementedError,
     r"attention_mask given as a dict"),
    ("mask-1d", dict(attention_mask=torch.ones(S)), NotImplementedError, r"attention_mask of shape \(12,\)"),
    # Hugging Face would return the dense layers' maps only, numbered as if they were every layer's
    ("output-attentions", dict(output_attentions=True), NotImplementedError,
     r"output_attentions=True on a converted model: its MoD layers \(\[0, 1, 2, 3\]\)"),
]


@pytest.mark.parametrize("kw,exc,match", [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_converted_model_keywords(converted, kw, exc, match):
    ids = make_batch("llama", S=S, pad=False)["input_ids"]
    with torch.no_grad(), pytest.raises(exc, match=match):
        converted(ids, **kw)


@pytest.mark.parametrize("shape", [(0, S), (2, 0)], ids=["B=0", "S=0"])
def test_converted_model_empty_batch(converted, shape):
    with torch.no_grad(), pytest.raises(ValueError, match=r"input_ids has shape .*needs a non-empty batch"):
        converted(torch.zeros(shape, dtype=torch.long))


def test_converted_model_good_keywords_still_work(converted):
    ids = make_batch("llama", S=S, pad=False)["input_ids"]
    codes = torch.zeros(2, S, dtype=torch.int8)
    codes[:, :2] = 1
    codes[1, -1] = 2
    with torch.no_grad():
        for kw in (dict(gmod_routing_mask=codes), dict(gmod_routing_mask=codes.long()), dict(gmod_prefill_len=S + 3),
                   dict(gmod_prefill_len=torch.tensor(4)), dict(gmod_forced_mask=torch.zeros(2, S, dtype=torch.bool))):
            out = converted(ids, **kw)
            assert torch.isfinite(out.logits).all()


# ----------------------------------------------------------------------------- command lines
def _run_main(main, argv, capsys):
    with pytest.raises(SystemExit) as exc_info:
        rc = main(argv)
        raise SystemExit(rc)
    err = capsys.readouterr().err
    return exc_info.value.code, err


CLI_CASES = [
    ("arank --batches 0", "gmod", ["arank", "--batches", "0"], r"argument --batches: must be >= 1, got 0"),
    ("arank --batch-size 0", "gmod", ["arank", "--batch-size", "0"], r"argument --batch-size: must be >= 1"),
    ("arank --seq-len 0", "gmod", ["arank", "--seq-len", "0"], r"argument --seq-len: must be >= 1"),
    ("arank --tiny-layers 0", "gmod", ["arank", "--tiny-layers", "0"], r"argument --tiny-layers: must be >= 1"),
    ("arank --keep-dense -1", "gmod", ["arank", "--keep-dense", "-1"], r"argument --keep-dense: must be >= 0"),
    ("arank --threshold nan", "gmod", ["arank", "--threshold", "nan"], r"argument --threshold: must be a finite number"),
    ("arank --plot missing dir", "gmod", ["arank", "--plot", "MISSING/x.png"], r"--plot .*: the folder .* does not exist"),
    ("arank --json missing dir", "gmod", ["arank", "--no-plot", "--json", "MISSING/x.json"], r"--json .* does not exist"),
    ("arank --model missing", "gmod", ["arank", "--no-plot", "--model", "MISSING"], r"--model .* is not a folder"),
    ("arank --seq-len too long", "gmod", ["arank", "--no-plot", "--tiny-layers", "1", "--seq-len", "100000"],
     r"--seq-len 100000 is longer than the model's 512 positions"),
    ("arank --keep-dense > L", "gmod", ["arank", "--no-plot", "--tiny-layers", "2", "--keep-dense", "5"],
     r"--keep-dense 5 is more than the model's 2 layers"),
    ("bench --budget-ms -1", "bench", ["ops", "--budget-ms", "-1"], r"argument --budget-ms: must be a finite number > 0"),
    ("bench --budget-ms nan", "bench", ["ops", "--budget-ms", "nan"], r"argument --budget-ms: must be a finite number > 0"),
    ("bench --threads 0", "bench", ["ops", "--threads", "0"], r"argument --threads: must be >= 1"),
    ("bench --json a folder", "bench", ["ops", "--json", "TMP"], r"--json .* is a folder; expected a file path"),
    ("demo --ratio 1.5", "gmod", ["demo", "--ratio", "1.5"], r"demo: error: --ratio 1\.5 must be in \[0, 1\)"),
    ("demo --keep-dense > L", "gmod", ["demo", "--no-plot", "--pretrain-steps", "0", "--keep-dense", "100", "--out", "TMP"],
     r"--keep-dense 100 is more than the model's 8 decoder layers"),
    ("demo --steps 0", "gmod", ["demo", "--steps", "0"], r"demo: error: --steps 0 must be >= 1"),
    ("demo --batch-size 0", "gmod", ["demo", "--batch-size", "0"], r"demo: error: --batch-size 0 must be >= 1"),
    ("demo --gen-batch-size 0", "gmod", ["demo", "--gen-batch-size", "0"], r"--gen-batch-size 0 must be >= 1"),
    ("demo --pretrain-steps -5", "gmod", ["demo", "--pretrain-steps", "-5"], r"--pretrain-steps -5 must be >= 0"),
    ("demo --baseline-steps -1", "gmod", ["demo", "--baseline-steps", "-1"], r"--baseline-steps -1 must be >= 0"),
    ("demo --threads 0", "gmod", ["demo", "--threads", "0"], r"--threads 0 must be >= 1"),
    ("demo --keep-dense -1", "gmod", ["demo", "--keep-dense", "-1"], r"--keep-dense -1 must be >= 0"),
    ("demo --lr nan", "gmod", ["demo", "--lr", "nan"], r"--lr nan must be a finite number > 0"),
    ("demo --lr -1", "gmod", ["demo", "--lr", "-1"], r"--lr -1\.0 must be a finite number > 0"),
    ("demo --seq-len 100000", "gmod", ["demo", "--seq-len", "100000"], r"--seq-len 100000 is longer than the built-in"),
    ("demo --device bogus", "gmod", ["demo", "--device", "bogus"], r"--device 'bogus' is not a device"),
    ("demo --device cuda:x", "gmod", ["demo", "--device", "cuda:x"], r"--device 'cuda:x' is not a device"),
    ("demo --out a file", "gmod", ["demo", "--out", "FILE"], r"--out .* exists and is not a folder"),
]


@pytest.mark.parametrize("which,argv,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_values(tmp_path, capsys, which, argv, match):
    (tmp_path / "file").write_text("x")
    subst = {"MISSING": str(tmp_path / "missing"), "TMP": str(tmp_path), "FILE": str(tmp_path / "file")}
    for key, value in subst.items():
        argv = [value + a[len(key):] if a.startswith(key) else a for a in argv]
    if which == "gmod":
        from gmod_ext.__main__ import main
    else:
        from gmod_ext.bench.__main__ import main
    code, err = _run_main(main, argv, capsys)
    assert code not in (0, None)
    assert "error:" in err and re.search(match, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "missing").exists()  # nothing created where the output could not go


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.parametrize("argv,match", [
    (["-m", "gmod_ext", "arank", "--batch-size", "0"], r"^python -m gmod_ext arank: error: argument --batch-size: must be >= 1"),
    (["-m", "gmod_ext", "demo", "--seq-len", "3", "--pretrain-steps", "0", "--no-plot"],
     r"^python -m gmod_ext demo: error: --seq-len 3 is too short"),
], ids=["arank", "demo-seq-len-3"])
def test_cli_subprocess_one_line_error(tmp_path, argv, match):
    argv = argv + (["--out", str(tmp_path / "out")] if "demo" in argv else [])
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l and not l.startswith("  ")]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(match, lines[-1]), proc.stderr[-2000:]



def test_converted_model_refuses_attention_maps_from_its_config(converted, monkeypatch):
    ids = make_batch("llama", S=S, pad=False)["input_ids"]
    monkeypatch.setattr(converted.config, "_attn_implementation", "eager")  # (the config refuses maps with SDPA)
    monkeypatch.setattr(converted.config, "output_attentions", True)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="output_attentions=True"):
        converted(ids)
    with torch.no_grad():  # the keyword wins over the config
        converted(ids, output_attentions=False)


def _continuous_batching_config(model):
    if not callable(getattr(type(model), "generate_batch", None)):
        pytest.skip("this transformers has no continuous batching")
    return transformers.GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


def test_converted_model_refuses_continuous_batching(converted):
    """transformers' continuous batching flattens the requests into one row over a paged KV cache, which
    MoD layers (a compact cache per row) cannot serve: refused at the call."""
    gc = _continuous_batching_config(converted)
    with pytest.raises(NotImplementedError, match=r"model\.generate_batch: continuous batching .*model\.generate"):
        converted.generate_batch([[1, 2, 3], [4, 5]], generation_config=gc)
    with pytest.raises(NotImplementedError, match=r"model\.init_continuous_batching: continuous batching"):
        converted.init_continuous_batching(generation_config=gc)


def test_paged_cache_reaching_the_forward_is_refused(converted, caplog, monkeypatch):
    """Should transformers' manager reach the converted model another way, the forward hook refuses its
    paged cache (the manager then logs the error from its worker and returns empty results)."""
    gc = _continuous_batching_config(converted)
    dense = _model().eval()  # first: does this transformers' manager run on this machine at all?
    try:
        with caplog.at_level(logging.ERROR):
            out = dense.generate_batch([[1, 2, 3], [4, 5]], generation_config=gc)
    except Exception as err:  # noqa: BLE001 - e.g. 5.17 cannot size its paged cache on a CPU without psutil
        pytest.skip(f"transformers {transformers.__version__}'s continuous batching does not run here: {err}")
    if not all(getattr(r, "generated_tokens", None) for r in out.values()):
        pytest.skip(f"transformers {transformers.__version__}'s continuous batching does not run here: "
                    f"{caplog.text[-300:]}")
    caplog.clear()
    for name in ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager"):
        monkeypatch.delitem(converted.__dict__, name, raising=False)  # the manager itself, as if reached directly
    with caplog.at_level(logging.ERROR):
        out = converted.generate_batch([[1, 2, 3], [4, 5]], generation_config=gc)
    assert re.search(r"gmod: a PagedAttentionCache: continuous batching", caplog.text), caplog.text[-2000:]
    assert all(not getattr(r, "generated_tokens", None) for r in out.values())
