"""End to end: real SMTP clients -> ``relay serve`` (a real process) -> a real SMTP sink."""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import parseaddr
from pathlib import Path

import pytest

from relay import headers, message, trace
from tests.certs import make_certs
from tests.dkimtools import assert_opendkim_ok, dkimpy_verify
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Sink, SinkServer, free_port

PDF = b"JVBERi0xLjQKJcfsj6IKMSAwIG9iago8PC9UeXBlL0NhdGFsb2c+PgplbmRvYmoK\r\n"
BODY = (
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"Hei,\r\nvedlagt faktura 4711.\r\n..leading dot stays\r\nMed vennlig hilsen\r\n"
    b'--b1\r\nContent-Type: application/pdf; name="INV-4711.pdf"\r\n'
    b'Content-Disposition: attachment; filename="INV-4711.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n" + PDF + b"--b1--\r\n"
)
INVOICE = (
    b"From: =?utf-8?q?Kari_Nordmann?= <kari@acme.example>\r\n"
    b"To: Customer One <one@example.org>,\r\n two@example.org\r\n"
    b"Bcc: hidden@example.org\r\n"
    b"Subject: =?utf-8?q?Faktura_4711_fra_Acme?=\r\n"
    b"X-ERP-User: kari\r\n"
    b"X-Responsible: Per Hansen <per@acme.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n" + BODY
)
RCPTS = ["one@example.org", "two@example.org", "hidden@example.org"]


def _policy(policy_file: Path, relay_port: int, sink_port: int) -> Path:
    text = policy_file.read_text()
    text = text.replace("port: 2525", f"port: {relay_port}")
    smtp = (
        f"  default:\n    type: smtp\n    host: 127.0.0.1\n    port: {sink_port}\n"
        "    tls: none\n    timeout: 10\n"
    )
    text = text.replace("  default:\n    type: directory\n    path: outbox\n", smtp)
    policy_file.write_text(text)
    return policy_file


@pytest.fixture(params=[False, True], ids=["one-at-a-time", "pipelining"])
def sink(request: pytest.FixtureRequest) -> Iterator[SinkServer]:
    """The upstream, with and without PIPELINING: the daemon (uvloop) takes either path."""
    with SinkServer(Sink(pipelining=request.param)) as server:
        yield server


@pytest.fixture
def relay(policy_file: Path, sink: SinkServer, tmp_path: Path) -> Iterator[RelayProcess]:
    port = free_port()
    with RelayProcess(_policy(policy_file, port, sink.port), port, tmp_path / "relay.log") as proc:
        yield proc


def send(relay: RelayProcess, data: bytes, rcpts: list[str], login: bool = True) -> str:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        if login:
            client.login("erp-acme", "demo-password")
        client.mail("erp@erp.acme.example")
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(data)
    assert code == 250, reply
    return reply.decode()


