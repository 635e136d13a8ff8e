"""A small, realistic audit log over three days, shared by the audit tests.

Three messages of two tenants with every kind of outcome, plus the events
without a message (rejected, policy_loaded). Built through the real writer
with an injected clock so every test sees the same times.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relay.audit import AuditLog, events, reader, verify

START = datetime(2024, 5, 6, 9, 0, tzinfo=UTC)
ACME_INVOICE = ("Q0000000000000A1", "<inv-1001@erp.acme.example>")
ACME_QUOTE = ("Q0000000000000A2", "<quote-77@erp.acme.example>")
GLOBEX = ("Q0000000000000G1", "<g-5@erp.globex.example>")


class Clock:
    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def received(
    ids: tuple[str, str], tenant: str, user: str, doc_type: str, rcpts: list[str], **extra: Any
) -> dict[str, Any]:
    domain = f"{tenant}.example"
    return events.received(
        queue_id=ids[0],
        message_id=ids[1],
        client_address="192.0.2.10",
        auth_login=f"erp-{tenant}",
        listener="submission",
        mail_from=f"{user}@{domain}",
        rcpt_tos=rcpts,
        size=48213,
        tenant=tenant,
        user=user,
        doc_type=doc_type,
        rule=f"{doc_type}-header",
        from_before=f"{user.title()} <{user}@{domain}>",
        from_after=f'"{user.title()} via Platform" <noreply@platform.example>',
        reply_to_before=None,
        reply_to_after=f"{user.title()} <{user}@{domain}>",
        bcc_added=[f"{user}@{domain}"],
        dkim=[("platform.example", "s1"), ("platform.example", "e1")],
        upstream="smarthost",
        policy_version="9f2c" * 16,
        **extra,
    )


def build(directory: Path, key: bytes | None = None, start: datetime = START) -> Clock:
    """Day 1: policy, two acme messages, a rejection. Day 2: retries, globex. Day 3: bounce."""
    clock = Clock(start)
    log = AuditLog(directory, hmac_key=key, clock=clock)
    q, m = ACME_INVOICE
    log.append(
        events.policy_loaded(policy_file="/etc/erp-relay/relay.yaml", policy_sha256="9f2c" * 16)
    )
    clock.advance(minutes=5)
    log.append_many(
        [
            received(
                ACME_INVOICE,
                "acme",
                "jan",
                "invoice",
                ["buyer@customer.example", "ap@customer.example"],
            ),
            events.queued(
                queue_id=q,
                message_id=m,
                size=49001,
                recipients=["buyer@customer.example", "ap@customer.example", "jan@acme.example"],
            ),
        ]
    )
    clock.advance(seconds=2)
    log.append_many(
        [
            events.delivered(
                queue_id=q,
                message_id=m,
                recipient="buyer@customer.example",
                upstream="smarthost",
                reply="250 2.0.0 Ok: queued as 4Vx1",
                attempts=1,
            ),
            events.deferred(
                queue_id=q,
                message_id=m,
                recipient="ap@customer.example",
                reply="451 4.7.1 Greylisted",
                next_attempt=clock.now + timedelta(hours=15),
            ),
            events.delivered(
                queue_id=q,
                message_id=m,
                recipient="jan@acme.example",
                upstream="smarthost",
                reply="250 2.0.0 Ok: queued as 4Vx2",
                attempts=1,
            ),
        ]
    )
    clock.advance(minutes=10)
    q2, m2 = ACME_QUOTE
    log.append_many(
        [
            received(
                ACME_QUOTE, "acme", "eva", "quote", ["Sales@Prospect.example"], subject="Quote 77"
            ),
            events.queued(
                queue_id=q2,
                message_id=m2,
                size=20000,
                recipients=["Sales@Prospect.example", "eva@acme.example"],
            ),
        ]
    )
    log.append(
        events.failed(
            queue_id=q2,
            message_id=m2,
            recipient="Sales@Prospect.example",
            reply="550 5.1.1 User unknown",
        )
    )
    log.append(
        events.suppressed(
            queue_id=q2,
            message_id=m2,
            recipient="eva@acme.example",
            reason="complaint",
            since="2024-04-01T00:00:00.000Z",
        )
    )
    log.append(
        events.rejected(
            queue_id=None,
            message_id=None,
            client_address="198.51.100.7",
            auth_login=None,
            mail_from="x@spam.example",
            rcpt_tos=["buyer@customer.example"],
            reply="550 5.7.1 Sender not known",
        )
    )
    clock.advance(hours=15)  # day 2
    log.append(
        events.delivered(
            queue_id=q,
            message_id=m,
            recipient="ap@customer.example",
            upstream="smarthost",
            reply="250 2.0.0 Ok",
            attempts=2,
        )
    )
    g, gm = GLOBEX
    log.append_many(
        [
            received(GLOBEX, "globex", "hank", "invoice", ["buyer@customer.example"]),
            events.queued(
                queue_id=g, message_id=gm, size=1000, recipients=["buyer@customer.example"]
            ),
            events.delivered(
                queue_id=g,
                message_id=gm,
                recipient="buyer@customer.example",
                upstream="smarthost",
                reply="250 ok",
                attempts=1,
            ),
        ]
    )
    clock.advance(days=1)  # day 3
    log.append(
        events.bounced(
            queue_id=g,
            message_id=gm,
            recipient="buyer@customer.example",
            dsn_status="5.2.2",
            diagnostic="smtp; 552 mailbox full",
        )
    )
    log.append(
        events.complained(
            queue_id=q, message_id=m, recipient="buyer@customer.example", feedback_type="abuse"
        )
    )
    log.append(
        events.deleted(
            queue_id=q2,
            message_id=m2,
            by="root",
            recipients=["eva@acme.example"],
        )
    )
    log.close()
    return clock


def read_all(directory: Path) -> list[dict[str, Any]]:
    """Every record, from plain and compressed day files alike."""
    return [json.loads(line) for file in reader.day_files(directory) for line in reader.lines(file)]


def test_fixture_is_a_valid_three_day_log(tmp_path: Path) -> None:
    build(tmp_path)
    names = sorted(p.name for p in tmp_path.glob("audit-*"))
    assert names == ["audit-2024-05-06.jsonl", "audit-2024-05-07.jsonl", "audit-2024-05-08.jsonl"]
    records = read_all(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert verify(tmp_path).ok
