"""The suppression list end to end: a real relay process (two workers), a real
upstream that refuses some recipients, and the list as the workers share it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import engine
from relay.policy.load import load
from relay.spool import Spool
from relay.suppression import COMPLAINT, Suppression, SuppressionFile
from tests.readonly import read_only
from tests.relayproc import RelayProcess, wait_for
from tests.sink import Received, Sink, SinkServer, free_port
from tests.spoolkit import make_entry
from tests.test_metrics import _metrics_policy, _samples, _value
from tests.test_queue_e2e import SMALL, audit_events, configure, relay_cli, send

REFUSE = {
    "gone@example.org": "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown",
    "blocked@example.org": "554 5.7.1 Service unavailable; client host blocked",
    "later@example.org": "450 4.2.1 Mailbox busy",
}


@dataclass
class CountingSink(Sink):
    """Counts the transactions begun, taken or not."""

    mails: int = 0

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        self.mails += 1
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"


def _body(message: bytes) -> str:
    return message.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace").replace("=\r\n", "")


def _settled(relay: RelayProcess, policy: Path, queue_id: str) -> str:
    """The log once ``queue_id`` has been told of (a notice, or why none) and the
    queue is empty."""
    wait_for(lambda: f"{queue_id}: failure notice" in relay.log() or (
        f"{queue_id}: no failure notice" in relay.log()
    ))  # fmt: skip
    wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
    return relay.log()


def _listed(policy: Path) -> dict[str, Suppression]:
    settings = load(policy).suppression
    assert settings is not None
    return {e.address.lower(): e for e in SuppressionFile(settings.file).entries().entries}


def _audit_json(policy: Path, *args: str) -> list[dict]:
    done = relay_cli(policy, "audit", *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_mailbox_refused_as_unknown_is_not_sent_to_again(
    policy_file: Path, tmp_path: Path
) -> None:
    """The first message's 550 5.1.1 puts the address on the list; the next one, in
    another case, is not offered to the upstream at all: its sender is told why,
    and the audit log says ``suppressed``. A refusal of the platform (5.7.1) or a
    temporary one says nothing about the address and lists nothing."""
    with SinkServer(Sink(refuse=dict(REFUSE))) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            first = send(port, rcpts=(*REFUSE, "ok@example.org"))
            wait_for(lambda: "is on the suppression list now" in relay.log())
            second = send(port, rcpts=("Gone@Example.org", "ok2@example.org"))
            wait_for(lambda: len(sink.sink.messages) >= 4)  # two messages, two notices
            log = relay.log()
    listed = _listed(policy)
    assert set(listed) == {"gone@example.org"}
    entry = listed["gone@example.org"]
    assert (entry.reason, entry.tenant, entry.queue_id) == ("bounce", None, first)
    assert entry.detail == REFUSE["gone@example.org"]
    sent = [m for m in sink.sink.messages if m.mail_from != "<>"]
    assert sorted(r for m in sent for r in m.rcpt_tos) == ["ok2@example.org", "ok@example.org"]
    assert f"{second}: to=<Gone@Example.org>, relay=default" in log
    assert "status=suppressed (not sent: on the suppression list since" in log
    assert "status=bounced" not in log.split(f"{second}: ", 1)[1].split("\n", 1)[0]
    events = audit_events(policy, second)
    assert ("suppressed", "Gone@Example.org") in events
    assert ("failed", "Gone@Example.org") not in events
    notices = [m for m in sink.sink.messages if m.mail_from == "<>"]
    about_second = [n for n in notices if second.encode() in n.data]
    assert len(about_second) == 1
    text = _body(about_second[0].data)
    assert "Gone@Example.org" in text and "suppression list" in text
    assert "ok2@example.org" not in text


def test_a_message_whose_every_recipient_is_suppressed_ends_with_the_notice(
    policy_file: Path, tmp_path: Path
) -> None:
    """Nothing reaches the upstream but the sender's notice; the ERP still gets its
    250 (the message was taken and has its final state), the queue empties, and
    ``audit report`` counts the recipient as suppressed."""
    with SinkServer(CountingSink()) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        settings = load(policy).suppression
        assert settings is not None
        complaint = Suppression("angry@example.org", None, COMPLAINT, "2026-01-02T03:04:05.000Z")
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            SuppressionFile(settings.file).add([complaint])  # the running workers see it
            queue_id = send(port, rcpts=("angry@example.org",))
            (notice,) = sink.sink.wait(1)
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
    assert notice.mail_from == "<>" and notice.rcpt_tos == ["jan@acme.example"]
    assert isinstance(sink.sink, CountingSink) and sink.sink.mails == 1  # the notice's only
    text = _body(notice.data)
    assert "angry@example.org" in text
    assert "since 2026-01-02T03:04:05.000Z (its recipient reported mail as spam)" in text
    assert "none of its recipients got it" in text
    events = audit_events(policy, queue_id)
    assert [e for e, _ in events] == ["received", "queued", "suppressed", "notified"]
    report = relay_cli(policy, "audit", "report", "--format", "json")
    assert report.returncode == 0, report.stderr
    rows = [json.loads(line) for line in report.stdout.splitlines()]
    other = next(r for r in rows if r.get("doc_type") == "other")
    assert other["suppressed"] == 1 and other["delivered"] == 0


def test_no_hard_bounce_codes_lists_nothing(policy_file: Path, tmp_path: Path) -> None:
    """``suppression: {hard_bounce: []}``: the relay adds no address itself."""
    with SinkServer(Sink(refuse=dict(REFUSE))) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port, "suppression: {hard_bounce: []}\n")
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            send(port, rcpts=("gone@example.org", "ok@example.org"))
            sink.sink.wait(2)  # the message to ok@, and the notice about gone@
            wait_for(lambda: "status=bounced" in relay.log())
            log = relay.log()
    assert "suppression list now" not in log
    assert _listed(policy) == {}


def test_a_sender_on_the_list_gets_no_notice_and_a_listed_address_keeps_its_date(
    policy_file: Path, tmp_path: Path
) -> None:
    """A sender whose own mailbox bounced was still sent a notice for each failed
    document (to a mailbox the relay knew dead); and each new bounce of an address
    on the list listed it again, moving its date."""
    with SinkServer(Sink(refuse=dict(REFUSE))) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        settings = load(policy).suppression
        assert settings is not None
        dead = Suppression("jan@acme.example", None, "bounce", "2026-01-02T03:04:05.000Z")
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            SuppressionFile(settings.file).add([dead])
            first = send(port, rcpts=("gone@example.org", "ok@example.org"))
            wait_for(lambda: f"{first}: no failure notice" in relay.log())
            second = send(port, rcpts=("gone@example.org",))
            wait_for(lambda: f"{second}: no failure notice" in relay.log())
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
            log = relay.log()
    said = "no failure notice: <jan@acme.example> is on the suppression list since 2026-01-02"
    assert f"{first}: {said}" in log and f"{second}: {said}" in log
    assert [m.rcpt_tos for m in sink.sink.messages] == [["ok@example.org"]]  # no notice at all
    lines = settings.file.read_text().splitlines()
    assert sum('"gone@example.org"' in line for line in lines) == 1
    assert _listed(policy)["gone@example.org"].queue_id == first


def test_two_queued_messages_bouncing_at_one_address_list_it_once(
    policy_file: Path, tmp_path: Path
) -> None:
    """Both were taken before the address was on the list; the second bounce found
    it listed and listed it again, with a later date. One attempted after the
    first bounce was listed is suppressed instead."""
    port, sink_port = free_port(), free_port()
    policy = configure(policy_file, port, sink_port)
    settings = load(policy).suppression
    assert settings is not None
    with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
        ids = [send(port, rcpts=("gone@example.org",)) for _ in range(2)]
        wait_for(lambda: relay.log().count("status=deferred") >= 2)  # the upstream is down
        with SinkServer(Sink(refuse=dict(REFUSE)), port=sink_port):
            ended = ("status=bounced", "status=suppressed")
            wait_for(lambda: sum(map(relay.log().count, ended)) >= 2)
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
    lines = settings.file.read_text().splitlines()
    assert sum('"gone@example.org"' in line for line in lines) == 1
    assert _listed(policy)["gone@example.org"].queue_id in ids


@contextlib.contextmanager
def _relay_with_a_list(
    policy_file: Path, tmp_path: Path, extra: str = ""
) -> Iterator[tuple[Path, int, RelayProcess, Path]]:
    """A relay whose upstream refuses ``REFUSE``, and its list file made."""
    with SinkServer(Sink(refuse=dict(REFUSE))) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port, extra)
        settings = load(policy).suppression
        assert settings is not None
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            SuppressionFile(settings.file).create()
            yield policy, port, relay, settings.file


def test_a_hard_bounce_the_list_refused_is_added_once_it_can_be_written(
    policy_file: Path, tmp_path: Path
) -> None:
    """The entry was lost: an error line, and the dead mailbox was mailed again."""
    with _relay_with_a_list(policy_file, tmp_path) as (policy, port, relay, listing):
        with read_only(listing, 0o444):
            first = send(port, rcpts=("gone@example.org",))
            wait_for(lambda: "kept in memory until the suppression list" in relay.log())
            assert _listed(policy) == {}
        Spool(load(policy).queue.directory, create=False).kick()  # as `relay queue retry`
        wait_for(lambda: "can be written again" in relay.log())
        log = relay.log()
    assert f"{first}: <gone@example.org> is kept in memory until the suppression list" in log
    assert f"{first}: <gone@example.org> is on the suppression list now, for every tenant" in log
    entry = _listed(policy)["gone@example.org"]
    assert (entry.reason, entry.queue_id) == ("bounce", first)
    (record,) = [r for r in _audit_json(policy, "show", first) if r["event"] == "listed"]
    assert record["message_id"] and record["suppression"]["since"] == entry.since


def test_a_kept_hard_bounce_keeps_its_first_refusal_when_the_address_bounces_again(
    policy_file: Path, tmp_path: Path
) -> None:
    """Not on the list while kept, the address is mailed and bounces again: the
    write that then works carried both, and the second, last in the file, won."""
    with _relay_with_a_list(policy_file, tmp_path, "workers: 1\n") as (
        policy,
        port,
        relay,
        listing,
    ):
        with read_only(listing, 0o444):
            first = send(port, rcpts=("gone@example.org",))
            wait_for(lambda: "kept in memory until the suppression list" in relay.log())
        second = send(port, rcpts=("gone@example.org",))
        wait_for(lambda: "can be written again" in relay.log())
        log = relay.log()
    assert _listed(policy)["gone@example.org"].queue_id == first
    assert listing.read_text().count('"gone@example.org"') == 1
    assert f"{second}: <gone@example.org> is on the suppression list now" not in log


def test_a_relay_stopping_with_hard_bounces_the_list_refused_names_them(
    policy_file: Path, tmp_path: Path
) -> None:
    with (
        _relay_with_a_list(policy_file, tmp_path) as (policy, port, relay, listing),
        read_only(listing, 0o444),
    ):
        send(port, rcpts=("gone@example.org",))
        wait_for(lambda: "kept in memory until the suppression list" in relay.log())
        assert relay.stop() == 0
        log = relay.log()
    assert (
        "stopping with 1 address refused as not existing that the suppression list"
        " could not take; add it with `relay suppression add`: gone@example.org"
    ) in log
    assert _listed(policy) == {}


def test_a_hard_bounce_from_a_tenants_own_upstream_lists_for_that_tenant_only(
    policy_file: Path, tmp_path: Path
) -> None:
    """A server only one company's mail goes through (its own account) listed the
    address for every company: their mail to it was suppressed too."""
    with SinkServer() as shared, SinkServer(Sink(refuse=dict(REFUSE))) as own:
        port = free_port()
        policy = configure(policy_file, port, shared.port)
        text = policy.read_text().replace(
            "upstreams:\n",
            f"upstreams:\n  globex-own:\n    type: smtp\n    host: 127.0.0.1\n"
            f"    port: {own.port}\n    tls: none\n    timeout: 5\n",
            1,
        )
        tenant = "    verified_domains: [globex.example]\n"
        policy.write_text(text.replace(tenant, tenant + "    upstream: globex-own\n", 1))
        policy.write_text(policy.read_text().replace(
            "    address: info@globex.example\n    upstream: default\n",
            "    address: info@globex.example\n",
        ))  # fmt: skip
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("hank@globex.example", ["gone@example.org"], SMALL)
            wait_for(lambda: "is on the suppression list now" in relay.log())
            assert (
                "<gone@example.org> is on the suppression list now, for tenant globex (550 5.1.1"
                in relay.log()
            )
            send(port, rcpts=("gone@example.org",))  # acme's, through the shared one
            wait_for(lambda: len(shared.sink.messages) >= 1)
    listed = _listed(policy)
    assert (listed["gone@example.org"].tenant, listed["gone@example.org"].reason) == (
        "globex",
        "bounce",
    )
    assert [m.rcpt_tos for m in shared.sink.messages] == [["gone@example.org"]]


def test_a_bounce_from_an_upstream_no_tenant_shares_now_lists_for_the_messages_tenant(
    policy_file: Path,
) -> None:
    """A reload that took the company away (or off its own server) left its
    queued mail going there: the server's refusal was listed for everyone."""
    policy = load(policy_file)
    own = dataclasses.replace(policy.upstreams["default"], name="own")
    moved = dataclasses.replace(policy, upstreams={**policy.upstreams, "own": own})
    assert engine._refused_for(make_entry(tenant="acme", upstream="default"), moved) is None
    assert engine._refused_for(make_entry(tenant="acme", upstream="own"), moved) == "acme"
    assert engine._refused_for(make_entry(tenant="gone", upstream="own"), moved) == "gone"


