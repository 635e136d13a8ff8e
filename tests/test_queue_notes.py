"""The notes the queue tools leave for the relay's log: what a worker takes,
and what it passes over without stopping."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from relay.engine import Attempt, Engine
from relay.policy.load import load
from relay.record import Recorder
from relay.spool import Spool
from relay.spool.notes import Notes

QID = "25YG484N3P030WLT"
OTHER = "25YG484N3P030WLV"


@pytest.fixture
def notes(tmp_path: Path) -> Notes:
    return Notes(Spool(tmp_path / "spool"))


def _taken(notes: Notes) -> list[tuple[str, str, str]]:
    """``take`` in a thread, bounded: a note it waited on for ever fails here."""
    got: list[tuple[str, str, str]] = []
    worker = threading.Thread(
        target=lambda: got.extend((n.queue_id, n.verb, n.by) for n in notes.take()), daemon=True
    )
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "take() waited"
    return got


def test_a_note_left_is_taken_once(notes: Notes) -> None:
    notes.leave([QID], "delete", "alice")
    assert _taken(notes) == [(QID, "delete", "alice")]
    assert _taken(notes) == []


@pytest.mark.parametrize("at", ["-Infinity", "1e300", "NaN", "-1", '"soon"'])
def test_a_note_with_a_time_no_clock_can_show_is_removed_unread(notes: Notes, at: str) -> None:
    """``-Infinity`` passed as a number, and showing its time ended the
    delivery engine (OverflowError); the note after it was never logged."""
    notes.leave([OTHER], "hold", "bob")
    bad = notes.directory / "0.bad"
    bad.write_text(f'{{"queue_id": "{QID}", "verb": "delete", "by": "x", "at": {at}}}')
    assert _taken(notes) == [(OTHER, "hold", "bob")]
    assert list(notes.directory.iterdir()) == []


@pytest.mark.parametrize("kind", ["directory", "fifo", "link"])
def test_an_entry_that_is_no_note_is_passed_over(notes: Notes, kind: str, tmp_path: Path) -> None:
    """Raised for the whole directory at every look, it kept every later note
    out of the log; a FIFO's open waited for ever."""
    notes.leave([QID], "release", "carol")
    odd = notes.directory / "0.odd"
    if kind == "directory":
        odd.mkdir()
    elif kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to(tmp_path / "elsewhere")
    assert _taken(notes) == [(QID, "release", "carol")]
    assert _taken(notes) == []


async def test_an_engine_that_cannot_read_the_notes_says_so_once(
    policy_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of file descriptors, the look at the notes failed each second and
    said so each time, though no queue tool had been used: the mark that it
    was said was overwritten before the failing read."""
    spool = Spool(tmp_path / "spool")
    policy = load(policy_file)
    engine = Engine(spool, lambda: policy, _never, Recorder(None))
    in_the_way = spool.directory / "notes"
    in_the_way.write_text("not a directory\n")  # stat passes, reading it fails
    with caplog.at_level(logging.INFO, logger="relay"):
        for _ in range(3):
            await engine._log_queue_changes(True)
        in_the_way.unlink()
        Notes(spool).leave([QID], "delete", "alice")
        await engine._log_queue_changes(True)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("relay")]
    assert len([m for m in said if m.startswith("cannot log what the queue tools did")]) == 1
    assert said[-1] == f"{QID}: removed (relay queue delete by alice)"


async def _never(*_: object, **__: object) -> Attempt:
    raise AssertionError("no delivery here")
