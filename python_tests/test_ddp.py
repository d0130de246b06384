"""Distributed training of a converted tiny model on CPU: 2-process gloo DDP, and FSDP2.

Each rank trains on its own data; afterwards both ranks must hold identical parameters, equal to
a single-process run on the concatenated batch (same token counts per rank, so the mean of the
per-rank mean losses equals the global mean).
"""
from __future__ import annotations

import json
import os
import re
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 3
LAYERS = [1, 2, 3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(step: int, rank: int):
    from gmod_hf_utils import make_batch

    b = make_batch("llama", B=2, S=16, pad=False, seed=100 * step + rank, labels_prefix=3)
    return b


def _build():
    import gmod_ext
    from gmod_hf_utils import tiny_model

    model = tiny_model("llama", seed=0)
    gmod_ext.convert(model, ratio=0.5, layers=LAYERS, progress=False)
    return model.train()


def _flat(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name] = t.clone()
    return out


def _worker(rank: int, world: int, port: int, out_dir: str, mode: str) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        model = _build()
        if mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        for step in range(STEPS):
            loss = wrapped(**_data(step, rank)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        params = _flat(model)
        torch.save({"params": params, "stats": model.gmod_stats()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        with open(os.path.join(out_dir, f"rank{rank}.exc.json"), "w") as f:
            json.dump({"rank": rank, "types": [c.__name__ for c in type(e).__mro__], "message": str(e)}, f)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _reference():
    model = _build()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(STEPS):
        parts = [_data(step, r) for r in range(2)]
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return _flat(model)


def _run(tmp_path, mode, tries: int = 2, exceptions: list | None = None):
    """Spawn the two ranks; (results, None) or (None, error text). A rank killed by a signal without a
    Python error (gloo's C++ teardown has aborted under a loaded 2-core CI machine: "terminate called
    without an active exception", once in many runs) is run again, once, in a fresh directory: a
    Python error in a rank, or a second crash, is reported. ``exceptions`` (a list) receives each
    failed rank's exception as {"rank", "types" (the class's MRO names), "message"}."""
    for attempt in range(tries):
        out = tmp_path / f"try{attempt}"
        out.mkdir()
        port = _free_port()
        try:
            mp.spawn(_worker, args=(2, port, str(out), mode), nprocs=2, join=True)
        except Exception as err:  # noqa: BLE001
            errs = [p.read_text() for p in sorted(out.glob("*.err"))]
            if errs or not isinstance(err, mp.ProcessExitedException) or attempt + 1 == tries:
                if exceptions is not None:
                    exceptions.extend(json.loads(p.read_text()) for p in sorted(out.glob("*.exc.json")))
                return None, "\n".join(errs) or repr(err)
            print(f"_run: {err!r} with no Python error in any rank; running the {mode} test again")
            continue
        return [torch.load(out / f"rank{r}.pt") for r in range(2)], None


def _check(results):
    r0, r1 = results[0]["params"], results[1]["params"]
    assert set(r0) == set(r1) and "gmod_router.weight" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
    ref = _reference()
    init = _flat(_build())
    assert not torch.equal(ref["gmod_router.weight"], init["gmod_router.weight"])  # the router trained
    for k in ref:
        torch.testing.assert_close(r0[k], ref[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert sorted(results[0]["stats"]["layers"]) == LAYERS


def test_ddp_gloo_two_ranks(tmp_path):
    torch.set_num_threads(1)
    results, err = _run(tmp_path, "ddp")
    assert err is None, err
    _check(results)


# The only rank errors that mean "FSDP2 cannot run on CPU/gloo with this torch build" (a skip):
# * the FSDP2 / DeviceMesh API missing (an ImportError naming it);
# * the gloo process group lacking a collective FSDP2 needs: c10d's Backend base class raises
#   RuntimeError "Backend gloo does not support <collective>" (TORCH_CHECK in c10d/Backend.hpp), and
#   ProcessGroupGloo itself RuntimeError "ProcessGroupGloo::<collective>: unsupported ..." (e.g.
#   "unsupported layout"), and the dispatcher NotImplementedError "Could not run 'c10d::<op>' with
#   arguments from the '<key>' backend" for a c10d op with no kernel there. On this torch 2.13 CPU
#   build every collective FSDP2 uses runs on gloo (the test passes), so none of these occurs here.
# A rank that dies while its peer raised one of those sees the connection drop ("Connection closed by
# peer", ...): that is a consequence, tolerated only next to a known-unsupported error. Anything else
# (an AssertionError, a shape error, a real bug) fails the test with every rank's traceback.
_FSDP2_API = re.compile(r"fully_shard|torch\.distributed\.(fsdp|device_mesh|tensor)|init_device_mesh|DeviceMesh")
_GLOO_UNSUPPORTED = re.compile(
    r"Backend gloo does not support \w+|ProcessGroupGloo::\w+: unsupported|Could not run 'c10d::\w+' with arguments")
_PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Connection refused", re.I)


def _fsdp2_unsupported(exc: dict) -> bool:
    types, msg = exc["types"], exc["message"]
    if "ImportError" in types:
        return bool(_FSDP2_API.search(msg))
    if "RuntimeError" in types or "NotImplementedError" in types:
        return bool(_GLOO_UNSUPPORTED.search(msg))
    return False


def _fsdp2_skip_reason(exceptions: list) -> str | None:
    """A skip reason when the ranks failed only for a known-unsupported reason, else None."""
    known = [e for e in exceptions if _fsdp2_unsupported(e)]
    rest = [e for e in exceptions if not _fsdp2_unsupported(e)]
    if not known or any(not ("RuntimeError" in e["types"] and _PEER_LOST.search(e["message"])) for e in rest):
        return None
    e = known[0]
    return f"FSDP2 does not run on CPU/gloo here (rank {e['rank']}): {e['types'][0]}: {e['message'].strip()}"


def test_fsdp2_skip_rule():
    """Only the known-unsupported conditions skip; an assertion or any other error in a rank fails."""
    imp = {"rank": 0, "types": ["ImportError", "Exception"], "message": "cannot import name 'fully_shard' from "
           "'torch.distributed.fsdp'"}
    gloo = {"rank": 1, "types": ["RuntimeError", "Exception"], "message": "Backend gloo does not support reduce_scatter"}
    peer = {"rank": 0, "types": ["RuntimeError", "Exception"], "message": "[../gloo/transport/tcp/pair.cc:534] "
            "Connection closed by peer [127.0.0.1]:1234"}
    bad = {"rank": 1, "types": ["AssertionError", "Exception"], "message": "ranks differ"}
    other_imp = {"rank": 1, "types": ["ModuleNotFoundError", "ImportError", "Exception"],
                 "message": "No module named 'gmod_hf_utils'"}
    other_rt = {"rank": 1, "types": ["RuntimeError", "Exception"], "message": "shape '[2, 16]' is invalid"}
    disp = {"rank": 0, "types": ["NotImplementedError", "RuntimeError", "Exception"],
            "message": "Could not run 'c10d::reduce_scatter_' with arguments from the 'CPU' backend."}
    assert _fsdp2_skip_reason([imp]) and _fsdp2_skip_reason([gloo, peer]) and _fsdp2_skip_reason([gloo, gloo])
    assert _fsdp2_skip_reason([disp, peer])
    for excs in ([], [bad], [other_imp], [other_rt], [peer], [gloo, bad], [imp, other_rt]):
        assert _fsdp2_skip_reason(excs) is None, excs


def test_fsdp2_gloo_two_ranks(tmp_path):
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not available")
    torch.set_num_threads(1)
    exceptions: list = []
    results, err = _run(tmp_path, "fsdp2", exceptions=exceptions)
    if err is not None:
        reason = _fsdp2_skip_reason(exceptions)
        if reason is not None:
            pytest.skip(reason)
        pytest.fail(f"FSDP2 on CPU/gloo failed in a rank:\n{err}", pytrace=False)
    _check(results)
