"""``.stepped``: which day files hold records the clock stepped back for, so
that a window in the past skips the others unread and still finds those."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from relay.audit import AuditLog, events, reader, verify
from relay.audit.search import report, search
from relay.audit.writer import AuditError
from tests.test_audit_fixture import ACME_INVOICE, GLOBEX, Clock
from tests.test_audit_search import _message

ROOT = Path(__file__).resolve().parent.parent
DEC = [date(2026, 12, d) for d in range(5, 9)]


def _loaded(log: AuditLog) -> None:
    log.append(events.policy_loaded(policy_file="relay.yaml", policy_sha256="9f2c" * 16))


def stepped_back(directory: Path) -> Clock:
    """One record on 5 and 6 December; at 00:09 on the 7th a record, then the
    clock back to 23:45 of the 6th for a message (seq 4-6), then one on the 8th."""
    clock = Clock(datetime(2026, 12, 5, 10, 0, tzinfo=UTC))
    with AuditLog(directory, clock=clock) as log:
        _loaded(log)
        clock.now = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
        _loaded(log)
        clock.now = datetime(2026, 12, 7, 0, 9, tzinfo=UTC)
        _loaded(log)
        clock.now = datetime(2026, 12, 6, 23, 45, tzinfo=UTC)
        _message(log, ACME_INVOICE, "acme", "jan")
        clock.now = datetime(2026, 12, 8, 10, 0, tzinfo=UTC)
        _loaded(log)
    return clock


def scanned(monkeypatch: pytest.MonkeyPatch) -> list[date]:
    """The days whose files a search looks into for records before its window's end."""
    seen: list[date] = []
    real = reader._holds_before

    def spy(file: reader.DayFile, time: str) -> bool:
        seen.append(file.day)
        return real(file, time)

    monkeypatch.setattr(reader, "_holds_before", spy)
    return seen


def seqs(directory: Path, **window: str) -> list[int]:
    return [r["seq"] for r in search(directory, **window)]  # type: ignore[arg-type]


def test_stepped_round_trips_and_a_damaged_one_is_not_trusted(tmp_path: Path) -> None:
    stepped = reader.Stepped(DEC[0], DEC[3], frozenset({DEC[2], DEC[1]}))
    text = reader.stepped_text(stepped)
    assert reader.parse_stepped(text) == stepped
    assert reader.parse_stepped(reader.stepped_text(reader.Stepped(DEC[0], DEC[0]))) is not None
    assert reader.parse_stepped(text[:-1]) is None  # cut off in a crash
    assert reader.parse_stepped(text.replace(b"2026-12-07", b"2026-12-08")) is None
    assert reader.parse_stepped(b"") is None
    (tmp_path / ".stepped").write_bytes(text)
    assert reader.read_stepped(tmp_path) == stepped
    (tmp_path / ".stepped").write_bytes(text + b"x" * reader.STEPPED_SIZE)
    assert reader.read_stepped(tmp_path) is None


def test_a_step_back_across_midnight_is_marked_and_later_files_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file after a window was scanned whole: a window in the past cost
    as much as reading the rest of the log. Only the file named is scanned."""
    stepped_back(tmp_path)
    assert reader.read_stepped(tmp_path) == reader.Stepped(DEC[0], DEC[3], frozenset({DEC[2]}))
    seen = scanned(monkeypatch)
    assert seqs(tmp_path, since="2026-12-06", until="2026-12-06") == [2, 4, 5, 6]
    assert seen == [DEC[2]]
    seen.clear()
    assert seqs(tmp_path, until="2026-12-05") == [1]
    assert seen == [DEC[2]]  # scanned, and it holds nothing before the 6th
    (row,) = report(tmp_path, since="2026-12-06", until="2026-12-06")
    assert (row["tenant"], row["sent"], row["delivered"]) == ("acme", 1, 1)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "gzip"])
def test_a_year_ahead_clock_set_right_marks_its_one_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed: bool
) -> None:
    """The file goes on for the year after: marked once, compressed or not."""
    clock = Clock(datetime(2027, 12, 6, 10, 0, tzinfo=UTC))
    with AuditLog(tmp_path, clock=clock) as log:
        _loaded(log)
        clock.now = datetime(2026, 12, 6, 10, 0, tzinfo=UTC)
        _message(log, ACME_INVOICE, "acme", "jan")
        clock.now = datetime(2027, 3, 1, 10, 0, tzinfo=UTC)
        _message(log, GLOBEX, "globex", "hank")
        clock.now = datetime(2027, 12, 7, 10, 0, tzinfo=UTC)
        _loaded(log)
        clock.now = datetime(2027, 12, 8, 10, 0, tzinfo=UTC)
        _loaded(log)
    if packed:
        AuditLog(tmp_path, compress_after_days=1, clock=Clock(clock.now)).maintain()
        assert (tmp_path / "audit-2027-12-06.jsonl.gz").exists()
        assert (tmp_path / "audit-2027-12-07.jsonl.gz").exists()
    stepped = reader.read_stepped(tmp_path)
    assert stepped is not None and stepped.days == {date(2027, 12, 6)}
    seen = scanned(monkeypatch)
    assert seqs(tmp_path, since="2026-12-06", until="2026-12-06") == [2, 3, 4]
    assert seqs(tmp_path, since="2027-03-01", until="2027-03-01") == [5, 6, 7]
    assert set(seen) == {date(2027, 12, 6)}


def test_the_mark_is_on_disk_before_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the two leaves a file named that holds no such record (a
    scan for nothing), never such a record in a file not named."""
    clock = Clock(datetime(2026, 12, 7, 0, 9, tzinfo=UTC))
    with AuditLog(tmp_path, clock=clock) as log:
        _loaded(log)

        def crash(data: bytes, sync: bool) -> None:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(log, "_write", crash)
        clock.now = datetime(2026, 12, 6, 23, 45, tzinfo=UTC)
        with pytest.raises(AuditError):
            _loaded(log)
    stepped = reader.read_stepped(tmp_path)
    assert stepped is not None and stepped.days == {DEC[2]}
    assert seqs(tmp_path, until="2026-12-06") == []


