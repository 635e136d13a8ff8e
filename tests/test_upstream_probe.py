"""``relay upstream test`` as a sysadmin runs it, against real aiosmtpd upstreams on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.policy.model import SmtpUpstream, TlsMode
from relay.upstream import smtp
from tests.certs import Certs, make_certs, server_context
from tests.policyfiles import variant
from tests.sink import Sink, SinkServer, free_port

ROOT = Path(__file__).resolve().parent.parent


class RecordingSink(Sink):
    """Also notes each MAIL, so a test sees how far a probe went."""

    def __init__(self) -> None:
        super().__init__()
        self.senders: list[str] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        self.senders.append(address)
        envelope.mail_from = address
        return "250 2.1.0 Sender ok"


def login(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relay", b"s3cret")
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def upstream(sink: RecordingSink, certs: Certs) -> Iterator[Controller]:
    """A smarthost with STARTTLS and AUTH, as the relay's would be."""
    controller = Controller(
        sink, hostname="127.0.0.1", port=free_port(), server_hostname="smtp.test",
        tls_context=server_context(certs), authenticator=login, ready_timeout=10,
        data_size_limit=10_000_000,
    )  # fmt: skip
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def policy(
    tmp_path: Path, port: int, ca: Path, secret: str = "s3cret", tls: str = "starttls"
) -> Path:
    (tmp_path / "smarthost.password").write_text(secret + "\n")
    smarthost = (
        "upstreams:\n"
        "  smarthost:\n"
        "    type: smtp\n"
        "    host: 127.0.0.1\n"
        f"    port: {port}\n"
        f"    tls: {tls}\n"
        "    username: relay\n"
        "    password_file: smarthost.password\n"
        f"    ca_file: {ca}\n"
        "    timeout: 5\n"
    )
    path = variant(tmp_path, "upstreams:\n", smarthost)
    (tmp_path / "outbox").mkdir()
    text = path.read_text().replace("upstream: outbox", "upstream: smarthost")
    path.write_text(text)
    return path


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", "upstream", "test", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_a_working_account_is_tried_through_tls_and_login_and_nothing_is_sent(
    tmp_path: Path, upstream: Controller, sink: RecordingSink, certs: Certs
) -> None:
    path = policy(tmp_path, upstream.port, certs.ca)
    done = relay("-c", str(path), "smarthost", "--rcpt", "buyer@customer.example")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"smarthost (127.0.0.1:{upstream.port}): ok (used by acme)"
    assert "  EHLO: 250 smtp.test" in lines
    assert re.search(
        rf"  TLS: (warning: )?TLSv1\.[23] \S+, certificate for 127\.0\.0\.1"
        rf" checked against {certs.ca}",
        done.stdout,
    )
    assert "  login: accepted for relay (AUTH PLAIN)" in lines
    assert any(line.startswith("  offers: ") and "SIZE 10000000" in line for line in lines)
    assert "  MAIL FROM:<NoReply@Platform.example>: 250 2.1.0 Sender ok" in lines
    assert "  RCPT TO:<buyer@customer.example>: 250 OK" in lines
    assert lines[-1] == "  RSET: nothing was sent"
    assert sink.senders == ["NoReply@Platform.example"]
    assert sink.messages == []


def test_the_warnings_a_sysadmin_should_act_on_do_not_fail_the_test(
    tmp_path: Path, upstream: Controller, certs: Certs
) -> None:
    """The test certificates end in a day; the sink takes 10 MB, the listener's
    default is more; aiosmtpd offers no DSN."""
    path = policy(tmp_path, upstream.port, certs.ca)
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(
        r"  TLS: warning: .* valid until \d{4}-\d\d-\d\d: it ends within 14 days\n", done.stdout
    )
    size = "  SIZE: warning: takes messages up to 10000000 bytes; listeners accept more: local ("
    assert size in done.stdout
    assert (
        "  DSN: warning: not offered: a bounce that comes back is matched by its Message-ID"
        in done.stdout
    )
    assert "  MAIL FROM:<NoReply@Platform.example>: 250 2.1.0 Sender ok\n" in done.stdout
    assert "RCPT TO" not in done.stdout  # no --rcpt: the sender only
    assert done.stdout.endswith("  RSET: nothing was sent\n")