def test_a_message_for_suppressed_recipients_only_is_no_upstream_attempt(
    policy_file: Path, tmp_path: Path
) -> None:
    """It asks the upstream nothing: it was counted as a deferred attempt, which
    the alert of docs/metrics.md on deferred attempts without a sent one took for
    an upstream down whenever only such mail came in."""
    with SinkServer(CountingSink()) as sink:
        port, metrics = free_port(), free_port()
        policy = _metrics_policy(policy_file, port, sink.port, metrics, workers=1)
        settings = load(policy).suppression
        assert settings is not None
        complaint = Suppression("angry@example.org", None, COMPLAINT, "2026-01-02T03:04:05.000Z")
        with RelayProcess(policy, port, tmp_path / "relay.log"):
            SuppressionFile(settings.file).add([complaint])
            queue_id = send(port, rcpts=("angry@example.org",))
            sink.sink.wait(1)  # the sender's notice
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
            samples = _samples(metrics)
    attempts = {
        outcome: _value(
            samples, "relay_upstream_attempts_total", upstream="default", result=outcome
        )
        for outcome in ("sent", "deferred", "refused")
    }
    assert attempts == {"sent": 1, "deferred": 0, "refused": 0}  # the notice's only
    assert [e for e, _ in audit_events(policy, queue_id)][-2:] == ["suppressed", "notified"]


