"""A tiny Llama converted with ARank trains on synthetic data (CPU, ~200 steps)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from gmod_hf_utils import make_batch, num_threads, tiny_model

import gmod_ext

B, S, PREFIX = 8, 32, 4


def synthetic_batch(gen: torch.Generator):
    """Bigram data: x[t+1] = (3 * x[t] + 1) mod 100; the first PREFIX tokens are the 'instruction'
    (labels -100, forced by masked routing)."""
    start = torch.randint(0, 100, (B, 1), generator=gen)
    ids = [start]
    for _ in range(S - 1):
        ids.append((3 * ids[-1] + 1) % 100)
    ids = torch.cat(ids, 1)
    labels = ids.clone()
    labels[:, :PREFIX] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_train_converted_tiny_model():
    with num_threads(1):
        t0 = time.time()
        model = tiny_model("llama")
        gen = torch.Generator().manual_seed(0)
        calib = [synthetic_batch(gen) for _ in range(2)]
        gmod_ext.convert(model, ratio=0.5, layers="arank", calibration_batches=calib, progress=False)
        mod_layers = model.config.gmod["layers"]
        assert len(mod_layers) == 3
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses, auxes = [], []
        for step in range(200):
            batch = synthetic_batch(gen)
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            st = model.gmod_stats()
            losses.append(float(out.loss.detach()))
            auxes.append(st["aux_loss"])
        elapsed = time.time() - t0

    assert all(math.isfinite(v) for v in losses + auxes)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    aux_first, aux_last = sum(auxes[:20]) / 20, sum(auxes[-20:]) / 20
    assert aux_last <= aux_first * 1.1, (aux_first, aux_last)  # decreasing or stable
    st = model.gmod_stats()
    assert sorted(st["layers"]) == mod_layers
    R = S - PREFIX
    expected_skip = (R - (R - math.floor(0.5 * R))) / S
    for v in st["layers"].values():
        assert v["skip_ratio"] == pytest.approx(expected_skip)
        assert v["routable_skip_ratio"] == pytest.approx(0.5)
        assert 0.0 < v["mean_p"] < 1.0
    print(f"train: loss {first:.3f} -> {last:.3f}, aux {aux_first:.3f} -> {aux_last:.3f}, {elapsed:.1f} s")
    assert elapsed < 120


def test_trainer_callback_logs_stats():
    model = tiny_model("llama")
    gmod_ext.convert(model, ratio=0.5, layers=[1, 2], progress=False)
    model(**make_batch("llama"))
    from gmod_ext.convert import GmodStatsCallback

    logs = {}
    GmodStatsCallback().on_log(None, None, None, model=model, logs=logs)
    assert {"gmod/aux_loss", "gmod/skip_ratio", "gmod/skip_l1", "gmod/p_l2"} <= set(logs)
