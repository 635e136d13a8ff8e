"""Delivery to real upstreams on loopback: aiosmtpd sinks (plain, TLS, AUTH) and directories."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509

from relay.deliver import DeliveryResult, attempt, deliver, result
from relay.errors import UpstreamError
from relay.policy.model import DirectoryUpstream, SmtpUpstream, TlsMode
from relay.upstream import RecipientsRefused, helo, replies, smtp
from relay.upstream.pool import Pool
from tests.certs import Certs, make_certs, self_signed, server_context
from tests.sink import RefusingRecipients, free_port

MESSAGE = (
    b"From: Jan via Acme <noreply@platform.example>\r\n"
    b"To: one@example.org\r\n"
    b"Subject: Faktura 4711\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"..two dots\r\n"
    b"\xc3\x86 8-bit \xff\r\n"
    b"\r\n"
    b"last line"  # no final CRLF: SMTP adds one, nothing else may change
)
SENT = MESSAGE + b"\r\n"
RCPTS = ["one@example.org", "two@example.org"]


@dataclass
class Got:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None
    helo: str | None = None


@dataclass
class SinkHandler(RefusingRecipients):
    data_reply: str = "250 2.0.0 Ok: queued as SINK1"  # "": the connection drops instead
    delay: float = 0.0
    messages: list[Got] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.data_reply:
            server.transport.abort()  # the reply below is never written
            return "250 never sent"
        login = session.auth_data.login.decode() if session.authenticated else None
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(
            Got(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                server.transport.get_extra_info("ssl_object") is not None,
                login,
                session.host_name,
            )
        )
        return self.data_reply


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relay", b"s3cret")
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


class Sink:
    def __init__(self, handler: SinkHandler | None = None, **kwargs: Any) -> None:
        self.handler = handler or SinkHandler()
        self.port = free_port()
        kwargs.setdefault("server_hostname", "localhost")
        self.controller = Controller(
            self.handler,
            hostname="127.0.0.1",
            port=self.port,
            enable_SMTPUTF8=False,
            ready_timeout=10,
            **kwargs,
        )

    def __enter__(self) -> Sink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


def upstream(port: int, tls: TlsMode = TlsMode.NONE, **kwargs: Any) -> SmtpUpstream:
    """A ``ca_file`` is read as the policy reads it, at load."""
    settings: dict[str, Any] = dict(
        name="smarthost", host="127.0.0.1", port=port, tls=tls,
        username=None, password_file=None, password_env=None, timeout=5.0,
    )  # fmt: skip
    settings.update(kwargs)
    if settings.get("ca_file") is not None:
        settings["ca_pem"] = Path(settings["ca_file"]).read_text()
    return SmtpUpstream(**settings)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def trust_test_ca(certs: Certs, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))


@pytest.fixture(autouse=True)
def unpooled(monkeypatch: pytest.MonkeyPatch) -> None:
    """One connection per message here, as before pooling: these tests stop their sink
    while the test runs, and aiosmtpd's ``Controller.stop`` leaks the server side of a
    TLS connection still open. Reuse is tested in ``test_pool.py``."""
    monkeypatch.setattr(smtp, "default_pool", lambda: Pool(max_idle_per_key=0))


@pytest.fixture
def sink() -> Iterator[Sink]:
    with Sink() as running:
        yield running


# --- directory --------------------------------------------------------------------


async def test_directory_writes_message_and_envelope(tmp_path: Path) -> None:
    outbox = tmp_path / "does" / "not" / "exist"
    result = await deliver(
        DirectoryUpstream("outbox", outbox), "b@platform.example", RCPTS, MESSAGE
    )
    (eml,) = outbox.glob("*.eml")
    (meta,) = outbox.glob("*.envelope.json")
    assert eml.read_bytes() == MESSAGE
    assert meta.name == eml.name.removesuffix(".eml") + ".envelope.json"
    assert json.loads(meta.read_text()) == {"mail_from": "b@platform.example", "rcpt_tos": RCPTS}
    assert sorted(p.name for p in outbox.iterdir()) == sorted([eml.name, meta.name])
    assert result == DeliveryResult(f"written to {eml}", {})


async def test_directory_names_are_unique_and_sort_by_time(tmp_path: Path) -> None:
    target = DirectoryUpstream("outbox", tmp_path)
    for n in range(5):
        await deliver(target, "b@platform.example", [f"r{n}@example.org"], MESSAGE)
    metas = sorted(tmp_path.glob("*.envelope.json"))
    assert len(metas) == 5
    assert [json.loads(m.read_text())["rcpt_tos"] for m in metas] == [
        [f"r{n}@example.org"] for n in range(5)
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
async def test_directory_unwritable_is_temporary(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(UpstreamError) as failed:
            await deliver(
                DirectoryUpstream("outbox", tmp_path / "x"), "b@p.example", RCPTS, MESSAGE
            )
    finally:
        tmp_path.chmod(0o700)
    assert (failed.value.code, failed.value.status) == (451, "4.3.0")
    assert "Permission denied" in failed.value.text


async def test_directory_path_that_is_a_file_is_temporary(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UpstreamError) as failed:
        await deliver(DirectoryUpstream("outbox", tmp_path / "file"), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.3.0")
    assert (
        failed.value.text == f"Upstream outbox cannot write to {tmp_path / 'file'}: Not a directory"
    )


# --- SMTP: accepted ---------------------------------------------------------------


async def test_smtp_delivers_byte_identical(sink: Sink) -> None:
    result = await deliver(upstream(sink.port), "bounces@platform.example", RCPTS, MESSAGE)
    assert result == DeliveryResult("250 2.0.0 Ok: queued as SINK1", {})
    (got,) = sink.handler.messages
    assert got.mail_from == "bounces@platform.example"
    assert got.rcpt_tos == RCPTS
    assert got.data == SENT
    assert not got.tls


async def test_partial_refusal_delivers_to_the_others() -> None:
    handler = SinkHandler(refuse={"two@example.org": "550 5.1.1 <two@example.org>: no such user"})
    with Sink(handler) as sink:
        result = await deliver(upstream(sink.port), "b@platform.example", RCPTS, MESSAGE)
    assert result.refused == {"two@example.org": "550 5.1.1 <two@example.org>: no such user"}
    assert result.reply.startswith("250 ")
    (got,) = handler.messages
    assert got.rcpt_tos == ["one@example.org"]
    assert got.data == SENT


@pytest.mark.parametrize("pipelining", [False, True])
async def test_any_2xx_to_rcpt_is_the_recipient_taken(pipelining: bool) -> None:
    """RFC 5321 4.2.1: a server answering 252 to RCPT has the recipient, and the
    copy goes out with the others; it was counted as deferred, sent again at
    every retry (pipelined, as an empty message), expired, and its sender told
    it had failed."""
    refuse = {"two@example.org": "252 2.1.5 Cannot VRFY user"}
    handler = SinkHandler(taken=refuse, pipelining=pipelining)
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
        alone = await attempt(upstream(sink.port), "b@p.example", ["two@example.org"], MESSAGE)
    assert {code for code, _ in got.replies.values()} == {250}
    assert {code for code, _ in alone.replies.values()} == {250}
    assert [m.rcpt_tos for m in handler.messages] == [RCPTS, ["two@example.org"]]
    assert [m.data for m in handler.messages] == [SENT, SENT]


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_3xx_to_rcpt_is_retried_and_never_delivered(pipelining: bool) -> None:
    """No server in step answers RCPT with 3xx: the recipient is not taken (and
    pipelined, a 354 before DATA's reply puts the replies out of step: all retried)."""
    handler = SinkHandler(refuse={"two@example.org": "354 2.1.5 what"}, pipelining=pipelining)
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert got.replies["two@example.org"][0] == 451
    assert all("two@example.org" not in m.rcpt_tos for m in handler.messages)
    if not pipelining:
        assert got.replies["two@example.org"][1] == "451 4.4.0 what (upstream replied 354 2.1.5)"
        assert [m.rcpt_tos for m in handler.messages] == [["one@example.org"]]


# --- SMTP: refused, with the upstream's own words ---------------------------------


async def test_permanent_refusal_passes_through() -> None:
    handler = SinkHandler(
        refuse={"one@example.org": "550 5.1.1 <one@example.org>: mailbox unknown"}
    )
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port), "b@p.example", ["one@example.org"], MESSAGE)
    assert failed.value.line == "550 5.1.1 <one@example.org>: mailbox unknown"
    assert handler.messages == []