def test_a_hard_bounce_at_delivery_is_listed_in_the_audit_log(
    policy_file: Path, tmp_path: Path
) -> None:
    """The listing was in the operational log and the list only: an auditor asking
    why mail to an address stopped found a ``failed`` record and nothing saying
    the relay had listed it, nor since when."""
    with SinkServer(Sink(refuse=dict(REFUSE))) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            first = send(port, rcpts=("gone@example.org", "ok@example.org"))
            wait_for(lambda: "is on the suppression list now" in relay.log())
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
    entry = _listed(policy)["gone@example.org"]
    found = _audit_json(policy, "search", "--recipient", "gone@example.org", "--status", "listed")
    assert [(r["queue_id"], r["recipient"]) for r in found] == [(first, "gone@example.org")]
    assert found[0]["suppression"] == {"reason": "bounce", "since": entry.since}
    assert (found[0]["for_tenant"], found[0]["detail"]) == (None, REFUSE["gone@example.org"])
    story = relay_cli(policy, "audit", "show", first)
    assert story.returncode == 0, story.stderr
    gone = story.stdout.split("  gone@example.org\n", 1)[1]
    assert f"listed     on the suppression list for every tenant since {entry.since}" in gone
    table = relay_cli(policy, "audit", "search", "--recipient", "gone@example.org")
    assert "listed" in table.stdout and "bounce, every tenant: 550 5.1.1" in table.stdout
    rows = _audit_json(policy, "report")
    assert sum(r["listed"] for r in rows) == 1
    verified = relay_cli(policy, "audit", "verify")
    assert verified.returncode == 0, verified.stderr


