"""Benchmarks of the gmod ops: ``python -m gmod_ext.bench ops|attention [--quick] [--json PATH]``.

``ops``: copy bandwidth (the floor), router_logits / gather_rows / scatter_merge forward and backward
as effective bandwidth, route against topk + sort, and the whole MoD overhead of a layer against its
bandwidth floor and the public-code torch version. ``attention``: gmod.attention forward/backward
against SDPA (flash, cuDNN; math on CPU) in TFLOP/s, and decode against KV caches in GB/s.
Each gmod result is checked against its baseline once before it is timed ("MISMATCH" otherwise).
See ``python -m gmod_ext.bench --help`` for what each column means.
"""
from .common import Ctx, measure  # noqa: F401

__all__ = ["Ctx", "measure"]