async def test_temporary_refusal_passes_through() -> None:
    handler = SinkHandler(refuse={"one@example.org": "451 4.7.1 Greylisted, try again in 5 min"})
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port), "b@p.example", ["one@example.org"], MESSAGE)
    assert failed.value.line == "451 4.7.1 Greylisted, try again in 5 min"
    assert not failed.value.permanent


async def test_all_refused_mixed_is_temporary_so_a_retry_can_help() -> None:
    refuse = {
        "one@example.org": "550 5.1.1 unknown",
        "two@example.org": "452 4.2.2 mailbox full",
    }
    with Sink(SinkHandler(refuse=refuse)) as sink, pytest.raises(RecipientsRefused) as failed:
        await deliver(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert failed.value.line == "452 4.2.2 mailbox full (and 1 more recipient refused)"
    assert failed.value.refused == refuse


@pytest.mark.parametrize("pipelining", [False, True])
async def test_every_recipient_refused_each_gets_its_own_reply(pipelining: bool) -> None:
    """A 5xx is not deferred because another recipient got a 4xx, and each
    recipient's record quotes what the upstream said to it."""
    refuse = {
        "bad@example.org": "550 5.1.1 No such user",
        "soft@example.org": "450 4.2.1 try later",
        "deny@example.org": "553 5.7.1 Relaying denied",
    }
    handler = SinkHandler(refuse=refuse, pipelining=pipelining)
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", list(refuse), MESSAGE)
    assert got.replies == {
        "bad@example.org": (550, "550 5.1.1 No such user"),
        "soft@example.org": (450, "450 4.2.1 try later"),
        "deny@example.org": (553, "553 5.7.1 Relaying denied"),
    }
    assert handler.messages == []


PERM = {"perm@example.org": "550 5.1.1 User unknown"}
PARTLY = ["ok@example.org", "perm@example.org", "ok2@example.org"]


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(
    ("data_reply", "others"),
    [
        (
            "554 5.7.1 Message rejected: content policy",
            "554 5.7.1 Message rejected: content policy",
        ),
        ("451 4.3.0 Try again later", "451 4.3.0 Try again later"),
        (
            "",
            "451 4.4.2 Upstream smarthost (127.0.0.1:{port}): connection lost before the reply"
            " to the end of the message; it may arrive twice (sending)",
        ),
    ],
    ids=["refused", "deferred", "dropped"],
)
async def test_a_recipient_refused_at_rcpt_keeps_its_reply_when_the_message_fails(
    pipelining: bool, data_reply: str, others: str
) -> None:
    """The 550 to RCPT fails that recipient at once with its own words; it was
    deferred or failed with the reply to the message, and retried with the others."""
    handler = SinkHandler(refuse=dict(PERM), data_reply=data_reply, pipelining=pipelining)
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", PARTLY, MESSAGE)
    line = others.format(port=sink.port)
    assert got.replies == {
        "ok@example.org": (int(line[:3]), line),
        "perm@example.org": (550, "550 5.1.1 User unknown"),
        "ok2@example.org": (int(line[:3]), line),
    }


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_421_after_a_550_each_recipient_keeps_its_own_reply(pipelining: bool) -> None:
    """The upstream refuses one recipient, then says 421 and closes: the first
    recipient, taken, is retried for the connection lost, the refused one fails
    with its 550 and the one answered 421 is retried with that reply."""
    refuse = {**PERM, "bye@example.org": "421 4.7.0 Too many errors, closing"}
    handler = SinkHandler(refuse=refuse, pipelining=pipelining)
    rcpts = ["ok@example.org", "perm@example.org", "bye@example.org"]
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    lost = f"451 4.4.2 Upstream smarthost (127.0.0.1:{sink.port}): connection lost (sending)"
    assert got.replies == {
        "ok@example.org": (451, lost),
        "perm@example.org": (550, "550 5.1.1 User unknown"),
        "bye@example.org": (
            451,
            "451 4.7.0 Too many errors, closing (upstream replied 421 4.7.0)",
        ),
    }
    assert handler.messages == []


@dataclass
class SenderRefusing(SinkHandler):
    """Postfix's ``reject_unverified_sender`` when the return path does not exist."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return f"550 5.1.1 <{address}>: Sender address rejected: undeliverable address"


UNKNOWN = "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
SENDER_REFUSED = "the upstream refused the sender, not the recipient"
WHOLE_REFUSED = "the upstream refused the message for all its recipients, not this one"


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(
    ("handler", "rcpts", "shared"),
    [
        (SenderRefusing, RCPTS, dict.fromkeys(RCPTS, SENDER_REFUSED)),
        (SenderRefusing, RCPTS[:1], dict.fromkeys(RCPTS[:1], SENDER_REFUSED)),
        (
            functools.partial(SinkHandler, data_reply=UNKNOWN),
            RCPTS,
            dict.fromkeys(RCPTS, WHOLE_REFUSED),
        ),
        (functools.partial(SinkHandler, data_reply=UNKNOWN), RCPTS[:1], {}),
        (
            functools.partial(SinkHandler, refuse=dict(PERM), data_reply=UNKNOWN),
            PARTLY,
            dict.fromkeys(["ok@example.org", "ok2@example.org"], WHOLE_REFUSED),
        ),
        (
            functools.partial(SinkHandler, refuse=dict(PERM), data_reply=UNKNOWN),
            PARTLY[:2],
            {},
        ),
        (functools.partial(SinkHandler, refuse=dict(PERM)), PARTLY, {}),
    ],
    ids=[
        "mail-from",
        "mail-from-of-one",
        "data-of-two",
        "data-of-one",
        "data-after-rcpt",
        "data-of-one-taken",
        "rcpt",
    ],
)
async def test_a_refusal_of_the_whole_transaction_is_no_recipients_own(
    pipelining: bool,
    handler: Callable[..., SinkHandler],
    rcpts: list[str],
    shared: dict[str, str],
) -> None:
    """A 5.1.1 to MAIL FROM is about the sender, one to the end of a message of
    several recipients about none of them: each was put on the suppression list.
    A reply to RCPT, or to the end of a message of one recipient, is its own."""
    with Sink(handler(pipelining=pipelining)) as sink:
        got = await attempt(upstream(sink.port), "bounces@p.example", rcpts, MESSAGE)
    assert any(code == 550 for code, _ in got.replies.values())
    assert got.shared == shared


@dataclass
class MailRefusing(SinkHandler):
    mail_reply: str = ""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return self.mail_reply


@pytest.mark.parametrize("pipelining", [False, True])
@pytest.mark.parametrize(
    ("reply", "sender"),
    [
        ("552 5.3.4 Message size exceeds fixed limit", False),
        ("552 Message size exceeds fixed limit", False),  # RFC 1870's code, no enhanced one
        ("554 5.6.0 Content rejected", False),
        ("550 5.2.3 Message too long", False),
        ("550 5.1.1 <b@p.example>: Sender address rejected", True),
        ("553 5.7.1 Sender not allowed", True),
        ("552 5.7.1 Sender address rejected: Access denied", True),  # the code before the 552
        ("501 5.5.2 Bad sender address syntax", True),
        ("550 Sender refused", True),
    ],
)
async def test_a_refusal_of_mail_from_about_the_message_is_not_the_senders(
    pipelining: bool, reply: str, sender: bool
) -> None:
    """Postfix's ``552 5.3.4`` to a message over its size limit was warned of as
    the return path refused, every message with it failing, while smaller ones
    went; nor is it either recipient's own."""
    handler = MailRefusing(mail_reply=reply, pipelining=pipelining)
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "bounces@p.example", RCPTS, MESSAGE)
    said = replies.line(int(reply[:3]), reply[4:])
    assert got.replies == dict.fromkeys(RCPTS, (int(reply[:3]), said))
    assert got.shared == dict.fromkeys(RCPTS, SENDER_REFUSED if sender else WHOLE_REFUSED)
    assert got.sender_refused == (said if sender else None)


