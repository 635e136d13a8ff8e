"""Turn an upstream's SMTP reply into the reply the ERP gets.

The ERP shows our reply to its user or decides from it whether to retry, so
the upstream's own code and text pass through. Only codes that would
mislead the ERP are changed: 421 would tell it that *our* connection is
closing, and 530/534/535/538 are about the relay's own login upstream, not
about the message; both become 451, so the message is retried rather than
bounced, with the upstream's text kept and its code named after it.
"""

from __future__ import annotations

import re

from relay.errors import UpstreamError

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
OUR_LOGIN = frozenset({530, 534, 535, 538})
_CLASSES = (2, 4, 5)  # RFC 3463 has no other: a 650 or a 354 gets no enhanced status
_CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f]")  # all but CR and LF


def split(code: int, message: str) -> tuple[str, str]:
    """The enhanced status code and the text, with multi-line replies on one line;
    no status (``""``) for a code RFC 3463 has no class for, none being made up."""
    given, text = _split(message)
    return _status(code, given), text


def _status(code: int, given: str) -> str:
    if not given or given[0] != str(code)[0]:
        return f"{code // 100}.0.0" if code // 100 in _CLASSES else ""
    return given


def _split(message: str) -> tuple[str, str]:
    """The enhanced status the reply gave (``""`` for none) and its text.

    The text goes into the audit log, the spool, the log and the sender's
    notice, which all take only text: bytes of a reply that are not UTF-8
    (the client keeps them as surrogates) become U+FFFD, control characters
    a space."""
    message = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    message = _CONTROL.sub(" ", message)
    given = ""
    texts: list[str] = []
    for line in message.splitlines() or [""]:
        head, _, rest = line.strip().partition(" ")
        if _ENHANCED.fullmatch(head):
            given = given or head
            line = rest
        if line.strip():
            texts.append(line.strip())
    return given, " ".join(texts)


def line(code: int, message: str) -> str:
    status, text = split(code, message)
    return " ".join(part for part in (str(code), status, text) if part)


def refusal(code: int, message: str, suffix: str = "") -> UpstreamError:
    """A changed code says what it was, in the text: the audit log, the log and
    the sender's notice quote this reply, and should not put a 451 in the
    upstream's mouth where it said 421. The quote is the upstream's own: its
    code, and its enhanced status if it gave one (``421 Too busy`` was quoted
    ``421 4.0.0``, a status it did not send)."""
    given, text = _split(message)
    status = _status(code, given)
    said = f"{code} {given}".rstrip()
    if code == 421 or code in OUR_LOGIN:
        status = "4" + status[1:]
        replied, code = code, 451
    elif not 400 <= code < 600:  # not a refusal a client can act on; try again later
        replied, code, status = code, 451, "4.4.0"
    else:
        replied = code
    if replied != code or (given and given != status):
        text = f"{text} (upstream replied {said})".lstrip()
    return UpstreamError(code, status, text + suffix)
