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

import logging
import os
import re
import socket
from typing import TextIO

DEFAULT = "/dev/log"  # where syslog and journald listen on Linux
OFF = "off"
IDENT = "erp-relay/bounce"
_MAIL = 2  # the facility (RFC 5424)
_SEVERITY = {logging.WARNING: 4, logging.INFO: 6}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a report's text must not start a log line of its own


class SystemLog:
    """The system log's socket, or nothing when there is none to write to.
    Written as the C library's ``syslog()`` writes (one datagram a line); the
    standard library's handler retries a missing socket at every line and
    prints a traceback for each."""

    def __init__(self, address: str, err: TextIO) -> None:
        self._sock: socket.socket | None = None
        if address == OFF:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            if address != DEFAULT:  # asked for by name: say it is not there
                err.write(f"relay bounce: no system log at {address}: {exc.strerror}\n")
            return
        self._sock = sock
        self._tag = f"{IDENT}[{os.getpid()}]"

    def say(self, level: int, text: str) -> None:
        if self._sock is None:
            return
        text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)  # one line, as it came
        line = f"<{_MAIL * 8 + _SEVERITY[level]}>{self._tag}: {text}"
        try:
            self._sock.send(line.encode("utf-8", "replace"))
        except OSError:
            return  # the log went away: the report is taken all the same

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