@dataclass
class LoginWanted(SinkHandler):
    """Microsoft 365 to a client that did not log in."""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        return "530 5.7.57 Client not authenticated to send mail"


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_login_wanted_at_mail_from_makes_the_upstream_unusable(pipelining: bool) -> None:
    """Every message meets it alike: it was retried message by message, each its
    own connection, and the upstream never suspended (``relay.unreachable``)."""
    with Sink(LoginWanted(pipelining=pipelining)) as sink:
        got = await attempt(upstream(sink.port), "bounces@p.example", RCPTS, MESSAGE)
    said = "451 4.7.57 Client not authenticated to send mail (upstream replied 530 5.7.57)"
    assert got.replies == dict.fromkeys(RCPTS, (451, said))
    assert got.unreachable == said


@pytest.mark.parametrize("pipelining", [False, True])
async def test_recipients_over_the_upstreams_limit_go_at_once_in_further_transactions(
    pipelining: bool,
) -> None:
    """RFC 5321 4.5.3.1.10: a 452 to RCPT is the server's limit per transaction.
    Deferred, an invoice to 5 recipients went out over three retry waits."""
    handler = SinkHandler(most=2, pipelining=pipelining)
    rcpts = [f"r{number}@example.org" for number in range(5)]
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert {code for code, _ in got.replies.values()} == {250}
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    assert [m.data for m in handler.messages] == [SENT] * 3


async def test_a_452_without_an_enhanced_code_over_the_limit_goes_in_further_transactions() -> None:
    """A server that gives no enhanced code answers its limit ``452 Too many
    recipients``: read as a full mailbox's, the recipients past it waited a
    retry wait each, a transaction at a time."""
    handler = SinkHandler(most=2, over_most="452 Too many recipients")
    rcpts = [f"r{number}@example.org" for number in range(5)]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert {code for code, _ in got.replies.values()} == {250}
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]


@pytest.mark.parametrize("over", ["552 5.5.3 Too many recipients", "552 Too many recipients"])
@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_552_5_5_3_over_the_limit_goes_in_further_transactions_as_a_452(
    pipelining: bool, over: str
) -> None:
    """RFC 821's code for the limit, which RFC 5321 says to take as temporary:
    every recipient past it failed for good; a server that old often gives
    no enhanced code."""
    handler = SinkHandler(most=2, over_most=over, pipelining=pipelining)
    rcpts = [f"r{number}@example.org" for number in range(5)]
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert {code for code, _ in got.replies.values()} == {250}
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]


@pytest.mark.parametrize(
    "refuse",
    [
        {"full@example.org": "552 5.2.2 Mailbox full"},
        {"one@example.org": "552 5.5.3 Too many recipients"},
    ],
    ids=["mailbox-full", "first-rcpt"],
)
async def test_a_552_not_after_a_recipient_taken_for_the_limit_is_the_recipients_own(
    refuse: dict[str, str],
) -> None:
    """A full mailbox's 552 is no limit; nor is a 5.5.3 to the first RCPT, which
    a server would answer each further transaction alike."""
    handler = SinkHandler(refuse=refuse)
    rcpts = ["one@example.org", "full@example.org"]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    refused = next(iter(refuse))
    assert got.replies[refused] == (552, refuse[refused])
    assert [m.rcpt_tos for m in handler.messages] == [[r for r in rcpts if r != refused]]


async def test_a_552_without_a_code_after_a_recipient_taken_fails_in_the_next_transaction() -> None:
    """Taken for the limit, it may have been the recipient's full mailbox after
    all: the further transaction, where it is the first, fails it for good."""
    full = "552 Requested mail action aborted: exceeded storage allocation"
    handler = SinkHandler(refuse={"full@example.org": full})
    rcpts = ["one@example.org", "full@example.org"]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert got.replies["full@example.org"] == (552, replies.line(552, full[4:]))
    assert [m.rcpt_tos for m in handler.messages] == [["one@example.org"]]


async def test_an_attempt_that_took_the_message_for_someone_reached_its_upstream() -> None:
    """The further transaction for the recipients over the limit found the upstream
    gone; the attempt said "unreachable" for the message it had just delivered,
    and the engine suspended the upstream that took it."""

    @dataclass
    class ClosingAfterOne(SinkHandler):
        sink: Sink | None = None

        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            reply = await super().handle_DATA(server, session, envelope)
            assert self.sink is not None and self.sink.controller.server is not None
            self.sink.controller.server.close()  # the next connection is refused
            return reply

    handler = ClosingAfterOne(most=1)
    with Sink(handler) as sink:
        handler.sink = sink
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert got.replies[RCPTS[0]][0] == 250
    assert got.replies[RCPTS[1]][1].startswith("451 4.4.1 Upstream smarthost")
    assert got.unreachable is None


@dataclass
class CountingRcpts(SinkHandler):
    rcpts: int = 0

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        self.rcpts += 1
        return await super().handle_RCPT(server, session, envelope, address, options)


async def test_further_transactions_send_as_many_recipients_as_the_server_takes() -> None:
    """Each further transaction sent all the rest again: a 1,000-recipient message
    cost 500,000 refused RCPTs at a server taking one, and 100 s."""
    handler = CountingRcpts(most=3)
    rcpts = [f"r{number}@example.org" for number in range(10)]
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert {code for code, _ in got.replies.values()} == {250}
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[0:3], rcpts[3:6], rcpts[6:9], rcpts[9:]]
    assert handler.rcpts == 10 + 7  # the first transaction's 7 refused, then none


@dataclass
class LimitFirst(SinkHandler):
    """Postfix's order: the limit counts every RCPT and comes before the address."""

    limit: int = 2
    seen: int = 0

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        self.seen = 0
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        self.seen += 1
        if self.seen > self.limit:
            return "452 4.5.3 Error: too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, options)


async def test_recipients_refused_on_their_own_do_not_end_the_attempt() -> None:
    """A full mailbox (452 4.2.2) was counted as the server's limit, and a further
    transaction whose recipients were all refused (550) ended the attempt: the
    rest waited a retry, where the attempt before had delivered to them all."""
    handler = LimitFirst(
        refuse={
            "full@example.org": "452 4.2.2 Mailbox full",
            "bad0@example.org": "550 5.1.1 No such user",
            "bad1@example.org": "550 5.1.1 No such user",
        }
    )
    rcpts = ["r0@example.org", "full@example.org", "bad0@example.org", "bad1@example.org"]
    rcpts += ["r1@example.org", "r2@example.org"]
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert {r: code for r, (code, _) in got.replies.items()} == {
        "r0@example.org": 250,
        "full@example.org": 452,
        "bad0@example.org": 550,
        "bad1@example.org": 550,
        "r1@example.org": 250,
        "r2@example.org": 250,
    }
    assert got.replies["full@example.org"][1] == "452 4.2.2 Mailbox full"


