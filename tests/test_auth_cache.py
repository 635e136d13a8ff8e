"""Remembered logins: a repeat login skips scrypt, and nothing else gets in because of it."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator

import pytest

from relay.ingress import auth
from relay.ingress.authcache import Verified
from relay.passwd import hash_password
from tests.ingress_harness import Relay
from tests.minimal_policy import DEMO_HASH, listener, policy

LOGIN, PASSWORD = "erp-acme", "demo-password"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def scrypts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The passwords that went through the real scrypt verification, in order."""
    seen: list[str] = []
    real = auth.verify_password

    def counted(password: str, encoded: str) -> bool:
        seen.append(password)
        return real(password, encoded)

    monkeypatch.setattr(auth, "verify_password", counted)
    return seen


@pytest.fixture
def relay() -> Iterator[Relay]:
    with Relay([listener()]) as running:
        yield running


def login(
    relay: Relay, name: str, password: str, mechanism: str = "PLAIN", port: int | None = None
) -> int:
    """One AUTH (``SMTP.login`` would try the other mechanism too after a refusal)."""
    with smtplib.SMTP("127.0.0.1", port or relay.port, timeout=10) as client:
        client.ehlo()
        client.user, client.password = name, password
        method = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        try:
            code, _ = client.auth(mechanism, method)
        except smtplib.SMTPAuthenticationError as exc:
            code = exc.smtp_code
        return code


def test_a_repeat_login_skips_scrypt(relay: Relay, scrypts: list[str]) -> None:
    assert login(relay, LOGIN, PASSWORD) == 235
    assert login(relay, LOGIN, PASSWORD) == 235
    assert login(relay, LOGIN, PASSWORD) == 235
    assert scrypts == [PASSWORD]


def test_auth_login_uses_the_same_memory(relay: Relay, scrypts: list[str]) -> None:
    assert login(relay, LOGIN, PASSWORD, "LOGIN") == 235
    assert login(relay, LOGIN, PASSWORD, "PLAIN") == 235
    assert login(relay, LOGIN, "demo-passwore", "LOGIN") == 535
    assert scrypts == [PASSWORD, "demo-passwore"]


def test_every_listener_of_a_worker_shares_the_memory(scrypts: list[str]) -> None:
    with Relay([listener(name="one"), listener(name="two")]) as relay:
        assert relay.ingress is not None
        ports = sorted({port for _, _, port in relay.ingress.bound()})
        assert len(ports) == 2
        assert [login(relay, LOGIN, PASSWORD, port=port) for port in ports] == [235, 235]
    assert scrypts == [PASSWORD]


def test_a_wrong_password_after_a_remembered_one_is_refused(
    relay: Relay, scrypts: list[str]
) -> None:
    assert login(relay, LOGIN, PASSWORD) == 235
    assert login(relay, LOGIN, "demo-passwore") == 535
    assert login(relay, LOGIN, "demo-passwore") == 535
    assert scrypts == [PASSWORD, "demo-passwore", "demo-passwore"]  # failures are not remembered


def test_a_changed_hash_refuses_the_remembered_password(relay: Relay, scrypts: list[str]) -> None:
    assert login(relay, LOGIN, PASSWORD) == 235
    relay.policy = policy((listener(),), logins={LOGIN: hash_password("new-password")})
    assert login(relay, LOGIN, PASSWORD) == 535
    assert login(relay, LOGIN, "new-password") == 235
    assert login(relay, LOGIN, "new-password") == 235
    assert scrypts == [PASSWORD, PASSWORD, "new-password"]


def test_a_removed_login_is_refused_though_remembered(relay: Relay) -> None:
    assert login(relay, LOGIN, PASSWORD) == 235
    relay.policy = policy((listener(),), logins={"erp-other": DEMO_HASH})
    assert login(relay, LOGIN, PASSWORD) == 535
    assert login(relay, "erp-other", PASSWORD) == 235


def test_remembered_until_the_ttl_runs_out() -> None:
    clock = Clock()
    verified = Verified(ttl=60.0, clock=clock)
    verified.remember(LOGIN, DEMO_HASH, PASSWORD.encode())
    clock.now += 59.9
    assert verified.known(LOGIN, DEMO_HASH, PASSWORD.encode())
    clock.now += 0.1
    assert not verified.known(LOGIN, DEMO_HASH, PASSWORD.encode())
    clock.now -= 1.0  # gone, not just hidden by the clock
    assert not verified.known(LOGIN, DEMO_HASH, PASSWORD.encode())


def test_a_digest_goes_at_its_ttl_also_when_nobody_asks_for_it() -> None:
    clock = Clock()
    verified = Verified(ttl=60.0, clock=clock)
    verified.remember("old", DEMO_HASH, PASSWORD.encode())  # say its hash is replaced
    clock.now += 30.0
    verified.remember(LOGIN, DEMO_HASH, PASSWORD.encode())
    assert len(verified) == 2
    clock.now += 30.0
    assert verified.known(LOGIN, DEMO_HASH, PASSWORD.encode())
    assert len(verified) == 1  # "old" went without being asked for
    clock.now += 30.0
    verified.remember("other", DEMO_HASH, PASSWORD.encode())
    assert len(verified) == 1


def test_only_the_same_login_hash_and_password_match() -> None:
    verified = Verified()
    verified.remember(LOGIN, DEMO_HASH, PASSWORD.encode())
    assert verified.known(LOGIN, DEMO_HASH, PASSWORD.encode())
    assert not verified.known(LOGIN, DEMO_HASH, b"demo-passwore")
    assert not verified.known(LOGIN, DEMO_HASH, PASSWORD.encode() + b"\0")
    assert not verified.known("erp-other", DEMO_HASH, PASSWORD.encode())
    assert not verified.known(LOGIN, DEMO_HASH + "x", PASSWORD.encode())


def test_the_oldest_is_forgotten_past_the_size() -> None:
    verified = Verified(size=2)
    for name in ("a", "b", "c"):
        verified.remember(name, DEMO_HASH, PASSWORD.encode())
    assert not verified.known("a", DEMO_HASH, PASSWORD.encode())
    assert verified.known("b", DEMO_HASH, PASSWORD.encode())
    assert verified.known("c", DEMO_HASH, PASSWORD.encode())
    verified.remember("b", DEMO_HASH, PASSWORD.encode())  # remembered again: now the newest
    verified.remember("d", DEMO_HASH, PASSWORD.encode())
    assert not verified.known("c", DEMO_HASH, PASSWORD.encode())
    assert verified.known("b", DEMO_HASH, PASSWORD.encode())
