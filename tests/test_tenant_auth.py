"""A tenant with ``auth: required`` on a relay whose unknown senders go to
another tenant's default user: real clients, a real relay of two workers,
a real upstream, and ``relay preview`` on the same policy."""

from __future__ import annotations

import smtplib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import message
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer, free_port
from tests.test_cli import relay as relay_command
from tests.test_queue_e2e import configure

REFUSED = "550 5.7.1 Sender not known to this relay"
HANK = (
    "From: Hank Scorpio <hank@globex.example>\r\nTo: customer@example.org\r\n"
    "Subject: Invoice B-77 from Globex GmbH\r\n\r\nDear customer,\r\n"
)


def _globex_needs_a_login(policy_file: Path) -> None:
    text = policy_file.read_text().replace(
        "    name: Globex GmbH\n", "    name: Globex GmbH\n    auth: required\n"
    )
    default = "  unknown_sender: default\n  default_tenant: acme\n"
    policy_file.write_text(text.replace("  unknown_sender: reject\n", default))


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    with SinkServer(Sink()) as server:
        yield server


@pytest.fixture
def running(policy_file: Path, sink: SinkServer, tmp_path: Path) -> Iterator[RelayProcess]:
    port = free_port()
    path = configure(policy_file, port, sink.port, "workers: 2\n")
    _globex_needs_a_login(path)
    with RelayProcess(path, port, tmp_path / "relay.log") as proc:
        yield proc


def _swaks(running: RelayProcess, sender: str, *extra: str) -> str:
    """What swaks heard after DATA, or of its failure."""
    out = subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{running.port}", "--from", sender,
            "--to", "customer@example.org", "--header", "From: Hank Scorpio <hank@globex.example>",
            "--header", "Subject: Invoice B-77 from Globex GmbH", *extra,
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return out.stdout + out.stderr


def _send(running: RelayProcess, data: str, sender: str, login: str | None = None) -> str:
    with smtplib.SMTP("127.0.0.1", running.port, timeout=20) as client:
        client.ehlo()
        if login is not None:
            client.login(login, "demo-password")
        client.mail(sender)
        client.rcpt("customer@example.org")
        code, text = client.data(data.encode())
    return f"{code} {text.decode()}"


def _preview(running: RelayProcess, tmp_path: Path, data: str, *options: str) -> str:
    eml = tmp_path / "preview.eml"
    eml.write_text(data)
    done = relay_command("preview", "-c", str(running.policy), str(eml), *options)
    assert done.returncode == 65, done.stdout
    return done.stderr.removeprefix("relay preview: the relay would refuse this message: ")


def test_a_required_tenants_user_without_a_login_is_refused_not_sent_as_the_default(
    running: RelayProcess, sink: SinkServer, tmp_path: Path
) -> None:
    """Globex's invoice, sent without a login, went out as Acme's default user
    Jan, through Acme's upstream, with a BCC copy to Jan: the user found was
    passed over as if no tenant had it. Whichever source names the user."""
    said = _swaks(running, "hank@globex.example")
    assert f"<** {REFUSED}" in said, said
    by_header = HANK.replace("From: Hank Scorpio <hank@globex.example>", "From: x@elsewhere.org")
    by_header = by_header.replace("\r\n\r\n", "\r\nX-ERP-User: hank@globex.example\r\n\r\n", 1)
    for data, sender in ((HANK, "erp@erp.example"), (by_header, "erp@erp.example")):
        assert _send(running, data, sender).startswith(f"{REFUSED} (envelope sender {sender}")
    time.sleep(0.2)
    assert sink.sink.messages == []
    assert "tenant=acme" not in running.log()
    note = "header X-ERP-User: 'hank@globex.example' is user 'hank', of tenant 'globex'"
    assert note in running.log()  # the sysadmin's note: why the sender is not known
    preview = _preview(running, tmp_path, by_header, "--mail-from", "erp@erp.example")
    assert preview.startswith(f"{REFUSED} (envelope sender erp@erp.example"), preview
    assert note in preview


def test_a_login_decides_as_before(running: RelayProcess, sink: SinkServer) -> None:
    """Another tenant's login is refused the user as ever; the tenant's own
    sends; an unknown sender without a login is still the default tenant's."""
    other = _send(running, HANK, "hank@globex.example", login="erp-acme")
    assert other == "550 5.7.1 Login erp-acme may not send as a user of another tenant"
    assert _send(running, HANK, "hank@globex.example", login="erp-globex").startswith("250 ")
    unknown = HANK.replace("hank@globex.example", "x@elsewhere.org")
    assert _send(running, unknown, "x@elsewhere.org").startswith("250 ")
    senders = {message.read(got.data).get("Reply-To") for got in sink.sink.wait(2)}
    assert senders == {"Globex GmbH <info@globex.example>", "Jan Janssens <jan@acme.example>"}
