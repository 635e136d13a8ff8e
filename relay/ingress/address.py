"""MAIL and RCPT paths: the common ``<local@domain>`` parsed fast, and which
addresses the relay takes at all.

aiosmtpd parses every path with ``email._header_value_parser`` and defines a
class on each call; on a busy relay that was a twentieth of all CPU. A path
this pattern does not match exactly (quoted local parts, comments, spaces,
non-ASCII, the null path) goes the long way, so the result is always the one
aiosmtpd would give.

Of what aiosmtpd parses, the relay takes only ``local@domain`` with a
dot-atom local part and a host name: that is sent upstream and recorded
exactly as received. A quoted local part (``"a@b"@x``) would not be: the
upstream client unquotes it, so ``"postmaster@x"`` would go out as
``postmaster@x``. ERPs never need quoted local parts or address literals.

Some ERPs write a display name before the path (``MAIL FROM:"Jan"
<jan@acme.example>``), which Postfix takes by default
(``strict_rfc821_envelopes = no``): the name is dropped and the path parsed
as if it stood alone. A name is words, quoted strings and comments (RFC
5322's phrase); one holding ``<``, ``>``, a control, or outside a quoted
string a backslash or a special (``@ , : ; [ ]``) is no name: the whole is
parsed as before, and refused.
"""

from __future__ import annotations

import re

from relay.errors import Rejected
from relay.headers import DOT_ATOM, fits_smtp

_PATH = re.compile(rf"<({DOT_ATOM}@{DOT_ATOM})>")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MAILBOX = re.compile(rf"{DOT_ATOM}@{_LABEL}(?:\.{_LABEL})*")

# RFC 5322's phrase (with obs-phrase's dots) and comments, in ASCII without <, >;
# a word that starts as an ESMTP parameter (AUTH=<…>) is never taken for a name,
# an encoded word (=?UTF-8?Q?J=C3=B8rgen?=) is
PARAMETER_WORD = r"[A-Za-z0-9][A-Za-z0-9-]*="
_ATOM = rf"(?!{PARAMETER_WORD})[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~.-]+"
_QUOTED = r'"(?:[\x20\x21\x23-\x3b\x3d\x3f-\x5b\x5d-\x7e]|\\[\x20-\x3b\x3d\x3f-\x7e])*"'
_COMMENT = r"\([\x20-\x27\x2a-\x3b\x3d\x3f-\x5b\x5d-\x7e]*\)"
#: A display name before a path's ``<``, with the white space after it;
#: possessive, or a long run of letters with no ``<`` took exponential time.
DISPLAY_NAME = rf"(?:(?:{_ATOM}|{_QUOTED}|{_COMMENT})[ \t]*)++(?=<)"
_DISPLAY_NAME = re.compile(DISPLAY_NAME)
#: What comes between a path's ``<`` and its ``>``: a quoted local part (the
#: whole of it, after any source route) may hold a ``>``
#: (``<"a>b"@example.org>``), so such a path that is not closed after it is
#: never closed; a ``"`` anywhere else, or one never closed, is read as any
#: other character, and the path ends at the first ``>``
PATH_TEXT = r'(?>(?:@[^:>"]*:)?"(?:[^"\\]|\\.)*+"[^>]*+|[^>]*+)'
_CLOSED_PATH = re.compile(rf"<{PATH_TEXT}>")

TOO_LONG = "Address longer than SMTP allows (64 octets before the @, 254 in all)"
SENDER = "5.1.7"  # RFC 3463: bad sender's mailbox address syntax
RECIPIENT = "5.1.3"  # bad destination mailbox address syntax


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, the parameters after the ``>``) for a plain path; None for anything else."""
    match = _PATH.match(arg)
    if match is None:
        return None
    rest = arg[match.end() :].lstrip(" \t")
    if rest[:1].isspace() or rest.startswith("("):
        return None  # folding or a comment: the parser's rules for CFWS apply
    return match.group(1), rest


def path_end(arg: str) -> int | None:
    """Where the path ``arg`` starts with ends, after its ``>``; None when it
    opens with no ``<`` or never closes it."""
    match = _CLOSED_PATH.match(arg)
    return None if match is None else match.end()


def without_display_name(arg: str) -> str:
    """``arg`` from its path's ``<`` on when a display name comes first, else as
    it is: an ERP that writes one could not send at all, refused ``501``."""
    match = _DISPLAY_NAME.match(arg)
    return arg if match is None else arg[match.end() :]


def mailbox_refusal(address: str, status: str, given: str | None = None) -> Rejected | None:
    """The 553 refusing ``address`` (a parsed path, not the null one) as a sender
    (``SENDER``) or recipient (``RECIPIENT``), or None when the relay takes it.
    One longer than RFC 5321 allows is refused now, while the ERP can show it:
    taken, a server that holds to the lengths would refuse it at delivery, the
    ERP having heard 250 and the user getting a failure notice instead.

    ``given`` is the path as the client wrote it, without its brackets: the
    parser quotes a local part with a space (``<Customer Name>``), and a reply
    about quoted local parts, quoting text the ERP never sent, had its
    sysadmin look for quotes."""
    if _MAILBOX.fullmatch(address):
        if not fits_smtp(address):
            return Rejected(553, status, f"{TOO_LONG}: {address!r}")
        return None
    written = address if given is None else given
    if written.startswith('"'):
        return Rejected(553, status, f"Quoted local parts are not supported: {written!r}")
    return Rejected(553, status, f"Bad address syntax: {written!r}")
