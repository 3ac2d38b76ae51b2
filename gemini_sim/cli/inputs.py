"""The one place where the command line's numbers are parsed and checked.

Every numeric flag of every verb is declared with :func:`number` (a float) or :func:`whole` (an integer) and its
range, so a value is finite and in range before any work, memory or loop is sized by it; anything else is
argparse's one-line error (``gemini-sim: error: argument --days: ...``, exit code 2). :func:`int_range` parses
``K`` or ``A-B`` with a bound on its length, checked before the range is built. A new verb gets all of this by
declaring its flags here.
"""

from __future__ import annotations

import argparse
import math

MAX_RANGE = 10_000  # values in a K range (placement --failures A-B)


def _describe(lo, hi, lo_open: bool) -> str:
    left = f"> {lo:g}" if lo_open else f">= {lo:g}"
    return left if hi is None else f"{left} and <= {hi:g}"


def number(lo: float = -math.inf, hi: float | None = None, lo_open: bool = False):
    """An argparse type: a finite float in [lo, hi] (``lo_open``: lo excluded)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_describe(lo, hi, lo_open)}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def whole(lo: int = 0, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_describe(lo, hi, False)}, got {text!r}")
        return value

    parse.__name__ = "whole number"
    return parse


def int_range(lo: int = 0, hi: int | None = None, most: int = MAX_RANGE):
    """An argparse type: ``K`` or ``A-B`` (A <= B, within [lo, hi], at most ``most`` values) as a list."""
    def parse(text: str) -> list[int]:
        a_text, sep, b_text = text.partition("-")
        try:
            a = int(a_text)
            b = int(b_text) if sep else a
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer or a range like 1-8, got {text!r}") from None
        if a > b or a < lo or (hi is not None and b > hi):
            raise argparse.ArgumentTypeError(f"range {text!r} is empty or outside {_describe(lo, hi, False)}")
        if b - a + 1 > most:
            raise argparse.ArgumentTypeError(f"range {text!r} has {b - a + 1:,} values; at most {most:,}")
        return list(range(a, b + 1))

    parse.__name__ = "range"
    return parse


# The bounds every verb uses: large enough for any real cluster or run, small enough to refuse nonsense early.
MACHINES = whole(1, 1_000_000)
REPLICAS = whole(1, 1_000)
SEED = whole(0, 2**63 - 1)
HOURS = number(0, 1e9, lo_open=True)
DAYS = number(0, 36_500, lo_open=True)  # a century
FRACTION = number(0, 1)
PERCENT = number(0, 1e6)
