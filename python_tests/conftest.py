"""Shared fixtures for the gmod op tests.

* ``device``: every op test runs on "cpu" and "cuda". The CUDA case is skipped when no GPU is
  visible or when one of the ops the test module exercises (its ``GMOD_OPS`` list) has no CUDA
  kernel registered in the loaded library.
* An autouse fixture seeds torch per test (from the test id, plus ``GMOD_TEST_SEED`` if set), so
  every test sees fresh but reproducible random inputs; set GMOD_TEST_SEED=1,2,... to draw others.
* ``poison_heap`` / ``poison_``: NaN-filled memory so that an output element a kernel forgets to
  write shows up as NaN instead of a lucky zero.
"""
from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

import gmod_ext  # noqa: F401  (loads torch.ops.gmod, fake kernels, autograd)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gmod::{op}", "CUDA")


def cuda_skip_reason(ops) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    missing = [op for op in ops if not has_cuda_kernel(op)]
    if missing:
        return f"no CUDA kernel registered for gmod::{', gmod::'.join(missing)}"
    return None


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    if request.param == "cuda":
        ops = getattr(request.module, "GMOD_OPS", ())
        reason = cuda_skip_reason(ops)
        if reason:
            pytest.skip(reason)
    return request.param


def skip_unsupported(device: str, dtype: torch.dtype) -> None:
    """float64 is a CPU-only activation dtype (used for gradcheck), see ops.py."""
    if device != "cpu" and dtype == torch.float64:
        pytest.skip("float64 activations are CPU-only")


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("GMOD_TEST_SEED", "0"))) & 0x7FFFFFFF
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def seed(_seed):
    return _seed


# ------------------------------------------------------------------ poisoning
def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN (int tensors with a large negative sentinel), in place."""
    if t.is_floating_point():
        return t.fill_(math.nan)
    return t.fill_(-(2**30))


def poison_heap(device: str, nbytes: int, copies: int = 4) -> None:
    """Best effort: leave poisoned freed blocks of about ``nbytes`` in the allocator, so that a
    kernel's fresh ``empty`` output that is not fully written is likely to hold garbage.

    The 32-bit word 0x7FC0FFFF reads as NaN in float32 and in both 16-bit halves (0xFFFF and 0x7FC0
    are NaN in bfloat16 and float16; a float32 NaN would leave every other 16-bit element 0.0), and
    as 2143354879 in int32, outside any index or count."""
    n = max(1, nbytes // 4)
    blocks = [torch.full((n,), 0x7FC0FFFF, dtype=torch.int32, device=device) for _ in range(copies)]
    del blocks


# ------------------------------------------------------------------ inputs
def random_route(B: int, S: int, C: int, counts=None, device="cpu", garbage_past_count: bool = False):
    """A valid (idx, count): count[b] sorted unique positions in [0, S), then the slots past count.

    Slots past count[b] are meaningless to the consumers (gather_rows / scatter_merge read only
    ``c < count[b]``). By default they hold -1, what gmod.route writes. With
    ``garbage_past_count=True`` they hold in-range junk instead, alternating positions the row does
    not keep with duplicates of positions it keeps (random order), so a kernel that decided
    validity with ``idx >= 0`` instead of ``c < count[b]`` gets a different answer. (With S == 0
    there is no in-range position and the slots keep -1.)
    """
    idx = torch.full((B, C), -1, dtype=torch.int32)
    if counts is None:
        counts = [int(torch.randint(0, min(S, C) + 1, ()).item()) for _ in range(B)]
    for b, n in enumerate(counts):
        assert 0 <= n <= min(S, C)
        sel = torch.randperm(S)[:n].sort().values
        idx[b, :n] = sel.to(torch.int32)
        if garbage_past_count and S > 0 and n < C:
            idx[b, n:] = _junk_positions(sel, S, C - n)
    return idx.to(device), torch.tensor(counts, dtype=torch.int32, device=device)


def _junk_positions(kept: torch.Tensor, S: int, m: int) -> torch.Tensor:
    """m positions in [0, S): even slots not in ``kept`` (when S allows), odd slots duplicates of
    ``kept`` (when it is not empty); uniform in [0, S) where the preferred kind does not exist."""
    is_kept = torch.zeros(S, dtype=torch.bool)
    is_kept[kept.long()] = True
    others = (~is_kept).nonzero().flatten()
    out = torch.randint(0, S, (m,))
    for j in range(m):
        pool = others if j % 2 == 0 else kept
        if pool.numel() == 0:
            pool = kept if j % 2 == 0 else others
        out[j] = pool[torch.randint(0, pool.numel(), ())]
    return out.to(torch.int32)


def snapshot(*tensors):
    return [None if t is None else t.detach().clone() for t in tensors]


def assert_unchanged(before, tensors, names=None):
    """Bitwise comparison (NaN-safe) of tensors against a snapshot."""
    for i, (a, t) in enumerate(zip(before, tensors)):
        if a is None:
            continue
        name = names[i] if names else str(i)
        assert t.dtype == a.dtype and t.shape == a.shape, f"input {name} changed dtype/shape"
        eq = (a == t) | (a.isnan() & t.isnan()) if a.is_floating_point() else a == t
        assert bool(eq.all()), f"op modified its input {name}"
