"""ARank (gmod_ext.arank) and the `python -m gmod_ext arank` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gmod_hf_utils import make_batch, num_threads, tiny_model

import gmod_ext
from gmod_ext.arank import attention_rank, choose_mod_layers, format_table


@pytest.fixture(autouse=True)
def _one_thread():
    with num_threads(1):
        yield


def test_attention_rank_definition():
    S = 6
    # uniform causal attention: tril(-1) of it has full rank S-1
    uni = torch.tril(torch.ones(S, S))
    uni = uni / uni.sum(-1, keepdim=True)
    # every token attends only to token 0 (attention sink): tril(-1) has rank 1
    sink = torch.zeros(S, S)
    sink[:, 0] = 1.0
    # identity (attend to self only): the diagonal is zeroed, rank 0
    eye = torch.eye(S)
    r = attention_rank(torch.stack([uni, sink, eye]))
    assert r.tolist() == [S - 1, 1, 0]
    # padding: rows and columns of invalid tokens are dropped first
    valid = torch.tensor([False, False, True, True, True, True])
    assert attention_rank(uni.unsqueeze(0), valid).tolist() == [3]
    # float32 even for low-precision maps
    assert attention_rank(uni.unsqueeze(0).bfloat16()).dtype == torch.float32


def _sharp(model, factor: float = 16.0):
    """q / k projections x factor: the tiny models' near-uniform attention has full rank in every layer
    (so any per-layer mix-up would still match); sharpened, the ranks differ from layer to layer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(factor)
    return model


def _manual_arank(arch: str, inputs: dict) -> list[float]:
    """ARank by hand: the eager attention maps of a fresh copy of the same (sharpened) tiny model on
    ``inputs``, per sample the valid rows / columns, tril(-1), matrix_rank in float32, averaged over
    heads and samples."""
    ref = _sharp(tiny_model(arch))
    ref.set_attn_implementation("eager")
    out = ref(**inputs, output_attentions=True)
    am = inputs.get("attention_mask")
    ranks = []
    for att in out.attentions:
        per_sample = []
        for b in range(att.shape[0]):
            v = am[b].bool() if am is not None else torch.ones(att.shape[-1], dtype=torch.bool)
            a = att[b][:, v][:, :, v].float().tril(-1)
            per_sample.append(torch.linalg.matrix_rank(a).float().mean())
        ranks.append(float(torch.stack(per_sample).mean()))
    return ranks


def test_arank_matches_manual_computation():
    model = _sharp(tiny_model("llama"))
    batch = make_batch("llama", S=16)
    ranks = gmod_ext.arank(model, [batch], progress=False)
    assert len(ranks) == 4 and len(set(ranks)) > 1, ranks  # layers differ: a mix-up would show
    assert model.config._attn_implementation == "sdpa"  # restored after the eager calibration
    manual = _manual_arank("llama", {k: v for k, v in batch.items() if k != "labels"})
    for li in range(4):
        assert abs(ranks[li] - manual[li]) < 1e-5


def test_arank_llava_and_tensor_batches():
    """LLaVA (the language model's maps over image + text tokens) and a plain id tensor as the batch,
    each against the hand computation."""
    model = _sharp(tiny_model("llava"))
    batch = make_batch("llava")
    ranks = gmod_ext.arank(model, [batch], progress=False)
    manual = _manual_arank("llava", {k: v for k, v in batch.items() if k != "labels"})
    assert len(ranks) == 4 and all(0 <= r <= 23 for r in ranks) and len(set(ranks)) > 1, ranks
    assert max(abs(a - b) for a, b in zip(ranks, manual)) < 1e-5, (ranks, manual)
    lm = _sharp(tiny_model("llama"))
    ids = torch.randint(0, 100, (2, 10))
    ranks2 = gmod_ext.arank(lm, ids, progress=False)
    assert all(0 <= r <= 9 for r in ranks2)
    manual2 = _manual_arank("llama", {"input_ids": ids})
    assert max(abs(a - b) for a, b in zip(ranks2, manual2)) < 1e-5, (ranks2, manual2)


def test_choose_mod_layers():
    ranks = [40.0, 12.0, 30.0, 12.0, 5.0, 39.0, 20.0, 41.0]
    assert choose_mod_layers(ranks) == [0, 1, 2, 3, 4, 5, 6]  # keep ceil(8/8) = 1 dense: layer 7
    assert choose_mod_layers(ranks, keep_dense=3) == [1, 2, 3, 4, 6]
    assert choose_mod_layers(ranks, threshold=30.0) == [1, 3, 4, 6]
    assert choose_mod_layers([1.0, 1.0, 1.0], keep_dense=1) == [1, 2]  # ties: lower index stays dense
    assert choose_mod_layers(ranks, keep_dense=0) == list(range(8))
    table = format_table(ranks, [1, 2])
    assert "MoD" in table and "dense" in table and len(table.splitlines()) == 10


def test_cli_help():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, "-m", "gmod_ext", "arank", "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "--keep-dense" in res.stdout and "--plot" in res.stdout
    res = subprocess.run([sys.executable, "-m", "gmod_ext", "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "arank" in res.stdout


def test_cli_arank_tiny(tmp_path, capsys):
    from gmod_ext.__main__ import main

    png = tmp_path / "arank.png"
    js = tmp_path / "arank.json"
    rc = main(
        ["arank", "--batches", "2", "--seq-len", "24", "--tiny-layers", "6", "--plot", str(png), "--json", str(js), "--no-progress"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "ARank" in out and "MoD layers:" in out
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(js.read_text())
    assert len(data["arank"]) == 6 and len(data["mod_layers"]) == 5
    # the synthetic tiny model has sharper attention (lower ARank) in deeper layers
    assert data["arank"][0] > data["arank"][-1]
