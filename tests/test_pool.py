"""Pooled upstream connections against real aiosmtpd servers on loopback.

The sink records every connection it accepts: the commands on it, the login
it performed and the messages that travelled on it, so reuse and isolation
are checked where they matter, at the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.deliver import attempt, counted, deliver
from relay.errors import UpstreamError, sent_in_full
from relay.ingress import clientlimit
from relay.ingress.clientlimit import ClientCounts
from relay.policy.model import SmtpUpstream, TlsMode
from relay.tally import Tally
from relay.upstream import Crowded, DeliveryResult, Unreachable, smtp
from relay.upstream import pool as pool_module
from relay.upstream.pool import Pool, PoolKey, close_default_pool, default_pool
from tests.certs import make_certs, server_context
from tests.sink import ConnectionLimit, RefusingRecipients, free_port

MESSAGE = b"From: a@platform.example\r\nTo: one@example.org\r\nSubject: pool\r\n\r\nbody\r\n"
PASSWORDS = {"acme": {"acme-pw", "acme-pw-2"}, "globex": {"globex-pw"}}


@dataclass
class Conn:
    """One TCP connection as the sink saw it."""

    commands: list[str] = field(default_factory=list)
    login: str | None = None
    messages: list[str] = field(default_factory=list)  # envelope senders, in order
    tls: list[bool] = field(default_factory=list)  # whether each message came encrypted
    closed: bool = False


@dataclass
class Recorder(RefusingRecipients):
    """Handler hooks; ``rset_reply`` answers RSET once, ``drop`` hangs up after each message."""

    delay: float = 0.0
    drop: bool = False
    rset_reply: str | None = None
    mail_reply: str | None = None  # answers the next MAIL instead of 250
    data_reply: str | None = None  # answers the end of the next message instead of 250
    conns: list[Conn] = field(default_factory=list)

    @property
    def connections(self) -> list[Conn]:
        """The controller's own readiness probe says nothing; a client always sends EHLO."""
        return [c for c in self.conns if c.commands]

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply, self.rset_reply = self.rset_reply, None
        return reply or "250 OK"

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply, self.mail_reply = self.mail_reply, None
        if reply is not None:
            return reply
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        assert isinstance(server, RecordingSMTP)
        server.conn.messages.append(envelope.mail_from)
        server.conn.tls.append(server.transport.get_extra_info("ssl_object") is not None)
        if self.drop:
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        reply, self.data_reply = self.data_reply, None
        return reply or "250 2.0.0 Ok"


