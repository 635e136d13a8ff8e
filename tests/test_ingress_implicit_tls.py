"""Implicit TLS (port 465, "SSL/TLS" in an ERP) with real clients on loopback:
TLS from the first byte, AUTH over it, and a client set for plain text named
in the log as a client set for implicit TLS is on a STARTTLS listener."""

from __future__ import annotations

import logging
import shutil
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from relay import tally
from relay.ingress import implicit, listen
from relay.ingress.clientlimit import ClientCounts
from relay.ingress.protocol import CLOSED_AFTER_HANDSHAKE
from relay.policy.model import AuthMode, Listener, ListenerTls, TlsFiles
from relay.policy.tlspair import read_pair
from relay.tally import Tally
from tests.certs import Certs, checked_after_handshake, der, make_certs, served_certificate
from tests.ingress_harness import TIMEOUT, Relay
from tests.minimal_policy import listener

IMPLICIT = ListenerTls.IMPLICIT
MESSAGE = b"From: jan@acme.example\r\nTo: one@example.org\r\nSubject: x\r\n\r\nx\r\n"


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "tls")


@pytest.fixture
def tls_files(certs: Certs) -> TlsFiles:
    return read_pair(certs.cert, certs.key)


@pytest.fixture
def not_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat the 127.0.0.1 test listener as if it were on a public address."""
    monkeypatch.setattr(listen, "loopback_only", lambda address: False)


def trusting(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The relay's log lines with ``text`` in them, once there is one."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = [r for r in caplog.records if r.name == "relay" and text in r.getMessage()]
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no {text} in the log: {caplog.text}")


@pytest.mark.usefixtures("not_loopback")
def test_smtps_client_logs_in_and_sends_over_tls(certs: Certs, tls_files: TlsFiles) -> None:
    """Off loopback, AUTH is offered at once: the connection is encrypted, and no
    STARTTLS is offered within it."""
    served = listener(tls=tls_files, tls_mode=IMPLICIT, auth=AuthMode.REQUIRED)
    with (
        Relay([served]) as relay,
        smtplib.SMTP_SSL("127.0.0.1", relay.port, context=trusting(certs)) as client,
    ):
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        assert client.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        client.login("erp-acme", "demo-password")
        client.sendmail("jan@acme.example", ["one@example.org"], MESSAGE)
    (submission,) = relay.process.submissions
    assert submission.tls and submission.auth_login == "erp-acme"


def test_a_client_set_for_starttls_is_told_421_in_plain_text_and_named_at_once(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It waited for a greeting until the idle timeout, 300 s by default, and its
    user was told only that the connection closed."""
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(implicit, "FIRST_BYTES_WAIT", 0.5)
    counts = Tally(1)
    served = listener(tls=tls_files, tls_mode=IMPLICIT, idle_timeout=300)
    with Relay([served], tally=counts.row(0)) as relay:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT)
        assert time.monotonic() - started < 5
        (line,) = logged(caplog, "where a TLS handshake was expected")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        421,
        b"4.7.0 This port expects implicit TLS (SSL/TLS) from the first byte: an ERP set for"
        b" STARTTLS should use a listener of the relay that offers it (port 587 is the usual one)",
    )
    assert line.getMessage().startswith("client=127.0.0.1 sent no TLS handshake in 0.5s where")
    assert counts.total(tally.TLS_FAILED, "test") == 1


def test_a_client_waiting_for_a_greeting_is_named_at_an_idle_timeout_shorter_than_the_wait(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT, idle_timeout=0.5)]) as relay:
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPConnectError):
            smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT)
        assert time.monotonic() - started < 5
        (line,) = logged(caplog, "where a TLS handshake was expected")
    assert (line.levelno, line.getMessage()) == (
        logging.WARNING,
        "client=127.0.0.1 sent no TLS handshake in 0.5s where a TLS handshake was expected:"
        " is it set for STARTTLS or no encryption (port 587 or 25)? this listener offers"
        " implicit TLS",
    )


def test_a_client_that_resets_once_it_has_read_the_221_for_quit_is_not_logged(
    certs: Certs, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """smtplib resets the connection as the relay ends its TLS: more than half
    its sessions were logged "lost connection after QUIT"."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT)]) as relay:
        for _ in range(20):
            with smtplib.SMTP_SSL("127.0.0.1", relay.port, context=trusting(certs)) as client:
                client.ehlo()
        time.sleep(0.2)  # the last connection's end
    relay_lines = [r.getMessage() for r in caplog.records if r.name == "relay"]
    assert not [m for m in relay_lines if "lost connection" in m or "TLS" in m], relay_lines


def test_a_client_that_stalls_in_its_handshake_is_not_taken_for_a_plain_text_one(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT, idle_timeout=0.5)]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
            started = time.monotonic()
            assert sock.recv(4096) == b""
            assert time.monotonic() - started < 5
        (line,) = logged(caplog, "TLS handshake in")
    assert (line.levelno, line.getMessage()) == (
        logging.WARNING,
        "client=127.0.0.1 did not finish the TLS handshake in 0.5s",
    )


def test_a_stalled_handshake_is_given_the_idle_timeout_not_the_wait_for_its_first_bytes(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(implicit, "FIRST_BYTES_WAIT", 1.0)  # its first bytes come well within
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT, idle_timeout=3.0)]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            started = time.monotonic()
            sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
            assert sock.recv(4096) == b""
            assert time.monotonic() - started > 2.0
        (line,) = logged(caplog, "TLS handshake in")
    assert line.getMessage() == "client=127.0.0.1 did not finish the TLS handshake in 3s"


def test_a_client_that_resets_in_its_handshake_is_logged_as_after_starttls(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """After STARTTLS it was logged and counted; here it left no trace."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT)]) as relay:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a ClientHello
        time.sleep(0.2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset
        (line,) = logged(caplog, "TLS handshake failed")
    assert line.getMessage().startswith("TLS handshake failed client=127.0.0.1: ")
    assert line.getMessage().endswith(" (listener test)")


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_client_that_does_not_trust_the_certificate_is_named_not_counted_as_failed(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture, reset: bool
) -> None:
    """It closes once the handshake is done, as msmtp or PHPMailer with the
    wrong CA: the relay said nothing, or only that the handshake was reset."""
    caplog.set_level(logging.INFO, logger="relay")
    counts = Tally(1)
    other = make_certs(tmp_path / "other")
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT)], tally=counts.row(0)) as relay:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
        assert not checked_after_handshake(sock, other.ca, reset=reset)
        (line,) = logged(caplog, "right after the TLS handshake")
    assert (line.levelno, line.getMessage()) == (logging.INFO, CLOSED_AFTER_HANDSHAKE % "127.0.0.1")
    assert "handshake failed" not in caplog.text
    assert counts.total(tally.TLS_FAILED, "test") == 0  # a certificate check does the same


