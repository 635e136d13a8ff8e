"""A listener's oldest TLS version, ``tls.min_version``: a legacy ERP (old .NET
or Windows) speaks only TLS 1.0 or 1.1, which the relay refused at STARTTLS and
on implicit TLS with nothing but OpenSSL's ``unsupported protocol`` in the log.
Real clients: Python's ssl and ``openssl s_client``, on loopback."""

from __future__ import annotations

import io
import logging
import signal
import smtplib
import ssl
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from relay.errors import PolicyError
from relay.policy.load import check_main, load
from relay.policy.model import ListenerTls, TlsVersion
from relay.policy.tlspair import server_context
from tests.certs import der, make_certs, served_certificate
from tests.ingress_harness import TIMEOUT, Relay
from tests.minimal_policy import listener
from tests.policyfiles import variant
from tests.relayproc import RelayProcess, wait_for
from tests.sink import free_port

_LISTENER = "    address: 127.0.0.1\n    port: 2525\n"
_TLS = "    tls: {cert: tls/relay.crt, key: tls/relay.key%s}\n"
_OLD_CLIENT = (
    "the client offered an older TLS version than this listener's min_version 1.2"
    ' (set tls: min_version: "1.0" on listener local for a legacy client)'
)


def _client(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers ``version`` alone, as a legacy ERP's TLS stack does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 refuses TLS 1.0 above level 0
    with warnings.catch_warnings():  # Python deprecates TLS 1.0 and 1.1
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            context.minimum_version = context.maximum_version = version
        except ValueError as exc:
            pytest.skip(f"this machine's OpenSSL cannot offer {version.name}: {exc}")
    return context


def _policy(
    tmp_path: Path, setting: str = "", port: int = 2525, address: str = "127.0.0.1"
) -> Path:
    tls = _TLS % (f", {setting}" if setting else "")
    return variant(tmp_path, _LISTENER, f"    address: {address}\n    port: {port}\n{tls}")


def _where(path: Path, text: str) -> tuple[int, int]:
    """The line and column of ``text``'s one place in the policy, as ``relay check`` counts."""
    ((line, column),) = [
        (number, found.index(text) + 1)
        for number, found in enumerate(path.read_text().splitlines(), 1)
        if text in found
    ]
    return line, column


def _load(path: Path) -> TlsVersion:
    (only,) = load(path).listeners
    assert only.tls is not None
    return only.tls.min_version


def _tls_version(port: int, client: ssl.SSLContext, implicit: bool = False) -> str:
    """The version a session was served with, once it has sent a message's MAIL."""
    if implicit:
        smtp: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", port, timeout=TIMEOUT, context=client)
    else:
        smtp = smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)
        smtp.starttls(context=client)
    with smtp:
        smtp.ehlo()
        assert smtp.mail("jan@acme.example")[0] == 250
        assert isinstance(smtp.sock, ssl.SSLSocket)
        version = smtp.sock.version()
    assert version is not None
    return version


def _refused(port: int, client: ssl.SSLContext) -> None:
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT)
    with smtp, pytest.raises((ssl.SSLError, ConnectionError)):
        smtp.starttls(context=client)


def _relay_line(caplog: pytest.LogCaptureFixture, start: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]
        if found:
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no {start!r} in the log: {caplog.text}")


def test_min_version_is_read_and_a_legacy_one_warned_of(tmp_path: Path) -> None:
    path = _policy(tmp_path, 'min_version: "1.0"', address="0.0.0.0")
    assert _load(path) is TlsVersion.V1_0
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0, err.getvalue()
    (warned,) = [line for line in err.getvalue().splitlines() if ".tls.min_version:" in line]
    line, column = _where(path, '"1.0"')
    assert warned == (
        f"{path}:{line}:{column}: warning: listeners[0].tls.min_version: TLS 1.0 is a weak"
        " protocol (RFC 8996), for a legacy client only (one that cannot do TLS 1.2); better on"
        " a listener bound to loopback or a private network, with an allow list of those"
        " clients"
    )


@pytest.mark.parametrize("value", ["1.0", "1.1"])
def test_a_legacy_min_version_on_loopback_is_not_warned_of(tmp_path: Path, value: str) -> None:
    """The warning said "better on a listener bound to loopback" of one that is: no
    session there leaves the host, as with no tls on loopback, not warned of either."""
    path = _policy(tmp_path, f'min_version: "{value}"')
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0, err.getvalue()
    assert ".tls.min_version:" not in err.getvalue()
    assert _load(path).value == value


@pytest.mark.parametrize("value", ["1.1", "1.2", "1.3", "1.0"])
def test_each_version_loads_unquoted_too(tmp_path: Path, value: str) -> None:
    """``min_version: 1.2`` is a number to YAML; what was written is what counts."""
    assert _load(_policy(tmp_path, f"min_version: {value}")).value == value


@pytest.mark.parametrize("value", ["'1.4'", "TLSv1.2", "'1'", "ssl3"])
def test_a_wrong_min_version_is_located_and_names_what_is_expected(
    tmp_path: Path, value: str
) -> None:
    path = _policy(tmp_path, f"min_version: {value}")
    with pytest.raises(PolicyError) as caught:
        load(path)
    line, column = _where(path, value)
    (problem,) = caught.value.problems
    assert problem.startswith(
        f"{path}:{line}:{column}: listeners[0].tls.min_version: expected one of: 1.0, 1.1, 1.2, 1.3"
    ), problem