async def test_the_copy_never_goes_alone_in_a_further_transaction() -> None:
    """Immediate mode's automatic BCC copy goes with the ERP's recipients or not at
    all: dropped after the first transaction, it went alone in the next, and the
    ERP heard 250 for a customer the upstream had refused."""
    handler = LimitFirst(limit=1, refuse={"a@example.org": "550 5.1.1 No such user"})
    rcpts = ["a@example.org", "copy@example.org"]
    with Sink(handler) as sink:
        got = await attempt(
            upstream(sink.port), "b@p.example", rcpts, MESSAGE, needed=["a@example.org"]
        )
    assert handler.messages == []
    assert got.replies["a@example.org"][0] == 550
    assert got.replies["copy@example.org"][0] == 451


async def test_a_message_deferred_at_its_end_leaves_the_rest_to_the_next_attempt() -> None:
    """A 451 to the end of the message is the whole transaction's, not its
    recipients': the next transaction would be answered alike, so the ones over
    the server's limit wait for the next attempt with the others."""
    handler = SinkHandler(most=2, data_reply="451 4.3.0 Try again later")
    rcpts = [f"r{number}@example.org" for number in range(5)]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2]]
    assert [got.replies[r] for r in rcpts[:2]] == [(451, "451 4.3.0 Try again later")] * 2
    assert [got.replies[r][1][:9] for r in rcpts[2:]] == ["452 4.5.3"] * 3  # not tried


async def test_a_relay_stopping_ends_the_attempt_between_transactions() -> None:
    """The stop's grace cut off a long split attempt: the replies of its finished
    transactions were lost, and their recipients got the message again."""
    handler = SinkHandler(most=1)
    rcpts = [f"r{number}@example.org" for number in range(5)]
    asked = []

    def go_on() -> bool:
        asked.append(True)
        return len(asked) < 2  # stopping after the second transaction

    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE, go_on=go_on)
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:1], rcpts[1:2]]
    assert [got.replies[r][0] for r in rcpts] == [250, 250, 451, 451, 451]
    assert got.replies[rcpts[4]][1] == "451 4.3.2 Not sent yet: the relay was stopping"


async def test_a_452_for_a_full_mailbox_costs_one_more_transaction_then_is_deferred() -> None:
    handler = SinkHandler(refuse={"full@example.org": "452 4.2.2 Mailbox full"})
    with Sink(handler) as sink:
        async with asyncio.timeout(10):  # not a transaction after another without end
            got = await attempt(
                upstream(sink.port), "b@p.example", ["one@example.org", "full@example.org"], MESSAGE
            )
    assert got.replies["full@example.org"] == (452, "452 4.2.2 Mailbox full")
    assert got.replies["one@example.org"][0] == 250
    assert [m.rcpt_tos for m in handler.messages] == [["one@example.org"]]


async def test_refusal_after_data_passes_through() -> None:
    handler = SinkHandler(data_reply="554 5.7.1 Message rejected as spam")
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert failed.value.line == "554 5.7.1 Message rejected as spam"


async def test_refusal_without_enhanced_code_gets_one() -> None:
    handler = SinkHandler(refuse={"one@example.org": "550 no such user here"})
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port), "b@p.example", ["one@example.org"], MESSAGE)
    assert failed.value.line == "550 5.0.0 no such user here"


@pytest.mark.parametrize(
    ("reply", "line"),
    [
        (
            "421 4.7.0 Too many connections",
            "451 4.7.0 Too many connections (upstream replied 421 4.7.0)",
        ),
        # the quote is the upstream's own: no 4.0.0 it did not send
        ("421 Too many connections", "451 4.0.0 Too many connections (upstream replied 421)"),
    ],
)
async def test_421_becomes_451_with_the_upstream_text(reply: str, line: str) -> None:
    handler = SinkHandler(refuse={"one@example.org": reply})
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port), "b@p.example", ["one@example.org"], MESSAGE)
    assert failed.value.line == line


# --- SMTP: unreachable ------------------------------------------------------------


