"""NVTX ranges around the MoD stages, for Nsight Compute / Nsight Systems.

Off by default (zero cost). Turn on with ``GMOD_NVTX=1`` in the environment or
``gmod_ext.profiling.enable_nvtx()``. Ranges are named ``gmod.<stage>`` (router, route, gather,
attention, mlp, merge), so e.g. ``ncu --nvtx --nvtx-include "gmod.attention/"`` profiles the
kernels of the attention stage only. Inside torch.compile the ranges are skipped.
"""
from __future__ import annotations

import contextlib
import os

import torch

_enabled = os.environ.get("GMOD_NVTX", "0") not in ("", "0", "false", "False")


def enable_nvtx(flag: bool = True) -> None:
    """Switch the ``gmod.*`` NVTX ranges on or off for this process."""
    global _enabled
    _enabled = bool(flag)


def nvtx_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def nvtx_range(stage: str):
    """``with nvtx_range("router"): ...`` pushes ``gmod.router`` when NVTX is on and CUDA is there."""
    active = _enabled and torch.cuda.is_available() and not torch.compiler.is_compiling()
    if active:
        torch.cuda.nvtx.range_push(f"gmod.{stage}")
    try:
        yield
    finally:
        if active:
            torch.cuda.nvtx.range_pop()
