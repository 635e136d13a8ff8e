"""The audit schema is a contract with auditors' scripts: pinned here, key by key."""

from __future__ import annotations

import json
from datetime import UTC
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay.audit import AuditLog, events
from tests.test_audit_fixture import ACME_INVOICE, Clock, build, read_all, received

HEAD = ["v", "seq", "time", "event", "queue_id", "message_id"]
TAIL = ["prev", "hash"]
PINNED = {
    "received": [
        "client_address", "auth_login", "listener", "mail_from", "rcpt_tos", "size", "tenant",
        "user", "doc_type", "rule", "from_before", "from_after", "reply_to_before",
        "reply_to_after", "bcc_added", "dkim", "upstream", "policy_version",
    ],
    "rejected": ["client_address", "auth_login", "mail_from", "rcpt_tos", "reply"],
    "queued": ["recipients", "size"],
    "delivered": ["recipient", "upstream", "reply", "attempts"],
    "deferred": ["recipient", "reply", "next_attempt"],
    "failed": ["recipient", "reply"],
    "expired": ["recipient"],
    "suppressed": ["recipient", "suppression"],
    "bounced": ["recipient", "dsn_status", "diagnostic"],
    "complained": ["recipient", "feedback_type"],
    "deleted": ["by", "recipients"],
    "held": ["by"],
    "released": ["by"],
    "notified": ["recipient", "notice_queue_id"],
    "policy_loaded": ["policy_file", "policy_sha256"],
    "pruned": ["files", "through_seq", "through_hash", "retention_days"],
    "listed": ["recipient", "suppression", "for_tenant", "detail"],
}  # fmt: skip


def test_every_event_is_pinned() -> None:
    assert set(PINNED) == set(events.SCHEMA)
    for event, own in PINNED.items():
        assert list(events.fields(event, frozenset())) == HEAD + own + TAIL
    optional = ["subject", "found_by", "reasons"]
    assert list(events.fields("received"))[-5:] == [*optional, "prev", "hash"]


def test_stored_records_have_the_pinned_key_order(tmp_path: Path) -> None:
    build(tmp_path)
    q, m = ACME_INVOICE
    log = AuditLog(tmp_path, clock=Clock())
    log.append(events.expired(queue_id=q, message_id=m, recipient="ap@customer.example"))
    log.append(
        events.notified(
            queue_id=q, message_id=m, recipient="jan@acme.example", notice_queue_id="QN"
        )
    )
    log.append(events.held(queue_id=q, message_id=m, by="root"))
    log.append(events.released(queue_id=q, message_id=m, by="root"))
    log.append(
        events.listed(
            queue_id=q,
            message_id=m,
            recipient="ap@customer.example",
            reason="bounce",
            since="2024-05-06T09:05:02.000Z",
            for_tenant=None,
            detail="550 5.1.1 User unknown",
        )
    )
    log.close()
    seen = set()
    for record in read_all(tmp_path):
        own = PINNED[record["event"]] + (["subject"] if "subject" in record else [])
        assert list(record) == HEAD + own + TAIL
        assert record["v"] == 1
        seen.add(record["event"])
    assert seen == set(PINNED) - {"pruned"}  # pruned: see test_audit_writer


def test_builders_reject_unknown_and_missing_fields() -> None:
    with pytest.raises(TypeError):
        events.delivered(  # type: ignore[call-arg]
            queue_id="Q",
            message_id=None,
            recipient="a@b",
            upstream="u",
            reply="250",
            attempts=1,
            body="never",
        )
    with pytest.raises(TypeError):
        events.failed(queue_id="Q", message_id=None, recipient="a@b")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        events._build("failed", "Q", None, recipient="a@b", reply="5", colour="red")


def test_builders_reject_wrong_types() -> None:
    with pytest.raises(ValueError, match="attempts"):
        events.delivered(
            queue_id="Q", message_id=None, recipient="a@b", upstream="u", reply="250", attempts="1"
        )  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recipients"):
        events.queued(queue_id="Q", message_id=None, recipients="a@b", size=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="size"):
        events.queued(queue_id="Q", message_id=None, recipients=["a@b"], size=True)


def test_a_message_id_that_is_not_text_is_refused_not_written(tmp_path: Path) -> None:
    """A search by Message-ID compares text: a record whose message_id is a
    number or a list is one no search finds, in a log that cannot be rewritten."""
    with pytest.raises(ValueError, match="queue_id and message_id must be text or None"):
        events.failed(queue_id="Q", message_id=4711, recipient="a@b", reply="550")  # type: ignore[arg-type]
    log = AuditLog(tmp_path, clock=Clock())
    record = events.failed(queue_id="Q", message_id="<m@x>", recipient="a@b", reply="550")
    with pytest.raises(ValueError, match="queue_id and message_id must be text or None"):
        log.append({**record, "message_id": ["<m@x>"]})
    assert not list(tmp_path.glob("audit-*"))