def test_control_headers_left_out_remove_x_responsible_too(
    policy_file: Path, tmp_path: Path
) -> None:
    """The example lists it with the others, and a Reply-To chain reads it: a
    policy that left the list out sent the ERP's responsible person on."""
    text = policy_file.read_text()
    policy_file.write_text(
        text.replace("control_headers: [X-ERP-User, X-Document-Type, X-Responsible]\n", "")
    )
    with SinkServer(Sink()) as upstream:
        port = free_port()
        policy = _policy(policy_file, port, upstream.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as proc:
            send(
                proc,
                INVOICE.replace(b"X-ERP-User", b"X-Document-Type: invoice\r\nX-ERP-User"),
                RCPTS[:1],
            )
            (got,) = upstream.sink.wait(1)
    view = message.read(got.data)
    assert view.get("Reply-To") == "Per Hansen <per@acme.example>"
    for gone in ("X-ERP-User", "X-Document-Type", "X-Responsible"):
        assert view.get(gone) is None, gone


def test_audit_show_gives_a_non_ascii_from_as_it_reads(policy_file: Path, tmp_path: Path) -> None:
    """Its table gave the encoded words sent, where preview and the reasons give
    the name; the record keeps them as sent."""
    with SinkServer(Sink()) as upstream:
        port = free_port()
        policy = _policy(policy_file, port, upstream.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as proc:
            queue_id = send(proc, INVOICE, RCPTS[:1]).rsplit(" ", 1)[1]
            upstream.sink.wait(1)
    show = [sys.executable, "-m", "relay", "audit", "show", queue_id, "-c", str(policy)]
    done = subprocess.run(show, capture_output=True, text=True, timeout=60, check=True)
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("    From ")]
    assert line == (
        "    From      Kari Nordmann <kari@acme.example> ->"
        " Kåre Ødegård via Acme AS <noreply@platform.example>"
    )
    done = subprocess.run([*show, "--format", "json"], capture_output=True, text=True, check=True)
    records = [json.loads(x) for x in done.stdout.splitlines()]
    (received,) = [r for r in records if r["event"] == "received"]
    assert received["from_after"].startswith("=?utf-8?")


def test_audit_show_quotes_a_decoded_name_as_received(policy_file: Path, tmp_path: Path) -> None:
    """The received record held the From decoded, ``Gross, Jürgen <kari@...>``,
    which reads as two mailboxes and which audit show could not quote: it now
    holds the field as received, as ``from_after`` holds it as sent."""
    encoded = b"From: =?utf-8?q?Gross=2C_J=C3=BCrgen?= <kari@acme.example>"
    with SinkServer(Sink()) as upstream:
        port = free_port()
        policy = _policy(policy_file, port, upstream.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as proc:
            data = INVOICE.replace(b"From: =?utf-8?q?Kari_Nordmann?= <kari@acme.example>", encoded)
            queue_id = send(proc, data, RCPTS[:1]).rsplit(" ", 1)[1]
            upstream.sink.wait(1)
    show = [sys.executable, "-m", "relay", "audit", "show", queue_id, "-c", str(policy)]
    done = subprocess.run(show, capture_output=True, text=True, timeout=60, check=True)
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("    From ")]
    assert line.startswith('    From      "Gross, Jürgen" <kari@acme.example> ->'), line
    done = subprocess.run([*show, "--format", "json"], capture_output=True, text=True, check=True)
    records = [json.loads(x) for x in done.stdout.splitlines()]
    (received,) = [r for r in records if r["event"] == "received"]
    assert received["from_before"] == encoded.decode()[len("From: ") :]


def test_invoice_rewritten_signed_and_delivered(
    relay: RelayProcess, sink: SinkServer, dns_records: dict[str, str], tmp_path: Path
) -> None:
    reply = send(relay, INVOICE, RCPTS)
    assert reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]

    (got,) = sink.sink.wait(1)
    assert got.mail_from == "bounces@platform.example"
    assert got.rcpt_tos == [*RCPTS, "kari@acme.example"]
    view = message.read(got.data)
    assert parseaddr(view.get("From") or "") == (
        "Kåre Ødegård via Acme AS",
        "noreply@platform.example",
    )
    assert view.get("Reply-To") == "Per Hansen <per@acme.example>"
    assert view.get("To") == "Customer One <one@example.org>, two@example.org"
    for gone in ("Bcc", "X-ERP-User", "X-Responsible"):
        assert view.get(gone) is None
    assert b"hidden@example.org" not in got.data
    assert got.data.split(b"\r\n\r\n", 1)[1] == BODY
    assert view.get("Message-ID") == f"<{queue_id}@relay.platform.example>"

    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    log = relay.log()
    assert f"{queue_id}: client=127.0.0.1 login=erp-acme from=<erp@erp.acme.example>" in log
    assert "tenant=acme user=kari found_by=header_from type=invoice rule=invoice-subject" in log
    wait_for(lambda: f"{queue_id}: to=<one@example.org>, relay=default" in relay.log())
    assert "status=sent" in relay.log()


