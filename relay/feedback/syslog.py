"""What ``relay bounce`` made of a report, in the system log beside the mail
system's own lines.

A mail system's pipe throws away what a command prints when it succeeds:
the sysadmin reading the mail log saw Postfix hand the bounce to the pipe
and nothing of what came of it (which message, which address suppressed,
whose sender told). Each outcome is one line under the mail facility, tagged
``erp-relay/bounce[PID]`` as Postfix tags its programs, so ``grep erp-relay
/var/log/mail.log`` or ``journalctl -t erp-relay/bounce`` finds them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import socket
from typing import TextIO

from relay.quantity import quantity
from relay.visible import escaped_match

DEFAULT = "/dev/log"  # where syslog and journald listen on Linux
OFF = "off"
IDENT = "erp-relay/bounce"
LONGEST = 4000  # bytes of a line's text in UTF-8; syslog daemons cut at 8 KiB, or drop it
_MAIL = 2  # the facility (RFC 5424)
_SEVERITY = {logging.WARNING: 4, logging.INFO: 6}
# a report's text must not start a log line of its own, nor move a terminal's cursor
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class SystemLog:
    """The system log's socket, or nothing when there is none to write to.
    Written as the C library's ``syslog()`` writes: a datagram a line, or on a
    stream socket each line ended by a NUL. The standard library's handler
    retries a missing socket at every line and prints a traceback for each."""

    def __init__(self, address: str, err: TextIO) -> None:
        self._sock: socket.socket | None = None
        self._end = b""
        if address == OFF:
            return
        try:
            self._sock = _connected(address, socket.SOCK_DGRAM)
        except OSError as exc:
            if exc.errno == errno.EPROTOTYPE:
                with contextlib.suppress(OSError):
                    self._sock, self._end = _connected(address, socket.SOCK_STREAM), b"\0"
            if self._sock is None and address != DEFAULT:  # named: say it is not there
                err.write(f"relay bounce: no system log at {address}: {exc.strerror or exc}\n")
        self._tag = f"{IDENT}[{os.getpid()}]"

    def say(self, level: int, text: str) -> None:
        if self._sock is None:
            return
        data = _CONTROL.sub(escaped_match, text).encode("utf-8", "replace")  # one line, as it came
        if len(data) > LONGEST:
            kept = data[:LONGEST].decode("utf-8", "ignore").encode()  # whole characters
            data = kept + f"... ({quantity(len(data) - len(kept), 'more byte')})".encode()
        head = f"<{_MAIL * 8 + _SEVERITY[level]}>{self._tag}: ".encode()
        try:
            self._sock.sendall(head + data + self._end)
        except OSError:
            return  # the log went away: the report is taken all the same

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def _connected(address: str, kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock
