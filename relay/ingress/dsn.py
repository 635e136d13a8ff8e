"""RFC 3461's DSN parameters, taken from the client and not acted on.

The EHLO reply does not offer DSN, so a client should send none of them; but
Postfix offers it, and an ERP with "request delivery receipt" switched on
that sent through Postfix sends them all the same (``RET=HDRS ENVID=…`` on
MAIL, ``NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;…`` on RCPT). Refused ``555``,
as RFC 3461 has it, every message of such an ERP was lost after the move to
the relay. Well-formed ones are taken and dropped: the relay sends no
success receipts, its own failure notices go to the sender as for any
message, and nothing of them goes upstream, where the relay sends its own
(``upstream.transaction``). A malformed one, or one given twice, is refused
``501`` naming it, as a ``BODY`` the relay does not know is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from relay.errors import Rejected

MAIL = frozenset({"RET", "ENVID"})
RCPT = frozenset({"NOTIFY", "ORCPT"})
ENVID_LENGTH = 100  # characters, RFC 3461 4.4

# RFC 3461 4: printable ASCII but "+" and "=", which are written +HH
_XTEXT = r"(?:[!-*,-<>-~]|\+[0-9A-Fa-f]{2})*"
_FORMS = {
    "RET": re.compile(r"FULL|HDRS", re.IGNORECASE),
    "ENVID": re.compile(_XTEXT),
    "NOTIFY": re.compile(r"NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*", re.I),
    "ORCPT": re.compile(rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~-]+;{_XTEXT}"),
}
_WANTED = {
    "RET": "RET can only be one of FULL, HDRS",
    "ENVID": f"ENVID must be xtext (RFC 3461 4) of at most {ENVID_LENGTH} characters",
    "NOTIFY": "NOTIFY can only be NEVER or a list of SUCCESS, FAILURE, DELAY",
    "ORCPT": "ORCPT must be an address type and xtext, as rfc822;one@example.org",
}

Given = tuple[str, str | bool]  # a parameter's name and its value, True for none


def refusal(given: Sequence[Given]) -> Rejected | None:
    """The ``501`` refusing the first of ``given`` (DSN parameters, names in upper
    case) that is malformed or given a second time, or None when all are taken:
    of two values, which one the ERP meant is not known."""
    seen: set[str] = set()
    for name, value in given:
        if name in seen:
            return _refused(f"{name} can only be given once")
        seen.add(name)
        if not _well_formed(name, value):
            return _refused(_WANTED[name])
    return None


def _well_formed(name: str, value: str | bool) -> bool:
    if not isinstance(value, str) or not _FORMS[name].fullmatch(value):
        return False
    return name != "ENVID" or len(value) <= ENVID_LENGTH


def _refused(text: str) -> Rejected:
    return Rejected(501, "5.5.4", f"Error: {text}")