async def test_connection_refused_is_451_4_4_1() -> None:
    port = free_port()
    with pytest.raises(UpstreamError) as failed:
        await deliver(upstream(port), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert (
        failed.value.text
        == f"Upstream smarthost (127.0.0.1:{port}): Connection refused (connecting)"
    )


async def test_no_answer_in_time_is_451_4_4_1() -> None:
    with socket.socket() as mute:  # takes the connection, never greets
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        target = upstream(mute.getsockname()[1], timeout=0.5)
        with pytest.raises(UpstreamError) as failed:
            await asyncio.wait_for(deliver(target, "b@p.example", RCPTS, MESSAGE), 10)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert "no answer within 0.5s (connecting)" in failed.value.text


@dataclass
class HangingUpAtEhlo(SinkHandler):
    """Greets, then closes the connection at EHLO ``hang_ups`` times; serves after."""

    hang_ups: int = 1

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        if self.hang_ups:
            self.hang_ups -= 1
            server.transport.close()  # the reply is never written
        return await super().handle_EHLO(server, session, envelope, hostname, responses)


async def test_a_hang_up_at_ehlo_makes_the_upstream_unusable(pipelining: bool) -> None:
    """With ``tls: none`` EHLO went with the first MAIL: the hang-up was "connection
    lost (sending)", the upstream taken as reached and never suspended. Answered
    again, its EHLO still decides how the transaction goes."""
    handler = HangingUpAtEhlo(pipelining=pipelining)
    with Sink(handler) as sink:
        lost = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
        again = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    said = f"451 4.4.1 Upstream smarthost (127.0.0.1:{sink.port}): connection lost (connecting)"
    assert lost.replies == dict.fromkeys(RCPTS, (451, said))
    assert lost.unreachable == said
    assert again.unreachable is None
    assert {code for code, _ in again.replies.values()} == {250}
    assert len(handler.messages) == 1


async def test_no_answer_to_ehlo_in_time_makes_the_upstream_unusable() -> None:
    async def greet_only(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.example ESMTP\r\n")
        await reader.read()  # EHLO, never answered, until the relay gives up
        writer.close()

    server = await asyncio.start_server(greet_only, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        target = upstream(port, timeout=0.5)
        got = await asyncio.wait_for(attempt(target, "b@p.example", RCPTS, MESSAGE), 10)
    said = f"451 4.4.1 Upstream smarthost (127.0.0.1:{port}): no answer within 0.5s (connecting)"
    assert got.unreachable == said


@dataclass
class RefusingEhloAndHelo(SinkHandler):
    """Knows no EHLO, and refuses HELO for a name it cannot look up, as Postfix may."""

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        return ["502 5.5.2 Error: command not recognized"]

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        return "450 4.7.1 <relay>: Helo command rejected: Host not found"


async def test_ehlo_and_helo_refused_make_the_upstream_unusable() -> None:
    with Sink(RefusingEhloAndHelo()) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    said = (
        f"451 4.4.1 Upstream smarthost (127.0.0.1:{sink.port}): 450 4.7.1 <relay>: Helo"
        " command rejected: Host not found (connecting)"
    )
    assert got.unreachable == said


async def test_an_ehlo_name_aiosmtplib_refuses_is_deferred_not_a_refused_address() -> None:
    """A non-ASCII helo_name (which relay check now refuses) made every delivery
    bounce as "550 5.1.3 Address refused", and its failure notice too: the
    relay's own setting, nothing wrong with the message."""
    with Sink() as sink:
        target = upstream(sink.port, helo_name="rélay.example")
        with pytest.raises(UpstreamError) as failed:
            await asyncio.wait_for(deliver(target, "b@p.example", RCPTS, MESSAGE), 10)
    assert (failed.value.code, failed.value.status) == (451, "4.3.5")
    assert "the relay's settings refused" in failed.value.text


def _dropping() -> tuple[socket.socket, socket.socket]:
    """A listener that answers no new connection, and the connection that fills
    its queue: one to it hangs, as one to a host that drops packets does."""
    hole = socket.socket()
    hole.bind(("127.0.0.3", 0))
    hole.listen(0)
    return hole, socket.create_connection(hole.getsockname(), timeout=5)


async def test_an_address_that_drops_connections_gives_way_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The smarthost's name had two addresses, the first down: the whole timeout
    went on it, the second was never tried, and every message expired. The
    system resolver here has no name with two addresses, so the loop's
    lookup gives them; the connections are real."""
    hole, filling = _dropping()
    with hole, filling, Sink() as sink:
        loop = asyncio.get_running_loop()
        stream = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        dead, alive = (*stream, hole.getsockname()), (*stream, ("127.0.0.1", sink.port))
        resolved = {2525: [dead, alive], 2526: [dead, dead]}  # 2526: both down

        async def lookup(host: str, port: int, **_: object) -> list:
            assert host == "smarthost.example"
            return resolved[port]

        monkeypatch.setattr(loop, "getaddrinfo", lookup)
        target = upstream(2525, host="smarthost.example", timeout=1.0)
        await asyncio.wait_for(deliver(target, "b@p.example", RCPTS, MESSAGE), 10)
        with pytest.raises(UpstreamError) as failed:
            down = upstream(2526, host="smarthost.example", timeout=1.0)
            await asyncio.wait_for(deliver(down, "b@p.example", RCPTS, MESSAGE), 10)
    assert len(sink.handler.messages) == 1
    assert failed.value.text == (
        "Upstream smarthost (smarthost.example:2526): 127.0.0.3: no answer within 1s;"
        " 127.0.0.3: no answer within 1s (connecting)"
    )


async def test_a_name_lookup_is_held_to_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the relay looking the name up itself, a resolver that does not answer
    held each attempt for its own timeouts (5 s, times tries, times servers)
    rather than the upstream's. The lookup stands for such a resolver."""
    loop = asyncio.get_running_loop()

    async def silent(*_: object, **__: object) -> list:
        await asyncio.sleep(30)
        return []

    monkeypatch.setattr(loop, "getaddrinfo", silent)
    target = upstream(2525, host="smarthost.example", timeout=0.5)
    with pytest.raises(UpstreamError) as failed:
        await asyncio.wait_for(deliver(target, "b@p.example", RCPTS, MESSAGE), 10)
    assert failed.value.text == (
        "Upstream smarthost (smarthost.example:2525): host not found:"
        " no answer within 0.5s (connecting)"
    )


async def test_the_end_of_the_message_may_take_longer_than_a_command(pipelining: bool) -> None:
    """A server that scans a message before it answers the final dot (RFC 5321
    4.5.3.2.6 gives it ten minutes) is waited for: given up on at the command
    timeout, the message would be sent again and arrive twice."""
    handler = SinkHandler(delay=1.0, pipelining=pipelining)
    with Sink(handler) as sink:
        target = upstream(sink.port, timeout=0.3, data_timeout=10.0)
        result = await asyncio.wait_for(deliver(target, "b@p.example", RCPTS, MESSAGE), 20)
    assert result.reply.startswith("250")
    assert not result.refused
    assert len(handler.messages) == 1


async def test_no_reply_to_the_end_of_the_message_says_it_may_arrive_twice(
    pipelining: bool,
) -> None:
    handler = SinkHandler(delay=5.0, pipelining=pipelining)
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        target = upstream(sink.port, timeout=5.0, data_timeout=0.5)
        await asyncio.wait_for(deliver(target, "b@p.example", RCPTS, MESSAGE), 10)
    assert (failed.value.code, failed.value.status) == (451, "4.4.2")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}): no reply to the end of the message"
        " within 0.5s; it may arrive twice (sending)"
    )


async def test_a_connection_lost_before_the_reply_to_the_end_says_it_may_arrive_twice(
    pipelining: bool,
) -> None:
    """The server read the whole message and closed without answering the final
    dot: it may have taken the message, which the retry then sends again."""
    handler = SinkHandler(data_reply="", pipelining=pipelining)
    with Sink(handler) as sink, pytest.raises(UpstreamError) as failed:
        await asyncio.wait_for(deliver(upstream(sink.port), "b@p.example", RCPTS, MESSAGE), 10)
    assert (failed.value.code, failed.value.status) == (451, "4.4.2")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}): connection lost before the reply to"
        " the end of the message; it may arrive twice (sending)"
    )


async def test_silent_server_times_out_while_connecting() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(UpstreamError) as failed:
            await asyncio.wait_for(
                deliver(upstream(port, timeout=0.5), "b@p.example", RCPTS, MESSAGE), 10
            )
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert "(connecting)" in failed.value.text


# --- SMTP: TLS --------------------------------------------------------------------


@pytest.mark.usefixtures("trust_test_ca")
async def test_starttls(certs: Certs) -> None:
    with Sink(tls_context=server_context(certs)) as sink:
        await deliver(upstream(sink.port, TlsMode.STARTTLS), "b@p.example", RCPTS, MESSAGE)
    (got,) = sink.handler.messages
    assert got.tls
    assert got.data == SENT


@pytest.mark.usefixtures("trust_test_ca")
async def test_implicit_tls(certs: Certs) -> None:
    with Sink(ssl_context=server_context(certs)) as sink:
        await deliver(upstream(sink.port, TlsMode.IMPLICIT), "b@p.example", RCPTS, MESSAGE)
    (got,) = sink.handler.messages
    assert got.tls


@pytest.mark.usefixtures("trust_test_ca")
async def test_auto_uses_starttls_when_offered(certs: Certs) -> None:
    with Sink(tls_context=server_context(certs)) as sink:
        await deliver(upstream(sink.port, TlsMode.AUTO), "b@p.example", RCPTS, MESSAGE)
    assert sink.handler.messages[0].tls


async def test_auto_goes_plain_when_not_offered(sink: Sink) -> None:
    await deliver(upstream(sink.port, TlsMode.AUTO), "b@p.example", RCPTS, MESSAGE)
    assert not sink.handler.messages[0].tls


async def test_starttls_required_but_not_offered_says_what_to_set(sink: Sink) -> None:
    """aiosmtplib's "SMTP STARTTLS extension not supported by server." said
    neither that the policy asks for it nor what else would do."""
    with pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port, TlsMode.STARTTLS), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.7.10")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}) offers no STARTTLS, which tls: starttls"
        " needs: nothing is sent in plain text; set tls: implicit with the upstream's"
        " implicit-TLS port (465), or tls: none to allow it (connecting)"
    )
    assert sink.handler.messages == []


async def test_implicit_tls_at_a_plain_smtp_port_says_to_use_starttls_or_465(sink: Sink) -> None:
    with pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port, TlsMode.IMPLICIT), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}): TLS failed: WRONG_VERSION_NUMBER; the"
        " port speaks plain SMTP (or STARTTLS), not implicit TLS: set tls: starttls, or use"
        " the upstream's implicit-TLS port (465) (connecting)"
    )
    assert sink.handler.messages == []


