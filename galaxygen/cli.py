"""Small argument types shared by the command-line entry points."""

from __future__ import annotations

import argparse


def positive(text: str) -> int:
    """An argparse type: an integer >= 1, or one clear error naming the value."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