def test_a_tenant_users_address_refused_at_delivery_is_not_listed(
    policy_file: Path, tmp_path: Path
) -> None:
    """The sender's own automatic copy refused as unknown listed the sender: no
    copy and no notice reached them again, and nothing in the audit log said
    why. As ``relay bounce`` does, a user of the message's tenant (the copy, or a
    colleague by alias) is not listed; a warning says to check the policy."""
    refuse = {
        **REFUSE,
        "jan@acme.example": "550 5.1.1 <jan@acme.example>: User unknown",
        "salg@acme.example": "550 5.1.1 <salg@acme.example>: User unknown",
    }
    with SinkServer(Sink(refuse=refuse)) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            invoice = SMALL.replace(b"Subject: Hello", b"Subject: Invoice 1")
            first = send(port, invoice, rcpts=("ok@example.org", "salg@acme.example"))
            wait_for(lambda: relay.log().count(f"{first}: to=<") >= 3)
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
            second = send(port, rcpts=("gone@example.org",))
            log = _settled(relay, policy, second)
    assert set(_listed(policy)) == {"gone@example.org"}
    for address, user in (("jan@acme.example", "jan"), ("salg@acme.example", "kari")):
        assert (
            f"{first}: <{address}> is not put on the suppression list: user {user} of acme"
        ) in log
        assert ("failed", address) in audit_events(policy, first)
    assert "check the user's address in the policy" in log
    assert ("notified", "jan@acme.example") in audit_events(policy, second)
    nothing = relay_cli(
        policy, "audit", "search", "--status", "listed", "--recipient", "jan@acme.example"
    )
    assert (nothing.returncode, nothing.stdout.splitlines()[1:]) == (1, [])  # a header only


