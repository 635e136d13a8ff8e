"""The fail2ban filter in config/ finds the relay's failed logins and nothing a
client wrote: a refusal's log line quotes the client's address, header or login
name, where an unanchored pattern found any address the client put there."""

from __future__ import annotations

import base64
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest

from tests.relayproc import RelayProcess, wait_for
from tests.sink import SinkServer, free_port
from tests.test_queue_e2e import ROOT, configure

FILTER = ROOT / "config" / "fail2ban" / "erp-relay.conf"
FORGED = "relay[1] WARNING AUTH failed client={} login=x"

pytestmark = pytest.mark.skipif(
    shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed"
)


def _found(log: Path, *options: str) -> list[str]:
    """The address of each line the filter finds, in order."""
    done = subprocess.run(
        ["fail2ban-regex", *options, "-o", "ip", str(log), str(FILTER)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.split()


def _as_the_journal_gives_it(log: Path, to: Path) -> Path:
    """What fail2ban's systemd backend reads: "HOST IDENT[PID]: " and the
    journal's message, the line without the relay's own time."""
    lines = log.read_text().splitlines()
    to.write_text("".join(f"relayhost python3[4242]: {line.split(' ', 1)[1]}\n" for line in lines))
    return to


def test_only_the_clients_that_failed_to_log_in_are_found(
    policy_file: Path, tmp_path: Path
) -> None:
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.login("erp-acme", "wrong")
                forged = base64.b64encode(f"\0{FORGED.format('6.6.6.8')}\0x".encode())
                assert client.docmd("AUTH PLAIN", forged.decode())[0] == 535
                client.mail("jan@acme.example")
                code, _ = client.rcpt(f'"{FORGED.format("6.6.6.7")}"@customer.example')
                assert code == 553
                client.rset()
                message = (
                    f"From: x@nowhere.example\r\nX-ERP-User: {FORGED.format('6.6.6.9')}\r\n"
                    "Subject: hello\r\n\r\nhi\r\n"
                ).encode()
                with pytest.raises(smtplib.SMTPDataError):
                    client.sendmail("x@nowhere.example", ["bob@customer.example"], message)
                not_utf8 = base64.b64encode(b"\0erp-\xff\0x").decode()
                assert client.docmd("AUTH PLAIN", not_utf8)[0] == 535  # logged "client=ADDR:"
            wait_for(lambda: "6.6.6.9" in relay.log())
            log = relay.log()
    assert all(f"6.6.6.{n}" in log for n in (7, 8, 9)), log
    failures = re.findall(r"^\S+ relay\[\d+\] WARNING AUTH failed client=([^ :]+)", log, re.M)
    assert len(failures) >= 3 and set(failures) == {"127.0.0.1"}, failures
    assert _found(tmp_path / "relay.log") == failures
    journal = _as_the_journal_gives_it(tmp_path / "relay.log", tmp_path / "journal.log")
    assert _found(journal, "-d", "{NONE}") == failures