class RecordingSMTP(SMTP):
    def __init__(self, handler: Recorder, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.conn = Conn()
        handler.conns.append(self.conn)
        for verb, method in list(self._smtp_methods.items()):
            self._smtp_methods[verb] = self._recorded(verb, method)

    def _recorded(
        self, verb: str, method: Callable[[str], Awaitable[None]]
    ) -> Callable[[str], Awaitable[None]]:
        @functools.wraps(method)
        async def recorded(arg: str) -> None:
            self.conn.commands.append(verb)
            await method(arg)
            if verb == "AUTH" and self.session.authenticated:
                self.conn.login = self.session.auth_data.login.decode()

        return recorded

    def connection_lost(self, error: Exception | None) -> None:
        self.conn.closed = True
        super().connection_lost(error)


class RecordingController(Controller):
    def factory(self) -> SMTP:
        return RecordingSMTP(self.handler, **self.SMTP_kwargs)


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (
        data.password.decode() in PASSWORDS.get(data.login.decode(), ())
    )
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


@contextlib.contextmanager
def running(
    recorder: Recorder | None = None, port: int | None = None, **kwargs: Any
) -> Iterator[tuple[Recorder, int]]:
    recorder = recorder or Recorder()
    port = port or free_port()
    controller = RecordingController(
        recorder,
        hostname="127.0.0.1",
        port=port,
        enable_SMTPUTF8=False,
        ready_timeout=10,
        server_hostname="localhost",
        **kwargs,
    )
    controller.start()
    try:
        yield recorder, port
    finally:
        controller.stop()


def upstream(port: int, **kwargs: Any) -> SmtpUpstream:
    settings: dict[str, Any] = dict(
        name="smarthost", host="127.0.0.1", port=port, tls=TlsMode.NONE,
        username=None, password_file=None, password_env=None, timeout=5.0,
    )  # fmt: skip
    settings.update(kwargs)
    return SmtpUpstream(**settings)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    made = Pool()
    yield made
    await made.close()


@pytest.fixture
def sink() -> Iterator[tuple[Recorder, int]]:
    with running() as started:
        yield started


async def send(
    pool: Pool, target: SmtpUpstream, sender: str, rcpt: str = "one@example.org"
) -> DeliveryResult:
    return await smtp.send(target, sender, [rcpt], MESSAGE, pool=pool)


def transactions(conn: Conn) -> list[list[str]]:
    """The commands of each transaction: from the first command after the previous DATA."""
    chunks: list[list[str]] = [[]]
    for verb in conn.commands:
        chunks[-1].append(verb)
        if verb == "DATA":
            chunks.append([])
    return chunks


# --- reuse ------------------------------------------------------------------------


async def test_sequential_messages_share_one_connection_with_rset_between(
    pipelining: bool,
) -> None:
    with running(Recorder(pipelining=pipelining)) as (rec, port):
        target = upstream(port)
        for n in range(5):
            await deliver(target, f"m{n}@platform.example", ["one@example.org"], MESSAGE)
        await close_default_pool()
        await eventually(lambda: rec.connections[0].closed)
    (conn,) = rec.connections
    assert conn.messages == [f"m{n}@platform.example" for n in range(5)]
    first, *later, tail = transactions(conn)
    assert first == ["EHLO", "MAIL", "RCPT", "DATA"]
    assert later == [["RSET", "MAIL", "RCPT", "DATA"]] * 4
    assert tail == ["QUIT"]


async def test_attempt_uses_the_default_pool_too(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    for _ in range(3):
        result = await attempt(upstream(port), "b@p.example", ["one@example.org"], MESSAGE)
        assert result.replies["one@example.org"][0] == 250
    assert default_pool().idle_count() == 1
    await close_default_pool()
    assert len(rec.connections) == 1


async def test_a_connection_counts_as_open_from_its_taking_to_its_return(
    pool: Pool, sink: tuple[Recorder, int]
) -> None:
    """Between two transactions (idle, or tried with RSET) a worker's one
    connection to a smarthost counted for nothing, and the 421 its limit gave a
    second connection then suspended the upstream it was delivering to."""
    _, port = sink
    target = upstream(port)
    key = PoolKey.of(target, None)
    assert pool.open_count(key) == 0
    await send(pool, target, "a@platform.example")
    assert pool.open_count(key) == 1  # idle
    async with pool.lease(key, functools.partial(smtp.connect, target, None), 5.0):
        assert pool.open_count(key) == 1  # taken, RSET, in a transaction
    assert pool.open_count(key) == 1


async def test_clean_refusal_keeps_the_connection(pool: Pool, pipelining: bool) -> None:
    rec = Recorder(refuse={"gone@example.org": "550 5.1.1 no such user"}, pipelining=pipelining)
    with running(rec) as (_, port):
        with pytest.raises(UpstreamError) as failed:
            await send(pool, upstream(port), "b@p.example", "gone@example.org")
        assert failed.value.line == "550 5.1.1 no such user"
        await send(pool, upstream(port), "b@p.example")
        await pool.close()
    (conn,) = rec.connections
    assert conn.messages == ["b@p.example"]


async def test_a_refused_message_after_a_refused_recipient_keeps_the_connection(
    pool: Pool, pipelining: bool
) -> None:
    """The DATA refusal comes wrapped with the RCPT refusal before it; the
    connection is in step all the same, and the next message takes it."""
    rec = Recorder(
        refuse={"gone@example.org": "550 5.1.1 no such user"},
        pipelining=pipelining,
        data_reply="554 5.7.1 content refused",
    )
    with running(rec) as (_, port):
        with pytest.raises(UpstreamError):
            await smtp.send(
                upstream(port), "a@p.example", ["one@example.org", "gone@example.org"],
                MESSAGE, pool=pool,
            )  # fmt: skip
        await send(pool, upstream(port), "b@p.example")
        await pool.close()
    (conn,) = rec.connections
    assert conn.messages == ["a@p.example", "b@p.example"]


async def test_timeout_closes_the_connection_instead_of_reusing_it(
    pool: Pool, pipelining: bool
) -> None:
    rec = Recorder(delay=1.0, pipelining=pipelining)
    with running(rec) as (_, port):
        slow = upstream(port, timeout=5.0, data_timeout=0.3)
        with pytest.raises(UpstreamError) as failed:
            await send(pool, slow, "b@p.example")
        assert "no reply to the end of the message within 0.3s" in failed.value.text
        assert pool.idle_count() == 0
        rec.delay = 0.0
        await send(pool, upstream(port), "b@p.example")
        await pool.close()
    assert len(rec.connections) == 2
    assert rec.connections[1].commands[0] == "EHLO"


async def test_cancelled_transaction_closes_the_connection(pool: Pool, pipelining: bool) -> None:
    rec = Recorder(delay=60.0, pipelining=pipelining)  # no reply before the cancel, however slow
    with running(rec) as (_, port):
        task = asyncio.create_task(send(pool, upstream(port), "b@p.example"))
        await eventually(lambda: bool(rec.connections) and "DATA" in rec.connections[0].commands)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pool.idle_count() == 0
        await eventually(lambda: rec.connections[0].closed)


# --- isolation --------------------------------------------------------------------


def tenant(tmp_path: Path, port: int, user: str, password: str, **kwargs: Any) -> SmtpUpstream:
    secret = tmp_path / f"{user}.password"
    secret.write_text(password + "\n")
    return upstream(port, name=user, username=user, password_file=secret, **kwargs)


async def test_tenants_never_share_a_connection(tmp_path: Path, pool: Pool) -> None:
    with running(authenticator=authenticator, auth_require_tls=False) as (rec, port):
        acme = tenant(tmp_path, port, "acme", "acme-pw")
        globex = tenant(tmp_path, port, "globex", "globex-pw")
        for n in range(4):
            for target in (acme, globex):
                sender = f"{target.username}-{n}@platform.example"
                await send(pool, target, sender)
        await asyncio.gather(
            *(
                send(pool, t, f"{t.username}-c{n}@platform.example")
                for n in range(3)
                for t in (acme, globex)
            )
        )
        await pool.close()
    carried = 0
    for conn in rec.connections:
        assert conn.login in PASSWORDS
        assert conn.commands.count("AUTH") == 1
        assert conn.commands.index("AUTH") < conn.commands.index("MAIL")
        for sender in conn.messages:
            assert sender.startswith(f"{conn.login}-")
        carried += len(conn.messages)
    assert carried == 14
    logins = sorted(c.login for c in rec.connections if c.login)
    assert logins.count("acme") >= 1 and logins.count("globex") >= 1
    sequential = [c for c in rec.connections if any("-0@" in m for m in c.messages)]
    assert sorted(len([m for m in c.messages if "-c" not in m]) for c in sequential) == [4, 4]


async def test_changed_password_opens_a_new_connection(tmp_path: Path, pool: Pool) -> None:
    with running(authenticator=authenticator, auth_require_tls=False) as (rec, port):
        before = tenant(tmp_path, port, "acme", "acme-pw")
        await send(pool, before, "old@platform.example")
        after = tenant(tmp_path, port, "acme", "acme-pw-2")
        await send(pool, after, "new@platform.example")
        await pool.close()
    assert [c.messages for c in rec.connections] == [
        ["old@platform.example"],
        ["new@platform.example"],
    ]
    assert all(c.commands.count("AUTH") == 1 for c in rec.connections)


def test_key_separates_credentials_and_hides_the_password(tmp_path: Path) -> None:
    base = upstream(25)
    keys = {
        PoolKey.of(base, None),
        PoolKey.of(upstream(25, username="acme"), "pw"),
        PoolKey.of(upstream(25, username="acme"), "pw2"),
        PoolKey.of(upstream(25, username="globex"), "pw"),
        PoolKey.of(upstream(25, tls=TlsMode.STARTTLS), None),
        PoolKey.of(upstream(26), None),
    }
    assert len(keys) == 6
    assert PoolKey.of(upstream(25, username="acme"), "pw") in keys
    assert "pw" not in repr(PoolKey.of(upstream(25, username="acme"), "pw"))


async def test_starttls_login_is_reused_encrypted(
    tmp_path: Path, pool: Pool, monkeypatch: pytest.MonkeyPatch, pipelining: bool
) -> None:
    certs = make_certs(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca))
    context = server_context(certs)
    recorder = Recorder(pipelining=pipelining)
    with running(recorder, tls_context=context, authenticator=authenticator) as (rec, port):
        target = tenant(tmp_path, port, "acme", "acme-pw", tls=TlsMode.STARTTLS)
        for n in range(3):
            await send(pool, target, f"acme-{n}@platform.example")
        await pool.close()  # before the sink stops: see the note in test_deliver.py
        await eventually(lambda: rec.connections[0].closed)
    (conn,) = rec.connections
    assert conn.commands.count("STARTTLS") == 1
    assert conn.commands.count("AUTH") == 1
    assert conn.login == "acme"
    assert conn.tls == [True, True, True]
    assert conn.commands.count("RSET") == 2


# --- stale connections ------------------------------------------------------------


async def test_connection_the_server_dropped_is_replaced(pool: Pool, pipelining: bool) -> None:
    with running(Recorder(drop=True, pipelining=pipelining)) as (rec, port):
        for n in range(3):
            await send(pool, upstream(port), f"m{n}@p.example")
            await eventually(lambda: rec.connections[-1].closed)
        await pool.close()
    assert [c.messages for c in rec.connections] == [
        ["m0@p.example"],
        ["m1@p.example"],
        ["m2@p.example"],
    ]


async def test_restarted_server_is_reconnected_without_a_failure(pool: Pool) -> None:
    port = free_port()
    with running(port=port) as (first, _):
        await send(pool, upstream(port), "a@p.example")
    assert pool.idle_count() == 1
    with running(port=port) as (second, _):
        await send(pool, upstream(port), "b@p.example")
        await pool.close()
    assert [c.messages for c in first.connections] == [["a@p.example"]]
    assert [c.messages for c in second.connections] == [["b@p.example"]]


@pytest.mark.parametrize("refusal", ["502 5.5.1 not now", "451 4.3.0 not now"])
async def test_refused_rset_means_stale_not_failed(
    pool: Pool, pipelining: bool, refusal: str
) -> None:
    """Any reply to RSET but its 250, a temporary one too: the message goes at
    once on a new connection, not after it on the one that refused it."""
    recorder = Recorder(rset_reply=refusal, pipelining=pipelining)
    with running(recorder) as (rec, port):
        for n in range(2):
            await send(pool, upstream(port), f"m{n}@p.example")
        await pool.close()
    first, second = rec.connections
    assert first.messages == ["m0@p.example"]
    assert transactions(first)[1][0] == "RSET"  # pipelined, the rest of its group came too
    assert second.messages == ["m1@p.example"]


async def test_a_421_to_mail_on_a_reused_connection_means_stale(
    pool: Pool, pipelining: bool
) -> None:
    """A server's limit of messages a connection: the message waited a whole retry
    interval, where a new connection takes it at once."""
    with running(Recorder(pipelining=pipelining)) as (rec, port):
        await send(pool, upstream(port), "m0@p.example")
        rec.mail_reply = "421 4.7.0 too many messages on this connection"
        await send(pool, upstream(port), "m1@p.example")
        await pool.close()
    first, second = rec.connections
    assert first.messages == ["m0@p.example"]
    assert second.messages == ["m1@p.example"]


async def test_a_451_to_mail_on_a_reused_connection_is_the_messages_deferral(
    pool: Pool, pipelining: bool
) -> None:
    """Only a 421 says the connection is done: a 451 (a sender's rate) is the
    server's answer to the message, which a new connection at once would only
    ask again."""
    with running(Recorder(pipelining=pipelining)) as (rec, port):
        await send(pool, upstream(port), "m0@p.example")
        rec.mail_reply = "451 4.7.1 Sender rate exceeded, try again later"
        with pytest.raises(UpstreamError) as failed:
            await send(pool, upstream(port), "m1@p.example")
        await pool.close()
    assert failed.value.line == "451 4.7.1 Sender rate exceeded, try again later"
    (only,) = rec.connections
    assert only.messages == ["m0@p.example"]


async def test_a_421_to_mail_then_a_hang_up_on_a_reused_connection_means_stale(
    pool: Pool, pipelining: bool
) -> None:
    """As RFC 5321 has a server do after its 421: the replies after it never
    come, and the refusal counted, where a new connection would take it."""
    transactions: list[list[bytes]] = []

    async def limited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen: list[bytes] = []
        transactions.append(seen)
        writer.write(b"220 limited ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            seen.append(verb)
            if verb == b"EHLO":
                offer = b"250-PIPELINING\r\n" if pipelining else b""
                writer.write(b"250-limited\r\n" + offer + b"250 8BITMIME\r\n")
            elif verb == b"MAIL" and seen.count(b"MAIL") > 1:
                writer.write(b"421 4.7.0 one message a connection\r\n")
                break
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                writer.write(b"250 2.0.0 queued\r\n")
            else:
                writer.write(b"221 bye\r\n" if verb == b"QUIT" else b"250 ok\r\n")
            await writer.drain()
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(limited, "127.0.0.1", free_port())
    port = server.sockets[0].getsockname()[1]
    try:
        for n in range(2):
            result = await send(pool, upstream(port), f"m{n}@p.example")
            assert result.reply.startswith("250"), result
        await pool.close()
    finally:
        server.close()
    assert [t.count(b"MAIL") for t in transactions] == [2, 1]


# --- idle timeout, close, limits --------------------------------------------------


async def test_idle_connection_gets_quit_after_the_idle_timeout(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    pool = Pool(idle_timeout=0.3)
    try:
        await send(pool, upstream(port), "a@p.example")
        assert pool.idle_count() == 1
        await eventually(lambda: rec.connections[0].closed)
        assert rec.connections[0].commands[-1] == "QUIT"
        assert pool.idle_count() == 0
        await send(pool, upstream(port), "b@p.example")
        assert len(rec.connections) == 2
    finally:
        await pool.close()


async def test_close_quits_every_idle_connection(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    rec.delay = 0.2
    pool = Pool()
    await asyncio.gather(*(send(pool, upstream(port), f"m{n}@p.example") for n in range(3)))
    assert pool.idle_count() == 3
    await pool.close()
    assert pool.idle_count() == 0
    await eventually(lambda: all(c.closed for c in rec.connections))
    assert len(rec.connections) == 3
    assert all(c.commands[-1] == "QUIT" for c in rec.connections)
    await send(pool, upstream(port), "late@p.example")
    assert pool.idle_count() == 0  # a closed pool keeps nothing


async def test_reuse_limit_opens_a_new_connection(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    pool = Pool(reuse_limit=2)
    try:
        for n in range(5):
            await send(pool, upstream(port), f"m{n}@p.example")
    finally:
        await pool.close()
    assert [len(c.messages) for c in rec.connections] == [2, 2, 1]
    assert all(c.commands[-1] == "QUIT" for c in rec.connections)


async def test_idle_connections_per_key_are_capped(sink: tuple[Recorder, int]) -> None:
    rec, port = sink
    rec.delay = 0.2
    pool = Pool(max_idle_per_key=2)
    try:
        await asyncio.gather(*(send(pool, upstream(port), f"m{n}@p.example") for n in range(5)))
        assert pool.idle_count() == 2
        await eventually(lambda: sum(c.closed for c in rec.connections) == 3)
    finally:
        await pool.close()


async def test_the_most_recently_used_idle_connection_goes_first(
    sink: tuple[Recorder, int], pool: Pool
) -> None:
    """So that the surplus ones of a burst age out: taken oldest first, each
    connection was used in turn, none ever idle long enough to be let go, and
    the upstream kept the whole burst's connections open."""
    rec, port = sink
    rec.delay = 0.3
    first = asyncio.ensure_future(send(pool, upstream(port), "m0@p.example"))
    await eventually(lambda: any("DATA" in c.commands for c in rec.connections))
    async with asyncio.timeout(10):
        await send(pool, upstream(port), "m1@p.example")  # on a second one, back last
        await first
        await send(pool, upstream(port), "m2@p.example")
    older, newer = rec.connections
    assert (older.messages, newer.messages) == (["m0@p.example"], ["m1@p.example", "m2@p.example"])


async def test_a_connection_greeted_with_another_ehlo_name_is_not_shared(
    sink: tuple[Recorder, int], pool: Pool
) -> None:
    """Two upstreams alike but for ``helo_name``: the second's mail went on a
    connection that had given the first's name, which its smarthost may not accept."""
    rec, port = sink
    for name in ("a.relay.example", "b.relay.example"):
        await send(pool, upstream(port, helo_name=name), f"m@{name}")
    assert [c.messages for c in rec.connections] == [["m@a.relay.example"], ["m@b.relay.example"]]


# --- concurrency ------------------------------------------------------------------


async def test_concurrent_sends_each_get_their_own_connection(
    sink: tuple[Recorder, int], pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec, port = sink
    rec.delay = 0.5
    leased: set[int] = set()
    lease = pool.lease

    @contextlib.asynccontextmanager
    async def watched(*args: Any) -> AsyncIterator[aiosmtplib.SMTP]:
        async with lease(*args) as client:
            assert id(client) not in leased, "one connection in two transactions"
            leased.add(id(client))
            try:
                yield client
            finally:
                leased.discard(id(client))

    monkeypatch.setattr(pool, "lease", watched)

    async def burst(tag: str, count: int, stagger: float) -> None:
        async def one(n: int) -> None:
            await asyncio.sleep(n * stagger)
            await send(pool, upstream(port), f"{tag}{n}@p.example")

        await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(count))), 10)

    started = time.monotonic()
    await burst("a", 10, 0.0)
    assert time.monotonic() - started < 3.5  # ten 0.5 s transactions side by side, not in a row
    assert len(rec.connections) == 10
    assert all(len(c.messages) == 1 for c in rec.connections)
    # Arriving one by one while the others are still busy: ten take the idle connections,
    # the other five must open their own rather than join a busy one.
    await burst("b", 15, 0.01)
    assert len(rec.connections) == 15
    assert sorted(len(c.messages) for c in rec.connections) == [1] * 5 + [2] * 10
    assert pool.opened == 15
    assert pool.idle_count() == 10


async def test_default_pool_belongs_to_the_running_loop() -> None:
    pool = default_pool()
    assert default_pool() is pool
    await close_default_pool()
    assert default_pool() is not pool
    await close_default_pool()


# --- a connection limit -----------------------------------------------------------


class LimitedSMTP(ConnectionLimit, RecordingSMTP):
    limit = 0


class LimitedController(RecordingController):
    def factory(self) -> SMTP:
        return LimitedSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def limited(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    port = free_port()
    controller = LimitedController(Recorder(), hostname="127.0.0.1", port=port, ready_timeout=10)
    controller.start()
    deadline = time.monotonic() + 5
    while LimitedSMTP.active and time.monotonic() < deadline:  # the controller's readiness probe
        time.sleep(0.01)
    assert not LimitedSMTP.active
    monkeypatch.setattr(LimitedSMTP, "taken", 0)
    try:
        yield port
    finally:
        controller.stop()


async def burst(pool: Pool, port: int, count: int, **settings: Any) -> list[object]:
    """Each send's result or error, in the order they were started, one every 50 ms."""

    async def one(n: int) -> object:
        await asyncio.sleep(n * 0.05)
        try:
            return await send(pool, upstream(port, **settings), f"s{n}@p.example")
        except UpstreamError as exc:
            return exc

    return await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(count))), 10)


async def test_a_login_refused_for_now_while_another_connection_is_open_is_no_limit(
    tmp_path: Path, pool: Pool
) -> None:
    """Only a 421 is what a smarthost answers one connection too many: a 454 to
    the login is about the login, and taken for the limit the upstream was
    neither suspended nor its login failure said as one."""
    logins: list[bool] = []

    def first_only(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        logins.append(not logins)
        if logins[-1]:
            return AuthResult(success=True, handled=False, auth_data=data)
        return AuthResult(
            success=False, handled=False, message="454 4.7.0 Temporary authentication failure"
        )

    with running(authenticator=first_only, auth_require_tls=False) as (rec, port):
        rec.delay = 0.5
        target = tenant(tmp_path, port, "acme", "acme-pw")
        first = asyncio.ensure_future(send(pool, target, "m0@p.example"))
        await eventually(lambda: any("DATA" in c.commands for c in rec.connections))
        async with asyncio.timeout(10):
            with pytest.raises(UpstreamError) as failed:
                await send(pool, target, "m1@p.example")
            await first
        await pool.close()
    assert type(failed.value) is Unreachable
    assert "454 4.7.0 Temporary authentication failure" in failed.value.text


async def test_a_421_while_another_connection_is_greeted_is_the_connection_limit(
    limited: int, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 421s of a cold burst came while its accepted connection was still being
    greeted: with none of this pool's connections open yet, the smarthost's
    connection limit read as the smarthost down, and it was suspended."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    monkeypatch.setattr(LimitedSMTP, "delays", (0.5,))
    first, *others = await burst(pool, limited, 3)
    assert isinstance(first, DeliveryResult), first
    assert [type(r) for r in others] == [Crowded, Crowded], others


async def test_a_crowded_attempt_is_no_reach_of_its_upstream(
    limited: int, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connection too many says nothing of whether the upstream is there:
    taken for a reach, it showed a suspended upstream as no longer held in the
    metrics, its mail still held."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    monkeypatch.setattr(LimitedSMTP, "delays", (0.5,))
    monkeypatch.setattr(smtp, "default_pool", lambda: pool)
    counts = Tally(1)
    row = counts.row(0)
    send = counted(attempt, row)
    target = upstream(limited)
    first = asyncio.ensure_future(send(target, "a@p.example", ["one@example.org"], MESSAGE))
    await asyncio.sleep(0.03)
    row.suspended(target.name, True)  # after the first began, before the second
    await asyncio.sleep(0.03)
    async with asyncio.timeout(10):
        second = await send(target, "b@p.example", ["two@example.org"], MESSAGE)
        taken = await first
    assert second.crowded
    assert taken.replies["one@example.org"][0] == 250
    assert counts.holding(target.name) == 1


async def test_421s_to_connections_opened_side_by_side_are_the_upstream_down(
    limited: int, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the others being opened must not make an upstream that refuses
    every connection look crowded: their 421s say it is down too."""
    monkeypatch.setattr(LimitedSMTP, "delays", (0.5, 0.3, 0.0))
    results = await burst(pool, limited, 3)
    assert [type(r) for r in results] == [Unreachable] * 3, results


async def test_the_verdict_waits_for_a_greeting_and_ehlo_slower_than_one_timeout(
    limited: int, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step of opening has its own timeout: a wait of one timeout for the
    connection the smarthost took ended before its slow EHLO was answered."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    monkeypatch.setattr(LimitedSMTP, "delays", (0.7,))
    monkeypatch.setattr(LimitedSMTP, "ehlo_delay", 0.7)
    first, *others = await burst(pool, limited, 2, timeout=1.0)
    assert isinstance(first, DeliveryResult), first
    assert [type(r) for r in others] == [Crowded], others


async def test_the_verdict_comes_with_the_first_connection_that_opens(
    limited: int, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refused one kept its delivery slot until the slowest of those being
    opened had opened too, where the first to open had said it."""
    monkeypatch.setattr(LimitedSMTP, "limit", 2)
    monkeypatch.setattr(LimitedSMTP, "delays", (0.3, 5.0))
    ended: dict[int, float] = {}

    async def timed(n: int) -> object:
        await asyncio.sleep(n * 0.05)
        try:
            return await send(pool, upstream(limited, timeout=10.0), f"s{n}@p.example")
        except UpstreamError as exc:
            return exc
        finally:
            ended[n] = time.monotonic()

    results = await asyncio.wait_for(asyncio.gather(*(timed(n) for n in range(3))), 20)
    assert [type(r) for r in results] == [DeliveryResult, DeliveryResult, Crowded], results
    assert ended[2] < ended[1] - 3, ended  # the refused one ended long before the slow one


class Freezing:
    """A smarthost that takes the first connection's message and then freezes: it
    never answers the end of it, and says nothing to the connections after it
    (``later``: or answers them "421" or "554", hangs up on them before a
    greeting, "hang-up", or takes none, "refused")."""

    def __init__(self, later: str = "silent") -> None:
        self.later = later
        self.frozen = asyncio.Event()
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.held: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.held.append(writer)
        if self.connections > 1:
            if self.later == "421":
                writer.write(b"421 4.7.0 Too many connections\r\n")
            if self.later == "554":
                writer.write(b"554 5.7.1 No SMTP service here\r\n")
            if self.later in ("421", "554", "hang-up"):
                writer.close()
            return
        if self.later == "refused":
            assert self.server is not None
            self.server.close()  # the connections after this one are refused
        writer.write(b"220 freezing ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                self.frozen.set()
                return
            writer.write(b"250 freezing\r\n" if verb == b"EHLO" else b"250 ok\r\n")


@contextlib.asynccontextmanager
async def hung(pool: Pool, later: str, timeout: float) -> AsyncIterator[int]:
    """The port of a ``Freezing`` smarthost whose first connection, this pool's,
    is hung waiting for the reply to its message."""
    host, port = Freezing(later), free_port()
    host.server = await asyncio.start_server(host.serve, "127.0.0.1", port)
    target = upstream(port, timeout=timeout, data_timeout=30.0)
    first = asyncio.create_task(send(pool, target, "a@p.example"))
    try:
        await asyncio.wait_for(host.frozen.wait(), 5)
        yield port
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        for writer in host.held:
            writer.close()
        host.server.close()


async def test_a_host_frozen_mid_transaction_times_out_as_down_not_crowded(pool: Pool) -> None:
    """Its hung transaction kept a connection open: every new connection that timed
    out was taken for one over the connection limit, and the upstream was never
    suspended until the transaction's ``data_timeout`` ended."""
    async with hung(pool, "silent", timeout=0.5) as port:
        assert pool.open_count(PoolKey.of(upstream(port), None)) == 1
        with pytest.raises(Unreachable) as down:
            await asyncio.wait_for(send(pool, upstream(port, timeout=0.5), "b@p.example"), 5)
    assert not isinstance(down.value, Crowded)
    assert "no answer within 0.5s (connecting)" in down.value.text


@pytest.mark.parametrize("later", ["421", "hang-up", "refused"])
async def test_a_refusal_like_a_limit_is_the_limit_while_a_connection_is_open(
    pool: Pool, later: str
) -> None:
    """Only a host that is there refuses as a limit does, whatever its open
    connection is waiting for: a smarthost at its limit that takes seconds
    over each message's end (content scanning) hears nothing on them meanwhile,
    and taken for down, it held all mail a ``first_retry``."""
    async with hung(pool, later, timeout=1.0) as port:
        await asyncio.sleep(1.5)
        with pytest.raises(UpstreamError) as refused:
            await asyncio.wait_for(send(pool, upstream(port, timeout=1.0), "b@p.example"), 5)
    assert type(refused.value) is Crowded, refused.value


async def test_a_greeting_refused_for_good_is_no_limit_while_a_connection_is_open(
    pool: Pool,
) -> None:
    """Only a 421 is the refusal a connection limit gives: a 554 at the greeting
    refuses every connection alike, and taken for the limit, the upstream was
    tried again every few seconds and never suspended."""
    async with hung(pool, "554", timeout=1.0) as port:
        with pytest.raises(Unreachable) as refused:
            await asyncio.wait_for(send(pool, upstream(port, timeout=1.0), "b@p.example"), 5)
    assert not isinstance(refused.value, Crowded)
    assert "554 5.7.1 No SMTP service here (connecting)" in refused.value.text


async def test_a_stop_while_a_refusal_waits_for_its_verdict_says_nothing_left(
    pool: Pool,
) -> None:
    """Cut off while ``_crowded`` waited for a connection opening alongside, the
    cancellation came out of the handler unmarked, and the engine recorded
    that the message may arrive twice: none of it had left."""
    greeted = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if greeted.is_set():
            writer.write(b"421 4.7.0 Too many connections\r\n")
            writer.close()
            return
        greeted.set()
        await asyncio.sleep(5)  # the first is greeted slowly
        writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    target = upstream(port, timeout=10.0)
    first = asyncio.create_task(send(pool, target, "a@p.example"))
    second = None
    try:
        await asyncio.wait_for(greeted.wait(), 5)
        second = asyncio.create_task(send(pool, target, "b@p.example"))
        await asyncio.sleep(0.5)  # its 421 in, it waits for the first's verdict
        assert not second.done()
        second.cancel()
        with pytest.raises(asyncio.CancelledError) as cut:
            await second
        assert not sent_in_full(cut.value)
    finally:
        for task in (first, second):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        server.close()


class ShiftedByOne:
    """Takes a first message; answers the second's group with one reply more,
    each reply in a write of its own (the 354 comes last, after DATA was
    taken as refused), and reads the RSET after it as the message's text."""

    def __init__(self) -> None:
        self.messages = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 s ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-s\r\n250 PIPELINING\r\n")
            elif verb == b"RSET" and self.messages == 1:
                self.messages += 1
                for _ in range(4):  # MAIL, RCPT, RCPT, DATA
                    await reader.readline()
                replies = (b"250 rset", b"250 EXTRA", b"250 mail", b"250 one", b"550 two", b"354")
                for reply in replies:
                    writer.write(reply + b"\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                await reader.read(65536)
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                while await reader.readline() not in (b".\r\n", b""):
                    pass
                self.messages += 1
                writer.write(b"250 queued\r\n")
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


async def test_an_rset_answered_out_of_step_after_a_refusal_is_not_reused() -> None:
    """The RSET after a refusal went into the message the server was still
    reading, and its late 354 passed for the RSET's answer: the connection
    went back to the pool, and the next message waited a whole timeout."""
    host, port = ShiftedByOne(), free_port()
    server = await asyncio.start_server(host.serve, "127.0.0.1", port)
    pool = Pool(max_idle_per_key=1)
    target = upstream(port, timeout=5.0)
    rcpts = ["one@p.example", "two@p.example"]
    try:
        await smtp.send(target, "s@p.example", rcpts, MESSAGE, pool=pool)
        with pytest.raises(UpstreamError):
            await smtp.send(target, "s@p.example", rcpts, MESSAGE, pool=pool)
        assert pool.idle_count() == 0
    finally:
        server.close()
        await pool.close()


# --- the other workers' connections -------------------------------------------


@pytest.fixture
async def workers() -> AsyncIterator[tuple[Pool, Pool]]:
    """Two workers' pools, counting their connections in one shared table."""
    table = ClientCounts(2)
    made = Pool(shared=table.row(0)), Pool(shared=table.row(1))
    yield made
    for each in made:
        await each.close()


async def test_a_421_while_another_workers_connection_fills_the_limit_is_the_limit(
    limited: int, workers: tuple[Pool, Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker counted only its own connections: one refused over a limit the
    other worker's idle connection filled took the smarthost for down."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    first, second = workers
    assert isinstance(await send(first, upstream(limited), "a@p.example"), DeliveryResult)
    assert first.idle_count() == 1
    with pytest.raises(Crowded):
        await send(second, upstream(limited), "b@p.example")
    await first.close()  # its connection no longer counts: a 421 now is the host down
    monkeypatch.setattr(LimitedSMTP, "limit", 0)
    with pytest.raises(Unreachable) as down:
        await send(second, upstream(limited), "c@p.example")
    assert not isinstance(down.value, Crowded)


async def test_a_421_while_another_worker_greets_its_connection_waits_for_it(
    limited: int, workers: tuple[Pool, Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold burst over two workers: one worker's 421 came while the connection
    the smarthost took, the other worker's, was still being greeted."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    monkeypatch.setattr(LimitedSMTP, "delays", (0.5,))
    first, second = workers

    async def later() -> object:
        await asyncio.sleep(0.1)
        try:
            return await send(second, upstream(limited), "b@p.example")
        except UpstreamError as exc:
            return exc

    took, refused = await asyncio.wait_for(
        asyncio.gather(send(first, upstream(limited), "a@p.example"), later()), 10
    )
    assert isinstance(took, DeliveryResult), took
    assert isinstance(refused, Crowded), refused


async def test_421s_to_both_workers_side_by_side_are_the_upstream_down(
    limited: int, workers: tuple[Pool, Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting for the other worker's opening must not make an upstream that
    refuses every connection look crowded."""
    monkeypatch.setattr(LimitedSMTP, "delays", (0.5, 0.1))

    async def one(pool: Pool, wait: float) -> object:
        await asyncio.sleep(wait)
        try:
            return await send(pool, upstream(limited), "a@p.example")
        except UpstreamError as exc:
            return exc

    results = await asyncio.wait_for(asyncio.gather(one(workers[0], 0.0), one(workers[1], 0.1)), 10)
    assert [type(r) for r in results] == [Unreachable, Unreachable], results


async def test_a_worker_refused_over_the_others_idle_connections_gets_one_of_them(
    limited: int, workers: tuple[Pool, Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker's idle connections are its own: the last worker of a burst held
    the whole limit idle for ``idle_timeout``, and the other's mail was refused
    all that time."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    monkeypatch.setattr(pool_module, "WANTED_LOOK", 0.1)
    first, second = workers
    assert isinstance(await send(first, upstream(limited), "a@p.example"), DeliveryResult)
    with pytest.raises(Crowded):
        await send(second, upstream(limited), "b@p.example")
    await eventually(lambda: first.idle_count() == 0, timeout=3)
    await eventually(lambda: not LimitedSMTP.active, timeout=3)
    assert isinstance(await send(second, upstream(limited), "b@p.example"), DeliveryResult)
    # its want ends with the connection it opened, and frees its place in the table
    assert first.shared is not None
    label = pool_module._label(PoolKey.of(upstream(limited), None))
    assert first.shared.latest_elsewhere(pool_module.WANTED, label) == 0


async def test_one_want_is_given_one_connection_whatever_the_workers(
    limited: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker kept its own mark of the wants it had served: every other
    worker QUIT a connection for the same one, three for one with four workers."""
    monkeypatch.setattr(LimitedSMTP, "limit", 2)
    monkeypatch.setattr(pool_module, "WANTED_LOOK", 0.05)
    table = ClientCounts(3)
    first, second, third = (Pool(shared=table.row(i)) for i in range(3))
    try:
        for n, holder in enumerate((first, second)):
            sent = await send(holder, upstream(limited), f"h{n}@p.example")
            assert isinstance(sent, DeliveryResult)
        with pytest.raises(Crowded):
            await send(third, upstream(limited), "c@p.example")
        await eventually(lambda: first.idle_count() + second.idle_count() < 2, timeout=3)
        await asyncio.sleep(0.5)  # ten looks more
        assert first.idle_count() + second.idle_count() == 1
    finally:
        for each in (first, second, third):
            await each.close()


async def test_a_want_a_full_row_cannot_mark_served_closes_nothing(
    limited: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no room for the mark, each look of the reaper closed one more idle
    connection for the same want, until none was left."""
    monkeypatch.setattr(LimitedSMTP, "limit", 2)
    monkeypatch.setattr(pool_module, "WANTED_LOOK", 0.05)
    monkeypatch.setattr(clientlimit, "SLOTS", 8)
    table = ClientCounts(2)
    first, second = Pool(shared=table.row(0)), Pool(shared=table.row(1))
    try:
        sent = await asyncio.gather(
            *(send(first, upstream(limited), f"h{n}@p.example") for n in range(2))
        )
        assert all(isinstance(s, DeliveryResult) for s in sent) and first.idle_count() == 2
        row = table.row(0)
        n = 0
        while row.enter("local", f"192.0.2.{n}"):  # the clients fill the worker's row
            n += 1
        with pytest.raises(Crowded):
            await send(second, upstream(limited), "c@p.example")
        await asyncio.sleep(0.5)  # ten looks
        assert first.idle_count() == 2
    finally:
        for each in (first, second):
            await each.close()


async def test_refused_at_one_address_and_unanswered_at_the_other_is_no_limit(
    pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a host that refuses at every address it has may be one at its limit:
    a smarthost whose second address drops packets is down there, and taken
    for crowded, its mail waited for a connection rather than the upstream
    being suspended. The system resolver here has no name with two addresses,
    so the loop's lookup gives them; the connections are real."""
    host, port = Freezing("refused"), free_port()
    host.server = await asyncio.start_server(host.serve, "127.0.0.1", port)
    hole = socket.socket()
    hole.bind(("127.0.0.3", 0))
    hole.listen(0)
    filling = socket.create_connection(hole.getsockname(), timeout=5)  # the next one hangs
    stream = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")

    async def lookup(name: str, _port: int, **_: object) -> list:
        assert name == "smarthost.example"
        return [(*stream, ("127.0.0.1", port)), (*stream, hole.getsockname())]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", lookup)
    target = upstream(port, host="smarthost.example", timeout=1.0, data_timeout=30.0)
    first = asyncio.create_task(send(pool, target, "a@p.example"))
    try:
        await asyncio.wait_for(host.frozen.wait(), 5)
        assert pool.open_count(PoolKey.of(target, None)) == 1
        with pytest.raises(Unreachable) as down:
            await asyncio.wait_for(send(pool, target, "b@p.example"), 5)
    finally:
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        for writer in host.held:
            writer.close()
        host.server.close()
        filling.close()
        hole.close()
    assert not isinstance(down.value, Crowded)
    assert down.value.text == (
        f"Upstream smarthost (smarthost.example:{port}): 127.0.0.1: Connection refused;"
        " 127.0.0.3: no answer within 1s (connecting)"
    )


async def test_another_logins_connections_leave_a_logins_limit_alone(
    tmp_path: Path, workers: tuple[Pool, Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A smarthost's limit is counted per login (Microsoft 365 counts it per
    mailbox): one tenant's idle connection in one worker does not make a 421
    to another tenant's login, in the other worker, the limit. Counted
    together, that tenant's upstream was never suspended, its mail waiting
    on a connection that could never be its own."""
    monkeypatch.setattr(LimitedSMTP, "limit", 1)
    port = free_port()
    controller = LimitedController(
        Recorder(),
        hostname="127.0.0.1",
        port=port,
        ready_timeout=10,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    controller.start()
    try:
        await eventually(lambda: not LimitedSMTP.active)  # the controller's readiness probe
        first, second = workers
        acme = tenant(tmp_path, port, "acme", "acme-pw")
        globex = tenant(tmp_path, port, "globex", "globex-pw")
        assert isinstance(await send(first, acme, "a@p.example"), DeliveryResult)
        assert first.idle_count() == 1
        assert second.open_anywhere(PoolKey.of(acme, "acme-pw")) == 1
        assert second.open_anywhere(PoolKey.of(globex, "globex-pw")) == 0
        with pytest.raises(Unreachable) as refused:
            await send(second, globex, "b@p.example")
    finally:
        controller.stop()
    assert not isinstance(refused.value, Crowded)
    assert "421 4.7.0 Too many connections" in refused.value.text
