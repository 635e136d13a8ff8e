"""An ERP that skips STARTTLS on an ``auth: required`` listener off loopback: its
AUTH is refused for want of TLS, and what it is told at MAIL, and what the log
says, name STARTTLS, not a login it never made. The listener binds 0.0.0.0,
which is not loopback, and the client comes from 127.0.0.1, as a real one would
from the LAN."""

from __future__ import annotations

import logging
import smtplib
import ssl

import pytest

from relay.policy.model import AuthMode, TlsFiles
from relay.policy.tlspair import read_pair
from tests.certs import make_certs
from tests.ingress_harness import TIMEOUT, Raw, Relay
from tests.minimal_policy import listener
from tests.test_ingress import plain

STARTTLS_FIRST = "530 5.7.0 Must issue a STARTTLS command first"
ENCRYPTION_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
LOGIN = b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    certs = make_certs(tmp_path_factory.mktemp("tls"))
    return read_pair(certs.cert, certs.key)


def required_off_loopback(tls: TlsFiles | None) -> Relay:
    return Relay([listener(address="0.0.0.0", tls=tls, auth=AuthMode.REQUIRED)])


def connected(relay: Relay) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", relay.port, timeout=TIMEOUT)


def relay_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "relay"]


def test_mail_without_starttls_is_told_to_issue_starttls(
    tls_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with required_off_loopback(tls_files) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(LOGIN) == ENCRYPTION_REQUIRED
        assert raw.cmd(LOGIN) == ENCRYPTION_REQUIRED
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>") == STARTTLS_FIRST
        assert raw.cmd(b"RCPT TO:<one@example.org>") == STARTTLS_FIRST
        assert raw.cmd(b"STARTTLS").startswith("220")
        raw.sock = context.wrap_socket(raw.sock)
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>") == "530 5.7.0 Authentication required"
        assert raw.cmd(LOGIN).startswith("235 ")
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>").startswith("250 ")
    refused = [line for line in relay_lines(caplog) if line.startswith("refused ")]
    assert refused == [  # the AUTH once a session, however often it is tried
        f"refused client=127.0.0.1 login=-: AUTH before STARTTLS: {ENCRYPTION_REQUIRED}",
        f"refused client=127.0.0.1 login=- from=<jan@acme.example>: {STARTTLS_FIRST}",
        "refused client=127.0.0.1 login=- from=<jan@acme.example>:"
        " 530 5.7.0 Authentication required",  # on TLS, the login is what is missing
    ]


def test_smtplib_without_starttls_reads_what_to_do(tls_files: TlsFiles) -> None:
    """What an ERP's error dialog shows: the reply to its MAIL."""
    with required_off_loopback(tls_files) as relay, connected(relay) as client:
        client.ehlo()
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("jan@acme.example", ["one@example.org"], b"Subject: x\r\n\r\nx\r\n")
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        530,
        b"5.7.0 Must issue a STARTTLS command first",
    )


@pytest.mark.parametrize("auth", [AuthMode.OPTIONAL, AuthMode.REQUIRED])
def test_auth_on_a_listener_without_tls_names_the_listener(
    auth: AuthMode, caplog: pytest.LogCaptureFixture
) -> None:
    """No STARTTLS is offered there: "AUTH before STARTTLS" sent the sysadmin to
    set the ERP to use what the listener does not have."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(address="0.0.0.0", tls=None, auth=auth)]) as relay, Raw(relay.port) as raw:
        assert not any("STARTTLS" in line for line in raw.ehlo())
        assert raw.cmd(LOGIN) == ENCRYPTION_REQUIRED
        mail = raw.cmd(b"MAIL FROM:<jan@acme.example>")
    assert mail == (
        "250 2.1.0 OK" if auth is AuthMode.OPTIONAL else "530 5.7.0 Authentication required"
    )
    refused = [line for line in relay_lines(caplog) if line.startswith("refused ")]
    assert refused[0] == (
        "refused client=127.0.0.1 login=-: AUTH on listener test, which has no tls:"
        f" a login needs TLS off loopback: {ENCRYPTION_REQUIRED}"
    )
    assert not any("STARTTLS" in line for line in refused)
