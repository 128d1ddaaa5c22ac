"""Argument types of the command line: a bad number is argparse's one-line usage error
(exit 2), not an OverflowError or a silent nonsense value further on."""

from __future__ import annotations

import argparse
import math


def port(text: str) -> int:
    """A TCP port, 1-65535 (99999 was an OverflowError when the server bound it)."""
    value = _int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def positive_int(text: str) -> int:
    """A whole number > 0 (``top --limit -1`` showed all rows but one)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
