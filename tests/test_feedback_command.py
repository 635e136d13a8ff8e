"""``relay bounce`` as a mail system's pipe runs it: a real bounce and a real
complaint about documents a real relay delivered, read from standard input."""

from __future__ import annotations

import json
import subprocess
import sys
from email import message_from_bytes
from email.policy import default
from pathlib import Path

from relay.policy.load import load
from relay.suppression import SuppressionFile
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer, free_port
from tests.test_queue_e2e import ROOT, audit_events, configure, relay_cli, send

FEEDBACK = Path(__file__).parent / "messages" / "feedback"


def _send(port: int, message_id: str, rcpts: tuple[str, ...]) -> str:
    data = (
        f"From: jan@acme.example\r\nTo: {', '.join(rcpts)}\r\nSubject: Rechnung 4711\r\n"
        f"Message-ID: {message_id}\r\n\r\nanbei die Rechnung.\r\n"
    ).encode()
    return send(port, data, rcpts)


def _bounce(policy: Path, report: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "bounce", "-c", str(policy)],
        input=report.decode("latin-1"),
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, encoding="latin-1",
    )  # fmt: skip


def _listed(policy: Path) -> dict[str, tuple[str | None, str]]:
    settings = load(policy).suppression
    assert settings is not None
    listing = SuppressionFile(settings.file).entries()
    return {e.address: (e.tenant, e.reason) for e in listing.entries}


def test_a_bounce_and_a_complaint_piped_in_are_acted_on_and_the_sender_told(
    policy_file: Path, tmp_path: Path
) -> None:
    sink = Sink()
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            invoice = _send(
                port,
                "<4711.erp@acme.example>",
                ("nobody@buyer.example", "Full.Box@Supplier.example"),
            )
            quote = _send(port, "<4716.erp@acme.example>", ("Buyer.Desk@yahoo-mail.example",))
            sink.wait(2)
        bounced = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes())
        complained = _bounce(policy, (FEEDBACK / "yahoo-arf.eml").read_bytes())
        ignored = _bounce(policy, (FEEDBACK / "out-of-office.eml").read_bytes())
        with RelayProcess(policy, port, tmp_path / "again.log"):  # delivers the notices queued
            sink.wait(4)
    assert bounced.returncode == 0, bounced.stderr
    assert bounced.stdout.splitlines() == [
        f"bounce about {invoice} (acme/jan)",
        "Full.Box@Supplier.example: bounced (5.2.2), not suppressed (not a hard bounce code)",
        "nobody@buyer.example: bounced (5.1.1), suppressed",
        bounced.stdout.splitlines()[3],
    ]
    assert bounced.stdout.splitlines()[3].startswith("jan@acme.example told (notice ")
    assert complained.returncode == 0, complained.stderr
    assert complained.stdout.splitlines()[:2] == [
        f"complaint about {quote} (acme/jan)",
        "Buyer.Desk@yahoo-mail.example: complained, suppressed",
    ]
    assert ignored.returncode == 0 and ignored.stdout == ""
    assert "neither a bounce nor a complaint: ignored" in ignored.stderr
    assert _listed(policy) == {
        "nobody@buyer.example": (None, "bounce"),
        "Buyer.Desk@yahoo-mail.example": ("acme", "complaint"),
    }
    assert ("bounced", "nobody@buyer.example") in audit_events(policy, invoice)
    assert ("complained", "Buyer.Desk@yahoo-mail.example") in audit_events(policy, quote)
    notices = [m for m in sink.messages if m.rcpt_tos == ["jan@acme.example"]]
    subjects = sorted(str(message_from_bytes(m.data, policy=default)["Subject"]) for m in notices)
    assert subjects == ["Complaint about: Invoice 4716", "Undelivered: Rechnung 4711 für März"]
    report = relay_cli(policy, "audit", "report", "--format", "json")
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    other = next(r for r in rows if r["doc_type"] != "notice")
    assert (other["bounced"], other["complaints"]) == (2, 1)


def test_a_policy_that_does_not_load_keeps_the_report_for_later(tmp_path: Path) -> None:
    """EX_TEMPFAIL: the mail system keeps the bounce and tries again, rather than
    bouncing the bounce (to nobody) while the sysadmin fixes the policy."""
    policy = tmp_path / "relay.yaml"
    policy.write_text("version: 1\nplatform: [\n")
    done = _bounce(policy, (FEEDBACK / "postfix-two-failed.eml").read_bytes())
    assert done.returncode == 75
    assert f"{policy}:" in done.stderr and "not taken, try again later" in done.stderr
