"""The failure notice as built for the sender: it must be writable whatever the
document's subject held, since the subject comes from the ERP's message."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import message
from relay.notice import build_notice
from relay.policy.load import load
from relay.spool import FAILED, RecipientState
from tests.spoolkit import make_entry


@pytest.mark.parametrize(
    ("subject", "shown"),
    [
        (
            "Invoice\x0b4711\x00x",
            "Undelivered: Invoice 4711 x",
        ),  # decoded from =?utf-8?q?...=0B...?=
        ("Faktura for Ørsted", "Undelivered: Faktura for Ørsted"),
        ("x" * 1000, "Undelivered: " + "x" * 1000),  # no space to fold at
    ],
)
def test_a_notice_is_built_for_any_subject(policy_file: Path, subject: str, shown: str) -> None:
    policy = load(policy_file)
    entry = make_entry(subject=subject)
    failed = RecipientState("customer@example.net", FAILED, notify=True)
    _, data = build_notice(policy, entry, [failed], 1_790_000_000.0)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert message.read(data).get("Subject") == shown
