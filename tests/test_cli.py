"""The command-line helpers: range-checked numbers, one-line parser errors, progress bars in logs."""

from __future__ import annotations

import argparse
import io
import time

import pytest

from galaxygen import cli


@pytest.mark.parametrize("text,ok", [("1", True), ("7", True), ("0", False), ("-1", False), ("1.5", False),
                                     ("x", False), ("", False)])
def test_positive(text, ok):
    if ok:
        assert cli.positive(text) == int(text)
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            cli.positive(text)


@pytest.mark.parametrize("text", ["-0.5", "nan", "inf", "2.5", "x"])
def test_bounded_float_refuses_out_of_range_and_non_finite(text):
    parse = cli.number(float, 0, 2)
    with pytest.raises(argparse.ArgumentTypeError, match="from 0 to 2"):
        parse(text)
    assert parse("0.5") == 0.5 and parse("0") == 0


def test_parser_errors_are_one_line_and_exit_2(capsys):
    parser = cli.Parser(prog="prog")
    parser.add_argument("--n", type=cli.positive)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "-3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --n: expected a positive integer, got '-3'")


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_in_a_log_is_silent_for_short_work_and_one_line_per_interval_for_long(monkeypatch):
    log = Log()
    for _ in cli.progress_bar(range(1000), desc="short", file=log):
        pass
    assert log.getvalue() == ""  # no 750 refreshes, and nothing at all for work under the interval

    monkeypatch.setattr(cli, "LOG_INTERVAL_S", 0.05)
    log = Log()
    for _ in cli.progress_bar(range(12), desc="long", file=log, leave=False, disable=None):
        time.sleep(0.02)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 2 <= len(lines) <= 8
    assert all(line.startswith("long:") for line in lines) and "12/12" in lines[-1]
