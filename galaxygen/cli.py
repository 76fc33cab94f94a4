"""What the command-line entry points share: range-checked argument types, a parser whose errors are one
line, and the progress bar every long loop uses (a live bar on a terminal, a line every 30 s in a log)."""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any, NoReturn

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # progress lines in a log file or SLURM output: at most one per bar every 30 s


def number(kind: type, low: float | None = None, high: float | None = None,
           what: str = "") -> Callable[[str], Any]:
    """An argparse type: an int or float within [low, high], or one error naming the value and the range."""
    if not what:
        name = "an integer" if kind is int else "a number"
        if high is None:
            what = f"{name} >= {low}" if low is not None else name
        else:
            what = f"{name} from {low} to {high}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or (kind is float and not math.isfinite(value)) or \
                (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive = number(int, 1, what="a positive integer")
non_negative = number(int, 0, what="an integer >= 0")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...`) and exit 2, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _Lines(io.TextIOBase):
    """A stream for tqdm that turns each carriage-return refresh into a line of its own (log files)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").replace("\n", "").rstrip()
        if line:
            self.stream.write(line + "\n")
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, *, file: IO[str] | None = None, **kwargs) -> tqdm:
    """tqdm for every long loop of the project: a live bar on a terminal; in a log file or SLURM output
    (not a terminal) a line every LOG_INTERVAL_S, and nothing at all for work shorter than that."""
    stream = file or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", 1.0)
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, delay=LOG_INTERVAL_S, leave=True,
                  ascii=True, ncols=100)
    if kwargs.get("disable") is None:  # tqdm's "off when not a terminal": a log still gets its lines
        kwargs["disable"] = False
    return tqdm(iterable, file=_Lines(stream), **kwargs)