@pytest.mark.parametrize("mode", [ListenerTls.STARTTLS, ListenerTls.IMPLICIT])
def test_a_tls_1_0_client_is_served_where_min_version_lets_it_in(
    tmp_path: Path, mode: ListenerTls
) -> None:
    path = _policy(tmp_path, 'min_version: "1.0"')
    (read,) = load(path).listeners
    assert read.tls is not None
    implicit = mode is ListenerTls.IMPLICIT
    with Relay([listener(tls=read.tls, tls_mode=mode)]) as relay:
        assert _tls_version(relay.port, _client(ssl.TLSVersion.TLSv1), implicit) == "TLSv1"
        assert _tls_version(relay.port, _client(ssl.TLSVersion.TLSv1_1), implicit) == "TLSv1.1"
        assert _tls_version(relay.port, ssl._create_unverified_context(), implicit) == "TLSv1.3"


def test_openssl_s_client_tls1_passes_starttls(tmp_path: Path) -> None:
    (read,) = load(_policy(tmp_path, "min_version: '1.0'")).listeners
    with Relay([listener(tls=read.tls)]) as relay:
        done = subprocess.run(
            ["openssl", "s_client", "-tls1", "-cipher", "DEFAULT:@SECLEVEL=0",
             "-starttls", "smtp", "-connect", f"127.0.0.1:{relay.port}"],
            input=b"QUIT\n", capture_output=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    if b"no protocols available" in done.stderr:
        pytest.skip("this machine's openssl cannot offer TLS 1.0")
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"Protocol  : TLSv1\n" in done.stdout or b"Protocol: TLSv1\n" in done.stdout


@pytest.mark.parametrize("mode", [ListenerTls.STARTTLS, ListenerTls.IMPLICIT])
def test_by_default_tls_1_0_is_refused_and_the_log_says_what_to_do(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: ListenerTls
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    (read,) = load(_policy(tmp_path)).listeners
    assert read.tls is not None and read.tls.min_version is TlsVersion.V1_2
    context = server_context(read.tls)  # the default as it was: 1.2, Python's ciphers
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    default = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    assert context.get_ciphers() == default.get_ciphers()
    with Relay([listener(name="local", tls=read.tls, tls_mode=mode)]) as relay:
        if mode is ListenerTls.IMPLICIT:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                smtplib.SMTP_SSL(
                    "127.0.0.1", relay.port, timeout=TIMEOUT, context=_client(ssl.TLSVersion.TLSv1)
                )
        else:
            _refused(relay.port, _client(ssl.TLSVersion.TLSv1))
        line = _relay_line(caplog, "TLS handshake failed ")
    assert line == f"TLS handshake failed client=127.0.0.1: {_OLD_CLIENT}"


def test_min_version_1_3_refuses_tls_1_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    (read,) = load(_policy(tmp_path, 'min_version: "1.3"')).listeners
    with Relay([listener(name="local", tls=read.tls)]) as relay:
        _refused(relay.port, _client(ssl.TLSVersion.TLSv1_2))
        line = _relay_line(caplog, "TLS handshake failed ")
        assert _tls_version(relay.port, ssl._create_unverified_context()) == "TLSv1.3"
    assert line == (  # not "1.0", which would also take TLS 1.0 and 1.1 from anyone
        "TLS handshake failed client=127.0.0.1: the client offered an older TLS version than"
        ' this listener\'s min_version 1.3 (set tls: min_version: "1.2" on listener local'
        " for a client without TLS 1.3)"
    )


def test_a_reload_takes_up_a_changed_min_version(tmp_path: Path) -> None:
    """As a renewed certificate is taken up by ``kill -HUP``: a restart to let a
    legacy ERP in stopped every other ERP's mail."""
    port = free_port()
    path = _policy(tmp_path, port=port)
    legacy = _client(ssl.TLSVersion.TLSv1)
    with RelayProcess(path, port, tmp_path / "relay.log") as relay:
        _refused(port, legacy)
        wait_for(lambda: _OLD_CLIENT in relay.log())
        path.write_text(path.read_text().replace("relay.key}", "relay.key, min_version: '1.0'}"))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(1)
        assert _tls_version(port, legacy) == "TLSv1"
        path.write_text(path.read_text().replace(", min_version: '1.0'", ""))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(2)
        _refused(port, legacy)
        log = relay.log()
    assert "listener local: TLS min_version 1.0 from now on" in log
    assert "listener local: TLS min_version 1.2 from now on" in log
    assert "after a restart" not in log


def test_a_reload_that_keeps_the_certificate_keeps_its_min_version(tmp_path: Path) -> None:
    """An expired certificate copied in by a renewal hook is refused, the one served
    kept: the min_version changed with it is not taken up apart from the pair it
    came with, and the log says which is kept."""
    port = free_port()
    path = _policy(tmp_path, port=port)
    legacy = _client(ssl.TLSVersion.TLSv1)
    served = der(tmp_path / "tls" / "relay.crt")
    with RelayProcess(path, port, tmp_path / "relay.log") as relay:
        expired = make_certs(tmp_path / "expired", expired=True)
        (tmp_path / "tls" / "relay.crt").write_bytes(expired.cert.read_bytes())
        (tmp_path / "tls" / "relay.key").write_bytes(expired.key.read_bytes())
        path.write_text(path.read_text().replace("relay.key}", "relay.key, min_version: '1.0'}"))
        relay.signal(signal.SIGHUP)
        relay.wait_reloaded(1)
        _refused(port, legacy)
        assert served_certificate(port) == served
        log = relay.log()
    assert "listener local: keeping the TLS certificate served before: " in log
    assert (
        "listener local: keeping TLS min_version 1.2 with the certificate served before,"
        " not 1.0: a reload with a certificate clients take takes it up"
    ) in log
    assert "min_version 1.0 from now on" not in log
