"""A login bound to one user (``users: [jan]``) on a relay whose ``identify.order``
leaves ``auth_login`` out and whose unknown senders go to the default user,
another one: real clients, a real relay and a real upstream."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import message
from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_e2e import _rejected_records
from tests.test_queue_e2e import configure

REST = "To: one@example.org\r\nSubject: Hello\r\n\r\nhi\r\n"


@pytest.fixture
def sink() -> Iterator[SinkServer]:
    with SinkServer() as server:
        yield server


@pytest.fixture
def relay(policy_file: Path, sink: SinkServer, tmp_path: Path) -> Iterator[RelayProcess]:
    text = policy_file.read_text()
    text = text.replace(
        "order: [auth_login, envelope_sender, header_from, header]",
        "order: [envelope_sender, header_from, header]",
    )
    text = text.replace("unknown_sender: reject", "unknown_sender: default")
    policy_file.write_text(text.replace("    default_user: jan\n", "    default_user: kari\n"))
    port = free_port()
    path = configure(policy_file, port, sink.port)
    with RelayProcess(path, port, tmp_path / "relay.log") as proc:
        yield proc


def _send(relay: RelayProcess, head: str, login: str = "erp-acme-jan") -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.login(login, "demo-password")
        client.mail("erp@erp.acme.example")
        client.rcpt("one@example.org")
        code, reply = client.data((head + REST).encode())
    return f"{code} {reply.decode()}"


def test_an_unknown_sender_of_a_login_bound_to_one_user_is_that_user(
    relay: RelayProcess, sink: SinkServer
) -> None:
    """The tenant's default user, Kari, is a user the login may not be: all
    its mail whose sender no source found was refused, as Kari's."""
    assert _send(relay, "From: Who <who@nowhere.example>\r\n").startswith("250 ")
    (got,) = sink.sink.wait(1)
    assert message.read(got.data).get("From") == (
        "Jan Janssens via Acme AS <noreply@platform.example>"
    )
    assert "tenant=acme user=jan found_by=default" in relay.log()
    # a login bound to no user still sends an unknown sender's mail as the default user
    assert _send(relay, "From: Who <who@nowhere.example>\r\n", "erp-acme").startswith("250 ")
    assert "tenant=acme user=kari found_by=default" in relay.log()


def test_a_from_naming_the_logins_user_and_another_is_refused_for_the_other(
    relay: RelayProcess, sink: SinkServer
) -> None:
    """Not "Sender ambiguous": the login may be only Jan, so Kari is the user it
    may not send as, wherever she stands, as when she stands alone."""
    refused = "550 5.7.1 Login erp-acme-jan may not send as user kari"
    for head in (
        "From: Jan <jan@acme.example>, Kari <kari@acme.example>\r\n",
        "From: Kari <kari@acme.example>\r\nFrom: Jan <jan@acme.example>\r\n",
        "From: Kari <kari@acme.example>\r\n",
    ):
        assert _send(relay, head) == refused
    assert [r["reply"] for r in _rejected_records(relay)] == [refused] * 3
    assert sink.sink.messages == []
