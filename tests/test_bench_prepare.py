"""The benchmark's timing of the accepting path alone, over its own invoices."""

from __future__ import annotations

import re

import pytest

from bench import prepare


def test_times_the_benchmarks_invoices_through_prepare(capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare._unstuffed(b"..a\r\nb\r\n..\r\n") == b".a\r\nb\r\n.\r\n"
    assert prepare.main(["--messages", "60", "--rounds", "2"]) == 0
    shown = capsys.readouterr().out
    found = re.fullmatch(
        r"prepare: (\d+\.\d) µs a message \(median of 2 rounds of 60; fastest (\d+\.\d)\)\n", shown
    )
    assert found is not None, shown
    assert 0 < float(found[2]) <= float(found[1])