def _rename_acme(policy: Path) -> None:
    text = policy.read_text().replace("tenant: acme\n", "tenant: acmeco\n")
    policy.write_text(text.replace("  acme:\n    name: Acme", "  acmeco:\n    name: Acme"))


def test_entries_of_a_renamed_tenant_are_warned_of(policy_file: Path, tmp_path: Path) -> None:
    """A complaint listed for tenant acme, and acme renamed acmeco: check said ok,
    the reload nothing, and the next message went to the complainant. The
    entries are not moved (only the sysadmin knows what became of a name), but
    check, the reload, the start and the listing say so."""
    complained = "complained@cust.example"
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        warned = "1 entry is for tenants the policy does not have: acme (1); they keep no"
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            done = relay_cli(
                policy, "suppression", "add", complained, "--tenant", "acme", "--reason", COMPLAINT
            )
            assert done.returncode == 0, done.stderr
            _rename_acme(policy)
            checked = relay_cli(policy, "check")
            assert checked.returncode == 0, checked.stderr
            assert f"{policy}: warning: suppression list " in checked.stderr
            assert warned in checked.stderr
            assert "relay suppression remove ADDRESS --tenant acme, then" in checked.stderr
            relay.signal(signal.SIGHUP)
            relay.wait_reloaded(1)
            assert warned in relay.log()
        listing = relay_cli(policy, "suppression", "list").stdout
        assert f"{complained}  acme (not in the policy)  complaint" in listing
        with RelayProcess(policy, port, tmp_path / "again.log") as again:
            assert warned in again.log()