async def test_implicit_tls_at_a_silent_port_names_the_handshake() -> None:
    """The connection was made before: what was not answered was the handshake,
    as after STARTTLS (``TLS handshake after STARTTLS: no answer``)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(UpstreamError) as failed:
            await asyncio.wait_for(
                deliver(
                    upstream(port, TlsMode.IMPLICIT, timeout=0.5), "b@p.example", RCPTS, MESSAGE
                ),
                10,
            )
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{port}): TLS handshake: no answer within 0.5s (connecting)"
    )


async def test_implicit_tls_done_but_no_greeting_is_not_the_handshake(certs: Certs) -> None:
    """The handshake went through, the greeting never came: "TLS handshake: no
    answer" sent the sysadmin after TLS versions and ciphers, where the server
    is what does not answer, as on a port without TLS."""
    done = asyncio.Event()

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # the handshake is asyncio's, before this runs
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0, ssl=server_context(certs))
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamError) as failed:
            pinned = upstream(port, TlsMode.IMPLICIT, ca_file=certs.ca, timeout=0.5)
            await asyncio.wait_for(deliver(pinned, "b@p.example", RCPTS, MESSAGE), 10)
    finally:
        done.set()
        server.close()
        await server.wait_closed()
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{port}): no answer within 0.5s (connecting)"
    )


@pytest.mark.parametrize("mode", [TlsMode.STARTTLS, TlsMode.IMPLICIT])
async def test_ca_file_trusts_a_private_ca_and_helo_name_is_what_ehlo_says(
    certs: Certs, mode: TlsMode
) -> None:
    kwargs = {"tls_context" if mode is TlsMode.STARTTLS else "ssl_context": server_context(certs)}
    with Sink(**kwargs) as sink:
        private = upstream(sink.port, mode, ca_file=certs.ca, helo_name="relay.platform.example")
        await deliver(private, "b@p.example", RCPTS, MESSAGE)
    (got,) = sink.handler.messages
    assert got.tls and got.data == SENT
    assert got.helo == "relay.platform.example"


@pytest.mark.parametrize("damage", ["gone", "half-written", "another CA"])
async def test_a_ca_file_changed_since_the_policy_loaded_is_the_next_reloads(
    certs: Certs, tmp_path: Path, damage: str
) -> None:
    """Read per connection, a CA file emptied or replaced by mistake stopped the
    upstream's mail at once, though a reload would have refused it and
    ``relay status`` said a reload would put it in use."""
    ca_file = tmp_path / "renewed-ca.pem"
    ca_file.write_bytes(certs.ca.read_bytes())
    loaded = upstream(0, TlsMode.STARTTLS, ca_file=ca_file)
    if damage == "gone":
        ca_file.unlink()
    elif damage == "half-written":
        ca_file.write_bytes(certs.ca.read_bytes()[:200])
    else:
        ca_file.write_bytes(make_certs(tmp_path / "other").ca.read_bytes())
    with Sink(tls_context=server_context(certs)) as sink:
        await deliver(dataclasses.replace(loaded, port=sink.port), "b@p.example", RCPTS, MESSAGE)
    assert len(sink.handler.messages) == 1


async def test_without_a_helo_name_ehlo_says_this_hosts_name(sink: Sink) -> None:
    """getfqdn said ``localhost`` on a host whose /etc/hosts lists it first for
    the host's address; a host with a name of its own gives that name."""
    await deliver(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    said = sink.handler.messages[0].helo
    assert said == helo.local_hostname()
    if socket.gethostname().lower() not in helo.LOOPBACK_NAMES:
        assert said.lower() not in helo.LOOPBACK_NAMES


async def test_ca_file_replaces_the_systems_cas(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA the system trusts (here through SSL_CERT_FILE) is not enough when
    ``ca_file`` names another."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    other = make_certs(tmp_path)
    with (
        Sink(tls_context=server_context(certs)) as sink,
        pytest.raises(UpstreamError) as failed,
    ):
        await deliver(
            upstream(sink.port, TlsMode.STARTTLS, ca_file=other.ca), "b@p.example", RCPTS, MESSAGE
        )
    assert "TLS certificate not accepted" in failed.value.text
    assert sink.handler.messages == []


@pytest.mark.parametrize("mode", [TlsMode.STARTTLS, TlsMode.IMPLICIT])
async def test_untrusted_certificate_is_451(certs: Certs, mode: TlsMode) -> None:
    kwargs = {"tls_context" if mode is TlsMode.STARTTLS else "ssl_context": server_context(certs)}
    with Sink(**kwargs) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port, mode), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert "TLS certificate not accepted" in failed.value.text
    assert sink.handler.messages == []


@pytest.mark.parametrize(
    ("mode", "hint"),
    [
        (TlsMode.STARTTLS, "set ca_file: to the CA certificate that signed it"),
        (TlsMode.IMPLICIT, "set ca_file: to the CA certificate that signed it"),
        (TlsMode.AUTO, "set tls: starttls and ca_file: to the CA certificate that signed it"),
    ],
)
async def test_a_private_ca_without_ca_file_says_to_set_it(
    certs: Certs, mode: TlsMode, hint: str
) -> None:
    kwargs = {"ssl_context" if mode is TlsMode.IMPLICIT else "tls_context": server_context(certs)}
    with Sink(**kwargs) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port, mode), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}): TLS certificate not accepted:"
        f" unable to get local issuer certificate; {hint} (connecting)"
    )


async def test_a_ca_file_without_the_ca_that_signed_it_says_to_add_it(
    certs: Certs, tmp_path: Path
) -> None:
    other = make_certs(tmp_path)
    with Sink(tls_context=server_context(certs)) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(
            upstream(sink.port, TlsMode.STARTTLS, ca_file=other.ca), "b@p.example", RCPTS, MESSAGE
        )
    assert failed.value.text.endswith(
        f"unable to get local issuer certificate; ca_file: ({other.ca}) holds no CA that"
        " signed it: add the CA certificate that signed it there (connecting)"
    )


async def test_a_self_signed_certificate_says_to_trust_it_in_ca_file(tmp_path: Path) -> None:
    """What the text says to set is what lets the message through."""
    own = self_signed(tmp_path)
    with Sink(tls_context=server_context(own)) as sink:
        with pytest.raises(UpstreamError) as failed:
            await deliver(upstream(sink.port, TlsMode.STARTTLS), "b@p.example", RCPTS, MESSAGE)
        assert failed.value.text.endswith(
            ": TLS certificate not accepted: self-signed certificate; set ca_file: to a copy"
            " of it (connecting)"
        )
        trusted = upstream(sink.port, TlsMode.STARTTLS, ca_file=own.cert)
        await deliver(trusted, "b@p.example", RCPTS, MESSAGE)
    assert len(sink.handler.messages) == 1