class LoginWantedAtMail(RecordingSink):
    """Microsoft 365 to a client that did not log in: greeted, then refused at MAIL."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return "530 5.7.57 Client not authenticated to send mail"


def test_a_sender_every_delivery_would_be_refused_fails_without_a_recipient(
    tmp_path: Path, certs: Certs
) -> None:
    """A delivery suspends such an upstream; the test said it works."""
    controller = Controller(
        LoginWantedAtMail(), hostname="127.0.0.1", port=free_port(),
        server_hostname="smtp.test", tls_context=server_context(certs),
        authenticator=login, ready_timeout=10,
    )  # fmt: skip
    controller.start()
    try:
        done = relay("-c", str(policy(tmp_path, controller.port, certs.ca)), "smarthost")
    finally:
        controller.stop()
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        "  MAIL FROM:<NoReply@Platform.example>: failed: 530 5.7.57 Client not authenticated"
        " to send mail" in done.stdout
    )


def test_a_refused_login_is_told_as_the_queue_would_tell_it(
    tmp_path: Path, upstream: Controller, certs: Certs
) -> None:
    path = policy(tmp_path, upstream.port, certs.ca, secret="wrong")
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"smarthost (127.0.0.1:{upstream.port}): FAILED (used by acme)",
        f"  delivery: failed: 451 4.7.0 Upstream smarthost (127.0.0.1:{upstream.port}) refused the"
        " relay's login: 535 5.7.8 Authentication credentials invalid",
    ]


class Counted(RecordingSink):
    """Notes each AUTH, as a smarthost that counts failed logins does; also offers
    XOAUTH2, and ``old_style`` adds an ``AUTH=`` line after aiosmtpd's ``AUTH``."""

    def __init__(self, old_style: str = "") -> None:
        super().__init__()
        self.attempts: list[str] = []
        self.old_style = old_style

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        self.attempts.append(mechanism)
        return login(server, session, envelope, mechanism, data)

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        self.attempts.append("XOAUTH2")
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        if not self.old_style:
            return responses
        return [*responses[:-1], f"250-AUTH={self.old_style}", responses[-1]]


@contextmanager
def counted(certs: Certs, exclude: list[str], old_style: str = "") -> Iterator[Controller]:
    handler = Counted(old_style)
    controller = Controller(
        handler, hostname="127.0.0.1", port=free_port(), server_hostname="smtp.test",
        tls_context=server_context(certs), authenticator=handler.authenticate,
        auth_exclude_mechanism=exclude, ready_timeout=10,
    )  # fmt: skip
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def test_a_wrong_password_is_one_failed_login_at_the_upstream(tmp_path: Path, certs: Certs) -> None:
    """aiosmtplib tried LOGIN after PLAIN was refused: two failed logins against
    the account for one test."""
    with counted(certs, ["XOAUTH2"]) as upstream:
        done = relay("-c", str(policy(tmp_path, upstream.port, certs.ca, "wrong")), "smarthost")
    assert done.returncode == 1
    assert upstream.handler.attempts == ["PLAIN"]
    assert done.stdout.splitlines()[1] == (
        f"  delivery: failed: 451 4.7.0 Upstream smarthost (127.0.0.1:{upstream.port}) refused"
        " the relay's login: 535 5.7.8 Authentication credentials invalid"
    )