def _send_as(port: int, sender: str, rcpts: tuple[str, ...]) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in rcpts:
            client.rcpt(rcpt)
        code, reply = client.data(SMALL)
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def test_another_tenants_users_address_refused_at_delivery_is_not_listed(
    policy_file: Path, tmp_path: Path
) -> None:
    """A shared upstream's refusal lists for every tenant: acme's document to a
    globex user listed him for globex's mail too, and his own company's
    notices and copies stopped. A user of any tenant is not listed."""
    refuse = {**REFUSE, "hank@globex.example": "550 5.1.1 <hank@globex.example>: User unknown"}
    with SinkServer(Sink(refuse=refuse)) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            first = send(port, rcpts=("hank@globex.example",))
            wait_for(lambda: f"{first}: to=<hank@globex.example>" in relay.log())
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
            second = _send_as(port, "hank@globex.example", ("gone@example.org",))
            log = _settled(relay, policy, second)
    assert set(_listed(policy)) == {"gone@example.org"}
    assert (
        f"{first}: <hank@globex.example> is not put on the suppression list: user hank of globex"
    ) in log
    assert ("failed", "hank@globex.example") in audit_events(policy, first)
    assert ("notified", "hank@globex.example") in audit_events(policy, second)


@dataclass
class RefusingTheMessage(Sink):
    """Refuses each message but the relay's notices (``<>``): at MAIL FROM with
    ``mail_reply``, else at its end with ``data_reply``, which must be a refusal."""

    mail_reply: str = ""

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        if self.mail_reply and address != "<>":
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if envelope.mail_from != "<>":
            return self.data_reply
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
        )
        return "250 2.0.0 sink accepted"


SENDER_UNKNOWN = (
    "550 5.1.1 <bounces@platform.example>: Sender address rejected: undeliverable address:"
    " host mx.platform.example said: 550 5.1.1 User unknown"
)
NOT_FOUND = "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
CUSTOMERS = ("c1@cust.example", "c2@cust.example")


def _refused_at_mail_from(
    policy_file: Path, tmp_path: Path, sink: RefusingTheMessage
) -> tuple[Path, str, Received, str]:
    """An invoice to CUSTOMERS through an upstream refusing its MAIL FROM: the
    policy, its queue ID, the sender's notice and the log once it is done."""
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            invoice = SMALL.replace(b"Subject: Hello", b"Subject: Invoice 3")
            queue_id = send(port, invoice, rcpts=CUSTOMERS)
            (notice,) = sink.wait(1)
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
            return policy, queue_id, notice, relay.log()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-at-a-time", "pipelining"])
def test_a_refused_sender_lists_no_recipient(
    policy_file: Path, tmp_path: Path, pipelining: bool
) -> None:
    """Postfix's ``reject_unverified_sender`` answers MAIL FROM ``550 5.1.1`` when
    the platform's bounce mailbox does not exist: every recipient was put on the
    suppression list, and the sender's automatic copy warned of as a user whose
    address the policy had wrong. The message fails and its sender is told, as
    before; the log says why nobody was listed."""
    sink = RefusingTheMessage(mail_reply=SENDER_UNKNOWN, pipelining=pipelining)
    policy, queue_id, notice, log = _refused_at_mail_from(policy_file, tmp_path, sink)
    assert _listed(policy) == {}
    why = "the upstream refused the sender, not the recipient"
    for address in (*CUSTOMERS, "jan@acme.example"):  # the sender's copy too
        said = f"{queue_id}: <{address}> is not put on the suppression list: {why} (550 5.1.1"
        assert said in log
        assert ("failed", address) in audit_events(policy, queue_id)
    assert "is on the suppression list now" not in log
    assert "check the user's address in the policy" not in log
    assert "listed" not in {event for event, _ in audit_events(policy, queue_id)}
    assert notice.rcpt_tos == ["jan@acme.example"] and queue_id.encode() in notice.data
    warned = (  # what to fix, where the lines above say only whom it did not list
        f"WARNING {queue_id}: upstream 'default' refused the envelope sender"
        f" <bounces@platform.example>, the platform's return_path ({SENDER_UNKNOWN}):"
        " every message sent with it fails until the upstream takes it"
    )
    assert log.count(warned) == 1, log


