"""The relay's login to an upstream: real aiosmtpd smarthosts on loopback that
count each AUTH they are sent, as a smarthost that locks accounts does."""

from __future__ import annotations

import hashlib
import hmac
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.deliver import deliver
from relay.errors import UpstreamError
from relay.policy.model import SmtpUpstream, TlsMode
from tests.certs import Certs, make_certs, server_context
from tests.sink import Sink, free_port
from tests.test_upstream_probe import policy as probe_policy
from tests.test_upstream_probe import relay as upstream_test

PASSWORD = b"s3cret"
CHALLENGE = b"<4711.1@smarthost.test>"
MESSAGE = b"From: a@p.example\r\nTo: b@example.org\r\nSubject: Faktura\r\n\r\nbody\r\n"


@dataclass
class Counting(Sink):
    """Takes PLAIN and LOGIN (aiosmtpd's own), CRAM-MD5 and XOAUTH2, each
    attempt noted; ``exclude`` leaves some out of what EHLO offers."""

    attempts: list[str] = field(default_factory=list)
    # a reply to every login by a mechanism, as a server that cannot check it gives
    refuse: dict[str, str] = field(default_factory=dict)
    hang_up: bool = False  # after a refusal of its own

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.attempts.append(mechanism)
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relay", PASSWORD)
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:
        self.attempts.append("CRAM-MD5")
        if "CRAM-MD5" in self.refuse:
            if self.hang_up:  # the reply and the end of the connection in one segment
                assert server.transport is not None
                sock = server.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            await server.push(self.refuse["CRAM-MD5"])
            if self.hang_up:
                assert server.transport is not None
                server.transport.close()
            return AuthResult(success=False, handled=True)
        answer = await server.challenge_auth(CHALLENGE)
        if answer is MISSING:
            return AuthResult(success=False, handled=True)
        login, _, digest = answer.rpartition(b" ")
        expected = hmac.new(PASSWORD, CHALLENGE, hashlib.md5).hexdigest().encode()
        ok = login == b"relay" and hmac.compare_digest(digest, expected)
        return AuthResult(success=ok, handled=False, auth_data=LoginPassword(login, b""))

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        if "LOGIN" not in self.refuse:
            return await server.auth_LOGIN(server, args)
        self.attempts.append("LOGIN")
        await server.push(self.refuse["LOGIN"])
        return AuthResult(success=False, handled=True)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        self.attempts.append("XOAUTH2")
        return AuthResult(success=False, handled=False)


@contextmanager
def smarthost(
    exclude: tuple[str, ...] = (),
    refuse: dict[str, str] | None = None,
    hang_up: bool = False,
    **kwargs: Any,
) -> Iterator[tuple[Counting, int]]:
    handler = Counting(refuse=refuse or {}, hang_up=hang_up)
    kwargs.setdefault("auth_require_tls", False)
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), server_hostname="smarthost.test",
        authenticator=handler.authenticate, auth_exclude_mechanism=list(exclude),
        ready_timeout=10, **kwargs,
    )  # fmt: skip
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


def upstream(port: int, secret: Path, tls: TlsMode = TlsMode.NONE, **kwargs: Any) -> SmtpUpstream:
    return SmtpUpstream(
        name="smarthost", host="127.0.0.1", port=port, tls=tls, username="relay",
        password_file=secret, password_env=None, timeout=5.0, **kwargs,
    )  # fmt: skip


@pytest.fixture
def right(tmp_path: Path) -> Path:
    path = tmp_path / "right"
    path.write_bytes(PASSWORD + b"\n")
    return path