async def test_an_expired_certificate_says_the_upstream_must_renew_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate's end date is not given: Python's ssl keeps no certificate
    whose check failed."""
    old = make_certs(tmp_path, expired=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(old.ca))
    with Sink(tls_context=server_context(old)) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port, TlsMode.STARTTLS), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}): TLS certificate not accepted: certificate"
        " has expired; the upstream must renew it (or this host's clock is wrong) (connecting)"
    )
    assert sink.handler.messages == []


async def test_an_expired_ca_in_ca_file_is_named_not_laid_on_the_upstream(
    tmp_path: Path,
) -> None:
    """A private CA not renewed in the relay's own ``ca_file``, the upstream's
    certificate in date: "the upstream must renew it" sent the sysadmin to ask
    the upstream for what was in their own file."""
    old_ca = make_certs(tmp_path / "old_ca", ca_expired=True)
    with Sink(tls_context=server_context(old_ca)) as sink, pytest.raises(UpstreamError) as failed:
        pinned = upstream(sink.port, TlsMode.STARTTLS, ca_file=old_ca.ca)
        await deliver(pinned, "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    ended = x509.load_pem_x509_certificate(old_ca.ca.read_bytes()).not_valid_after_utc
    assert failed.value.text == (
        f"Upstream smarthost (127.0.0.1:{sink.port}): TLS certificate not accepted: certificate"
        f" has expired; ca_file: ({old_ca.ca}) holds the CA certificate 'relay test CA', which"
        f" expired on {ended:%Y-%m-%d %H:%M} UTC: put the CA's renewed one there, unless it is"
        " the upstream's own that has expired (or this host's clock is wrong) (connecting)"
    )

    old_leaf = make_certs(tmp_path / "old_leaf", expired=True)  # its CA in date
    # a bundle, as the system's CAs copied, holds roots that ended long ago: which
    # one signed the certificate is not known, and an unrelated one was named
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(old_leaf.ca.read_bytes() + old_ca.ca.read_bytes())
    for ca_file, unless in (
        (old_leaf.ca, ""),
        (
            bundle,
            f", unless it is one of the expired CAs in ca_file: ({bundle}): 1 of 2",
        ),
    ):
        with (
            Sink(tls_context=server_context(old_leaf)) as sink,
            pytest.raises(UpstreamError) as failed,
        ):
            pinned = upstream(sink.port, TlsMode.STARTTLS, ca_file=ca_file)
            await deliver(pinned, "b@p.example", RCPTS, MESSAGE)
        assert failed.value.text == (
            f"Upstream smarthost (127.0.0.1:{sink.port}): TLS certificate not accepted: certificate"
            f" has expired; the upstream must renew it{unless} (or this host's clock is wrong)"
            " (connecting)"
        )


async def test_certificate_for_another_name_is_451(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = make_certs(tmp_path, names=("smtp.other.example",))
    monkeypatch.setenv("SSL_CERT_FILE", str(other.ca))
    with (
        Sink(tls_context=server_context(other)) as sink,
        pytest.raises(UpstreamError) as failed,
    ):
        await deliver(upstream(sink.port, TlsMode.STARTTLS), "b@p.example", RCPTS, MESSAGE)
    assert "TLS certificate not accepted" in failed.value.text
    assert "mismatch" in failed.value.text


# --- SMTP: AUTH -------------------------------------------------------------------


@pytest.fixture
def auth_sink() -> Iterator[Sink]:
    with Sink(authenticator=authenticator, auth_require_tls=False) as running:
        yield running


async def test_login_with_password_file(auth_sink: Sink, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    target = upstream(auth_sink.port, username="relay", password_file=secret)
    await deliver(target, "b@p.example", RCPTS, MESSAGE)
    assert auth_sink.handler.messages[0].login == "relay"


async def test_login_with_a_password_file_notepad_wrote(auth_sink: Sink, tmp_path: Path) -> None:
    """UTF-8 with a byte-order mark, lines ended CRLF: check took it, and the mark
    went to the upstream as part of the password, so every login failed."""
    secret = tmp_path / "password"
    secret.write_bytes(b"\xef\xbb\xbfs3cret\r\n")
    target = upstream(auth_sink.port, username="relay", password_file=secret)
    await deliver(target, "b@p.example", RCPTS, MESSAGE)
    assert auth_sink.handler.messages[0].login == "relay"


async def test_login_with_password_env(auth_sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SMARTHOST_PASSWORD", "s3cret")
    target = upstream(
        auth_sink.port, username="relay", password_env="RELAY_TEST_SMARTHOST_PASSWORD"
    )
    await deliver(target, "b@p.example", RCPTS, MESSAGE)
    assert auth_sink.handler.messages[0].login == "relay"


async def test_login_refused_is_temporary(auth_sink: Sink, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("wrong\n")
    target = upstream(auth_sink.port, username="relay", password_file=secret)
    with pytest.raises(UpstreamError) as failed:
        await deliver(target, "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.7.0")
    assert "535 5.7.8" in failed.value.text
    assert auth_sink.handler.messages == []


async def test_missing_password_is_a_local_configuration_error(
    auth_sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_TEST_UNSET", raising=False)
    for target in (
        upstream(auth_sink.port, username="relay", password_file=tmp_path / "missing"),
        upstream(auth_sink.port, username="relay", password_env="RELAY_TEST_UNSET"),
    ):
        with pytest.raises(UpstreamError) as failed:
            await deliver(target, "b@p.example", RCPTS, MESSAGE)
        assert (failed.value.code, failed.value.status) == (451, "4.3.5")


async def test_an_empty_password_is_none_and_no_login_is_tried(
    auth_sink: Sink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty variable (``Environment=RELAY_TEST_EMPTY=`` in a unit) or a file
    emptied since the policy was loaded went to the smarthost as the password:
    each delivery a failed login, which locks the account at smarthosts that
    count them, and a log that blamed the smarthost's refusal."""
    monkeypatch.setenv("RELAY_TEST_EMPTY", " ")
    secret = tmp_path / "password"
    secret.write_text("\n")
    for target, said in (
        (upstream(auth_sink.port, username="relay", password_file=secret), f"{secret} is empty"),
        (
            upstream(auth_sink.port, username="relay", password_env="RELAY_TEST_EMPTY"),
            "environment variable RELAY_TEST_EMPTY empty",
        ),
    ):
        with pytest.raises(UpstreamError) as failed:
            await deliver(target, "b@p.example", RCPTS, MESSAGE)
        assert (failed.value.code, failed.value.status) == (451, "4.3.5")
        assert said in failed.value.text, failed.value.text


async def test_auto_does_not_log_in_without_tls(tmp_path: Path) -> None:
    """A man in the middle strips STARTTLS from EHLO: the password stays unsent."""
    attempts: list[str] = []

    def recording(server: SMTP, session: Session, *args: Any) -> AuthResult:
        attempts.append(args[1])
        return authenticator(server, session, *args)

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    with (
        Sink(authenticator=recording, auth_require_tls=False) as sink,
        pytest.raises(UpstreamError) as failed,
    ):
        target = upstream(sink.port, TlsMode.AUTO, username="relay", password_file=secret)
        await deliver(target, "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.7.10")
    assert "offers no STARTTLS: the password is not sent in plain text" in failed.value.text
    assert "tls: none to allow it" in failed.value.text
    assert attempts == []
    assert sink.handler.messages == []


@pytest.mark.usefixtures("trust_test_ca")
async def test_auto_logs_in_after_starttls(certs: Certs, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    with Sink(authenticator=authenticator, tls_context=server_context(certs)) as sink:
        target = upstream(sink.port, TlsMode.AUTO, username="relay", password_file=secret)
        await deliver(target, "b@p.example", RCPTS, MESSAGE)
    (got,) = sink.handler.messages
    assert got.tls and got.login == "relay"


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_upstream_demanding_auth_we_do_not_do_is_temporary() -> None:
    with (
        Sink(authenticator=authenticator, auth_require_tls=False, auth_required=True) as sink,
        pytest.raises(UpstreamError) as failed,
    ):
        await deliver(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert failed.value.line == "451 4.7.0 Authentication required (upstream replied 530 5.7.0)"


# --- reply parsing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "message", "status", "text"),
    [
        (550, "5.1.1 <a@b>: unknown", "5.1.1", "<a@b>: unknown"),
        (550, "unknown user", "5.0.0", "unknown user"),
        (550, "4.1.1 class mismatch", "5.0.0", "class mismatch"),
        (554, "5.7.1 first line\n5.7.1 second line", "5.7.1", "first line second line"),
        (550, "5.1.1 no such user\n5.7.1 see our policy", "5.1.1", "no such user see our policy"),
        (451, "", "4.0.0", ""),
        (550, "5.1.1 no\tsuch\x07user", "5.1.1", "no such user"),  # the logs take text only
    ],
)
def test_reply_split(code: int, message: str, status: str, text: str) -> None:
    assert replies.split(code, message) == (status, text)


async def test_a_tls_handshake_the_upstream_closes_says_so(certs: Certs) -> None:
    """An upstream taking only a cipher the relay does not offer closes the
    handshake after its 220 to STARTTLS: that was logged as "connection lost",
    which sent the sysadmin looking at the network."""
    old = server_context(certs)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("AES128-SHA:@SECLEVEL=0")
    with Sink(tls_context=old) as sink, pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port, TlsMode.STARTTLS), "b@p.example", RCPTS, MESSAGE)
    assert (failed.value.code, failed.value.status) == (451, "4.4.1")
    assert "TLS handshake after STARTTLS failed: the upstream closed" in failed.value.text
    assert "connection lost" not in failed.value.text
    assert sink.handler.messages == []