def test_offers_names_the_mechanisms_of_every_auth_line_and_login_the_one_used(
    tmp_path: Path, certs: Certs
) -> None:
    """An old-style ``AUTH=LOGIN`` after ``AUTH PLAIN`` took its place in what the
    test showed offered, while the login used PLAIN."""
    with counted(certs, ["LOGIN", "XOAUTH2"], old_style="LOGIN") as upstream:
        done = relay("-c", str(policy(tmp_path, upstream.port, certs.ca)), "smarthost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert upstream.handler.attempts == ["PLAIN"]
    assert re.search(r"^  offers: .*\bAUTH PLAIN LOGIN(,|$)", done.stdout, re.MULTILINE)
    assert "  login: accepted for relay (AUTH PLAIN)\n" in done.stdout


def test_an_upstream_offering_xoauth2_only_says_what_the_relay_logs_in_with(
    tmp_path: Path, certs: Certs
) -> None:
    with counted(certs, ["LOGIN", "PLAIN"]) as upstream:
        done = relay("-c", str(policy(tmp_path, upstream.port, certs.ca)), "smarthost")
    assert done.returncode == 1
    assert upstream.handler.attempts == []
    where = f"smarthost (127.0.0.1:{upstream.port})"
    assert done.stdout.splitlines() == [
        f"{where}: FAILED (used by acme)",
        f"  delivery: failed: 451 4.7.0 Upstream {where}: offers AUTH XOAUTH2 only; the relay"
        " logs in with PLAIN, LOGIN or CRAM-MD5: use an account or app password the server"
        " takes with one of them (or a smarthost that does) (logging in)",
    ]


def test_a_refused_recipient_fails_the_test(
    tmp_path: Path, upstream: Controller, sink: RecordingSink, certs: Certs
) -> None:
    sink.refuse["gone@customer.example"] = "550 5.1.1 No such user"
    path = policy(tmp_path, upstream.port, certs.ca)
    done = relay("-c", str(path), "smarthost", "--rcpt", "gone@customer.example")
    assert done.returncode == 1
    assert "  RCPT TO:<gone@customer.example>: failed: 550 5.1.1 No such user" in done.stdout
    assert done.stdout.splitlines()[-1] == "  RSET: nothing was sent"
    assert sink.messages == []


def test_a_certificate_from_another_ca_is_not_accepted(
    tmp_path: Path, upstream: Controller, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = make_certs(tmp_path_factory.mktemp("other"))
    path = policy(tmp_path, upstream.port, other.ca)
    done = relay("-c", str(path))
    assert done.returncode == 1
    assert (
        f"TLS certificate not accepted: unable to get local issuer certificate; ca_file:"
        f" ({other.ca}) holds no CA that signed it: add the CA certificate that signed it there"
        " (connecting)"
    ) in done.stdout
    assert "login: accepted" not in done.stdout


def test_a_private_ca_without_ca_file_says_to_set_it(
    tmp_path: Path, upstream: Controller, certs: Certs
) -> None:
    path = policy(tmp_path, upstream.port, certs.ca)
    path.write_text(path.read_text().replace(f"    ca_file: {certs.ca}\n", ""))
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 1
    where = f"smarthost (127.0.0.1:{upstream.port})"
    assert done.stdout.splitlines()[1] == (
        f"  delivery: failed: 451 4.4.1 Upstream {where}: TLS certificate not accepted:"
        " unable to get local issuer certificate; set ca_file: to the CA certificate that"
        " signed it (connecting)"
    )


@pytest.mark.parametrize(
    ("tls", "reply"),
    [
        (
            "starttls",
            "451 4.7.10 Upstream {where} offers no STARTTLS, which tls: starttls needs: nothing"
            " is sent in plain text; set tls: implicit with the upstream's implicit-TLS port"
            " (465), or tls: none to allow it (connecting)",
        ),
        (
            "implicit",
            "451 4.4.1 Upstream {where}: TLS failed: WRONG_VERSION_NUMBER; the port speaks"
            " plain SMTP (or STARTTLS), not implicit TLS: set tls: starttls, or use the"
            " upstream's implicit-TLS port (465) (connecting)",
        ),
    ],
)
def test_a_tls_mode_the_port_does_not_speak_says_what_to_set(
    tmp_path: Path, tls: str, reply: str
) -> None:
    with SinkServer() as plain:
        path = policy(tmp_path, plain.port, tmp_path / "unused", tls=tls)
        path.write_text(re.sub(r"    (username|password_file|ca_file):.*\n", "", path.read_text()))
        done = relay("-c", str(path), "smarthost")
    assert done.returncode == 1
    where = f"smarthost (127.0.0.1:{plain.port})"
    assert done.stdout.splitlines() == [
        f"{where}: FAILED (used by acme)",
        f"  delivery: failed: {reply.format(where=where)}",
    ]
    assert plain.sink.messages == []


def test_an_upstream_not_listening_and_the_directory_beside_it(
    tmp_path: Path, certs: Certs
) -> None:
    port = free_port()
    path = policy(tmp_path, port, certs.ca)
    done = relay("-c", str(path))
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"smarthost (127.0.0.1:{port}): FAILED (used by acme)",
        f"  delivery: failed: 451 4.4.1 Upstream smarthost (127.0.0.1:{port}): Connection refused"
        " (connecting)",
        "outbox (directory): ok (used by no tenant)",
        f"  writes: each message into {tmp_path / 'outbox'}, nothing is sent",
    ]
    only = relay("-c", str(path), "outbox")
    assert only.returncode == 0
    assert only.stdout.startswith("outbox (directory): ok")
    assert "smarthost" not in only.stdout


def test_an_ipv6_upstream_is_named_with_its_address_in_brackets(
    tmp_path: Path, certs: Certs
) -> None:
    """``::1:38719`` reads as another address, port unknown."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no ::1 on this host")
    path = policy(tmp_path, port, certs.ca)
    path.write_text(path.read_text().replace("host: 127.0.0.1", "host: '::1'"))
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        f"smarthost ([::1]:{port}): FAILED (used by acme)",
        f"  delivery: failed: 451 4.4.1 Upstream smarthost ([::1]:{port}): Connection refused"
        " (connecting)",
    ]


def test_an_unknown_name_and_a_broken_policy(tmp_path: Path, certs: Certs) -> None:
    path = policy(tmp_path, free_port(), certs.ca)
    done = relay("-c", str(path), "smarthots")
    assert done.returncode == 2
    assert "no upstream 'smarthots' (the policy has smarthost, outbox)" in done.stderr
    assert done.stdout == ""
    path.write_text(path.read_text().replace("type: smtp", "type: smpt"))
    broken = relay("-c", str(path))
    assert broken.returncode == 78
    assert "relay.yaml:" in broken.stderr


def test_a_plain_upstream_without_a_login(tmp_path: Path) -> None:
    with SinkServer() as plain:
        path = policy(tmp_path, plain.port, tmp_path / "unused", tls="none")
        path.write_text(re.sub(r"    (username|password_file|ca_file):.*\n", "", path.read_text()))
        done = relay("-c", str(path), "smarthost")
    assert done.returncode == 0, done.stdout
    assert "  EHLO: 250 " in done.stdout  # sent by connecting, as a delivery's is
    assert "  offers: SIZE 33554432, 8BITMIME" in done.stdout
    assert "  TLS: none (tls: none): mail goes in clear" in done.stdout
    assert "  login: none (the policy gives no username)" in done.stdout


class RefusingGreeting(Sink):
    """Greets, then refuses EHLO and HELO, as Postfix does a client whose name it dislikes."""

    REFUSAL = "550 5.7.1 <relay>: Helo command rejected: need fully-qualified hostname"

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        return [self.REFUSAL]

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        return self.REFUSAL


def test_an_upstream_that_refuses_ehlo_fails_without_a_login_or_tls(tmp_path: Path) -> None:
    """Without STARTTLS or a login nothing had sent EHLO before the first MAIL: the
    account read as working although every delivery would fail. It reads as the
    queue logs it, a failure of connecting, as with STARTTLS."""
    with SinkServer(RefusingGreeting()) as refusing:
        path = policy(tmp_path, refusing.port, tmp_path / "unused", tls="none")
        path.write_text(re.sub(r"    (username|password_file|ca_file):.*\n", "", path.read_text()))
        done = relay("-c", str(path), "smarthost")
    assert done.returncode == 1
    where = f"smarthost (127.0.0.1:{refusing.port})"
    assert done.stdout.splitlines() == [
        f"{where}: FAILED (used by acme)",
        f"  delivery: failed: 451 4.4.1 Upstream {where}: {RefusingGreeting.REFUSAL} (connecting)",
    ]


def test_offers_after_starttls_without_a_login_are_those_said_over_tls(
    tmp_path: Path, upstream: Controller, certs: Certs
) -> None:
    path = policy(tmp_path, upstream.port, certs.ca)
    path.write_text(re.sub(r"    (username|password_file):.*\n", "", path.read_text()))
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 0, done.stdout
    assert "  EHLO: 250 smtp.test" in done.stdout
    assert "  offers: SIZE 10000000, 8BITMIME, SMTPUTF8, AUTH LOGIN PLAIN" in done.stdout


def test_a_directory_the_first_delivery_will_make_is_no_failure(
    tmp_path: Path, certs: Certs
) -> None:
    path = policy(tmp_path, free_port(), certs.ca)
    path.write_text(path.read_text().replace("path: outbox", "path: outbox/new/today"))
    done = relay("-c", str(path), "outbox")
    assert done.returncode == 0, done.stdout
    made = tmp_path / "outbox" / "new" / "today"
    assert (
        f"  writes: each message into {made} (made by the first delivery), nothing" in done.stdout
    )
    assert not made.exists()  # nothing made by the test itself


@pytest.mark.parametrize(
    ("rcpt", "why"),
    [
        ("", "not an address the relay takes"),
        ("<buyer@customer.example>", "not an address the relay takes"),
        ("a@b.example\r\nRCPT TO:<inject@x.example>", "not an address the relay takes"),
        ("x" * 65 + "@customer.example", "longer than SMTP allows"),
    ],
    ids=["empty", "brackets", "crlf", "long"],
)
def test_a_recipient_the_relay_would_not_take_is_refused_before_connecting(
    tmp_path: Path, upstream: Controller, sink: RecordingSink, certs: Certs, rcpt: str, why: str
) -> None:
    path = policy(tmp_path, upstream.port, certs.ca)
    done = relay("-c", str(path), "smarthost", "--rcpt", rcpt)
    assert done.returncode == 2
    assert f"relay upstream test: --rcpt {rcpt!r}: {why}" in done.stderr
    assert done.stdout == ""
    assert sink.senders == []


@pytest.fixture
def named_upstream(
    sink: RecordingSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Controller, Certs, list[str | None]]]:
    """A smarthost reached at 127.0.0.1 whose certificate names only
    mailhost.internal, as one a Postfix ``relayhost = [10.0.0.5]:587`` used;
    with the names its clients asked for in SNI."""
    certs = make_certs(tmp_path_factory.mktemp("named"), ("mailhost.internal",))
    asked: list[str | None] = []
    context = server_context(certs)
    context.sni_callback = lambda _tls, name, _context: asked.append(name)
    controller = Controller(
        sink, hostname="127.0.0.1", port=free_port(), server_hostname="mailhost.internal",
        tls_context=context, authenticator=login, ready_timeout=10,
    )  # fmt: skip
    controller.start()
    try:
        yield controller, certs, asked
    finally:
        controller.stop()


def test_a_certificate_for_another_name_than_host_says_what_to_set(
    tmp_path: Path, named_upstream: tuple[Controller, Certs, list[str | None]]
) -> None:
    controller, certs, _ = named_upstream
    done = relay("-c", str(policy(tmp_path, controller.port, certs.ca)), "smarthost")
    assert done.returncode == 1
    assert (
        "TLS certificate not accepted: IP address mismatch, certificate is not valid for"
        " '127.0.0.1'.; write the name the certificate is issued for in host:, or in"
        " tls_name: to keep connecting to this address (connecting)"
    ) in done.stdout


def test_a_name_mismatch_with_tls_auto_says_to_set_starttls_with_tls_name(
    tmp_path: Path,
    named_upstream: tuple[Controller, Certs, list[str | None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``auto`` takes no ``tls_name``: told to set it, relay check refused it."""
    controller, certs, _ = named_upstream
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))  # auto takes no ca_file either
    path = policy(tmp_path, controller.port, certs.ca, tls="auto")
    path.write_text(path.read_text().replace(f"    ca_file: {certs.ca}\n", ""))
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 1
    assert (
        "TLS certificate not accepted: IP address mismatch, certificate is not valid for"
        " '127.0.0.1'.; write the name the certificate is issued for in host:, or set"
        " tls: starttls and write it in tls_name: to keep connecting to this address"
        " (connecting)"
    ) in done.stdout