def test_a_client_sending_plain_text_is_named_and_closed_at_once(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files, tls_mode=IMPLICIT)]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"EHLO client.example\r\n")
            assert sock.recv(4096) == b""  # closed, no greeting in plain text
        (line,) = logged(caplog, "where a TLS handshake was expected")
        assert line.getMessage().startswith("client=127.0.0.1 sent plain text where a TLS")
        assert served_certificate(relay.port, implicit=True)  # the listener serves on


def test_a_stop_does_not_wait_for_a_handshake(tls_files: TlsFiles) -> None:
    with (
        Relay([listener(tls=tls_files, tls_mode=IMPLICIT)]) as relay,
        socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock,
    ):
        time.sleep(0.2)  # accepted: its handshake under way
        started = time.monotonic()
        relay.close()
        assert time.monotonic() - started < 2
        assert sock.recv(1) == b""


def test_a_reload_serves_a_renewed_certificate_to_new_connections(
    tmp_path: Path, certs: Certs
) -> None:
    renewed = make_certs(tmp_path / "renewed")
    with Relay([listener(tls=read_pair(certs.cert, certs.key), tls_mode=IMPLICIT)]) as relay:
        assert served_certificate(relay.port, implicit=True) == der(certs.cert)
        shutil.copy(renewed.cert, certs.cert)
        shutil.copy(renewed.key, certs.key)
        relay.call(
            _reloaded(relay, listener(tls=read_pair(certs.cert, certs.key), tls_mode=IMPLICIT))
        )
        assert {served_certificate(relay.port, implicit=True) for _ in range(4)} == {
            der(renewed.cert)
        }


def test_past_its_limit_a_silent_connection_is_refused_at_once_and_counted(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Admitted only once the handshake was done, a client's silent connections
    were each held uncounted until the idle timeout, past every limit."""
    caplog.set_level(logging.INFO, logger="relay")
    clients, counts = ClientCounts(1).row(0), Tally(1)
    limited = replace(listener(tls=tls_files, tls_mode=IMPLICIT), max_connections_per_client=2)
    with Relay([limited], clients=clients, tally=counts.row(0)) as relay:
        held = [socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)]
        held.append(socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT))
        try:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as third:
                started = time.monotonic()
                assert third.recv(512) == b""  # no reply: it expects TLS
                assert time.monotonic() - started < 2
        finally:
            for sock in held:
                sock.close()
        (line,) = logged(caplog, "max_connections_per_client")
        assert line.getMessage() == (
            "refused client=127.0.0.1 on listener test: 2 connections open from it already,"
            " its max_connections_per_client (closed before the TLS handshake, without a reply)"
        )
        _wait_until(lambda: clients.open("test", "127.0.0.1") == 0)  # handshakes that ended
        assert served_certificate(relay.port, implicit=True)
    assert counts.total(tally.CONNECTION, "test") == 4
    assert counts.total(tally.REFUSED, "test", "too_many_from_client") == 1


def test_a_client_not_allowed_is_closed_before_the_handshake(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """As a STARTTLS listener refuses it before any TLS: it was shown the
    certificate, then told 554 over TLS."""
    caplog.set_level(logging.INFO, logger="relay")
    counts = Tally(1)
    partners = listener(tls=tls_files, tls_mode=IMPLICIT, allow=("192.0.2.0/24",))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with Relay([partners], tally=counts.row(0)) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            started = time.monotonic()
            with pytest.raises(OSError), context.wrap_socket(sock):  # EOF, or a reset
                pass
            assert time.monotonic() - started < 2
        (line,) = logged(caplog, "not in its allow list")
    assert line.getMessage() == (
        "refused client=127.0.0.1 on listener test: not in its allow list"
        " (closed before the TLS handshake, without a reply)"
    )
    assert counts.total(tally.REFUSED, "test", "not_allowed") == 1
    assert counts.total(tally.TLS_FAILED, "test") == 0


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.02)


async def _reloaded(relay: Relay, again: Listener) -> None:
    """What a reload does to the listeners, in the loop that serves them."""
    assert relay.ingress is not None
    relay.ingress.reload_tls([again])
