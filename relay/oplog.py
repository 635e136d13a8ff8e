"""The operational log: one line per event on stderr, for the sysadmin.

Run by hand or under another supervisor, a line carries its own time, with the
UTC offset so that lines from hosts in different zones compare. Under systemd
stderr is a journal stream, and journald reads a ``<N>`` syslog priority at
the start of a line (``SyslogLevelPrefix=``, on by default): without it every
error was stored at the unit's default priority, out of sight of
``journalctl -p err``. The journal keeps its own time, so the line does not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

from relay.quantity import quantity

FORMAT = "%(asctime)s relay[%(process)d] %(levelname)s %(message)s"
JOURNAL_FORMAT = "<%(priority)d>relay[%(process)d] %(levelname)s %(message)s"

# syslog(3) priorities by logging level
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def local_time(epoch: float) -> str:
    """A time a line names besides its own, as the line's is written: with its
    date and UTC offset, so a next attempt past midnight or across the end of
    summer time reads right."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(epoch))


MESSAGE_LIMIT = 8000  # characters of a message: under syslog's 8 KiB, journald's 48 KiB lines


class _Bounded(logging.Formatter):
    """A message cut at ``MESSAGE_LIMIT``: a refusal quotes what the client sent
    (a header folded over 250 KB), and journald splits a longer line into
    entries of their own, the next beginning with the client's text, which a
    fail2ban filter anchored at the start of a line would then read as the
    relay's. The traceback after it is not cut."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if len(message) > MESSAGE_LIMIT:
            cut = len(message) - MESSAGE_LIMIT
            record.message = (
                f"{message[:MESSAGE_LIMIT]} [{quantity(cut, 'more character')} not logged]"
            )
        return super().formatMessage(record)


class _LocalTime(_Bounded):
    """ISO 8601 with milliseconds and the UTC offset: ``2026-12-03T08:12:57.123+0100``.
    The second's text is made once: a busy relay writes a few thousand lines in it."""

    _second: tuple[int, str, str] = (-1, "", "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, date, offset = self._second  # one read: other threads log too
        if second != int(record.created):
            local = self.converter(record.created)
            date, offset = time.strftime("%Y-%m-%dT%H:%M:%S", local), time.strftime("%z", local)
            self._second = (int(record.created), date, offset)
        return f"{date}.{int(record.msecs):03d}{offset}"


class _Journal(_Bounded):
    """journald reads each line on its own: a traceback's lines carry the
    priority too, or ``journalctl -p err`` shows an error without its cause."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        record.priority = priority
        return super().format(record).replace("\n", f"\n<{priority}>")


def configure(stream: TextIO | None = None) -> None:
    """Send the relay's log to ``stream`` (stderr), with priorities when that is
    the journal."""
    stream = stream or sys.stderr
    # Nothing in the formats needs the caller's file and line, the thread or the
    # process name; the logging HOWTO's "Optimization" section turns them off
    # this way, and at three lines a message they cost about 1% of the CPU.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream)
    if to_journal(stream):
        handler.setFormatter(_Journal(JOURNAL_FORMAT))
    else:
        handler.setFormatter(_LocalTime(FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # aiosmtpd logs every command at INFO and its own doubts per connection
    # at WARNING; the relay logs what an operator needs itself.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


class JournalLines:
    """A command's own lines on stderr, each with its priority when that is the
    journal: under the unit, ``relay check`` runs before every start and
    reload, and its lines are all that names a policy's mistake, which
    ``journalctl -p err`` left out, stored at the default priority."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._line_start = True

    def write(self, text: str) -> int:
        pieces = []
        for piece in text.splitlines(keepends=True):
            if self._line_start:
                pieces.append("<4>" if ": warning: " in piece else "<3>")
            pieces.append(piece)
            self._line_start = piece.endswith("\n")
        self._stream.write("".join(pieces))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()


def to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd names in ``$JOURNAL_STREAM``
    (``device:inode``; systemd.exec(5)): a child's stderr redirected elsewhere
    inherits the variable but not the stream."""
    named = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in named.split(":"))
        status = os.fstat(stream.fileno())
    except (ValueError, OSError):
        return False
    return (status.st_dev, status.st_ino) == (device, inode)
