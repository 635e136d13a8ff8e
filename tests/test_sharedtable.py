"""The lock-free table the workers share: rows, probing, slots handed on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.sharedtable import SharedTable, key_of

ROOT = Path(__file__).resolve().parent.parent


def test_each_row_is_its_writers_and_every_row_is_read() -> None:
    table = SharedTable("test", rows=3, slots=8, width=2)
    first, third = table.row(0), table.row(2)
    key = key_of("acme")
    table.words[first.own(key)] = 5  # type: ignore[index]
    table.words[third.own(key)] = 7  # type: ignore[index]
    reader = table.row(-1)
    assert sorted(table.words[base] for base in reader.found(key)) == [5, 7]
    assert list(reader.found(key_of("globex"))) == []


def test_a_worker_in_the_place_of_one_that_ended_finds_its_slots() -> None:
    table = SharedTable("test", rows=1, slots=8, width=1)
    key = key_of("acme")
    base = table.row(0).own(key)
    table.words[base] = 3  # type: ignore[index]
    assert table.row(0).own(key) == base  # a new process's view: nothing cached
    assert table.words[base] == 3  # type: ignore[index]


def test_a_slot_is_handed_on_only_when_its_counts_are_done() -> None:
    table = SharedTable("test", rows=1, slots=2, width=1)
    row = table.row(0)
    one, two, three = key_of("one"), key_of("two"), key_of("three")
    first, second = row.own(one), row.own(two)
    table.words[first] = 9  # type: ignore[index]
    table.words[second] = 4  # type: ignore[index]
    assert row.own(three, lambda base: False) is None  # full, nothing done with
    taken = row.own(three, lambda base: table.words[base] == 9)
    assert taken == first and table.words[taken] == 0  # its old count cleared
    reader = table.row(-1)
    assert list(reader.found(one)) == []
    assert [table.words[b] for b in reader.found(two)] == [4]  # its chain not cut
    assert row.own(one, lambda base: False) is None  # one's cached slot is gone too


def test_a_full_row_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    table = SharedTable("client limits", rows=1, slots=1, width=1)
    row = table.row(0)
    assert row.own(key_of("one")) is not None
    with caplog.at_level(logging.ERROR, logger="relay"):
        assert row.own(key_of("two")) is None
        assert row.own(key_of("three")) is None
    said = [r.getMessage() for r in caplog.records]
    assert said == ["client limits: 1 keys in a worker's table, no room for more"]


def test_a_full_row_gives_the_slot_that_counts_least_never_a_kept_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    table = SharedTable("test", rows=2, slots=3, width=1)
    row, reader = table.row(0), table.row(1)
    keys = [key_of(name) for name in ("one", "two", "three")]
    for key, count in zip(keys, (5, 2, 9), strict=True):
        table.words[row.own(key)] = count  # type: ignore[index]

    def rank(base: int) -> tuple[int, ...] | None:
        return None if table.words[base] == 2 else (table.words[base],)

    with caplog.at_level(logging.ERROR, logger="relay"):
        taken = row.own(key_of("four"), lambda base: False, rank)
        assert taken is not None and table.words[taken] == 0
        assert list(reader.found(keys[0])) == []  # 5: the least that may go
        assert [table.words[b] for b in reader.found(keys[1])] == [2]
        assert row.own(key_of("five"), None, lambda base: None) is None  # none may go
    assert caplog.records == []  # the caller says it, knowing why


def test_a_keys_place_is_the_same_in_every_worker_and_unknown_to_anyone_else() -> None:
    """Places worked out beforehand let an attacker lock the few slots a full
    row ranks near a key's place, and the failures placed there went uncounted."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker, forked as the supervisor forks them
        os.write(write, str(key_of("2001:db8:1:2::/64")).encode())
        os._exit(0)
    os.close(write)
    try:
        assert int(os.read(read, 64)) == key_of("2001:db8:1:2::/64")
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    script = "from relay.sharedtable import key_of; print(key_of('2001:db8:1:2::/64'))"
    other = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=True, cwd=ROOT,
    )  # fmt: skip
    assert int(other.stdout) != key_of("2001:db8:1:2::/64")


def test_a_table_with_a_reach_keeps_each_key_near_its_place() -> None:
    """Unbounded, a key missing from a full row was looked for in every slot of
    it, and room for a new one too: milliseconds a message in a table of 4,096."""
    table = SharedTable("test", rows=1, slots=64, width=1, reach=4)
    row = table.row(0)
    placed = [key for key in map(key_of, map(str, range(200))) if row.own(key) is not None]
    reader = table.row(-1)
    assert all(len(list(reader.found(key))) == 1 for key in placed)
    for key in placed:
        start = key % 64
        base = next(reader.found(key))
        assert (base - 1) // table.stride in {(start + probe) % 64 for probe in range(4)}


def test_a_full_row_with_a_reach_gives_a_slot_past_the_first_few_when_they_are_kept() -> None:
    """Ranked among the first 16 of a reach of 32 only, a key whose first 16 were
    all kept found no room though the next 16 were not: a limited tenant was
    refused (451) with tenants without a limit in its reach."""
    table = SharedTable("test", rows=1, slots=32, width=1, reach=32)
    row = table.row(0)
    for place in range(32):  # a key at each place, the first 16 from place 0 kept
        table.words[row.own(32 + place)] = 1  # type: ignore[index]

    def rank(base: int) -> tuple[int, ...] | None:
        return None if table.words[base - 1] % 32 < 16 else (table.words[base],)

    taken = row.own(32 * 5, None, rank)  # its place: 0
    assert taken is not None and (taken - 1) // table.stride == 16
    assert list(table.row(-1).found(32 + 16)) == []