def test_writer_refuses_records_not_made_by_a_builder(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, clock=Clock())
    record = events.failed(queue_id="Q", message_id=None, recipient="a@b", reply="550")
    with pytest.raises(ValueError, match="unknown audit event"):
        log.append({**record, "event": "exploded"})
    with pytest.raises(ValueError, match="schema"):
        log.append({**record, "extra": 1})
    with pytest.raises(ValueError, match="schema"):
        log.append(dict(reversed(record.items())))
    assert not list(tmp_path.glob("audit-*"))


def test_subject_only_when_passed() -> None:
    ids = ("Q1", "<m@x>")
    without = received(ids, "acme", "jan", "invoice", ["a@b"])
    assert "subject" not in without
    assert received(ids, "acme", "jan", "invoice", ["a@b"], subject=None) == without
    assert received(ids, "acme", "jan", "invoice", ["a@b"], subject="Invoice 1")["subject"] == (
        "Invoice 1"
    )


def test_each_optional_field_may_be_absent_but_not_out_of_order() -> None:
    """Records from before ``found_by`` have none; with ``record_subject: no`` one has
    ``found_by`` and no subject; both are valid, a reordered one is not."""
    ids = ("Q1", "<m@x>")
    found = received(ids, "acme", "jan", "invoice", ["a@b"], found_by="header_from")
    assert "subject" not in found and list(found)[-1] == "found_by"
    events.check(found)
    both = received(ids, "acme", "jan", "invoice", ["a@b"], subject="S", found_by="header")
    assert list(both)[-2:] == ["subject", "found_by"]
    events.check(both)
    swapped = {k: v for k, v in both.items() if k not in ("subject", "found_by")}
    with pytest.raises(ValueError, match="schema"):
        events.check({**swapped, "found_by": "header", "subject": "S"})


def test_undecodable_header_text_is_made_writable() -> None:
    record = events.failed(queue_id="Q", message_id="<\udcff@x>", recipient="a@b", reply="550")
    assert record["message_id"] == "<\ufffd@x>"
    json.dumps(record, ensure_ascii=False).encode()


def test_times_are_utc_with_milliseconds() -> None:
    from datetime import datetime, timedelta, timezone

    when = datetime(2024, 5, 6, 11, 0, 0, 123999, tzinfo=timezone(timedelta(hours=2)))
    assert events.timestamp(when) == "2024-05-06T09:00:00.123Z"
    assert events.timestamp(datetime(999, 1, 2, 3, 4, 5, 999, tzinfo=UTC)) == (
        "999-01-02T03:04:05.000Z"  # as strftime writes such a year
    )
    record = events.deferred(
        queue_id="Q", message_id=None, recipient="a@b", reply="451", next_attempt=when
    )
    assert record["next_attempt"] == "2024-05-06T09:00:00.123Z"


def test_received_for_takes_the_pipelines_objects() -> None:
    submission = SimpleNamespace(
        listener="submission",
        client_address="192.0.2.1",
        auth_login="erp",
        auth_tenant="acme",
        mail_from="jan@acme.example",
        rcpt_tos=("buyer@customer.example",),
    )
    decision = SimpleNamespace(
        identity=SimpleNamespace(
            tenant=SimpleNamespace(id="acme"), user=SimpleNamespace(id="jan"), source="auth_login"
        ),
        classification=SimpleNamespace(
            doc_type="invoice", rule="inv", reason="rule 'inv': Subject matches 'Invoice 42'"
        ),
        reasons=(
            "AUTH login 'erp' belongs to tenant 'acme'",
            "rule 'inv': Subject matches 'Invoice 42'",
            "Reply-To from sender: Jan <jan@acme.example>",
        ),
        from_before="Jan <jan@acme.example>",
        from_after="Jan via P <noreply@p.example>",
        reply_to_before=None,
        reply_to_after="Jan <jan@acme.example>",
        bcc_added=("jan@acme.example",),
        signing=(SimpleNamespace(domain="p.example", selector="s1"),),
        upstream=SimpleNamespace(name="smarthost"),
    )
    record = events.received_for("Q1", "<m@x>", submission, decision, 123, "abc")  # type: ignore[arg-type]
    assert record["rcpt_tos"] == ["buyer@customer.example"]
    assert record["dkim"] == [{"domain": "p.example", "selector": "s1"}]
    assert record["tenant"] == "acme" and record["rule"] == "inv" and "subject" not in record
    assert record["found_by"] == "auth_login" and list(record)[-1] == "reasons"
    # the rule's evidence is text of the subject, which the policy may keep out of the log
    assert record["reasons"] == [
        "AUTH login 'erp' belongs to tenant 'acme'",
        "Reply-To from sender: Jan <jan@acme.example>",
    ]
    reply = SimpleNamespace(line="550 5.7.1 Unknown sender")
    rejected = events.rejected_for(submission, reply)  # type: ignore[arg-type]
    assert rejected["reply"] == "550 5.7.1 Unknown sender" and rejected["queue_id"] is None
    assert rejected["tenant"] == "acme" and "user" not in rejected  # the login's tenant