def test_tls_name_checks_the_certificate_for_that_name_at_the_hosts_address(
    tmp_path: Path,
    named_upstream: tuple[Controller, Certs, list[str | None]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    controller, certs, asked = named_upstream
    path = policy(tmp_path, controller.port, certs.ca)
    text = path.read_text()

    def named(name: str, ca: Path = certs.ca) -> str:
        given = text.replace("    timeout: 5\n", f"    timeout: 5\n    tls_name: {name}\n")
        return given.replace(str(certs.ca), str(ca))

    path.write_text(named("mailhost.internal"))
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"smarthost (127.0.0.1:{controller.port}): ok" in done.stdout
    assert f"certificate for mailhost.internal checked against {certs.ca}" in done.stdout
    assert "  login: accepted for relay" in done.stdout
    assert asked == ["mailhost.internal"]
    path.write_text(named("other.internal"))
    wrong = relay("-c", str(path), "smarthost")
    assert wrong.returncode == 1
    assert "Hostname mismatch, certificate is not valid for 'other.internal'" in wrong.stdout
    other = make_certs(tmp_path_factory.mktemp("other"), ("mailhost.internal",))
    path.write_text(named("mailhost.internal", other.ca))
    untrusted = relay("-c", str(path), "smarthost")
    assert untrusted.returncode == 1
    assert "TLS certificate not accepted: unable to get local issuer" in untrusted.stdout


def test_a_tls_name_ending_in_a_dot_is_checked_and_sent_without_it(
    tmp_path: Path, named_upstream: tuple[Controller, Certs, list[str | None]]
) -> None:
    """``mailhost.internal.`` passed relay check, then every delivery failed:
    no certificate names it so, and SNI carried the dot (RFC 6066 forbids it)."""
    controller, certs, asked = named_upstream
    path = policy(tmp_path, controller.port, certs.ca)
    text = path.read_text().replace(
        "    timeout: 5\n", "    timeout: 5\n    tls_name: mailhost.internal.\n"
    )
    path.write_text(text)
    done = relay("-c", str(path), "smarthost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"certificate for mailhost.internal checked against {certs.ca}" in done.stdout
    assert asked == ["mailhost.internal"]


@pytest.mark.parametrize(
    ("host", "name", "checked"),
    [
        ("smtp.example.", None, "smtp.example"),
        ("192.0.2.5", "mail.example.", "mail.example"),
        ("smtp.example", None, "smtp.example"),
        ("2001:db8::5", None, "2001:db8::5"),
    ],
)
def test_the_name_checked_has_no_trailing_dot_whether_host_or_tls_name(
    host: str, name: str | None, checked: str
) -> None:
    """``host: smtp.example.`` resolves as written, a fully qualified name, but
    its certificate is checked for the name as certificates hold it."""
    upstream = SmtpUpstream(
        "smarthost", host, 587, TlsMode.STARTTLS, None, None, None, 5, tls_name=name
    )
    assert smtp.checked_name(upstream) == checked