def test_a_message_too_big_at_mail_from_is_no_refused_sender(
    policy_file: Path, tmp_path: Path
) -> None:
    """Postfix's ``552 5.3.4`` to a ``SIZE=`` over its ``message_size_limit`` is
    about the message: it was warned of as the return path refused, every
    message sent with it failing, while smaller ones went through. The message
    fails once and its sender is told, as before."""
    too_big = "552 5.3.4 Message size exceeds fixed limit"
    sink = RefusingTheMessage(mail_reply=too_big)
    policy, queue_id, notice, log = _refused_at_mail_from(policy_file, tmp_path, sink)
    assert f"{queue_id}: to=<{CUSTOMERS[0]}>" in log and f"status=bounced ({too_big})" in log
    assert "refused the envelope sender" not in log, log
    for address in (*CUSTOMERS, "jan@acme.example"):
        assert ("failed", address) in audit_events(policy, queue_id)
    assert notice.rcpt_tos == ["jan@acme.example"] and queue_id.encode() in notice.data


def test_a_refused_sender_is_warned_of_while_the_client_waits(
    policy_file: Path, tmp_path: Path
) -> None:
    """With ``immediate``, the client heard the refusal and the relay returned
    before its warning naming the envelope sender: the log said only whom it did
    not list. The refusal is of the relay's sender: the client hears a 4xx."""
    sink = RefusingTheMessage(mail_reply=SENDER_UNKNOWN)
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        text = policy.read_text().replace("auth: optional", "auth: optional\n    immediate: 10")
        policy.write_text(text)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("jan@acme.example")
                client.rcpt(CUSTOMERS[0])
                code, reply = client.data(SMALL)
            wait_for(lambda: "refused the envelope sender" in relay.log())
            log = relay.log()
    assert (code, reply.split(b" ", 1)[0]) == (451, b"4.7.0"), reply
    warned = (
        "upstream 'default' refused the envelope sender <bounces@platform.example>, the"
        f" platform's return_path ({SENDER_UNKNOWN}): every message sent with it fails"
    )
    assert log.count(warned) == 1, log


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-at-a-time", "pipelining"])
def test_a_refused_message_lists_its_recipient_only_when_it_had_one(
    policy_file: Path, tmp_path: Path, pipelining: bool
) -> None:
    """A ``5.1.1`` to the end of a message of several recipients names none of
    them, and listed them all; to a message of one recipient it can only be
    about that one, which is listed as before."""
    sink = RefusingTheMessage(data_reply=NOT_FOUND, pipelining=pipelining)
    with SinkServer(sink) as server:
        port = free_port()
        policy = configure(policy_file, port, server.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            several = send(port, rcpts=CUSTOMERS)
            sink.wait(1)  # the sender's notice
            one = send(port, rcpts=("c3@cust.example",))
            wait_for(lambda: "is on the suppression list now" in relay.log())
            wait_for(lambda: relay_cli(policy, "queue", "list").stdout == "Mail queue is empty\n")
            log = relay.log()
    assert set(_listed(policy)) == {"c3@cust.example"}
    assert _listed(policy)["c3@cust.example"].queue_id == one
    why = "the upstream refused the message for all its recipients, not this one"
    for address in CUSTOMERS:
        said = f"{several}: <{address}> is not put on the suppression list: {why} ({NOT_FOUND})"
        assert said in log
    assert "listed" not in {event for event, _ in audit_events(policy, several)}
    assert ("listed", "c3@cust.example") in audit_events(policy, one)


BUSY = "451 4.2.1 <{}>: mailbox busy, try again later"


def _listed_while_waiting(
    policy_file: Path, tmp_path: Path, rcpts: tuple[str, ...], data: bytes, *listing: str
) -> tuple[str, str, Sink, Path]:
    """A message deferred to ``rcpts``; then ``relay suppression add *listing``,
    the upstream takes mail again, and ``relay queue retry ALL``: (queue ID, log,
    sink, policy) once the queue is empty."""
    busy = {address: BUSY.format(address) for address in (*rcpts, "jan@acme.example")}
    with SinkServer(Sink(refuse=busy)) as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as relay:
            queue_id = send(port, data, rcpts)
            wait_for(lambda: f"{queue_id}: to=<{rcpts[0]}>" in relay.log())
            added = relay_cli(policy, "suppression", "add", *listing)
            assert added.returncode == 0, added.stderr
            busy.clear()
            relay_cli(policy, "queue", "retry", "ALL")
            log = _settled(relay, policy, queue_id)
    return queue_id, log, sink.sink, policy


def test_an_address_listed_while_its_message_waits_is_not_sent_to(
    policy_file: Path, tmp_path: Path
) -> None:
    """Checked only as the message came, a deferred message went to the address
    at its next attempt, though it had bounced or complained since."""
    queue_id, log, sink, policy = _listed_while_waiting(
        policy_file, tmp_path, ("c4@example.org", "ok@example.org"), SMALL, "c4@example.org"
    )
    sent = [m for m in sink.messages if m.mail_from != "<>"]
    assert [m.rcpt_tos for m in sent] == [["ok@example.org"]]
    line = f"{queue_id}: to=<c4@example.org>, relay=default, "
    (said,) = [x for x in log.splitlines() if line in x and "status=suppressed" in x]
    assert "status=suppressed (not sent: on the suppression list since" in said
    assert "(put there by the mail administrator)" in said
    events = audit_events(policy, queue_id)
    assert ("deferred", "c4@example.org") in events and ("failed", "c4@example.org") not in events
    assert events.index(("suppressed", "c4@example.org")) > events.index(("queued", None))
    (record,) = [r for r in _audit_json(policy, "show", queue_id) if r["event"] == "suppressed"]
    assert record["suppression"]["reason"] == "manual"
    (notice,) = [m for m in sink.messages if m.mail_from == "<>"]
    assert notice.rcpt_tos == ["jan@acme.example"]
    text = _body(notice.data)
    assert "c4@example.org" in text and "suppression list" in text
    assert "ok@example.org" not in text


def test_a_message_whose_every_recipient_is_listed_while_it_waits_leaves_the_queue(
    policy_file: Path, tmp_path: Path
) -> None:
    """Listed for the message's tenant only, the address is kept from it too; the
    sender's automatic copy of a document nobody gets is not sent, as at
    acceptance, and the message ends with the sender's notice."""
    invoice = SMALL.replace(b"Subject: Hello", b"Subject: Invoice 1")
    queue_id, log, sink, policy = _listed_while_waiting(
        policy_file, tmp_path, ("c4@example.org",), invoice, "c4@example.org", "--tenant", "acme"
    )
    assert [m.mail_from for m in sink.messages] == ["<>"]  # the notice only
    assert f"{queue_id}: to=<c4@example.org>, relay=default, " in log
    assert "status=suppressed (not sent: on the suppression list for acme since" in log
    assert f"{queue_id}: to=<jan@acme.example>, relay=default, " in log
    assert "status=bounced (not sent: every recipient is on the suppression list)" in log
    events = audit_events(policy, queue_id)
    assert ("suppressed", "c4@example.org") in events and ("notified", "jan@acme.example") in events
    assert ("delivered", "jan@acme.example") not in events
    assert "c4@example.org" in _body(sink.messages[0].data)
