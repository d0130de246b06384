"""argparse value types shared by the command lines (``python -m gmod_ext ...``, ``python -m
gmod_ext.bench ...``): a bad value becomes argparse's one-line ``error:`` and exit status 2."""
from __future__ import annotations

import argparse
import math


def int_at_least(lo: int):
    """An integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n

    return parse


def finite_float(positive: bool = False):
    """A finite number (> 0 when ``positive``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or (positive and v <= 0):
            raise argparse.ArgumentTypeError(f"must be a finite number{' > 0' if positive else ''}, got {text!r}")
        return v

    return parse
