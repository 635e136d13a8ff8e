"""``python -m relay.audit.bench N [DIR]``: how fast search is on N events.

Writes a realistic log (a message is received, queued, then each recipient
delivered, deferred, failed or bounced) through the real writer, one fsync
per batch, spread over a month of day files, then times typical searches.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relay.audit import events
from relay.audit.search import report, search
from relay.audit.writer import AuditLog

DAYS = 30
BATCH = 5000


def message_events(rng: random.Random, n: int, at: datetime) -> list[dict[str, Any]]:
    """The records of message ``n``: five to six on average."""
    tenant = f"tenant{n % 20:02d}"
    qid, mid = f"Q{n:015d}", f"<{n}.{tenant}@erp.example>"
    rcpts = [f"customer{rng.randrange(5000)}@buyer{rng.randrange(300)}.example" for _ in range(2)]
    user = f"user{n % 7}@{tenant}.example"
    out = [
        events.received(
            queue_id=qid,
            message_id=mid,
            client_address="192.0.2.10",
            auth_login=f"erp-{tenant}",
            listener="submission",
            mail_from=user,
            rcpt_tos=rcpts,
            size=48213,
            tenant=tenant,
            user=f"user{n % 7}",
            doc_type=rng.choice(["invoice", "quote", "reminder", "default"]),
            rule="erp-header",
            from_before=f"Jan <{user}>",
            from_after='"Jan via Platform" <noreply@platform.example>',
            reply_to_before=None,
            reply_to_after=f"Jan <{user}>",
            bcc_added=[user],
            dkim=[("platform.example", "s1")],
            upstream="smarthost",
            policy_version="9f2c" * 16,
        ),
        events.queued(queue_id=qid, message_id=mid, recipients=[*rcpts, user], size=49001),
    ]
    for rcpt in [*rcpts, user]:
        roll = rng.random()
        if roll < 0.05:
            out.append(
                events.deferred(
                    queue_id=qid,
                    message_id=mid,
                    recipient=rcpt,
                    reply="451 4.7.1 Greylisted, try again later",
                    next_attempt=at + timedelta(minutes=5),
                )
            )
        if roll < 0.02:
            out.append(
                events.failed(
                    queue_id=qid, message_id=mid, recipient=rcpt, reply="550 5.1.1 User unknown"
                )
            )
        else:
            out.append(
                events.delivered(
                    queue_id=qid,
                    message_id=mid,
                    recipient=rcpt,
                    upstream="smarthost",
                    reply="250 2.0.0 Ok: queued as 4Vx1",
                    attempts=1,
                )
            )
        if rng.random() < 0.005:
            out.append(
                events.bounced(
                    queue_id=qid,
                    message_id=mid,
                    recipient=rcpt,
                    dsn_status="5.2.2",
                    diagnostic="mailbox full",
                )
            )
    return out


def generate(directory: Path, count: int, start: datetime, seed: int = 1) -> int:
    rng = random.Random(seed)
    step = timedelta(days=DAYS) / max(count, 1)
    clock = [start]
    written, n, batch = 0, 0, []
    with AuditLog(directory, clock=lambda: clock[0]) as log:
        while written + len(batch) < count:
            batch += message_events(rng, n, clock[0])
            n += 1
            if len(batch) >= BATCH:
                log.append_many(batch)
                written += len(batch)
                clock[0] = start + step * written
                batch = []
        if batch:
            log.append_many(batch)
            written += len(batch)
    return written


def timed(label: str, run: Callable[[], Any]) -> float:
    began = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - began
    print(f"{label:<52} {seconds:6.2f} s  ({len(result)} results)")
    return seconds


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 1_000_000
    directory = Path(argv[1]) if len(argv) > 1 else Path(tempfile.mkdtemp(prefix="audit-bench-"))
    start = datetime(2024, 4, 1, tzinfo=UTC)
    if not any(directory.glob("audit-*")):
        began = time.perf_counter()
        written = generate(directory, count, start)
        print(f"wrote {written} events in {time.perf_counter() - began:.1f} s to {directory}")
    size = sum(p.stat().st_size for p in directory.glob("audit-*"))
    print(f"{size / 1e6:.0f} MB in {len(list(directory.glob('audit-*')))} files")
    week = (start + timedelta(days=DAYS - 7)).date().isoformat()
    timed("search status=failed (all days)", lambda: list(search(directory, status="failed")))
    timed(
        "search tenant=tenant07 status=failed (join)",
        lambda: list(search(directory, tenant="tenant07", status="failed")),
    )
    timed(
        "search recipient=customer42@buyer7.example",
        lambda: list(search(directory, recipient="customer42@buyer7.example")),
    )
    timed("search queue_id", lambda: list(search(directory, queue_id="Q000000000001234")))
    timed(
        f"search since={week} tenant=tenant07 (last week)",
        lambda: list(search(directory, since=week, tenant="tenant07")),
    )
    first = start.date().isoformat()
    second = (start + timedelta(days=1)).date().isoformat()
    timed(
        f"search until={second} status=failed (the first two days)",
        lambda: list(search(directory, since=first, until=second, status="failed")),
    )
    timed("report (all days)", lambda: report(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
