"""The common case of a MAIL or RCPT path, ``<local@domain>`` of plain dot-atoms,
parsed without the ``email`` package's header parser.

aiosmtpd parses every path with ``email._header_value_parser`` and defines a
class on each call; on a busy relay that was a twentieth of all CPU. A path
this pattern does not match exactly (quoted local parts, comments, spaces,
non-ASCII, the null path) goes the long way, so the result is always the one
aiosmtpd would give.
"""

from __future__ import annotations

import re

from relay.headers import DOT_ATOM

_PATH = re.compile(rf"<({DOT_ATOM}@{DOT_ATOM})>")


def plain_path(arg: str) -> tuple[str, str] | None:
    """(address, the parameters after the ``>``) for a plain path; None for anything else."""
    match = _PATH.match(arg)
    if match is None:
        return None
    rest = arg[match.end() :].lstrip(" \t")
    if rest[:1].isspace() or rest.startswith("("):
        return None  # folding or a comment: the parser's rules for CFWS apply
    return match.group(1), rest
