"""A STARTTLS handshake that fails, with real clients on loopback: the log
line names the client, so that the sysadmin can find which ERP it was."""

from __future__ import annotations

import logging
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay import tally
from relay.ingress.protocol import CLOSED_AFTER_HANDSHAKE
from relay.policy.model import TlsFiles
from relay.policy.tlspair import read_pair
from relay.tally import Tally
from tests.certs import checked_after_handshake, make_certs
from tests.ingress_harness import TIMEOUT, Raw, Relay
from tests.minimal_policy import listener


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    certs = make_certs(tmp_path_factory.mktemp("tls"))
    return read_pair(certs.cert, certs.key)


def handshake_failure(caplog: pytest.LogCaptureFixture, reason: str) -> str:
    """The relay's log line for the failed handshake, once it is written."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "relay" and reason in record.getMessage():
                return record.getMessage()
        time.sleep(0.02)
    raise AssertionError(f"no {reason} in the log: {caplog.text}")


def plain_text_after_starttls(port: int) -> None:
    with Raw(port) as raw:
        raw.ehlo()
        assert raw.cmd(b"STARTTLS").startswith("220")
        raw.send(b"EHLO client.example\r\n")
        assert raw.closed()


def tls_1_1_client(port: int) -> None:
    """``openssl s_client -tls1_1``, as an old ERP's TLS stack offers it."""
    done = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", "smtp", "-tls1_1"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert done.returncode != 0


@pytest.mark.parametrize(
    ("client", "reason"),
    [(plain_text_after_starttls, "WRONG_VERSION_NUMBER"), (tls_1_1_client, "older TLS version")],
    ids=["plain-text", "tls-1.1"],
)
def test_a_failed_handshake_is_logged_with_the_client(
    tls_files: TlsFiles,
    caplog: pytest.LogCaptureFixture,
    client: Callable[[int], None],
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files)]) as relay:
        client(relay.port)
        line = handshake_failure(caplog, reason)
        assert line.startswith("TLS handshake failed client=127.0.0.1: "), line
        named = (" (listener test)", " on listener test for a legacy client)")
        assert line.endswith(named), line  # which of a relay's listeners
        with Raw(relay.port) as raw:  # the listener serves on
            assert raw.cmd(b"NOOP").startswith("250")


