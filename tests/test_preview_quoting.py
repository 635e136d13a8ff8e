"""``relay preview``'s From and Reply-To lines, as ``relay audit show`` reads
them: a name decoded from an encoded word is quoted where it
holds a special, or ``Gross, Jürgen <j@x>`` reads as two mailboxes where the
header holds one."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_cli import relay

ENCODED = "=?utf-8?q?Gross=2C_J=C3=BCrgen?="
QUOTED = '"Gross, Jürgen"'
REST = "To: customer@example.org\nSubject: Faktura 4711\nX-ERP-User: kari\n\nHei!\n"
PLATFORM = "Kåre Ødegård via Acme AS <noreply@platform.example>"
SENDER = "Kåre Ødegård <kari@acme.example>"


def preview(policy_file: Path, tmp_path: Path, name: str) -> tuple[list[str], dict]:
    """The text report's lines and the JSON report of a message From and
    Reply-To ``name``."""
    eml = tmp_path / "message.eml"
    head = f"From: {name} <kari@acme.example>\nReply-To: {name} <j@example.org>\n"
    eml.write_bytes((head + REST).encode())
    text = relay("preview", "-c", str(policy_file), str(eml))
    assert text.returncode == 0, text.stderr
    done = relay("preview", "-c", str(policy_file), str(eml), "--json")
    assert done.returncode == 0, done.stderr
    return text.stdout.splitlines(), json.loads(done.stdout)


def test_a_name_in_the_message_reads_as_one_mailbox(policy_file: Path, tmp_path: Path) -> None:
    """Encoded, it read ``From: Gross, Jürgen <kari@...>``; written in quotes,
    it kept them and reads the same."""
    for name in (ENCODED, QUOTED):
        lines, report = preview(policy_file, tmp_path, name)
        assert f'From:        "Gross, Jürgen" <kari@acme.example>  ->  {PLATFORM}' in lines
        assert f'Reply-To:    "Gross, Jürgen" <j@example.org>  ->  {SENDER}' in lines
        # the JSON keeps the fields as written, as the audit record does
        assert report["from"]["before"] == f"{name} <kari@acme.example>"
        assert report["reply_to"]["before"] == f"{name} <j@example.org>"


def test_a_name_the_relay_writes_reads_as_one_mailbox(policy_file: Path, tmp_path: Path) -> None:
    """The user's name goes out in encoded words, which the text decoded without
    its quotes; the JSON keeps the fields the relay writes as written, and the
    user's name alone needs none."""
    policy_file.write_text(policy_file.read_text().replace("Kåre Ødegård", "Gross, Jürgen"))
    lines, report = preview(policy_file, tmp_path, "Kari")
    assert (
        'From:        Kari <kari@acme.example>  ->  "Gross, Jürgen via Acme AS"'
        " <noreply@platform.example>"
    ) in lines
    assert 'Reply-To:    Kari <j@example.org>  ->  "Gross, Jürgen" <kari@acme.example>' in lines
    assert report["from"]["after"].startswith("=?utf-8?")
    assert report["reply_to"]["after"].startswith("=?utf-8?")
    assert report["user"]["name"] == "Gross, Jürgen"
