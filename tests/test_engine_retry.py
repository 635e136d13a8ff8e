"""Retries and their end: the last attempt comes at the queue lifetime and an
entry expires only when that attempt fails too; a deferral the spool cannot
store keeps its backoff in memory; a stop that cuts attempts off says so."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import socket
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from relay import engine as engine_module
from relay import slots
from relay.audit import AuditLog, reader
from relay.clocksteps import ClockSteps
from relay.deliver import attempt
from relay.engine import Attempt, Engine, Outcome, backoff, duration
from relay.policy.model import Policy, SuppressionSettings, Tenant
from relay.record import Recorder
from relay.spool import PENDING, QueueEntry, RecipientState, Spool, SpoolError, tools
from relay.suppression import MANUAL, Suppression, SuppressionFile
from relay.suppression import now as suppression_now
from relay.upstream import smtp
from relay.upstream.pool import Pool
from tests.readonly import read_only
from tests.sink import free_port
from tests.spoolkit import make_entry
from tests.test_deliver import upstream
from tests.test_engine_settle import outcomes, until
from tests.test_engine_warm import message, running
from tests.test_upstream_sending import BIG, END, WAIT, Hostile, at_once, only_once_given_up

BUSY = (451, "451 4.2.0 mailbox busy")


class Upstream:
    """Answers every recipient with ``answer``, switched by the test; counts attempts."""

    def __init__(self, answer: tuple[int, str] = BUSY) -> None:
        self.answer = answer
        self.attempts = 0

    async def __call__(
        self, target: Any, sender: str, rcpts: Any, data: bytes, **_: Any
    ) -> Attempt:
        self.attempts += 1
        return Attempt(dict.fromkeys(rcpts, self.answer))


def with_queue(policy: Policy, **settings: float) -> Policy:
    return dataclasses.replace(policy, queue=dataclasses.replace(policy.queue, **settings))


def records(audit: Path, queue_id: str) -> list[tuple[str, str]]:
    return [
        (r["event"], r.get("reply", ""))
        for r in reader.records(audit)
        if r.get("queue_id") == queue_id and r.get("recipient") == "customer@example.net"
    ]


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (40, "40 seconds"),
        (1, "1 second"),
        (90 * 60, "90 minutes"),
        (4 * 3600, "4 hours"),
        (36 * 3600, "36 hours"),
        (86400, "1 day"),
        (5 * 86400, "5 days"),
    ],
)
def test_a_lifetime_reads_as_people_say_it(seconds: float, said: str) -> None:
    assert duration(seconds) == said


def test_the_wait_doubles_from_first_retry_up_to_max_retry_give_or_take_a_tenth(
    policy: Policy,
) -> None:
    """As docs/queue.md says it: the n-th failed attempt waits ``first_retry``
    times 2 to the n-1, at most ``max_retry``, and 10% more or less."""
    queue = with_queue(policy, first_retry=60, max_retry=1000).queue
    waits = [backoff(queue, attempts, lambda: 0.5) for attempts in range(1, 7)]
    assert waits == pytest.approx([60, 120, 240, 480, 960, 1000])
    assert backoff(queue, 2, lambda: 0.0) == pytest.approx(108)
    assert backoff(queue, 2, lambda: 1.0) == pytest.approx(132)


async def test_the_last_attempt_comes_at_the_lifetime_and_may_still_deliver(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """An upstream back in the last stretch of the lifetime used to see its mail
    bounced anyway: the next attempt was planned past the lifetime, and an entry
    due after it expired without one more try."""
    now = [time.time()]
    audit = AuditLog(tmp_path / "audit")
    upstream = Upstream()
    queue = with_queue(policy, first_retry=30, max_retry=3600, lifetime=40)
    engine = Engine(spool, lambda: queue, upstream, Recorder(audit), clock=lambda: now[0])
    entry = make_entry(arrival=now[0] - 20, size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert spool.load(entry.queue_id).next_attempt == entry.arrival + 40  # not 27-33 s on
    now[0] = entry.arrival + 41  # a moment late, as the loop is
    upstream.answer = (250, "250 2.0.0 ok")
    assert (await engine.attempt_now(entry.queue_id)).status == "delivered"
    await engine.stop(5)
    assert [event for event, _ in records(audit.directory, entry.queue_id)] == [
        "deferred",
        "delivered",
    ]


async def test_a_delivery_says_in_the_audit_log_how_many_attempts_it_took(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    audit = AuditLog(tmp_path / "audit")
    now = [time.time()]
    upstream = Upstream()
    queue = with_queue(policy, first_retry=30, max_retry=60)
    engine = Engine(spool, lambda: queue, upstream, Recorder(audit), clock=lambda: now[0])
    entry = make_entry(arrival=now[0], size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    now[0] += 60
    upstream.answer = (250, "250 2.0.0 ok")
    assert (await engine.attempt_now(entry.queue_id)).status == "delivered"
    await engine.stop(5)
    delivered = [r for r in reader.records(audit.directory) if r["event"] == "delivered"]
    assert {r["recipient"]: r["attempts"] for r in delivered} == {
        "customer@example.net": 2,
        "archive@acme.example": 2,
    }


@pytest.mark.parametrize("reply", ["500 5.5.2 Syntax error", "550 5.1.1 No such user"])
async def test_any_5xx_fails_the_recipient_at_once(
    spool: Spool, policy: Policy, tmp_path: Path, reply: str
) -> None:
    audit = AuditLog(tmp_path / "audit")
    upstream = Upstream((int(reply[:3]), reply))
    engine = Engine(spool, lambda: policy, upstream, Recorder(audit))
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "failed"
    await engine.stop(5)
    assert records(audit.directory, entry.queue_id) == [("failed", reply)]


async def test_an_entry_expires_when_its_last_attempt_fails_and_says_so_plainly(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """The reason reaches the sender's notice: it read "within 0.000462963 days";
    and the audit log, which named no reply, so the last one it had was a
    deferral's, not the one that ended the message."""
    audit = AuditLog(tmp_path / "audit")
    upstream = Upstream()
    queue = with_queue(policy, lifetime=40)
    engine = Engine(spool, lambda: queue, upstream, Recorder(audit))
    entry = make_entry(arrival=time.time() - 41, size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "failed"
    await engine.stop(5)
    assert upstream.attempts == 1
    reason = "not delivered within 40 seconds; last reply: 451 4.2.0 mailbox busy"
    assert records(audit.directory, entry.queue_id) == [("expired", reason)]
    (notice,) = spool.ids()
    text = message_from_bytes(spool.read_message(notice), policy=default).get_content()
    assert reason in text


async def test_a_last_attempt_that_fails_right_at_the_lifetime_expires_the_entry(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """The last attempt is planned for the lifetime itself: failing then, it is the
    last, not deferred for one more try past the lifetime."""
    audit = AuditLog(tmp_path / "audit")
    upstream = Upstream()
    queue = with_queue(policy, lifetime=40)
    entry = make_entry(arrival=time.time() - 40, size=len(message(1)))
    clock = entry.arrival + 40
    engine = Engine(spool, lambda: queue, upstream, Recorder(audit), clock=lambda: clock)
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "failed"
    await engine.stop(5)
    assert [event for event, _ in records(audit.directory, entry.queue_id)] == ["expired"]


async def test_a_failure_notice_that_expires_says_the_sender_was_never_told(
    spool: Spool, policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    """A notice gets no notice in turn: this error line is the sysadmin's only
    word that the sender of the failed document never heard of it."""
    upstream = Upstream()
    queue = with_queue(policy, lifetime=40)
    engine = Engine(spool, lambda: queue, upstream, Recorder(None))
    notice = make_entry(
        arrival=time.time() - 41,
        size=len(message(1)),
        mail_from="",
        recipients=[RecipientState("alice@acme.example", PENDING, notify=False)],
        is_notice=True,
        about="25YKSORIGINAL001",
    )
    assert spool.put_many([(notice, (message(1),))]) == [None]
    assert (await engine.attempt_now(notice.queue_id)).status == "failed"
    await engine.stop(5)
    assert upstream.attempts == 1 and spool.ids() == []
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert said == [
        f"25YKSORIGINAL001: the sender was not told: failure notice {notice.queue_id} to"
        " <alice@acme.example> expired (not delivered within 40 seconds; last reply:"
        " 451 4.2.0 mailbox busy)"
    ]


async def test_a_clock_set_forward_past_the_lifetime_expires_nothing_queued_before_it(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Set six days ahead (``date -s`` with a slip), the clock expired a message
    deferred seconds before at its next try, and its sender was told it had
    not been delivered within 5 days. Time that passed still expires it, and
    a step set right counts for nothing."""
    now, boot = [time.time()], [1000.0]
    audit = AuditLog(tmp_path / "audit")
    upstream = Upstream()
    engine = Engine(
        spool,
        lambda: policy,
        upstream,
        Recorder(audit),
        clock=lambda: now[0],
        steps=ClockSteps(lambda: now[0], lambda: boot[0]),
    )
    lifetime = policy.queue.lifetime
    entry = make_entry(arrival=now[0] - 5, size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    now[0] += 6 * 86400
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert "the clock was set forward by 6 days" in caplog.text
    later = make_entry(arrival=now[0] - lifetime - 1, size=len(message(2)))  # came after it
    assert spool.put_many([(later, (message(2),))]) == [None]
    assert (await engine.attempt_now(later.queue_id)).status == "failed"
    now[0] -= 6 * 86400  # set right; then the lifetime passes, and its retries' waits
    now[0] += lifetime + 2 * 86400
    boot[0] += lifetime + 2 * 86400
    assert (await engine.attempt_now(entry.queue_id)).status == "failed"
    assert "the clock was set back by 6 days, setting right 6 days of a step" in caplog.text
    await engine.stop(5)
    assert [event for event, _ in records(audit.directory, entry.queue_id)] == [
        "deferred",
        "deferred",
        "expired",
    ]


async def test_an_entry_expired_on_its_own_upstream_down_names_neither_it_nor_the_receiver(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """The notice quoted "451 4.4.1 Upstream default (127.0.0.1:PORT): Connection
    refused", the platform's smarthost and its address, and blamed "the receiving
    server"; the audit log keeps the reply whole for the sysadmin."""
    audit = AuditLog(tmp_path / "audit")
    dead = upstream(free_port(), name="default")
    queue = dataclasses.replace(
        with_queue(policy, lifetime=40), upstreams=MappingProxyType({"default": dead})
    )
    engine = Engine(spool, lambda: queue, attempt, Recorder(audit))
    entry = make_entry(arrival=time.time() - 41, size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "failed"
    await engine.stop(5)
    ((event, reply),) = records(audit.directory, entry.queue_id)
    assert event == "expired" and f"Upstream default (127.0.0.1:{dead.port})" in reply
    (notice,) = spool.ids()
    text = message_from_bytes(spool.read_message(notice), policy=default).get_content()
    assert (
        "Reason:     not delivered within 40 seconds; last reply: the mail platform could"
        " not pass it on (451 4.4.1)"
    ) in text.splitlines()
    assert "127.0.0.1" not in text and "Upstream" not in text and "default" not in text
    assert "The mail platform could not pass the document on" in text
    assert "The receiving server could not be reached" not in text


class Crowded(Upstream):
    """Refuses every connection as one over its limit (``crowded``)."""

    async def __call__(
        self, target: Any, sender: str, rcpts: Any, data: bytes, **_: Any
    ) -> Attempt:
        self.attempts += 1
        too_many = (451, "451 4.4.1 421 4.7.0 Too many connections")
        return Attempt(dict.fromkeys(rcpts, too_many), crowded=True)


async def test_a_refusal_over_the_limit_at_the_lifetime_goes_again_soon_not_expired(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal counts as no attempt, yet at the lifetime it expired the message
    untried; one refused so for long past it expires all the same."""
    monkeypatch.setattr(slots, "REST", 0.01)
    now = [time.time()]
    audit = AuditLog(tmp_path / "audit")
    upstream = Crowded()
    queue = with_queue(policy, lifetime=40)
    engine = Engine(
        spool,
        lambda: queue,
        upstream,
        Recorder(audit),
        clock=lambda: now[0],
        steps=ClockSteps(lambda: now[0], lambda: now[0]),  # time passes: no step of the clock
    )
    entry = make_entry(arrival=now[0] - 41, size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert spool.load(entry.queue_id).next_attempt == now[0] + engine_module.CROWDED_WAIT
    now[0] = entry.arrival + 40 + engine_module.CROWDED_GRACE
    await asyncio.sleep(0.1)  # the slot refused alone rests
    assert (await engine.attempt_now(entry.queue_id)).status == "failed"
    await engine.stop(5)
    assert upstream.attempts == 2
    reason = "not delivered within 40 seconds; last reply: 451 4.4.1 421 4.7.0 Too many connections"
    assert [event for event, _ in records(audit.directory, entry.queue_id)] == [
        "deferred",
        "expired",
    ]
    assert records(audit.directory, entry.queue_id)[-1][1] == reason


class Down(Upstream):
    """Cannot be used at all (``unreachable``): which message each try was for."""

    def __init__(self) -> None:
        super().__init__((451, "451 4.4.1 down"))
        self.tried: list[str] = []

    async def __call__(
        self, target: Any, sender: str, rcpts: Any, data: bytes, **kw: Any
    ) -> Attempt:
        self.tried.append(kw["envelope_id"])
        return Attempt(dict.fromkeys(rcpts, self.answer), self.answer[1])


def _queued(spool: Spool, count: int, arrival: float) -> list[str]:
    """``count`` messages that all came at ``arrival``, their queue IDs."""
    ids = []
    for n in range(count):
        entry = make_entry(arrival=arrival, size=len(message(n)))
        spool.put(entry, message(n))
        ids.append(entry.queue_id)
    return ids


class Recovers(Down):
    """Down until ``up``, then takes every recipient."""

    up = False

    async def __call__(
        self, target: Any, sender: str, rcpts: Any, data: bytes, **kw: Any
    ) -> Attempt:
        if self.up:
            return Attempt(dict.fromkeys(rcpts, (250, "250 2.0.0 ok")))
        return await super().__call__(target, sender, rcpts, data, **kw)


def _listing(policy: Policy, tmp_path: Path) -> tuple[Policy, SuppressionFile]:
    listing = tmp_path / "suppression.jsonl"
    settings = SuppressionSettings(listing, frozenset({"5.1.1"}))
    return dataclasses.replace(policy, suppression=settings), SuppressionFile(listing)


def _waiting_behind(spool: Spool, arrival: float) -> tuple[str, str]:
    """Two messages, their queue IDs: the first one, to another customer, is to
    find the upstream unusable, and the other, to one more, to wait for it."""
    first = make_entry(arrival=arrival, size=len(message(1)))
    first.recipients[0].address = "someone@example.com"
    waiting = make_entry(arrival=arrival, size=len(message(2)))
    waiting.recipients.insert(1, RecipientState("other@example.org", PENDING, notify=True))
    assert spool.put_many([(first, (message(1),)), (waiting, (message(2),))]) == [None, None]
    return first.queue_id, waiting.queue_id


def _list(listed: SuppressionFile) -> None:
    listed.add([Suppression("customer@example.net", None, MANUAL, suppression_now())])


@dataclass
class Listed:
    """An engine with a suppression list, whose upstream one message found down,
    another waiting behind it with a recipient listed since."""

    engine: Engine
    now: list[float]
    upstream: Recovers
    listed: SuppressionFile
    audit: AuditLog
    first: str
    waiting: str

    def recover(self, policy: Policy) -> None:
        self.upstream.up, self.now[0] = True, self.now[0] + 10 * policy.queue.first_retry


async def _listed_behind_a_suspension(spool: Spool, policy: Policy, tmp_path: Path) -> Listed:
    now = [time.time()]
    policy, listed = _listing(policy, tmp_path)
    audit = AuditLog(tmp_path / "audit")
    upstream = Recovers()
    engine = Engine(
        spool, lambda: policy, upstream, Recorder(audit), clock=lambda: now[0], suppressions=listed
    )
    first, waiting = _waiting_behind(spool, now[0])
    assert (await engine.attempt_now(first)).status == "deferred"
    _list(listed)
    return Listed(engine, now, upstream, listed, audit, first, waiting)


async def test_a_recipient_listed_while_its_upstream_is_suspended_is_recorded_once(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """Found listed by attempts that then waited for the upstream, the recipient
    got a ``suppressed`` record from each of them."""
    it = await _listed_behind_a_suspension(spool, policy, tmp_path)
    for _ in range(2):
        assert (await it.engine.attempt_now(it.waiting)).status == "later"
    it.recover(policy)
    assert (await it.engine.attempt_now(it.first)).status == "delivered"
    assert (await it.engine.attempt_now(it.waiting)).status == "failed"
    await it.engine.stop(5)
    assert [(e, r) for e, r in outcomes(it.audit.directory, it.waiting) if e != "notified"] == [
        ("suppressed", "customer@example.net"),
        ("delivered", "other@example.org"),
        ("delivered", "archive@acme.example"),
    ]


async def test_a_recipient_taken_off_the_list_while_its_message_waits_is_only_delivered(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """An attempt that found it listed, and then waited, left a ``suppressed``
    record that the delivery after the sysadmin's ``relay suppression remove``
    contradicted."""
    it = await _listed_behind_a_suspension(spool, policy, tmp_path)
    assert (await it.engine.attempt_now(it.waiting)).status == "later"
    it.listed.remove([("customer@example.net", None)], by="alice")
    it.recover(policy)
    assert (await it.engine.attempt_now(it.first)).status == "delivered"
    assert (await it.engine.attempt_now(it.waiting)).status == "delivered"
    await it.engine.stop(5)
    story = outcomes(it.audit.directory, it.waiting)
    assert [e for e, r in story if r == "customer@example.net"] == ["delivered"]


async def test_a_listed_recipient_is_recorded_by_the_attempt_that_reads_the_message(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attempt that could not read its message left its ``suppressed`` record
    for the next one to write beside its own."""
    policy, listed = _listing(policy, tmp_path)
    audit = AuditLog(tmp_path / "audit")
    upstream = Upstream((250, "250 2.0.0 ok"))
    engine = Engine(spool, lambda: policy, upstream, Recorder(audit), suppressions=listed)
    _, waiting = _waiting_behind(spool, time.time())
    _list(listed)
    read = spool.read_message

    def unreadable(queue_id: str, size: int) -> bytes:
        monkeypatch.setattr(spool, "read_message", read)
        raise SpoolError(spool.directory, "Input/output error")

    monkeypatch.setattr(spool, "read_message", unreadable)
    assert (await engine.attempt_now(waiting)).status == "busy"
    assert (await engine.attempt_now(waiting)).status == "failed"
    await engine.stop(5)
    story = outcomes(audit.directory, waiting)
    assert story.count(("suppressed", "customer@example.net")) == 1


async def test_mail_waiting_for_a_suspended_upstream_expires_at_its_lifetime(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each waiting message was planned for the end of the wait and one of them
    tried then, so those past their lifetime left one first_retry after
    another: ten of them, the last 4.5 s late; a thousand at a first_retry of
    60 s, hours late. Each now expires at its lifetime with the reply of the
    try that found the upstream unusable, not tried again itself."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    audit = AuditLog(tmp_path / "audit")
    queue = with_queue(policy, first_retry=0.5, max_retry=0.5, lifetime=1.0)
    down = Down()
    arrival = time.time()
    ids = _queued(spool, 10, arrival)
    async with running(Engine(spool, lambda: queue, down, Recorder(audit))):
        await until(lambda: not set(ids) & set(spool.ids()), "every message expired", 10)
        late = time.time() - (arrival + 1.0)
    assert late < 0.5, late
    assert len([queue_id for queue_id in down.tried if queue_id in ids]) <= 4, down.tried
    reason = "not delivered within 1 second; last reply: 451 4.4.1 down"
    for queue_id in ids:
        assert records(audit.directory, queue_id)[-1] == ("expired", reason)


async def test_mail_waiting_for_a_suspended_upstream_expires_at_a_lifetime_a_reload_shortened(
    spool: Spool, policy: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of each waiting message's life was kept from the policy when it
    began to wait: a reload shortening the lifetime in a long outage left them
    one first_retry after another again."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    audit = AuditLog(tmp_path / "audit")
    long = with_queue(policy, first_retry=0.5, max_retry=0.5, lifetime=60.0)
    short = with_queue(policy, first_retry=0.5, max_retry=0.5, lifetime=1.0)
    current = [long]
    down = Down()
    ids = _queued(spool, 8, time.time())
    async with running(Engine(spool, lambda: current[0], down, Recorder(audit))):
        await asyncio.sleep(1.2)  # suspended, the others waiting
        current[0], switched = short, time.time()
        await until(lambda: not set(ids) & set(spool.ids()), "every message expired", 10)
        late = time.time() - switched
    assert late < 2.0, late  # at the suspension's end, not one message at each of its ends


async def test_a_deferral_the_spool_cannot_store_still_waits_its_backoff(
    spool: Spool,
    policy: Policy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It used to be retried once a POLL, with an ERROR line and a deferred record
    each time, for as long as the spool refused the record."""
    caplog.set_level(logging.INFO, logger="relay")
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    upstream = Upstream()
    queue = with_queue(policy, first_retry=0.3, max_retry=10)
    engine = Engine(spool, lambda: queue, upstream, Recorder(None), rng=lambda: 0.5)
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    async with running(engine):
        with read_only(spool.directory / "env", 0o500):  # where changed records go
            await asyncio.sleep(1.5)  # attempts at 0, 0.3 and 0.9 s; the next at 2.1
            assert upstream.attempts == 3
        await until(lambda: "deferrals stored again" in caplog.messages, "stored", timeout=5)
    assert len([m for m in caplog.messages if "cannot store deferrals" in m]) == 1
    assert spool.load(entry.queue_id).attempts == 4


async def test_a_retry_asked_for_wins_over_a_deferral_kept_in_memory(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``relay queue retry`` stores a next attempt of 0 once the spool takes
    records again: the backoff the engine kept meanwhile must not outlast it;
    nor is it kept for an entry that has left the spool."""
    monkeypatch.setattr(engine_module, "POLL", 0.05)
    monkeypatch.setattr(engine_module, "RESCAN", 0.1)
    upstream = Upstream()
    queue = with_queue(policy, first_retry=300, max_retry=300)
    engine = Engine(spool, lambda: queue, upstream, Recorder(None), rng=lambda: 0.5)
    entry, other = (make_entry(size=len(message(n))) for n in (1, 2))
    assert spool.put_many([(entry, (message(1),)), (other, (message(2),))]) == [None, None]
    async with running(engine):
        with read_only(spool.directory / "env", 0o500):
            await until(lambda: upstream.attempts == 2, "both deferred, in memory only")
        assert tools.retry(spool, [entry.queue_id], io.StringIO(), io.StringIO()).code == 0
        await until(lambda: upstream.attempts == 3, "tried again at once", timeout=5)
        gone = tools.delete(
            spool, [other.queue_id], io.StringIO(), io.StringIO(), record=lambda *_: None
        )
        assert gone.code == 0
        await until(lambda: other.queue_id not in engine._unstored, "forgotten", timeout=5)


async def _cut_off_by_the_stop(spool: Spool, policy: Policy) -> QueueEntry:
    """An entry whose attempt the upstream never answers, cut off by a stop of 0.1 s."""

    async def stalled(*args: Any, **_: Any) -> Attempt:
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    engine = Engine(spool, lambda: policy, stalled, Recorder(None))
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    task = engine.attempt_now(entry.queue_id)
    await asyncio.sleep(0.1)
    await engine.stop(0.1)
    assert task.result().status == "deferred"
    return entry


async def test_a_stop_that_cuts_attempts_off_names_what_stays_queued(
    spool: Spool, policy: Policy, caplog: pytest.LogCaptureFixture
) -> None:
    """And puts each on record as an attempt, deferred: the upstream may have had
    the message, so the next start's delivery may be its second."""
    entry = await _cut_off_by_the_stop(spool, policy)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [
        "cutting off 1 delivery attempt still waiting for the upstream at the end of the"
        f" stop grace, having waited 0.1s for them: {entry.queue_id}; each stays queued,"
        " recorded as deferred, and is tried again at the next start, unless the upstream"
        " had answered its message already (one already sent in full may arrive twice: the"
        " audit log says so)"
    ]
    stored = spool.load(entry.queue_id)
    assert stored.attempts == 1
    assert {(r.status, r.attempts, r.reply) for r in stored.recipients} == {
        ("pending", 1, engine_module.CUT_OFF)
    }


@pytest.mark.parametrize(
    ("where", "said", "ended"),
    [
        ("connecting", engine_module.CUT_SHORT, []),
        ("sending", engine_module.CUT_SHORT, [False]),
        ("answering", engine_module.CUT_OFF, [True]),
    ],
)
async def test_a_stop_says_it_may_arrive_twice_only_of_a_message_sent_in_full(
    spool: Spool,
    policy: Policy,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    said: str,
    ended: list[bool],
) -> None:
    """An upstream that never greets, one that takes none of the message, and
    one that took it all and does not answer: each attempt was recorded "if it
    had the whole message, it may arrive twice", the first two of a message
    the upstream cannot have."""
    monkeypatch.setattr(smtp, "default_pool", lambda: Pool(max_idle_per_key=0))
    server = Hostile(only_once_given_up if where == "sending" else at_once, final=b"")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # before listen: a slow link
    listener.bind(("127.0.0.1", free_port()))
    listener.listen()
    hostile = (
        None if where == "connecting" else await asyncio.start_server(server.serve, sock=listener)
    )
    target = upstream(listener.getsockname()[1], name="default", timeout=WAIT, data_timeout=WAIT)
    queue = dataclasses.replace(policy, upstreams=MappingProxyType({"default": target}))
    engine = Engine(spool, lambda: queue, attempt, Recorder(None))
    entry = make_entry(size=len(BIG))
    assert spool.put_many([(entry, (BIG,))]) == [None]
    try:
        task = engine.attempt_now(entry.queue_id)
        if hostile is not None:
            await asyncio.wait_for(server.started.wait(), WAIT)
        await asyncio.sleep(0.5)
        await engine.stop(0.1)
        assert task.result().status == "deferred"
    finally:
        server.given_up.set()
        await asyncio.sleep(0.5)  # for what the upstream still gets
        if hostile is not None:
            hostile.close()
        listener.close()
    stored = spool.load(entry.queue_id)
    assert {(r.status, r.reply) for r in stored.recipients} == {("pending", said)}
    assert [part.endswith(END) for part in server.received] == ended  # its final dot came


@dataclass
class SilentAfter(Hostile):
    """Answers the message, then never answers ``last`` (QUIT, or the RSET after a refusal)."""

    last: bytes = b"QUIT"
    quit: asyncio.Event = field(default_factory=asyncio.Event)

    def _reply(self, line: bytes) -> bytes:
        if line[:4].upper() == self.last:
            self.quit.set()
            return b""
        return super()._reply(line)


async def test_a_stop_that_cuts_off_the_quit_after_the_upstream_took_the_message_records_it(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The upstream had answered 250 to the message; cut off in the QUIT that
    followed, the attempt was recorded "the relay stopped before the message was
    sent in full; the upstream cannot have it", and the next start sent it again."""
    monkeypatch.setattr(smtp, "default_pool", lambda: Pool(max_idle_per_key=0))
    server = SilentAfter(at_once)
    outcome, said = await _stopped_at(server, server.quit, spool, policy, tmp_path)
    assert outcome.status == "delivered"
    assert said == [("delivered", "250 2.0.0 queued")]
    assert spool.ids() == []


async def _stopped_at(
    server: Hostile, at: asyncio.Event, spool: Spool, policy: Policy, tmp_path: Path
) -> tuple[Outcome, list[tuple[str, str]]]:
    """An attempt at ``server`` that the stop cuts off once ``at`` is set: its
    outcome, and its message's records."""
    audit = AuditLog(tmp_path / "audit")
    listener = socket.socket()
    listener.bind(("127.0.0.1", free_port()))
    listener.listen()
    serving = await asyncio.start_server(server.serve, sock=listener)
    target = upstream(listener.getsockname()[1], name="default", timeout=WAIT, data_timeout=WAIT)
    queue = dataclasses.replace(policy, upstreams=MappingProxyType({"default": target}))
    engine = Engine(spool, lambda: queue, attempt, Recorder(audit))
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    try:
        task = engine.attempt_now(entry.queue_id)
        await asyncio.wait_for(at.wait(), WAIT)
        await engine.stop(0.1)
    finally:
        serving.close()
        listener.close()
    return task.result(), records(audit.directory, entry.queue_id)


@pytest.mark.parametrize("last", [b"RSET", b"QUIT"])
async def test_a_stop_that_cuts_off_what_follows_a_refusal_of_the_message_records_it(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, last: bytes
) -> None:
    """The upstream had refused the message at its end; cut off in the RSET or
    QUIT that followed, the attempt was recorded "the relay stopped before the
    message was sent in full", which it had been."""
    monkeypatch.setattr(smtp, "default_pool", lambda: Pool(max_idle_per_key=0))
    server = SilentAfter(at_once, final=b"554 5.7.1 spam\r\n", last=last)
    outcome, said = await _stopped_at(server, server.quit, spool, policy, tmp_path)
    assert outcome.status == "failed"
    assert said[-1][1].startswith("554 5.7.1 spam")


@dataclass
class RefusingEveryone(Hostile):
    """Refuses every recipient, answers the DATA sent with them 354 all the same,
    and never answers the lone dot that ends it."""

    def _reply(self, line: bytes) -> bytes:
        return b"550 5.1.1 unknown\r\n" if line[:4].upper() == b"RCPT" else super()._reply(line)


async def lone_dot_unanswered(server: Hostile, reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    server.given_up.set()
    await asyncio.sleep(WAIT)
    return line


async def test_a_stop_that_cuts_off_the_lone_dot_after_every_recipient_was_refused_records_it(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """The upstream had refused every recipient; cut off waiting for the reply to
    the lone dot that ended its 354, the attempt was recorded as not sent in
    full, and the next start tried the refused recipients again."""
    server = RefusingEveryone(lone_dot_unanswered)
    outcome, said = await _stopped_at(server, server.given_up, spool, policy, tmp_path)
    assert outcome.status == "failed"
    assert said[-1][1].startswith("550 5.1.1 unknown")


async def test_a_last_try_the_stop_cuts_off_does_not_expire_the_message(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """The cut-off reply is no upstream's: the message expired on it, and its
    sender was told it was not delivered, of a message the upstream may have had
    or the next start could still deliver. It stays queued for its last try."""
    audit = AuditLog(tmp_path / "audit")

    async def stalled(*args: Any, **_: Any) -> Attempt:
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    engine = Engine(spool, lambda: with_queue(policy, lifetime=40), stalled, Recorder(audit))
    entry = make_entry(arrival=time.time() - 41, size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    task = engine.attempt_now(entry.queue_id)
    await asyncio.sleep(0.1)
    await engine.stop(0.1)
    assert task.result().status == "deferred"
    assert spool.ids() == [entry.queue_id]  # and no failure notice beside it
    assert records(audit.directory, entry.queue_id) == [("deferred", engine_module.CUT_OFF)]


async def test_an_attempt_the_stop_cut_off_is_due_at_once_at_the_next_start(
    spool: Spool, policy: Policy
) -> None:
    """It was no verdict of the upstream's, only the relay stopping: planned a
    backoff later, a document the sysadmin's restart cut off waited minutes
    after the start, as one its upstream had turned away."""

    entry = await _cut_off_by_the_stop(spool, with_queue(policy, first_retry=600))
    stored = spool.load(entry.queue_id)
    assert stored.attempts == 1 and stored.next_attempt <= time.time()


async def test_mail_of_a_removed_upstream_counts_against_the_one_it_goes_to(
    spool: Spool, policy: Policy
) -> None:
    """It took the old name's share of ``queue.concurrency``: after a reload that
    renamed the smarthost, twice as many connections as the limit went to it."""
    acme = Tenant("acme", "Acme AS", "post@acme.example", (), "default", None, {}, frozenset(), {})
    queue = dataclasses.replace(
        with_queue(policy, concurrency=1), tenants=MappingProxyType({"acme": acme})
    )
    release, inside, most = asyncio.Event(), [0], [0]
    names: list[str] = []

    async def gate(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        names.append(target.name)
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        await release.wait()
        inside[0] -= 1
        return Attempt(dict.fromkeys(rcpts, (250, "250 2.0.0 Ok")))

    engine = Engine(spool, lambda: queue, gate, Recorder(None))
    size = len(message(1))
    old, new = make_entry(upstream="renamed", size=size), make_entry(size=size)
    assert spool.put_many([(old, (message(1),)), (new, (message(1),))]) == [None, None]
    async with running(engine):  # the one that waits for the slot is started at its turn
        first = engine.attempt_now(old.queue_id)
        second = engine.attempt_now(new.queue_id)
        await until(lambda: inside[0] >= 1, "an attempt under way")
        await asyncio.sleep(0.2)
        release.set()
        assert [(await first).status, (await second).status] == ["delivered", "parked"]
        await until(lambda: not spool.ids(), "both delivered")
    assert most[0] == 1 and names == ["default", "default"]


async def test_mail_of_a_removed_upstream_is_on_record_as_sent_through_the_one_it_went_to(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit log's ``upstream`` and the log's ``relay=`` are where the
    message went: naming the old name, gone from the policy, they sent the
    auditor to a smarthost that never had it, and the reroute was said anew
    at every attempt."""
    acme = Tenant("acme", "Acme AS", "post@acme.example", (), "default", None, {}, frozenset(), {})
    rerouting = dataclasses.replace(policy, tenants=MappingProxyType({"acme": acme}))
    audit = AuditLog(tmp_path / "audit")
    upstream, now = Upstream(), [time.time()]
    engine = Engine(spool, lambda: rerouting, upstream, Recorder(audit), clock=lambda: now[0])
    entry = make_entry(upstream="renamed", arrival=now[0], size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    caplog.set_level(logging.INFO, logger="relay")
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert spool.load(entry.queue_id).upstream == "default"
    upstream.answer = (250, "250 2.0.0 ok")
    now[0] += 3600
    assert (await engine.attempt_now(entry.queue_id)).status == "delivered"
    await engine.stop(5)
    went = [r["upstream"] for r in reader.records(audit.directory) if r["event"] == "delivered"]
    assert went == ["default", "default"]
    said = [r.getMessage() for r in caplog.records if "no longer in the policy" in r.getMessage()]
    assert len(said) == 1
    assert f"{entry.queue_id}: to=<customer@example.net>, relay=default," in caplog.text


async def test_a_recipient_the_upstream_gave_no_reply_for_is_deferred_not_delivered(
    spool: Spool, policy: Policy, tmp_path: Path
) -> None:
    """Only a reply says delivered: one missing (an attempt that ended early, a
    fault) is a temporary failure, tried again, never a delivery on record of
    a message nobody took."""
    audit = AuditLog(tmp_path / "audit")

    async def partial(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt({"archive@acme.example": (250, "250 2.0.0 ok")})

    engine = Engine(spool, lambda: policy, partial, Recorder(audit))
    entry = make_entry(size=len(message(1)))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    await engine.stop(5)
    assert records(audit.directory, entry.queue_id) == [
        ("deferred", "451 4.3.0 no reply for this recipient")
    ]
    assert [r.status for r in spool.load(entry.queue_id).recipients] == [PENDING, "delivered"]


async def test_a_failure_withheld_from_a_listed_sender_is_not_weighed_again_at_each_retry(
    spool: Spool, policy: Policy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sender's address is on the suppression list, so no notice goes: the
    failure counts as dealt with. Left to tell, each retry of the message's
    other recipients said "no failure notice" again, and a sender taken off
    the list later got a notice of failures long past."""
    policy, listed = _listing(policy, tmp_path)
    listed.add([Suppression("alice@acme.example", None, MANUAL, suppression_now())])
    now = [time.time()]
    answers = {"customer@example.net": (550, "550 5.1.1 no such user")}

    async def half(target: Any, sender: str, rcpts: Any, data: bytes, **_: Any) -> Attempt:
        return Attempt({r: answers.get(r, BUSY) for r in rcpts})

    engine = Engine(
        spool, lambda: policy, half, Recorder(None), clock=lambda: now[0], suppressions=listed
    )
    entry = make_entry(size=len(message(1)))
    entry.recipients.insert(1, RecipientState("other@example.org", PENDING, notify=True))
    assert spool.put_many([(entry, (message(1),))]) == [None]
    caplog.set_level(logging.INFO, logger="relay")
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    assert not spool.load(entry.queue_id).recipients[0].notify
    listed.remove([("alice@acme.example", None)], by="root")
    now[0] += 3600
    assert (await engine.attempt_now(entry.queue_id)).status == "deferred"
    await engine.stop(5)
    said = [r.getMessage() for r in caplog.records if "no failure notice" in r.getMessage()]
    assert len(said) == 1, said
    assert spool.ids() == [entry.queue_id]  # no notice queued


async def test_mail_deferred_before_the_clock_was_set_back_waits_its_wait_not_the_step(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its next attempt, stored on the clock before the step, lay a day ahead of
    a clock set back a day, and it waited the day. Its wait now runs from when
    the engine saw it so, and the rescans do not push it on."""
    monkeypatch.setattr(engine_module, "RESCAN", 0.2)
    written = time.time()
    entry = make_entry(arrival=written - 60, size=len(message(1)), next_attempt=written + 2.5)
    entry.attempts = 1
    for rcpt in entry.recipients:
        rcpt.updated = written - 0.5
    assert spool.put_many([(entry, (message(1),))]) == [None]
    upstream = Upstream((250, "250 2.0.0 ok"))
    engine = Engine(
        spool, lambda: policy, upstream, Recorder(None), clock=lambda: time.time() - 86400
    )
    async with running(engine):
        await asyncio.sleep(1.5)
        assert upstream.attempts == 0, "tried before its wait was over"
        await until(lambda: upstream.attempts == 1, "still waiting for the clock", 8.0)


async def test_mail_deferred_again_after_the_clock_was_set_back_keeps_its_backoff(
    spool: Spool, policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its arrival still lay ahead of the clock, and each rescan took its new
    next attempt back by the step again: tried at every rescan for a day."""
    monkeypatch.setattr(engine_module, "RESCAN", 0.2)
    now = time.time()
    back = now - 86400  # the clock, set back a day since the message arrived
    entry = make_entry(arrival=now - 60, size=len(message(1)), next_attempt=back + 3600)
    entry.attempts = 2
    entry.recipients[0].updated = back - 1  # deferred again since the step
    entry.recipients[1].status, entry.recipients[1].updated = "delivered", now - 59
    assert spool.put_many([(entry, (message(1),))]) == [None]
    upstream = Upstream((250, "250 2.0.0 ok"))
    engine = Engine(
        spool, lambda: policy, upstream, Recorder(None), clock=lambda: time.time() - 86400
    )
    async with running(engine):
        await asyncio.sleep(2.5)  # several looks and rescans
    assert upstream.attempts == 0, "tried long before its next attempt"