def test_a_lost_or_damaged_mark_has_every_later_file_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stepped_back(tmp_path)
    seen = scanned(monkeypatch)
    (tmp_path / ".stepped").write_bytes(b"covers 2026-12-05 2026-12-08\n")  # torn
    assert seqs(tmp_path, until="2026-12-06") == [1, 2, 4, 5, 6]
    assert seen == [DEC[2], DEC[3]]
    (tmp_path / ".stepped").unlink()
    assert seqs(tmp_path, until="2026-12-06") == [1, 2, 4, 5, 6]


def test_a_mark_that_cannot_be_written_removes_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk, say: the record is written, and nothing vouches for skipping."""

    def full(self: AuditLog, stepped: reader.Stepped) -> None:
        raise OSError(28, "No space left on device")

    clock = Clock(datetime(2026, 12, 7, 0, 9, tzinfo=UTC))
    with AuditLog(tmp_path, clock=clock) as log:
        _loaded(log)
        monkeypatch.setattr(AuditLog, "_write_stepped", full)
        clock.now = datetime(2026, 12, 6, 23, 45, tzinfo=UTC)
        _loaded(log)
    assert not (tmp_path / ".stepped").exists()
    assert seqs(tmp_path, until="2026-12-06") == [2]


def test_files_an_older_version_wrote_are_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Coverage starts at the first file begun with it, and again after a file
    begun without it (a downgrade for a while): the files outside hold records
    the clock stepped back for that no mark names."""
    stepped_back(tmp_path)
    (tmp_path / ".stepped").unlink()  # as an older version left the log
    clock = Clock(datetime(2026, 12, 9, 10, 0, tzinfo=UTC))
    with AuditLog(tmp_path, clock=clock) as log:
        _loaded(log)
    assert reader.read_stepped(tmp_path) == reader.Stepped(date(2026, 12, 9), date(2026, 12, 9))
    seen = scanned(monkeypatch)
    assert seqs(tmp_path, until="2026-12-06") == [1, 2, 4, 5, 6]
    assert seen == [DEC[2], DEC[3]]  # not the 9th

    (tmp_path / "audit-2026-12-10.jsonl").touch()  # begun by an older version
    clock.now = datetime(2026, 12, 11, 10, 0, tzinfo=UTC)
    with AuditLog(tmp_path, clock=clock) as log:
        _loaded(log)
    assert reader.read_stepped(tmp_path) == reader.Stepped(date(2026, 12, 11), date(2026, 12, 11))


def test_retention_drops_the_marks_of_the_files_it_deletes(tmp_path: Path) -> None:
    clock = stepped_back(tmp_path)
    clock.now = datetime(2026, 12, 10, 10, 0, tzinfo=UTC)
    AuditLog(tmp_path, retention_days=2, clock=clock).maintain()
    assert [f.day for f in reader.day_files(tmp_path)] == [DEC[3], date(2026, 12, 10)]
    stepped = reader.read_stepped(tmp_path)
    assert stepped is not None and stepped.days == set()
    assert stepped.covers(date(2026, 12, 10))
    assert verify(tmp_path).ok


def test_verify_of_a_log_with_marks_is_intact_and_says_nothing_of_them(
    policy_file: Path,
) -> None:
    directory = policy_file.parent / "state" / "audit"
    stepped_back(directory)
    assert (directory / ".stepped").exists()
    done = subprocess.run(
        [sys.executable, "-m", "relay", "audit", "verify", "-c", str(policy_file)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "stepped" not in done.stdout + done.stderr
    assert "note:" not in done.stdout.replace("note: the chain starts at its genesis", "")
