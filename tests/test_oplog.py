"""The operational log's line format: its own time with the UTC offset on a
plain stderr, the syslog priority journald reads when stderr is the journal."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import oplog
from tests.relayproc import RelayProcess
from tests.sink import free_port
from tests.test_queue_e2e import configure, send

PLAIN = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} relay\[\d+\] (INFO|WARNING|ERROR) \S"
)
JOURNAL = re.compile(r"^<([2-7])>relay\[\d+\] (INFO|WARNING|ERROR|CRITICAL) \S")


@pytest.fixture
def restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def _stream_id(path: Path) -> str:
    status = os.stat(path)
    return f"{status.st_dev}:{status.st_ino}"


def _lines_logged(path: Path) -> list[str]:
    with path.open("a", encoding="utf-8") as stream:
        oplog.configure(stream)
        log = logging.getLogger("relay")
        log.info("queued")
        log.warning("slow")
        log.error("refused")
    return path.read_text().splitlines()


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored: None) -> Path:
    """A file standing for stderr, named the journal's stream as systemd does."""
    path = tmp_path / "stderr"
    path.touch()
    monkeypatch.setenv("JOURNAL_STREAM", _stream_id(path))
    return path


def test_journal_lines_carry_the_syslog_priority(journal: Path) -> None:
    lines = _lines_logged(journal)
    assert [JOURNAL.match(line)[1] for line in lines] == ["6", "4", "3"]  # type: ignore[index]


def test_a_critical_line_carries_its_own_priority(journal: Path) -> None:
    """``journalctl -p crit`` shows the relay stopping for a worker that keeps dying."""
    with journal.open("a", encoding="utf-8") as stream:
        oplog.configure(stream)
        logging.getLogger("relay").critical("stopping the relay")
    (line,) = journal.read_text().splitlines()
    assert JOURNAL.match(line).groups() == ("2", "CRITICAL"), line  # type: ignore[union-attr]


def test_every_line_of_a_traceback_carries_the_priority(journal: Path) -> None:
    with journal.open("a", encoding="utf-8") as stream:
        oplog.configure(stream)
        try:
            raise ValueError("broken")
        except ValueError:
            logging.getLogger("relay").exception("delivery engine failed")
    lines = journal.read_text().splitlines()
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), lines
    assert lines[-1] == "<3>ValueError: broken"


@pytest.mark.parametrize("named", [None, "not a stream", "1:2"])
def test_elsewhere_lines_carry_the_time_with_its_offset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored: None, named: str | None
) -> None:
    """Also with JOURNAL_STREAM inherited by a process whose stderr goes elsewhere."""
    if named is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", named)
    lines = _lines_logged(tmp_path / "stderr")
    assert len(lines) == 3 and all(PLAIN.match(line) for line in lines), lines


def test_a_relay_under_systemd_logs_with_priorities(
    policy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    policy = configure(policy_file, port, free_port())
    log = tmp_path / "relay.log"
    log.touch()
    monkeypatch.setenv("JOURNAL_STREAM", _stream_id(log))  # the relay's stderr, as systemd sets it
    with RelayProcess(policy, port, log) as relay:
        assert send(port)
    lines = relay.log().splitlines()
    assert lines and all(JOURNAL.match(line) for line in lines), lines
    assert any(line.startswith("<6>") and " queued" in line for line in lines)


@pytest.mark.parametrize("to_journal", [False, True], ids=["plain", "journal"])
def test_a_long_message_is_cut_so_that_it_stays_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restored: None, to_journal: bool
) -> None:
    """A refusal quoted a header folded over 250 KB; journald splits a line past
    48 KiB into entries of their own, the next beginning with the client's text."""
    path = tmp_path / "stderr"
    path.touch()
    if to_journal:
        monkeypatch.setenv("JOURNAL_STREAM", _stream_id(path))
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    with path.open("a", encoding="utf-8") as stream:
        oplog.configure(stream)
        logging.getLogger("relay").info("refused: %s", "x" * 250_000 + "relay[1] WARNING end")
    (line,) = path.read_text().splitlines()
    assert len(line) < oplog.MESSAGE_LIMIT + 100
    assert line.endswith(
        f" [{250_020 + len('refused: ') - oplog.MESSAGE_LIMIT} more characters not logged]"
    )


def test_the_relays_info_and_up_are_logged_and_aiosmtpds_errors_only(
    restored: None, tmp_path: Path
) -> None:
    """At DEBUG every login was a line; aiosmtpd logs every command at INFO."""
    path = tmp_path / "stderr"
    with path.open("a", encoding="utf-8") as stream:
        oplog.configure(stream)
        logging.getLogger("relay").debug("AUTH ok client=192.0.2.1 login=erp-acme")
        logging.getLogger("relay").info("queued")
        logging.getLogger("mail.log").info("192.0.2.1 >> b'RCPT TO:<a@example.org>'")
        logging.getLogger("mail.log").warning("192.0.2.1 EOF received")
        logging.getLogger("mail.log").error("SMTP session exception")
    said = [line.split(" ", 2)[2] for line in path.read_text().splitlines()]
    assert said == ["INFO queued", "ERROR SMTP session exception"], said


def test_a_message_of_the_limit_is_logged_whole(restored: None, tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with path.open("a", encoding="utf-8") as stream:
        oplog.configure(stream)
        logging.getLogger("relay").info("%s", "x" * oplog.MESSAGE_LIMIT)
    (line,) = path.read_text().splitlines()
    assert line.endswith(" INFO " + "x" * oplog.MESSAGE_LIMIT), line[-80:]


def test_each_line_carries_its_own_second_and_milliseconds() -> None:
    """The formatter keeps the text of the second it last wrote: a line in the
    next second, or back in an earlier one after the clock was set back, has its own."""
    formatter = oplog._LocalTime(oplog.FORMAT)

    def stamp(created: float) -> str:
        record = logging.LogRecord("relay", logging.INFO, "", 0, "queued", None, None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        return formatter.formatTime(record)

    def expected(created: float) -> str:
        local = time.localtime(created)
        return (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{int((created % 1) * 1000):03d}"
            f"{time.strftime('%z', local)}"
        )

    moments = [1_765_000_000.125, 1_765_000_000.5, 1_765_000_001.25, 1_765_000_000.75, 0.0]
    assert [stamp(when) for when in moments] == [expected(when) for when in moments]