@pytest.fixture
def wrong(tmp_path: Path) -> Path:
    path = tmp_path / "wrong"
    path.write_text("not-the-password\n")
    return path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize(
    ("exclude", "tried"),
    [
        (("CRAM-MD5",), ["PLAIN"]),
        # CRAM-MD5 first in clear, as it keeps the password off the wire; refused,
        # PLAIN after it: the server may keep passwords hashed and cannot check it
        ((), ["CRAM-MD5", "PLAIN"]),
    ],
)
async def test_a_wrong_password_is_one_failed_login_a_try(
    wrong: Path, exclude: tuple[str, ...], tried: list[str]
) -> None:
    """aiosmtplib tried the next mechanism after each refusal: with CRAM-MD5,
    PLAIN and LOGIN offered, three failed logins a try against the account."""
    with smarthost(("XOAUTH2", *exclude)) as (handler, port):
        with pytest.raises(UpstreamError) as failed:
            await deliver(upstream(port, wrong), "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == tried
    assert failed.value.line == (
        f"451 4.7.0 Upstream smarthost (127.0.0.1:{port}) refused the relay's login:"
        " 535 5.7.8 Authentication credentials invalid"
    )
    assert handler.messages == []


@pytest.mark.parametrize(
    "refusal",
    ["535 5.7.8 Authentication credentials invalid", "504 5.5.4 Unrecognized authentication type"],
)
async def test_in_clear_a_cram_md5_the_server_cannot_check_gives_way_to_plain(
    right: Path, refusal: str
) -> None:
    """With ``tls: none`` aiosmtplib went on to PLAIN after a CRAM-MD5 the server
    refused, and a smarthost that keeps its passwords hashed took mail so."""
    with smarthost(("XOAUTH2",), {"CRAM-MD5": refusal}) as (handler, port):
        await deliver(upstream(port, right), "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == ["CRAM-MD5", "PLAIN"]
        assert len(handler.messages) == 1


async def test_in_clear_a_temporary_refusal_of_cram_md5_is_not_tried_again(right: Path) -> None:
    """A 454 is the server's trouble, not a mechanism it cannot check: the next
    try is the next connection's."""
    temporary = "454 4.7.0 Temporary authentication failure"
    with smarthost(("XOAUTH2",), {"CRAM-MD5": temporary}) as (handler, port):
        with pytest.raises(UpstreamError) as failed:
            await deliver(upstream(port, right), "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == ["CRAM-MD5"]
    assert failed.value.line.endswith(f"refused the relay's login: {temporary}")


@pytest.mark.parametrize(
    "exclude", [("XOAUTH2",), ("XOAUTH2", "PLAIN", "LOGIN")], ids=["plain-after", "cram-md5-alone"]
)
async def test_a_server_that_hangs_up_after_refusing_a_login_is_quoted(
    wrong: Path, exclude: tuple[str, ...]
) -> None:
    """Going on to PLAIN found the connection closed: "connection lost" sent the
    sysadmin to the network, where the server had said why. Asking the closed
    connection whether it runs TLS did the same, with CRAM-MD5 the only
    mechanism offered too; the reply and the hang-up come in one segment, as
    they may, and a reply read before the hang-up hid it."""
    with smarthost(exclude, {"CRAM-MD5": "535 5.7.8 No"}, hang_up=True) as (handler, port):
        with pytest.raises(UpstreamError) as failed:
            await deliver(upstream(port, wrong), "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == ["CRAM-MD5"]
    assert failed.value.line == (
        f"451 4.7.0 Upstream smarthost (127.0.0.1:{port}) refused the relay's login: 535 5.7.8 No"
    )


@pytest.mark.parametrize(
    ("refusal", "tried"),
    [
        ("535 5.7.8 Authentication credentials invalid", ["LOGIN"]),
        ("504 5.5.4 Unrecognized authentication type", ["LOGIN", "CRAM-MD5"]),
    ],
)
async def test_over_tls_only_a_refusal_of_the_mechanism_lets_the_next_be_tried(
    certs: Certs, right: Path, refusal: str, tried: list[str]
) -> None:
    """Over TLS a 535 is the password's: one failed login a try. A 504 (534,
    538) is the mechanism's: the next one the server offers is tried."""
    refuse = {"LOGIN": refusal}
    with smarthost(("XOAUTH2", "PLAIN"), refuse, tls_context=server_context(certs)) as (
        handler,
        port,
    ):
        target = upstream(port, right, TlsMode.STARTTLS, ca_pem=certs.ca.read_text())
        try:
            await deliver(target, "a@p.example", ["b@example.org"], MESSAGE)
        except UpstreamError:
            assert tried == ["LOGIN"]
        else:
            assert len(handler.messages) == 1
        assert handler.attempts == tried


async def test_over_tls_the_login_is_plain_where_cram_md5_is_offered_too(
    certs: Certs, right: Path
) -> None:
    """A server that keeps passwords hashed offers CRAM-MD5 yet cannot check it:
    over TLS the password is safe with PLAIN, which every smarthost takes."""
    with smarthost(("XOAUTH2",), tls_context=server_context(certs)) as (handler, port):
        target = upstream(port, right, TlsMode.STARTTLS, ca_pem=certs.ca.read_text())
        await deliver(target, "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == ["PLAIN"]
        assert len(handler.messages) == 1


async def test_an_upstream_offering_no_mechanism_the_relay_has_says_what_it_offers(
    right: Path,
) -> None:
    """aiosmtplib's "No suitable authentication method found." named neither
    side's mechanisms, and came as a connection problem (4.4.1)."""
    with smarthost(("PLAIN", "LOGIN", "CRAM-MD5")) as (handler, port):
        with pytest.raises(UpstreamError) as failed:
            await deliver(upstream(port, right), "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == []
    assert failed.value.line == (
        f"451 4.7.0 Upstream smarthost (127.0.0.1:{port}): offers AUTH XOAUTH2 only;"
        " the relay logs in with PLAIN, LOGIN or CRAM-MD5: use an account or app password"
        " the server takes with one of them (or a smarthost that does) (logging in)"
    )


async def test_an_upstream_offering_no_auth_in_clear_says_what_to_set(right: Path) -> None:
    """Offered after STARTTLS only, as servers do that keep passwords off plain text."""
    with smarthost(auth_require_tls=True) as (handler, port):
        with pytest.raises(UpstreamError) as failed:
            await deliver(upstream(port, right), "a@p.example", ["b@example.org"], MESSAGE)
        assert handler.attempts == []
    assert failed.value.line == (
        f"451 4.7.0 Upstream smarthost (127.0.0.1:{port}): offers no AUTH without TLS:"
        " set tls: starttls or implicit if it offers it over TLS, or take out username"
        " and the password if it takes mail without a login (logging in)"
    )


def test_upstream_test_names_the_mechanism_that_logged_in(tmp_path: Path) -> None:
    """After CRAM-MD5 refused in plain text, PLAIN logged in: the first one
    offered was shown as the one that did."""
    with smarthost(("XOAUTH2",), {"CRAM-MD5": "535 5.7.8 Cannot check"}) as (handler, port):
        path = probe_policy(tmp_path, port, tmp_path / "unused", tls="none")
        path.write_text(re.sub(r"    ca_file:.*\n", "", path.read_text()))
        done = upstream_test("-c", str(path), "smarthost")
        assert handler.attempts == ["CRAM-MD5", "PLAIN"]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "  login: accepted for relay (AUTH PLAIN)" in done.stdout.splitlines()
