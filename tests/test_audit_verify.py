"""Tampering with the audit log on disk, in every way an auditor asks about.

Each test edits the fixture's real files and checks that verify names the
first problem by file and line, in words an auditor can act on.
"""

from __future__ import annotations

import fcntl
import gzip
import io
import json
import os
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from relay.audit import AuditLog, events, reader, verify
from relay.audit.chain import VerifyResult, seal
from relay.audit.commands import verify_main
from tests.test_audit_fixture import START, Clock, build

DAY1, DAY2, DAY3 = "audit-2024-05-06.jsonl", "audit-2024-05-07.jsonl", "audit-2024-05-08.jsonl"
KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    build(tmp_path)
    return tmp_path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _problem(directory: Path, key: bytes | None = None) -> tuple[str, int, str]:
    result = verify(directory, key)
    assert result.problem is not None, "tampering went unnoticed"
    return result.problem.file, result.problem.line, result.problem.message


def _resealed(line: bytes, key: bytes | None = None, **changes: object) -> bytes:
    """What an attacker without the HMAC key can do: edit and recompute the hash."""
    record = json.loads(line)
    record.pop("hash")
    record.update(changes)
    return seal(record, key)[0].encode() + b"\n"


def test_untouched_log_verifies_with_counts(log_dir: Path) -> None:
    result = verify(log_dir)
    assert result.ok and result.files == 3 and result.records == 18
    assert (result.first_seq, result.last_seq) == (1, 18)
    out, err = io.StringIO(), io.StringIO()
    assert verify_main(log_dir, None, out, err) == 0
    assert "audit log intact: 18 records in 3 files (seq 1..18)" in out.getvalue()
    assert f"head: seq 18 hash {result.head}" in out.getvalue()
    assert err.getvalue() == "note: the chain starts at its genesis (seq 1)\n"


def test_one_changed_byte(log_dir: Path) -> None:
    path = log_dir / DAY1
    data = path.read_bytes()
    at = data.index(b"4Vx1")
    path.write_bytes(data[:at] + b"5" + data[at + 1 :])
    assert _problem(log_dir) == (
        DAY1,
        4,
        "record seq 4 was changed: its hash does not match its content",
    )
    out, err = io.StringIO(), io.StringIO()
    assert verify_main(log_dir, None, out, err) == 1
    assert f"TAMPERED: {DAY1} line 4: record seq 4 was changed" in err.getvalue()


