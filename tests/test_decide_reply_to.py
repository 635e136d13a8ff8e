"""What ``relay preview`` says of the Reply-To sources it passed over, and of a
Reply-To kept: a sysadmin goes by it to find which system wrote what."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.test_decisions import BASE, header, msg, run

ROOT = Path(__file__).parent.parent
NO_SUBJECT = [f for f in BASE if not f.startswith("Subject")]


def partner_first(policy_file: Path) -> Path:
    text = policy_file.read_text().replace(
        'invoice: ["header:X-Responsible", sender, company]',
        'invoice: ["header:X-Partner", "header:X-Responsible", company]',
    )
    policy_file.write_text(text)
    return policy_file


def preview(policy: Path, eml: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "preview", "-c", str(policy), str(eml)],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_source_holding_a_name_is_said_to_hold_no_address(
    policy_file: Path, tmp_path: Path
) -> None:
    """``X-Partner: Paul Partner`` and ``X-Responsible: eva`` were called empty."""
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(
        msg(*NO_SUBJECT, "Subject: Invoice 7", "X-Partner: Paul Partner", "X-Responsible: eva")
    )
    out = preview(partner_first(policy_file), eml)
    assert (
        "  - Reply-To from company: Acme AS <post@acme.example> (before it:"
        " header X-Partner holds no address, header X-Responsible holds no address)\n"
    ) in out


def test_an_empty_or_missing_source_is_said_to_be(policy_file: Path) -> None:
    data = msg(*NO_SUBJECT, "Subject: Invoice 7", "X-Responsible: ")
    p = run(partner_first(policy_file), data)
    assert header(p, "Reply-To") == "Acme AS <post@acme.example>"
    assert (
        "Reply-To from company: Acme AS <post@acme.example> (before it:"
        " header X-Partner is missing, header X-Responsible is empty)"
    ) in p.decision.reasons


def test_a_kept_reply_to_the_message_has_not_is_said_to_be_none(
    policy_file: Path, tmp_path: Path
) -> None:
    eml = tmp_path / "quote.eml"
    eml.write_bytes(msg(*NO_SUBJECT, "Subject: Quote 5"))
    out = preview(policy_file, eml)
    assert "  - Reply-To kept as the message has it: it has none\n" in out
    assert "\nReply-To:    -  ->  -\n" in out

    eml.write_bytes(msg(*NO_SUBJECT, "Subject: Quote 5", "Reply-To: desk@acme.example"))
    assert "  - Reply-To kept as the message has it\n" in preview(policy_file, eml)