@pytest.mark.parametrize("refusal", ["554 5.6.0 Content rejected", "500 5.5.2 Line too long"])
async def test_a_message_refused_at_its_end_is_offered_for_the_rest_at_once(refusal: str) -> None:
    """A 554 to the end of the first transaction left the recipients over the
    server's limit to the next attempt: refused a transaction a retry wait,
    a notice each time, and the last expired as "Too many recipients". A 500
    is as permanent as a 554."""
    handler = SinkHandler(most=2, data_reply=refusal)
    rcpts = [f"r{number}@example.org" for number in range(5)]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert got.replies == dict.fromkeys(rcpts, (int(refusal[:3]), refusal))
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]


async def test_the_copy_goes_in_a_further_transaction_once_its_recipients_took_it() -> None:
    """Once the upstream took the message for a recipient it was needed for, the
    automatic copy over the server's limit goes on its own at once: held back,
    it waited a retry wait, deferred with a word of refused recipients none of
    whom was refused."""
    handler = SinkHandler(most=2)
    rcpts = ["a@example.org", "b@example.org", "copy@example.org"]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(
                upstream(sink.port), "b@p.example", rcpts, MESSAGE, needed=rcpts[:2]
            )
    assert {code for code, _ in got.replies.values()} == {250}
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[:2], rcpts[2:]]


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_temporary_refusal_of_mail_from_is_no_refused_sender(pipelining: bool) -> None:
    """A 4xx to MAIL FROM (a sender domain not resolving for now) lists no
    recipient, yet is no refusal for good of the return path: the sysadmin is
    warned of those only, and the ERP's sender told of them only."""
    reply = "450 4.1.8 <b@p.example>: Sender address rejected: Domain not found"
    handler = MailRefusing(mail_reply=reply, pipelining=pipelining)
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert got.replies == dict.fromkeys(RCPTS, (450, reply))
    assert got.shared == dict.fromkeys(RCPTS, SENDER_REFUSED)
    assert got.sender_refused is None


async def test_recipients_refused_for_now_do_not_end_the_attempt() -> None:
    """A greylisted first recipient, every other over the server's limit: the
    transaction took no one, but the server's limit is known, and the others go
    at once. Ended there, they waited a retry wait the upstream did not ask for."""
    handler = LimitFirst(limit=1, refuse={"grey@example.org": "450 4.2.0 Greylisted"})
    rcpts = ["grey@example.org", "r1@example.org", "r2@example.org"]
    with Sink(handler) as sink:
        async with asyncio.timeout(10):
            got = await attempt(upstream(sink.port), "b@p.example", rcpts, MESSAGE)
    assert got.replies["grey@example.org"] == (450, "450 4.2.0 Greylisted")
    assert [got.replies[r][0] for r in rcpts[1:]] == [250, 250]
    assert [m.rcpt_tos for m in handler.messages] == [rcpts[1:2], rcpts[2:]]


async def test_a_552_5_5_3_to_the_first_recipient_costs_no_further_transaction() -> None:
    """Before any recipient was taken a 5.5.3 is no limit: the recipient's own
    refusal, not a RCPT more in a transaction of its own."""
    handler = CountingRcpts(refuse={"one@example.org": "552 5.5.3 Too many recipients"})
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert got.replies["one@example.org"] == (552, "552 5.5.3 Too many recipients")
    assert handler.rcpts == 2
    assert [m.rcpt_tos for m in handler.messages] == [RCPTS[1:]]


@pytest.mark.parametrize(
    ("refuse", "counted"),
    [
        (
            {"one@example.org": "550 5.1.1 No such user", "two@example.org": "450 4.2.1 Later"},
            "deferred",
        ),
        (
            {"one@example.org": "550 5.1.1 No such user", "two@example.org": "553 5.7.1 No"},
            "refused",
        ),
        ({"one@example.org": "550 5.1.1 No such user"}, "sent"),
    ],
    ids=["mixed", "permanent", "partly"],
)
async def test_an_attempt_is_counted_refused_only_when_every_reply_is_for_good(
    refuse: dict[str, str], counted: str
) -> None:
    """The upstream attempts in the metrics: one that a retry may yet get through
    counted as refused reads as mail lost to the upstream."""
    with Sink(SinkHandler(refuse=refuse)) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", RCPTS, MESSAGE)
    assert result(got) == counted


async def test_an_address_that_cannot_go_on_a_command_line_is_a_bad_address(sink: Sink) -> None:
    """5.1.3, a bad address syntax, not 5.1.1: an unknown mailbox's code puts the
    address on the suppression list, which a retry with the address corrected
    at the ERP would then find."""
    with pytest.raises(UpstreamError) as failed:
        await deliver(upstream(sink.port), "b@p.example", ['"x\x00y"@example.org'], MESSAGE)
    assert (failed.value.code, failed.value.status) == (550, "5.1.3")
    assert sink.handler.messages == []


@pytest.mark.parametrize("pipelining", [False, True])
async def test_encryption_wanted_for_the_login_defers_and_makes_the_upstream_unusable(
    pipelining: bool,
) -> None:
    """RFC 4954's 538 is about the relay's own login, as 530 is: passed on, it
    bounced every message as though the recipients had refused it."""
    reply = "538 5.7.11 Encryption required for requested authentication mechanism"
    with Sink(MailRefusing(mail_reply=reply, pipelining=pipelining)) as sink:
        got = await attempt(upstream(sink.port), "bounces@p.example", RCPTS, MESSAGE)
    said = (
        "451 4.7.11 Encryption required for requested authentication mechanism"
        " (upstream replied 538 5.7.11)"
    )
    assert got.replies == dict.fromkeys(RCPTS, (451, said))
    assert got.unreachable == said


@pytest.mark.usefixtures("trust_test_ca")
async def test_a_fully_qualified_name_with_its_root_dot_is_checked_without_it(
    certs: Certs,
) -> None:
    """No certificate names ``localhost.``: checked with the dot, every delivery
    to a smarthost written so failed."""
    with Sink(tls_context=server_context(certs)) as sink:
        target = upstream(sink.port, TlsMode.STARTTLS, tls_name="localhost.")
        await deliver(target, "b@p.example", RCPTS, MESSAGE)
    assert sink.handler.messages[0].tls


@pytest.mark.parametrize(
    ("reply", "quoted"),
    [("650 what", "650"), ("650 5.1.1 what", "650 5.1.1")],  # its own status kept in the quote
)
async def test_a_reply_code_smtp_does_not_have_is_retried(reply: str, quoted: str) -> None:
    """RFC 5321 codes end at 5xx: a 6xx passed on was taken for a refusal for good."""
    handler = SinkHandler(refuse={"one@example.org": reply})
    with Sink(handler) as sink:
        got = await attempt(upstream(sink.port), "b@p.example", ["one@example.org"], MESSAGE)
    said = f"451 4.4.0 what (upstream replied {quoted})"
    assert got.replies == {"one@example.org": (451, said)}