def test_swaks_submission(relay: RelayProcess, sink: SinkServer) -> None:
    out = subprocess.run(
        [
            "swaks", "--server", f"127.0.0.1:{relay.port}",
            "--auth", "LOGIN", "--auth-user", "erp-acme", "--auth-password", "demo-password",
            "--from", "jan@acme.example", "--to", "customer@example.org",
            "--header", "Subject: Faktura 17", "--body", "Se vedlagt faktura.",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (got,) = sink.sink.wait(1)
    assert got.rcpt_tos == ["customer@example.org", "jan@acme.example"]
    assert message.read(got.data).get("Reply-To") == "Jan Janssens <jan@acme.example>"


def _rejected_records(relay: RelayProcess) -> list[dict]:
    found = subprocess.run(
        [sys.executable, "-m", "relay", "audit", "search", "-c", str(relay.policy),
         "--status", "rejected", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


def test_unknown_sender_refused_and_nothing_sent(relay: RelayProcess, sink: SinkServer) -> None:
    data = (
        b"From: x@nowhere.example\r\nTo: one@example.org\r\nSubject: hi\r\n"
        b"Message-ID:\r\n <rej-1@erp.example>\r\n\r\nhi\r\n"
    )
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo()
        client.mail("x@nowhere.example")
        client.rcpt("one@example.org")
        code, reply = client.data(data)
    assert code == 550
    assert reply.startswith(b"5.7.1 Sender not known to this relay")
    time.sleep(0.2)
    assert sink.sink.messages == []
    (record,) = _rejected_records(relay)
    assert record["mail_from"] == "x@nowhere.example"
    assert record["reply"].startswith("550 5.7.1 Sender not known to this relay")
    assert record["message_id"] == "<rej-1@erp.example>"  # the ERP's ID finds its refusal
    # under the same word as the refusals on the SMTP side, so one grep finds them all
    said = "refused client=127.0.0.1 login=- from=<x@nowhere.example> to=<one@example.org>: 550"
    assert f"{said} 5.7.1 Sender not known to this relay" in relay.log()


TWO_USERS = (
    "Sender ambiguous: From names more than one user"
    " (kari@acme.example is user kari, jan@acme.example is user jan)"
)


def test_a_from_naming_two_users_is_refused_and_on_record(
    relay: RelayProcess, sink: SinkServer
) -> None:
    """Found by the From, the sender was the first user it named: the other's
    message went out with the first's Reply-To, copy and audit record."""
    rest = b"To: one@example.org\r\nSubject: Faktura 17\r\n\r\nhi\r\n"
    two_fields = b"From: Kari <kari@acme.example>\r\nFrom: Jan Janssens <jan@acme.example>\r\n"
    one_field = b"From: kari@acme.example, Jan <jan@acme.example>\r\n"
    same_user = b"From: Kari <kari@acme.example>\r\nFrom: Salg <salg@acme.example>\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo()
        for head in (two_fields, one_field, same_user):
            client.mail("erp-bounces@erp.acme.example")
            client.rcpt("one@example.org")
            code, reply = client.data(head + rest)
            refused = (550, f"5.7.1 {TWO_USERS}".encode())
            assert (code, reply) == ((250, reply) if head is same_user else refused)
    (got,) = sink.sink.wait(1)
    assert got.rcpt_tos == ["one@example.org", "kari@acme.example"]  # the copy is kari's
    assert [r["reply"] for r in _rejected_records(relay)] == [f"550 5.7.1 {TWO_USERS}"] * 2
    said = "refused client=127.0.0.1 login=- from=<erp-bounces@erp.acme.example>"
    assert f"{said} to=<one@example.org>: 550 5.7.1 {TWO_USERS}" in relay.log()


def test_a_refusal_naming_a_non_ascii_address_is_a_550_on_record(
    relay: RelayProcess, sink: SinkServer
) -> None:
    """The reply quoted the From address as written, which SMTP without SMTPUTF8
    cannot carry: the ERP got 451 for a refused message and retried it for ever."""
    data = "From: J\u00f6rg <j\u00f6rg@nowhere.example>\r\nTo: one@example.org\r\n\r\nhi\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=20) as client:
        client.ehlo()
        client.mail("x@nowhere.example")
        client.rcpt("one@example.org")
        code, reply = client.data(data.encode())
    assert code == 550
    assert reply.endswith(b"From j\\xf6rg@nowhere.example)")
    (record,) = _rejected_records(relay)
    assert record["reply"] == "550 " + reply.decode("unicode_escape")
    assert record["reply"].endswith("From j\u00f6rg@nowhere.example)")
    assert sink.sink.messages == []


def test_content_the_smtp_side_refuses_is_on_record(relay: RelayProcess, sink: SinkServer) -> None:
    """A bare line feed, a NUL, a line over 998 octets: refused before the pipeline
    sees the message, and an auditor finds each refusal as the pipeline's own."""
    head = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: x\r\n\r\n"
    sent = [head + b"one\ntwo\r\n", head + b"a\0b\r\n", head + b"x" * 999 + b"\r\n"]
    replies = []
    for data in sent:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as raw:
            stream = raw.makefile("rwb")
            stream.readline()
            for command in (b"EHLO erp.example", b"MAIL FROM:<jan@acme.example>",
                            b"RCPT TO:<one@example.org>", b"DATA"):  # fmt: skip
                stream.write(command + b"\r\n")
                stream.flush()
                line = stream.readline()
                while line[3:4] == b"-":
                    line = stream.readline()
            assert line.startswith(b"354"), line
            stream.write(data + b".\r\n")
            stream.flush()
            replies.append(stream.readline().decode().rstrip())
    assert [reply[:9] for reply in replies] == ["550 5.6.1", "554 5.6.0", "554 5.6.0"]
    records = _rejected_records(relay)
    assert [r["reply"] for r in records] == replies
    assert [r["message_id"] for r in records] == [None] * 3  # they have none
    assert {(r["mail_from"], tuple(r["rcpt_tos"])) for r in records} == {
        ("jan@acme.example", ("one@example.org",))
    }
    assert sink.sink.messages == []


def test_the_audit_log_has_the_size_as_received_and_as_sent(
    relay: RelayProcess, sink: SinkServer
) -> None:
    data = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: x\r\n\r\nx\r\n"
    send(relay, data, ["one@example.org"])
    (got,) = sink.sink.wait(1)
    found = subprocess.run(
        [sys.executable, "-m", "relay", "audit", "search", "-c", str(relay.policy),
         "--format", "json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    sizes = {r["event"]: r.get("size") for r in map(json.loads, found.stdout.splitlines())}
    assert sizes["received"] == len(data)
    assert sizes["queued"] == len(got.data) > len(data)  # rewritten and signed


def test_reload_keeps_old_policy_when_new_one_is_broken(
    relay: RelayProcess, sink: SinkServer, policy_file: Path
) -> None:
    good = policy_file.read_text()
    policy_file.write_text(good.replace("name: Acme AS", "name: Acme AS\n    bogus: 1"))
    relay.signal(signal.SIGHUP)
    wait_for(lambda: "bogus" in relay.log())
    send(
        relay,
        b"From: jan@acme.example\r\nTo: a@example.org\r\nSubject: x\r\n\r\nx\r\n",
        ["a@example.org"],
    )
    assert "Jan Janssens via Acme AS" in (message.read(sink.sink.wait(1)[0].data).get("From") or "")

    policy_file.write_text(good.replace("name: Acme AS", "name: Acme Norge AS"))
    relay.signal(signal.SIGHUP)
    relay.wait_reloaded(1)
    send(
        relay,
        b"From: jan@acme.example\r\nTo: a@example.org\r\nSubject: x\r\n\r\nx\r\n",
        ["a@example.org"],
    )
    assert "via Acme Norge AS" in (message.read(sink.sink.wait(2)[1].data).get("From") or "")


def test_headers_of_signed_message_keep_original_order(
    relay: RelayProcess, sink: SinkServer
) -> None:
    send(relay, INVOICE, RCPTS)
    (got,) = sink.sink.wait(1)
    names = [f.name for f in headers.split(got.data)[0]]
    assert names[:3] == ["DKIM-Signature", "DKIM-Signature", "Received"]
    assert names[3:] == ["From", "To", "Subject", "MIME-Version", "Content-Type", "Reply-To",
                         "Message-ID", "Date"]  # fmt: skip


def test_a_received_field_tells_the_next_hop_who_handed_the_message_over(
    relay: RelayProcess, sink: SinkServer
) -> None:
    """RFC 5321 4.4; ESMTPA for a login (RFC 3848), and no recipient named, BCC or not."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="erp.acme.example") as client:
        client.login("erp-acme", "demo-password")
        client.sendmail("erp@erp.acme.example", RCPTS, INVOICE)
    (got,) = sink.sink.wait(1)
    (field,) = [f for f in headers.split(got.data)[0] if f.name == "Received"]
    value = b" ".join(field.raw.split())
    found = re.fullmatch(
        rb"Received: from erp\.acme\.example \(\[127\.0\.0\.1\]\) by relay\.platform\.example"
        rb" with ESMTPA id ([0-9A-Z]{16}); \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000",
        value,
    )
    assert found is not None, value
    assert f"{found.group(1).decode()}: client=127.0.0.1 login=erp-acme" in relay.log()


def test_an_erp_set_for_ssl_tls_logs_in_and_sends_over_implicit_tls(
    policy_file: Path, sink: SinkServer, dns_records: dict[str, str], tmp_path: Path
) -> None:
    """Port 465's "SSL/TLS", all a legacy ERP may offer: the handshake first, then
    AUTH, by two workers on the one listening socket; traced and signed as after
    STARTTLS."""
    certs = make_certs(tmp_path / "tls")
    port = free_port()
    path = _policy(policy_file, port, sink.port)
    implicit = f"tls: {{cert: {certs.cert}, key: {certs.key}, mode: implicit}}"
    text = path.read_text().replace("    auth: optional\n", f"    auth: required\n    {implicit}\n")
    path.write_text(text + "workers: 2\n")
    context = ssl.create_default_context(cafile=str(certs.ca))
    with RelayProcess(path, port, tmp_path / "relay.log", tls=context) as relay:
        for _ in range(4):
            with smtplib.SMTP_SSL(
                "127.0.0.1", port, local_hostname="erp.acme.example", context=context, timeout=20
            ) as client:
                assert not client.has_extn("starttls")
                client.login("erp-acme", "demo-password")
                client.sendmail("erp@erp.acme.example", RCPTS, INVOICE)
        got = sink.sink.wait(4)
        assert "2 workers serving" in relay.log()
    for each in got:
        (field,) = [f for f in headers.split(each.data)[0] if f.name == "Received"]
        assert b" with ESMTPSA id " in b" ".join(field.raw.split())
        assert dkimpy_verify(each.data, dns_records)
    assert_opendkim_ok(got[0].data, dns_records, tmp_path)


def test_a_client_greeting_with_helo_is_traced_as_smtp(
    relay: RelayProcess, sink: SinkServer
) -> None:
    """It was stamped ESMTP, which a legacy ERP saying HELO never spoke."""
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="erp.acme.example") as client:
        client.helo()
        client.sendmail("jan@acme.example", RCPTS, INVOICE)
    (got,) = sink.sink.wait(1)
    (field,) = [f for f in headers.split(got.data)[0] if f.name == "Received"]
    assert b" with SMTP id " in b" ".join(field.raw.split())


@pytest.mark.parametrize(
    ("responsible", "reply_to"),
    [
        (
            "=?utf-8?q?=C3=85se_=3Cevil=40attacker.example=3E=2C?= <per@acme.example>",
            ("Åse <evil@attacker.example>,", "per@acme.example"),
        ),
        ('"Müller, Jörg" <jorg@acme.example>', ("Müller, Jörg", "jorg@acme.example")),
    ],
    ids=["encoded-name", "raw-utf8-name"],
)
def test_what_users_put_in_headers_cannot_redirect_replies_or_leak(
    relay: RelayProcess,
    sink: SinkServer,
    dns_records: dict[str, str],
    tmp_path: Path,
    responsible: str,
    reply_to: tuple[str, str],
) -> None:
    """Display names, raw UTF-8, Resent-Bcc and Sender, as an ERP passes them on."""
    data = (
        "From: Kari <kari@acme.example>\r\n"
        "Sender: ceo@bank.example\r\n"
        "To: one@example.org\r\n"
        "Resent-Bcc: hidden2@example.org\r\n"
        "Subject: Faktura for Ørsted og März\r\n"
        f"X-Responsible: {responsible}\r\n"
        "\r\nHei\r\n"
    ).encode()
    send(relay, data, ["one@example.org", "hidden2@example.org"])
    (got,) = sink.sink.wait(1)
    view = message.read(got.data)
    assert view.addresses("Reply-To") == (reply_to,)
    assert view.get_all("Sender") == () and view.get_all("Resent-Bcc") == ()
    head = got.data.split(b"\r\n\r\n", 1)[0]
    assert "Subject: Faktura for Ørsted og März\r\n".encode() in head
    for leaked in (b"hidden2@", b"bank.example", b"evil@attacker"):
        assert leaked not in head
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_the_listen_backlog_is_the_relays(relay: RelayProcess) -> None:
    """The event loop listened again with its default of 100, so a burst of ERP
    batch jobs past about 100 waited for SYN retries instead of the queue of 511."""
    shown = subprocess.run(
        ["ss", "-ltnH", f"sport = :{relay.port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    most = int(Path("/proc/sys/net/core/somaxconn").read_text())  # the kernel's cap
    assert shown[0] == "LISTEN" and shown[2] == str(min(511, most)), shown


def test_a_zone_is_no_part_of_the_received_address_literal() -> None:
    assert trace._literal("fe80::1%eth0") == "[IPv6:fe80::1]"
    assert trace._literal("::1") == "[IPv6:::1]"
