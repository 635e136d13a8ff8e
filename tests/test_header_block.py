"""The refusal of a header line that is neither a field nor a continuation:
what the ERP's developer reads in it."""

from __future__ import annotations

import pytest

from relay import headers
from relay.errors import Rejected
from relay.pipeline import _check_header_block


def _refusal(data: bytes) -> str:
    _, body = headers.split_at(data)
    with pytest.raises(Rejected) as caught:
        _check_header_block(data, body)
    return caught.value.line


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b" folded: x\r\nSubject: y\r\n\r\nbody\r\n",
            "' folded: x' (a continued line before the first header field)",
        ),
        (
            b"Subject: y\r\nFrom jan@acme.example Mon Nov 23 2026\r\n\r\n",
            "'From jan@acme.example Mon Nov 23 2026' (no colon: not a header field)",
        ),
        (
            b"Subject: y\r\nBcc : x@y.example\r\n",
            "'Bcc : x@y.example' (white space before the colon)",
        ),
        (b"Subject: y\n: x\n\nbody\n", "': x' (no field name before the colon)"),
        (
            "Subject: y\r\nBetreff\u00e4: x\r\n\r\n".encode(),
            "'Betreff\\xc3\\xa4: x' (a field name holds printable ASCII only, no spaces)",
        ),
        (
            b"Subject: y\r\nX-A b: x\t\r\n",
            "'X-A b: x\\t' (a field name holds printable ASCII only, no spaces)",
        ),
        (
            b"Subject: y\r\n" + b"x" * 100 + b"\r\n",
            "'" + "x" * 78 + "'... (no colon: not a header field)",
        ),
        (
            b"Subject: y\r\nX-" + b"N" * 100 + b" : v\r\n\r\nbody\r\n",
            "'X-" + "N" * 76 + "'... (white space before the colon)",
        ),
        (
            b"Subject: y\r\nX-" + b"N" * 100 + b"\xc3\xa4: v\n",
            "'X-" + "N" * 76 + "'... (a field name holds printable ASCII only, no spaces)",
        ),
    ],
)
def test_the_line_is_quoted_as_received_with_the_reason(data: bytes, expected: str) -> None:
    """It was stripped (the leading space that made it bad was gone), gave no
    reason, and showed non-ASCII bytes as U+FFFD. A name longer than the quote
    was said to have no colon: the reason was read from the quote alone."""
    assert _refusal(data) == f"550 5.6.0 Malformed header line: {expected}"
