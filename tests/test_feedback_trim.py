"""A large report read from the lines its reader needs: a returned attachment
of tens of megabytes costs neither its size in memory nor any of what is read."""

from __future__ import annotations

import base64
import email
import time
import tracemalloc
from email.message import Message
from email.policy import compat32
from pathlib import Path

import pytest

from relay.feedback.parse import SCANNED_LIMIT, _decoded_text, _Read, read
from relay.feedback.trim import _READ_WHOLE, trimmed

SAMPLES = Path(__file__).parent / "messages" / "feedback"


def _returning(attachment: bytes) -> bytes:
    """The Postfix bounce returning the whole message, an invoice PDF attached."""
    return (
        (SAMPLES / "postfix-two-failed.eml")
        .read_bytes()
        .replace(
            b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n",
            b'Content-Type: multipart/mixed; boundary="inner"\n\n--inner\n'
            b"Content-Type: text/plain\n\nSee the attachment.\n--inner\n"
            b'Content-Type: application/pdf; name="invoice.pdf"\n'
            b"Content-Transfer-Encoding: base64\n\n" + attachment + b"\n--inner--\n",
        )
    )


def _base64(size: int) -> bytes:
    return base64.encodebytes(bytes(range(256)) * (size // 256))


def test_a_bounce_returning_a_large_attachment_is_read_in_bounded_memory() -> None:
    """Parsed whole, a 48 MB one took 437 MB at its peak: on a small machine,
    anyone who mails the return path could have the relay's pipe killed."""
    raw = _returning(_base64(18 << 20))
    assert len(raw) > 24_000_000
    tracemalloc.start()
    try:
        report = read(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report is not None
    assert peak < 8 << 20


def test_a_bounce_of_45_megabytes_names_its_failed_recipients_from_a_few_kilobytes() -> None:
    raw = _returning(_base64(33 << 20))
    assert len(raw) > 45_000_000
    started = time.process_time()  # CPU, not the wall: a busy machine is no failure
    report = read(raw)
    assert time.process_time() - started < 2
    assert report is not None
    assert [(f.recipient, f.status) for f in report.failures] == [
        ("Full.Box@Supplier.example", "5.2.2"),
        ("nobody@buyer.example", "5.1.1"),
    ]
    assert report.message_id == "<4711.erp@acme.example>"
    assert report.queue_ids == ("4F2A31C0E5",)
    assert len(trimmed(raw, _Read)) < 16 * 1024


def _read_parts(raw: bytes) -> list[list[object]]:
    """What the reader takes from each part, in order: its type and header,
    how many parts a multipart has, the whole of a part read whole, the start
    of a text as it is read decoded and as it is read as it came."""
    taken: list[list[object]] = []
    for part in email.message_from_bytes(raw, _Read, policy=compat32).walk():
        payload = part.get_payload()
        kind = part.get_content_type()
        entry: list[object] = [kind, list(part.raw_items())]
        if isinstance(payload, list):
            entry.append(len(payload))
        elif kind in _READ_WHOLE:
            entry.append(payload)
        elif isinstance(part, Message) and part.get_content_maintype() == "text":
            entry += [_decoded_text(part), payload[:SCANNED_LIMIT]]
        taken.append(entry)
    return taken


LARGE = _base64(5 << 20)  # past what a text part keeps
NAMES = ["postfix-two-failed.eml", "yahoo-arf.eml", "qmail-failure.eml", "gmail-dsn.eml"]


@pytest.mark.parametrize("name", NAMES)
def test_what_is_read_from_a_report_is_the_same_wherever_a_large_body_comes(name: str) -> None:
    """Base64 lines spliced in after each empty line and each line of dashes:
    in a part's text, its header, a delivery-status or feedback-report part, a
    returned message. Wherever they land, the reader takes the same from the
    report cut as from the report whole, and most places are cut."""
    lines = (SAMPLES / name).read_bytes().split(b"\n")
    places = [i for i, line in enumerate(lines) if not line or line.startswith(b"--")]
    cut = 0
    for i in places:
        raw = b"\n".join(lines[: i + 1]) + b"\n" + LARGE + b"\n".join(lines[i + 1 :])
        kept = trimmed(raw, _Read)
        assert _read_parts(kept) == _read_parts(raw), f"after line {i + 1}"
        cut += len(kept) < len(raw)
    assert cut > len(places) // 2


def test_a_large_text_kept_whole_beside_a_small_cut_is_not_copied() -> None:
    """A 34 MB XML invoice in base64 is read whole; a small image beside it is
    cut, and the copy of what was left cost 47 MB more than the report alone."""
    xml = _base64(4 << 20)
    raw = _returning(b"iVBORw0KGgo=\n").replace(
        b"Content-Type: text/plain\n\nSee the attachment.\n",
        b"Content-Type: text/xml\nContent-Transfer-Encoding: base64\n\n" + xml,
    )
    assert len(raw) > len(xml) > 4 << 20
    assert trimmed(raw, _Read) is raw


def test_a_report_with_carriage_returns_alone_is_not_cut() -> None:
    """The email package ends a line there too, and so sees other boundaries."""
    raw = _returning(_base64(1 << 20)).replace(b"\n", b"\r")
    assert trimmed(raw, _Read) == raw
