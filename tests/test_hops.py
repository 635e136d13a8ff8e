"""A message that has been through too many relays is refused: the end of a mail loop."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from relay.errors import Rejected
from relay.pipeline import HOP_LIMIT
from tests.relayproc import RelayProcess, wait_for
from tests.sink import SinkServer, free_port
from tests.test_decisions import BASE, msg, run
from tests.test_queue_e2e import SMALL, configure, relay_cli

REFUSED = ": 554 5.4.6 Too many hops"  # the receiving side's log line, not the sender's


def _received(hops: int) -> bytes:
    return b"".join(
        b"Received: from hop%d.example by hop%d.example; Sat, 5 Dec 2026 10:00:00 +0000\r\n"
        % (n, n + 1)
        for n in range(hops)
    )


def test_a_message_carrying_the_hop_limit_of_received_fields_is_refused(
    policy_file: Path, tmp_path: Path
) -> None:
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                below = client.sendmail(
                    "jan@acme.example", ["one@example.org"], _received(HOP_LIMIT - 1) + SMALL
                )
                assert below == {}
                try:
                    client.sendmail(
                        "jan@acme.example", ["one@example.org"], _received(HOP_LIMIT) + SMALL
                    )
                except smtplib.SMTPDataError as exc:
                    code, text = exc.smtp_code, exc.smtp_error.decode()
                else:
                    raise AssertionError("accepted")
            sink.sink.wait(1)
    assert code == 554 and text.startswith("5.4.6 Too many hops"), (code, text)
    assert f"{HOP_LIMIT} Received" in text
    assert len(sink.sink.messages) == 1


def test_a_relay_that_is_its_own_smarthost_stops_the_loop(
    policy_file: Path, tmp_path: Path
) -> None:
    """Two relays each other's smarthost, in one: each round added a Received
    field and a signature until the header size limit stopped the message
    after some 300 rounds, each on record as a delivery, and the failure
    notice then went round as often."""
    port = free_port()
    policy = configure(policy_file, port, port)
    (tmp_path / "loop-password").write_text("demo-password\n")
    text = policy.read_text().replace(
        "    tls: none\n    timeout: 5\n",
        "    tls: none\n    timeout: 5\n    username: erp-acme-jan\n"
        f"    password_file: {tmp_path / 'loop-password'}\n",
    )
    policy.write_text(text)
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail("jan@acme.example", ["one@example.org"], SMALL)
        # the message, then the failure notice about it, each refused at the limit
        wait_for(lambda: relay.log().count(REFUSED) >= 2, timeout=120)
        wait_for(lambda: "is empty" in relay_cli(policy, "queue", "list").stdout, timeout=30)
        log = relay.log()
    assert log.count(REFUSED) == 2, log[-3000:]
    report = relay_cli(policy, "audit", "search", "--status", "received", "--format", "json")
    assert report.returncode == 0, report.stderr
    received = len(report.stdout.splitlines())
    assert received <= 2 * HOP_LIMIT, received


def test_received_fields_are_counted_in_any_case_and_the_refusal_says_the_limit(
    policy_file: Path,
) -> None:
    """A header name is the same in any case (RFC 5322 1.2.2): an MTA that
    writes ``received:`` adds a hop all the same. The refusal names the most
    a message may carry, which the README's table of refusals quotes."""
    names = ("Received", "received", "RECEIVED")
    loop = "".join(
        f"{names[n % 3]}: from hop{n}.example by hop{n + 1}.example;"
        " Sat, 5 Dec 2026 10:00:00 +0000\r\n"
        for n in range(HOP_LIMIT)
    ).encode()
    below = loop.split(b"\r\n", 1)[1]
    assert run(policy_file, below + msg(*BASE)).queue_id
    with pytest.raises(Rejected) as caught:
        run(policy_file, loop + msg(*BASE))
    assert caught.value.line == (
        f"554 5.4.6 Too many hops: the message carries {HOP_LIMIT} Received header fields,"
        f" at most {HOP_LIMIT - 1}; a mail loop? (RFC 5321 6.3)"
    )
