"""Typed errors. Each carries what the SMTP client and the sysadmin need to see."""

from __future__ import annotations

import asyncio
import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


def interrupted(cancel: asyncio.CancelledError, sent: bool) -> None:
    """Marks ``cancel``, a delivery attempt's (the relay's stop cut it off), with
    how far its message got: ``sent`` when its end, the final dot, may have
    reached the upstream. Only then may the upstream have it, and the message
    arrive twice when it goes again. A mark already there stays: it was made
    nearer the message. The cancellation itself goes on as it came: a subclass
    raised in its place was no ``CancelledError`` to ``asyncio.timeout`` (Python
    3.11), whose caller got it instead of ``TimeoutError``."""
    if not hasattr(cancel, "sent"):
        cancel.sent = sent  # type: ignore[attr-defined]


def answered() -> None:
    """Ends the cancellation (the relay's stop) of a delivery attempt whose
    upstream had answered already, cut off in what only lets the connection go
    (the RSET after a refusal, the QUIT): the answer is the attempt's outcome,
    and the stop records it. A message the upstream had taken was recorded as
    not sent in full and sent again at the next start, one it had refused at
    its end as not sent in full."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def sent_in_full(cancel: BaseException) -> bool:
    """Whether a cut-off attempt's message may have reached the upstream whole:
    so unless its client marked it otherwise (``interrupted``), since a plain
    cancellation tells nothing."""
    return bool(getattr(cancel, "sent", True))


class OutputError(OSError):
    """Writing a command's output failed (a full disk under ``> file``): no fault
    of what the command was reading, so it is not reported as such."""


class SmtpReply(RelayError):
    """An SMTP reply to give the client instead of accepting the message."""

    def __init__(self, code: int, status: str, text: str, note: str | None = None) -> None:
        """``note``: why, for the sysadmin (the log, ``relay preview``), where the
        client must not be told (which addresses are which tenant's users)."""
        # Texts quote addresses and upstream replies; a CR or LF in them
        # would let a client's input forge further reply lines.
        text = _UNSAFE.sub(" ", text)
        super().__init__(f"{code} {status} {text}")
        self.code = code
        self.status = status
        self.text = text
        self.note = note

    @property
    def line(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500


class Rejected(SmtpReply):
    """The policy refuses this message (unknown or unauthorised sender, bad input)."""


class UpstreamError(SmtpReply):
    """The upstream refused or could not be reached; carries its own reply text."""


class PolicyError(RelayError):
    """The policy file is invalid; ``problems`` holds every located problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SigningError(RelayError):
    """A DKIM signature could not be made."""


class HeaderInjection(RelayError):
    """A value would break out of its header field (CR, LF or NUL in it)."""