def test_a_changed_record_with_a_recomputed_hash(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    lines[3] = _resealed(lines[3], reply="250 2.0.0 fine")
    path.write_bytes(b"".join(lines))
    file, line, message = _problem(log_dir)
    assert (file, line) == (DAY1, 5)
    assert f"does not chain to the record before it ({DAY1} line 4)" in message


def test_a_key_written_twice_so_its_first_value_differs_from_what_was_sealed(
    log_dir: Path,
) -> None:
    """JSON readers differ on a key written twice: Python keeps the last value (the
    one the hash covers), ``grep`` and many tools show the first. A record shown
    with a recipient it was never delivered to must not verify."""
    path = log_dir / DAY1
    lines = _lines(path)
    real = b'"recipient":"buyer@customer.example",'
    forged = b'"recipient":"someone@else.example",' + real
    assert real in lines[3]
    lines[3] = lines[3].replace(real, forged)
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (
        DAY1,
        4,
        "record seq 4 was changed: its hash does not match its content",
    )


def test_a_deleted_line(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    del lines[4]
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (DAY1, 5, "record 5 missing before this line (deleted)")


def test_several_deleted_lines(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    del lines[4:7]
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (DAY1, 5, "records 5..7 missing before this line (deleted)")


def test_two_swapped_lines(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (
        DAY1,
        4,
        "lines 4 and 5 are out of order (seq 5 comes before seq 4)",
    )


def test_an_inserted_forged_line(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    forged = lines[3].replace(b"buyer@customer.example", b"thief@elsewhere.example")
    lines.insert(4, forged)
    path.write_bytes(b"".join(lines))
    file, line, message = _problem(log_dir)
    assert (file, line) == (DAY1, 5)
    assert "was inserted" in message and "forged" in message


def test_an_inserted_line_with_a_valid_hash(log_dir: Path) -> None:
    """Without an HMAC key a forger can compute a valid hash; the next record exposes it."""
    path = log_dir / DAY1
    lines = _lines(path)
    lines.insert(
        4,
        _resealed(
            lines[3], seq=5, prev=json.loads(lines[3])["hash"], recipient="thief@elsewhere.example"
        ),
    )
    path.write_bytes(b"".join(lines))
    file, line, message = _problem(log_dir)
    assert (file, line) == (DAY1, 6)
    assert f"line 5 of {DAY1} (seq 5) was inserted" in message


def test_a_copied_line(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    lines.insert(8, lines[2])
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (
        DAY1,
        9,
        "record seq 3 follows seq 8: a line was inserted, copied or moved here",
    )


def test_a_file_truncated_mid_line(log_dir: Path) -> None:
    path = log_dir / DAY3
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    assert _problem(log_dir) == (DAY3, 3, "truncated record: the file ends in the middle of a line")


def test_an_earlier_file_truncated_mid_line(log_dir: Path) -> None:
    path = log_dir / DAY1
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    assert _problem(log_dir)[:2] == (DAY1, 11)


def test_a_whole_day_removed(log_dir: Path) -> None:
    (log_dir / DAY2).unlink()
    assert _problem(log_dir) == (
        DAY3,
        1,
        f"records 12..15 missing between {DAY1} and {DAY3} (a file removed, or its end cut off)",
    )


def test_the_first_day_removed_without_retention(log_dir: Path) -> None:
    (log_dir / DAY1).unlink()
    file, line, message = _problem(log_dir)
    assert (file, line) == (DAY2, 1)
    assert message == (
        "the chain starts at seq 12: records 1..11 missing before it"
        " and no retention record explains it"
    )
    err = io.StringIO()
    assert verify_main(log_dir, None, io.StringIO(), err) == 1
    # found at line 1, after the rest was read: not "verified before the problem"
    assert err.getvalue().endswith("  (the 7 records from there on are whole)\n")


def test_since_skips_earlier_days_and_says_so(log_dir: Path) -> None:
    (log_dir / DAY1).unlink()
    result = verify(log_dir, since=date(2024, 5, 7))
    assert result.ok and result.records == 7
    assert result.notes == [
        f"verified from --since 2024-05-07: starts at seq 12 in {DAY2}; earlier records not checked"
    ]
    err = io.StringIO()
    assert verify_main(log_dir, "2024-05-07", io.StringIO(), err) == 0
    assert "earlier records not checked" in err.getvalue()


def test_retention_is_told_apart_from_removal(log_dir: Path) -> None:
    log = AuditLog(log_dir, retention_days=1, clock=Clock(START + timedelta(days=2)))
    log.maintain()
    assert not (log_dir / DAY1).exists()
    result = verify(log_dir)
    assert result.ok
    assert result.notes[0].startswith(
        f"starts after retention at seq 12 in {DAY2}: records 1..11 were deleted by retention"
        " (older than 1 day) at 2024-05-08T09:00:00.000Z"
    )
    (log_dir / DAY2).unlink()  # removing more than retention did is still caught
    assert _problem(log_dir)[:2] == (DAY3, 1)


def test_a_start_after_retention_must_chain_to_the_record_retention_names(
    log_dir: Path,
) -> None:
    """The ``pruned`` record names the hash of the last record it deleted: the
    first one kept must chain to it, as seq 1 must to the genesis, or any chain
    recomputed from there on, in a copy without ``.head``, passes for the log.
    Said as such: it was "records 12..11 missing before it"."""
    AuditLog(log_dir, retention_days=1, clock=Clock(START + timedelta(days=2))).maintain()
    (log_dir / reader.HEAD_FILE).unlink()
    prev = "0" * 64
    for name in (DAY2, DAY3):
        path = log_dir / name
        lines = []
        for line in _lines(path):
            lines.append(_resealed(line, prev=prev))
            prev = json.loads(lines[-1])["hash"]
        path.write_bytes(b"".join(lines))
    file, line, message = _problem(log_dir)
    assert (file, line) == (DAY2, 1)
    assert "the records before it are not the ones retention deleted" in message, message
    assert "missing" not in message, message  # "records 12..11 missing before it"


def test_a_replaced_start_of_the_log(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    lines[0] = _resealed(lines[0], prev="0" * 64)
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir)[:2] == (DAY1, 1)


def test_garbage_line(log_dir: Path) -> None:
    path = log_dir / DAY2
    path.write_bytes(path.read_bytes() + b"hello\n")
    assert _problem(log_dir) == (
        DAY2,
        5,
        "not a valid audit record (broken JSON or a cut-off line)",
    )


def test_hmac_chain_verifies_only_with_its_key(tmp_path: Path) -> None:
    build(tmp_path, key=KEY)
    assert verify(tmp_path, KEY).ok
    file, line, message = _problem(tmp_path)
    assert (file, line) == (DAY1, 1) and "HMAC key" in message
    assert _problem(tmp_path, b"another key")[:2] == (DAY1, 1)


def test_hmac_rejects_a_chain_recomputed_with_plain_sha256(tmp_path: Path) -> None:
    build(tmp_path, key=KEY)
    prev = None
    for name in (DAY1, DAY2, DAY3):  # the attacker edits a record and rebuilds every hash
        out = []
        for line in _lines(tmp_path / name):
            record = json.loads(line)
            record.pop("hash")
            if prev is not None:
                record["prev"] = prev
            if record["seq"] == 4:
                record["recipient"] = "thief@elsewhere.example"
            text, prev = seal(record)
            out.append(text.encode() + b"\n")
        (tmp_path / name).write_bytes(b"".join(out))
    assert prev is not None
    (tmp_path / ".head").write_bytes(reader.head_line(18, prev))  # it has no HMAC either
    assert verify(tmp_path).ok  # a plain chain is self-consistent...
    assert _problem(tmp_path, KEY)[:2] == (DAY1, 1)  # ...but not under the key
    key_file = tmp_path / "key"
    key_file.write_bytes(KEY + b"\n")
    from relay.audit import load_key

    assert load_key(key_file) == KEY
    assert verify_main(tmp_path, None, io.StringIO(), io.StringIO(), load_key(key_file)) == 1


def test_compressed_days_verify_and_tampering_inside_them_is_found(log_dir: Path) -> None:
    AuditLog(log_dir, compress_after_days=1, clock=Clock(START + timedelta(days=3))).maintain()
    assert verify(log_dir).ok
    gz = log_dir / (DAY2 + ".gz")
    with gzip.open(gz, "rb") as f:
        data = f.read()
    with gzip.open(gz, "wb") as f:
        f.write(data.replace(b"250 ok", b"250 OK"))
    assert _problem(log_dir) == (
        DAY2 + ".gz",
        4,
        "record seq 15 was changed: its hash does not match its content",
    )


def test_a_damaged_compressed_file(log_dir: Path) -> None:
    AuditLog(log_dir, compress_after_days=1, clock=Clock(START + timedelta(days=3))).maintain()
    gz = log_dir / (DAY1 + ".gz")
    gz.write_bytes(gz.read_bytes()[:-30])
    file, _, message = _problem(log_dir)
    assert file == DAY1 + ".gz" and "compressed file is damaged" in message


def test_empty_and_missing_logs(tmp_path: Path) -> None:
    result = verify(tmp_path)
    assert result.ok and result.records == 0 and "empty" in result.notes[0]
    err = io.StringIO()
    assert verify_main(tmp_path / "nope", None, io.StringIO(), err) == 2
    assert "No such file or directory" in err.getvalue()
    assert verify_main(tmp_path, "yesterday-ish", io.StringIO(), io.StringIO()) == 2


def test_records_appended_after_verify_extend_the_same_chain(log_dir: Path) -> None:
    head = verify(log_dir).head
    log = AuditLog(log_dir, clock=Clock(START + timedelta(days=2, hours=1)))
    log.append(events.expired(queue_id="Q", message_id=None, recipient="a@b"))
    last = json.loads(_lines(log_dir / DAY3)[-1])
    assert last["prev"] == head and verify(log_dir).ok


def test_a_line_the_relay_is_appending_is_waited_for_not_called_truncated(log_dir: Path) -> None:
    """verify on a running relay's log may read the last line half-written; the
    writer holds the log's lock for the append, and verify waits for it."""
    path = log_dir / DAY3
    data = path.read_bytes()
    whole = verify(log_dir).records
    path.write_bytes(data[:-40])  # the first part of the append is in the file
    lock = os.open(log_dir / ".lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the writer holds it
    results: list[VerifyResult] = []
    reading = threading.Thread(target=lambda: results.append(verify(log_dir)))
    try:
        reading.start()
        time.sleep(0.3)
        assert reading.is_alive() and not results  # waiting for the append to end
        with path.open("ab") as stream:
            stream.write(data[-40:])
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        reading.join(10)
    (result,) = results
    assert result.ok and result.records == whole


def test_records_cut_from_the_end_are_found_with_the_head_written_down(log_dir: Path) -> None:
    """A shorter chain is still whole: only a head noted before shows the cut."""
    out = io.StringIO()
    assert verify_main(log_dir, None, out, io.StringIO()) == 0
    written_down = next(line for line in out.getvalue().splitlines() if line.startswith("head:"))
    assert verify_main(log_dir, None, io.StringIO(), io.StringIO(), anchor=written_down) == 0
    path = log_dir / DAY3
    path.write_bytes(b"".join(_lines(path)[:-2]))  # the last two records gone
    (log_dir / ".head").unlink()  # whoever can cut the log can rewrite .head too
    assert verify(log_dir).ok  # as before: nothing else can tell
    err = io.StringIO()
    assert verify_main(log_dir, None, io.StringIO(), err, anchor=written_down) == 1
    assert (
        err.getvalue()
        .removeprefix("note: the chain starts at its genesis (seq 1)\n")
        .startswith(
            f"relay audit verify: TAMPERED: {DAY3} line 1: the log ends at seq 16,"
            " before the anchor's seq 18: records were removed from its end\n"
        )
    )


def test_an_anchor_written_down_in_capitals_is_the_same_head(log_dir: Path) -> None:
    """A head copied into a ticket or a spreadsheet comes back in capitals: the
    same hash, and an intact log was said to be TAMPERED (exit 1)."""
    out = io.StringIO()
    assert verify_main(log_dir, None, out, io.StringIO()) == 0
    written_down = next(line for line in out.getvalue().splitlines() if line.startswith("head:"))
    seq, head = written_down.removeprefix("head: seq ").split(" hash ")
    err = io.StringIO()
    assert verify_main(log_dir, None, io.StringIO(), err, anchor=f"{seq}:{head.upper()}") == 0
    assert "TAMPERED" not in err.getvalue()
    assert f"the anchor (seq {seq}) is in the log as written down" in err.getvalue()


def test_an_anchor_whose_record_was_replaced(log_dir: Path) -> None:
    head = verify(log_dir).head
    assert head is not None
    path = log_dir / DAY3
    lines = _lines(path)
    lines[-1] = _resealed(lines[-1], recipient="someone@else.example")
    path.write_bytes(b"".join(lines))
    (log_dir / ".head").unlink()  # whoever can edit the log can rewrite .head too
    assert verify(log_dir).ok  # a plain chain recomputed at its end
    err = io.StringIO()
    assert verify_main(log_dir, None, io.StringIO(), err, anchor=f"18:{head}") == 1
    assert "record seq 18 is not the one written down" in err.getvalue()


def test_an_anchor_older_than_the_days_verified_is_not_checked(log_dir: Path) -> None:
    head = verify(log_dir).head
    err = io.StringIO()
    assert verify_main(log_dir, "2024-05-08", io.StringIO(), err, anchor=f"seq 2 hash {head}") == 0
    assert "note: the anchor (seq 2) is older than the records verified: not checked" in (
        err.getvalue()
    )
    err = io.StringIO()
    assert verify_main(log_dir, None, io.StringIO(), err, anchor="18") == 2
    assert "bad --anchor '18'" in err.getvalue()


def test_a_since_out_of_the_calendar_is_a_usage_error(log_dir: Path) -> None:
    """It was an OverflowError traceback with exit 1, which reads as TAMPERED."""
    err = io.StringIO()
    assert verify_main(log_dir, "99999999d", io.StringIO(), err) == 2
    assert err.getvalue().startswith("relay audit verify: bad --since: '99999999d' is out of range")


def test_a_since_that_is_no_time_says_what_is_one(log_dir: Path) -> None:
    """It said Python's "Invalid isoformat string: 'xx'", where search says the forms."""
    err = io.StringIO()
    assert verify_main(log_dir, "xx", io.StringIO(), err) == 2
    assert err.getvalue() == (
        "relay audit verify: bad --since: 'xx' is not a time:"
        " use 2024-05-01, 2024-05-01T10:00Z or 7d, 12h, 30m\n"
    )


def test_since_with_a_utc_offset_starts_at_the_utc_day(log_dir: Path) -> None:
    """2024-05-07T01:00+05:00 is 2024-05-06T20:00Z: verify started at 05-07's file."""
    out = io.StringIO()
    assert verify_main(log_dir, "2024-05-07T01:00+05:00", out, io.StringIO()) == 0
    assert "audit log intact: 18 records in 3 files (seq 1..18)" in out.getvalue()


def test_an_anchor_with_no_records_since_is_not_checked_not_tampered(log_dir: Path) -> None:
    """--since after the last record read nothing, and the anchor was reported as
    records removed from the end: TAMPERED, exit 1, on an intact log."""
    head = verify(log_dir).head
    out, err = io.StringIO(), io.StringIO()
    assert verify_main(log_dir, "2030-01-01", out, err, anchor=f"seq 5 hash {head}") == 0, (
        err.getvalue()
    )
    assert "note: the anchor (seq 5) is not checked: no records from --since 2030-01-01 on" in (
        err.getvalue()
    )
    assert "note: no records from 2030-01-01 on to verify" in err.getvalue()
    assert "empty" not in out.getvalue()  # it holds records, none of them that late
    (log_dir / DAY3).unlink()  # with the anchor's day read, an end cut off still shows
    assert verify_main(log_dir, "2024-05-07", io.StringIO(), err, anchor=f"18:{head}") == 1


def _torn_mid_day(log_dir: Path) -> Path:
    """A crash while the third record of the day was written; the relay ended the
    line at its next start and wrote the same seq again, after the record before."""
    path = log_dir / DAY2
    lines = _lines(path)
    torn = lines[2][:25] + b" [torn write, ended by the relay]\n"
    path.write_bytes(b"".join([*lines[:2], torn, *lines[2:]]))
    return path


def test_a_torn_write_the_relay_ended_is_a_note_and_the_rest_is_checked(log_dir: Path) -> None:
    _torn_mid_day(log_dir)
    result = verify(log_dir)
    assert result.ok and result.records == 18
    assert (
        f"{DAY2} line 3: a write torn by a crash and ended by the relay, not a record:"
        " the chain goes on across it" in result.notes
    )
    out, err = io.StringIO(), io.StringIO()
    anchor = f"18:{result.head}"
    assert verify_main(log_dir, None, out, err, anchor=anchor) == 0
    assert "the anchor (seq 18) is in the log as written down" in err.getvalue()
    assert "audit log intact: 18 records" in out.getvalue()


def test_a_record_passed_off_as_a_torn_write_is_found(log_dir: Path) -> None:
    """The marker is plain text anyone can write: an edited record ended with it
    leaves its seq missing from the chain."""
    path = log_dir / DAY2
    lines = _lines(path)
    third = json.loads(lines[2])["seq"]
    lines[2] = lines[2].replace(b"250", b"550")[:-1] + b" [torn write, ended by the relay]\n"
    path.write_bytes(b"".join(lines))
    name, number, message = _problem(log_dir)
    assert (name, number) == (DAY2, 4)
    assert message.startswith(f"record {third} missing before this line (deleted)")
    assert "the torn line before it (line 3) stands for no record" in message


def test_two_far_apart_lines_swapped_are_named_so(log_dir: Path) -> None:
    path = log_dir / DAY1
    lines = _lines(path)
    lines[2], lines[8] = lines[8], lines[2]
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (
        DAY1,
        3,
        "lines 3 and 9 are out of order (seq 9 comes before seq 3)",
    )


def test_a_forged_record_appended_after_the_relays_newest_is_named_inserted(
    log_dir: Path,
) -> None:
    """Its seq and prev follow the last record as an edit of that record would, but
    the relay's ``.head`` says it never wrote a record after that one."""
    path = log_dir / DAY3
    last = json.loads(_lines(path)[-1])
    forged = dict(last, seq=last["seq"] + 1, prev=last["hash"], hash="0" * 64)
    path.write_bytes(path.read_bytes() + json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    assert _problem(log_dir) == (
        DAY3,
        len(_lines(path)),
        f"this line (seq {last['seq'] + 1}) was inserted: it is forged, its hash is wrong",
    )


def test_a_forged_record_whose_seq_fits_nowhere_is_named_inserted(log_dir: Path) -> None:
    """At the end of a day's file, where no next line shows what the chain expected."""
    path = log_dir / DAY1
    lines = _lines(path)
    copied = json.loads(lines[2])
    lines.append(json.dumps(dict(copied, hash="0" * 64), separators=(",", ":")).encode() + b"\n")
    path.write_bytes(b"".join(lines))
    assert _problem(log_dir) == (
        DAY1,
        len(lines),
        f"this line (seq {copied['seq']}) was inserted: it is forged, its hash is wrong",
    )


def test_more_removed_than_retention_names_only_what_retention_does_not_explain(
    log_dir: Path,
) -> None:
    AuditLog(log_dir, retention_days=1, clock=Clock(START + timedelta(days=2))).maintain()
    first_of_day3 = json.loads(_lines(log_dir / DAY3)[0])["seq"]
    (log_dir / DAY2).unlink()
    assert _problem(log_dir) == (
        DAY3,
        1,
        f"the chain starts at seq {first_of_day3}: records 12..{first_of_day3 - 1} missing"
        " before it; retention deleted only records 1..11 (at 2024-05-08T09:00:00.000Z)",
    )


def _logrotated(log_dir: Path, rotated: str) -> None:
    """What ``rotate 7 compress create`` does to the newest day's file: its
    records move to a name the relay does not read, an empty file takes its place."""
    path = log_dir / DAY3
    with gzip.open(log_dir / rotated, "wb") as packed:
        packed.write(path.read_bytes())
    path.write_bytes(b"")


@pytest.mark.parametrize(
    "rotated", [f"{DAY3}.1.gz", f"{DAY3}.gz.1", f"{DAY3}-20240509.gz", f"{DAY3}.1"]
)
def test_a_log_logrotate_rotated_is_not_intact_and_the_rotated_file_is_named(
    log_dir: Path, rotated: str
) -> None:
    """It said "audit log intact" on the records left, though .head names seq 18,
    and never named the file the newest records were in."""
    last_of_day2 = json.loads(_lines(log_dir / DAY2)[-1])["seq"]
    _logrotated(log_dir, rotated)
    out, err = io.StringIO(), io.StringIO()
    assert verify_main(log_dir, None, out, err) == 1
    assert f"note: {rotated} is not read: not a day file's name (rotated by logrotate?)\n" in (
        err.getvalue()
    )
    assert out.getvalue() == ""
    assert (
        f"\nrelay audit verify: TAMPERED: {DAY2} line {len(_lines(log_dir / DAY2))}: the log ends"
        f" at seq {last_of_day2}, but the relay wrote up to seq 18 (.head): records"
        f" {last_of_day2 + 1}..18 missing from its end (removed, or moved to a file not read:"
        " see the notes)\n"
    ) in err.getvalue()  # after the notes


def test_a_log_emptied_by_a_rotation_says_so_without_a_place(log_dir: Path) -> None:
    """Every day file moved away, an empty one left: the verdict began with
    ``- line 0:``, a place that is none."""
    for day in log_dir.glob("audit-*.jsonl"):
        day.rename(day.with_name(day.name + ".1"))
    (log_dir / DAY3).write_bytes(b"")
    result = verify(log_dir)
    assert result.problem is not None
    assert str(result.problem).startswith("the log is empty, but the relay wrote up to seq 18")


def test_a_rotated_log_written_to_again_names_the_rotated_file_by_the_gap(log_dir: Path) -> None:
    rotated = f"{DAY3}.1.gz"
    _logrotated(log_dir, rotated)
    log = AuditLog(log_dir, clock=Clock(START + timedelta(days=2, hours=1)))
    log.append(events.expired(queue_id="Q", message_id=None, recipient="a@b"))
    result = verify(log_dir)
    assert result.problem is not None and result.problem.message.endswith(
        f"missing between {DAY2} and {DAY3} (a file removed, or its end cut off)"
    )
    assert f"{rotated} is not read: not a day file's name (rotated by logrotate?)" in result.notes


def test_the_log_is_not_cut_short_while_the_relay_writes_to_it(log_dir: Path) -> None:
    """.head may name records verify has not read when it is read after them:
    it is read first, so records written during the read only lengthen the log."""
    log = AuditLog(log_dir, clock=Clock(START + timedelta(days=2, hours=1)))
    stop, wrote = threading.Event(), threading.Event()

    def write() -> None:
        while not stop.is_set():
            log.append(events.expired(queue_id="Q", message_id=None, recipient="a@b"))
            wrote.set()

    writing = threading.Thread(target=write)
    writing.start()
    try:
        assert wrote.wait(10)
        results = [verify(log_dir)]
        deadline = time.monotonic() + 30  # on a loaded machine 20 reads may see no write
        while len(results) < 20 or results[-1].records == results[0].records:
            assert time.monotonic() < deadline, "nothing was written while verify read"
            results.append(verify(log_dir))
    finally:
        stop.set()
        writing.join(10)
        log.close()
    assert [r.problem for r in results] == [None] * len(results)


@pytest.mark.parametrize("how", ["removed", "rotated"])
def test_the_newest_file_gone_with_retention_s_record_names_the_end_not_the_start(
    log_dir: Path, how: str
) -> None:
    """Retention writes ``pruned`` into the newest file: with that file gone, the
    start looked cut too, and verify sent the auditor after old records deleted
    ("no retention record explains it") while the newest were missing."""
    AuditLog(log_dir, retention_days=1, clock=Clock(START + timedelta(days=2))).maintain()
    pruned = json.loads(_lines(log_dir / DAY3)[-1])
    assert (pruned["event"], pruned["seq"]) == ("pruned", 19)
    last_of_day2 = json.loads(_lines(log_dir / DAY2)[-1])["seq"]
    if how == "removed":
        (log_dir / DAY3).unlink()
    else:
        _logrotated(log_dir, f"{DAY3}.1")
    out, err = io.StringIO(), io.StringIO()
    assert verify_main(log_dir, None, out, err) == 1
    moved = ", or moved to a file not read: see the notes" if how == "rotated" else ""
    assert err.getvalue().endswith(
        f"relay audit verify: TAMPERED: {DAY2} line {len(_lines(log_dir / DAY2))}: the log"
        f" ends at seq {last_of_day2}, but the relay wrote up to seq 19 (.head): records"
        f" {last_of_day2 + 1}..19 missing from its end (removed{moved})\n"
        f"  ({last_of_day2 - 11} records verified before the problem was found)\n"
    )
    assert (
        f"note: {DAY2} line 1: the chain starts at seq 12: records 1..11 missing before it"
        " and no retention record explains it (going by the records read: a retention"
        " record among those missing from the end may explain it)\n"
    ) in err.getvalue()


def test_the_newest_record_replaced_by_one_with_a_recomputed_hash(log_dir: Path) -> None:
    """As long a chain, and as whole: only ``.head`` still names the record written."""
    path = log_dir / DAY3
    lines = _lines(path)
    written = json.loads(lines[-1])["hash"]
    lines[-1] = _resealed(lines[-1], recipient="someone-else@customer.example")
    path.write_bytes(b"".join(lines))
    replaced = json.loads(lines[-1])["hash"]
    assert _problem(log_dir) == (
        DAY3,
        len(lines),
        f"record seq 18 is not the one the relay wrote: its hash is {replaced},"
        f" .head names {written}: it was replaced",
    )


def test_one_record_and_one_file_are_said_in_the_singular(tmp_path: Path) -> None:
    """``audit log intact: 1 records in 1 files`` and ``(1 records verified ...)``."""
    clock = Clock()
    log = AuditLog(tmp_path, clock=clock)
    log.append(events.expired(queue_id="Q1", message_id=None, recipient="a@b"))
    out = io.StringIO()
    assert verify_main(tmp_path, None, out, io.StringIO()) == 0
    assert out.getvalue().startswith("audit log intact: 1 record in 1 file (seq 1..1)\n")

    log.append(events.expired(queue_id="Q2", message_id=None, recipient="a@b"))
    path = tmp_path / DAY1
    lines = _lines(path)
    path.write_bytes(lines[0] + lines[1].replace(b'"Q2"', b'"Q3"'))
    err = io.StringIO()
    assert verify_main(tmp_path, None, io.StringIO(), err) == 1
    assert err.getvalue().endswith("  (1 record verified before the problem was found)\n")

    path.write_bytes(b"".join(lines))
    clock.advance(days=1)
    log.append(events.expired(queue_id="Q4", message_id=None, recipient="a@b"))
    path.unlink()  # the first day, where the chain starts
    err = io.StringIO()
    assert verify_main(tmp_path, None, io.StringIO(), err) == 1
    assert err.getvalue().endswith("  (the 1 record from there on is whole)\n"), err.getvalue()