def test_a_handshake_cut_off_by_the_client_is_logged_with_a_reason(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset mid-handshake has no text of its own: the line ended at the colon,
    and a client that hung up read like a protocol mismatch."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files)]) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(b"STARTTLS").startswith("220")
            raw.send(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        line = handshake_failure(caplog, "TLS handshake failed client=127.0.0.1: ")
    assert not line.endswith(": "), line


def test_a_client_idle_after_its_handshake_is_logged_after_starttls(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """Its 421 line said "after CONNECT", as of a client that never greeted."""
    caplog.set_level(logging.INFO, logger="relay")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with Relay([listener(tls=tls_files, idle_timeout=0.5)]) as relay:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            reader = sock.makefile("rb")
            assert reader.readline().startswith(b"220")
            sock.sendall(b"EHLO client.example\r\n")
            while not reader.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert reader.readline().startswith(b"220")
            with context.wrap_socket(sock) as tls:
                assert tls.recv(4096).startswith(b"421 4.4.2 ")
        line = handshake_failure(caplog, "disconnected after")
    assert line.startswith("client=127.0.0.1 disconnected after STARTTLS: 421 4.4.2 "), line


@pytest.mark.parametrize(
    "sent", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b""], ids=["half-a-hello", "nothing"]
)
def test_a_handshake_stalled_after_starttls_is_a_failed_handshake_as_on_implicit_tls(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture, sent: bytes
) -> None:
    """It was logged as told ``421 4.4.2``, which no client mid-handshake can
    read (nor was it sent), and counted as a dropped session, not as a failed
    handshake as the same stall on a listener of implicit TLS is."""
    caplog.set_level(logging.INFO, logger="relay")
    counts = Tally(1)
    with Relay([listener(tls=tls_files, idle_timeout=0.5)], tally=counts.row(0)) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(b"STARTTLS").startswith("220")
            raw.send(sent)
            started = time.monotonic()
            assert raw.sock.recv(4096) == b""
            assert time.monotonic() - started < 5
        line = handshake_failure(caplog, "TLS handshake in")
    assert line == "client=127.0.0.1 did not finish the TLS handshake in 0.5s"
    assert "disconnected after" not in caplog.text
    assert "handshake failed" not in caplog.text  # one line, one failure
    assert counts.total(tally.TLS_FAILED, "test") == 1
    assert counts.total(tally.DROPPED, "test", "timeout") == 0


def test_a_client_that_does_not_trust_the_certificate_is_named_not_counted_as_failed(
    tmp_path: Path, tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    """As msmtp with the wrong CA: it closed after the handshake, before EHLO
    again, and the relay said nothing."""
    caplog.set_level(logging.INFO, logger="relay")
    counts = Tally(1)
    other = make_certs(tmp_path / "other")
    with Relay([listener(tls=tls_files)], tally=counts.row(0)) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(b"STARTTLS").startswith("220")
            assert not checked_after_handshake(raw.sock, other.ca)
        line = handshake_failure(caplog, "right after the TLS handshake")
    assert line == CLOSED_AFTER_HANDSHAKE % "127.0.0.1"
    assert counts.total(tally.TLS_FAILED, "test") == 0  # a certificate check does the same


def curl_smtps(port: int) -> None:
    """curl as an ERP set for SSL/TLS on port 465 connects: TLS from the first byte."""
    done = subprocess.run(
        ["curl", "--silent", "--insecure", "--max-time", str(TIMEOUT), f"smtps://127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT + 5, check=False,
    )  # fmt: skip
    assert done.returncode == 35, done  # SSL connect error: wrong version number


def python_tls(port: int) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    with sock, pytest.raises(ssl.SSLError):
        context.wrap_socket(sock)


def openssl_s_client(port: int) -> None:
    """OpenSSL's ClientHello mostly has bytes over 127 before its first line
    feed: refused as non-ASCII, not as bad syntax, it went unnamed."""
    subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT + 5, check=False,
    )  # fmt: skip


def hello_without_a_line_end(port: int) -> None:
    """The start of a ClientHello with no newline in it, then the client gives up."""
    with Raw(port) as raw:
        raw.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")


def hello_twice(port: int) -> None:
    """Records that look like a handshake's on two lines, the second unended."""
    with Raw(port) as raw:
        raw.send(b"\x16\x03\x01\x00\x0a\r\n\x16\x03\x01\x00")
        assert raw.reply()[0].startswith("500 ")


@pytest.mark.parametrize(
    "client",
    [
        curl_smtps,
        python_tls,
        openssl_s_client,
        hello_without_a_line_end,
        hello_twice,
    ],
    ids=lambda c: c.__name__,
)
def test_a_client_set_for_implicit_tls_is_named_once_in_the_log(
    caplog: pytest.LogCaptureFixture, client: Callable[[int], None]
) -> None:
    """Its ClientHello got 500 bad syntax, and the log said only that the client
    closed the connection: nothing for the sysadmin of an ERP that cannot connect."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()]) as relay:
        client(relay.port)
        handshake_failure(caplog, "TLS handshake where")
    said = [r for r in caplog.records if "TLS handshake where" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (
            logging.WARNING,
            "client=127.0.0.1 sent a TLS handshake where an SMTP command was expected:"
            " is it set for implicit TLS (port 465)? this listener offers no TLS",
        )
    ]


def test_a_listener_with_tls_says_it_offers_starttls(
    caplog: pytest.LogCaptureFixture, tls_files: TlsFiles
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(tls=tls_files)]) as relay:
        curl_smtps(relay.port)
        handshake_failure(caplog, "TLS handshake where")
    said = [r.getMessage() for r in caplog.records if "TLS handshake where" in r.getMessage()]
    assert [m.rsplit("? ", 1)[1] for m in said] == ["this listener offers STARTTLS"]


def test_starttls_on_a_listener_without_tls_is_refused_for_good() -> None:
    """It got aiosmtpd's ``454 TLS not available``, a temporary failure: an ERP
    set to require STARTTLS retried for ever a setting that can never work."""
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        assert "250-STARTTLS" not in raw.ehlo()
        assert raw.cmd(b"STARTTLS") == "502 5.5.1 Error: this listener does not offer STARTTLS"
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


def test_help_on_a_listener_with_tls_names_starttls(tls_files: TlsFiles) -> None:
    """HELP left it out of its list, and HELP STARTTLS got the list instead."""
    with Relay([listener(tls=tls_files)]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert " STARTTLS " in raw.cmd(b"HELP")
        assert raw.cmd(b"HELP STARTTLS") == "214 2.0.0 Syntax: STARTTLS"


def test_help_after_starttls_no_longer_names_it(tls_files: TlsFiles) -> None:
    """EHLO stops offering STARTTLS once TLS is on; HELP listed it still."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        Relay([listener(tls=tls_files)]) as relay,
        smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT) as client,
    ):
        client.starttls(context=context)
        client.ehlo()
        assert not client.has_extn("starttls")
        code, text = client.docmd("HELP")
        assert code == 214 and b"STARTTLS" not in text
        assert client.docmd("HELP STARTTLS")[0] == 504
