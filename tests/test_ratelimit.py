"""A tenant's ``recipients_per_hour``: the shared counts, the policy key, and a real relay
with two workers refusing what passes the limit."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import re
import smtplib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import pytest

from relay import ratelimit
from relay.cli import main
from relay.deliver import attempt
from relay.engine import Engine
from relay.errors import SmtpReply
from relay.pipeline import Acceptor
from relay.policy.load import load
from relay.policy.model import Policy, Tenant
from relay.ratelimit import SLOTS, RateCounts
from relay.record import Recorder
from relay.server import SharedCounts
from relay.sharedtable import SharedTable, key_of
from relay.spool import Spool
from relay.submission import Submission
from tests.minimal_policy import policy as minimal_policy
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer
from tests.test_engine_warm import running
from tests.test_queue_e2e import UNKNOWN, immediate, submit
from tests.test_workers import (
    MESSAGE,
    Relay,
    audit_records,
    configure,
    free_port,
    reload_in_every_worker,
    serving,
)

NOON = 1_800_000_000.0  # a minute's start: 30,000,000 minutes since the epoch


def test_each_worker_writes_its_row_and_every_worker_reads_them_all() -> None:
    counts = RateCounts(2)
    first, second = counts.row(0), counts.row(1)
    first.add("acme", 3, NOON)
    second.add("acme", 2, NOON + 30)
    second.add("globex", 7, NOON)
    assert first.sent("acme", NOON + 59) == second.sent("acme", NOON + 59) == 5
    assert first.sent("globex", NOON) == 7
    assert first.sent("initech", NOON) == 0


def test_the_window_is_the_last_sixty_minutes_and_the_rest_of_the_minute_before() -> None:
    row = RateCounts(1).row(0)
    row.add("acme", 4, NOON)
    row.add("acme", 1, NOON + 60 * 30)
    assert row.sent("acme", NOON + 60 * 59 + 59) == 5  # still in the hour of the first minute
    assert row.sent("acme", NOON + 60 * 60 + 59) == 5  # its minute counts whole
    assert row.sent("acme", NOON + 60 * 61) == 1  # the first minute has gone
    assert row.sent("acme", NOON + 60 * 91) == 0
    row.add("acme", 2, NOON + 60 * 122)  # a bucket an hour old is started again, not added to
    assert row.sent("acme", NOON + 60 * 122) == 2


def test_nothing_sent_in_the_last_sixty_minutes_is_forgotten() -> None:
    """Counted in whole minutes from the one 59 minutes back, mail sent in a
    minute's last second stopped counting 59 minutes and a second later: a
    tenant could send twice its limit within an hour, across that minute."""
    for second in (0, 1, 30, 59):
        row = RateCounts(1).row(0)
        row.add("acme", 1, NOON + second)
        for later in (1, 60 * 59 + 1, 60 * 59 + 59, 3599):
            assert row.sent("acme", NOON + second + later) == 1, (second, later)


def test_the_hour_is_counted_on_a_clock_nobody_sets() -> None:
    """The minutes were the wall clock's: set back an hour, a tenant at its limit
    had its count fall to 0 and could send another hour's worth at once; kept
    for minutes later than the clock's, a day's step held it a day."""
    assert inspect.signature(Acceptor).parameters["clock"].default is time.monotonic


def test_a_count_given_back_is_taken_off_and_never_below_nothing() -> None:
    row = RateCounts(1).row(0)
    where = row.add("acme", 3, NOON)
    assert where is not None
    row.give_back(3, NOON, where)
    assert row.sent("acme", NOON) == 0
    row.give_back(5, NOON, where)
    assert row.sent("acme", NOON) == 0


def test_a_count_given_back_goes_to_its_own_minute_or_nowhere() -> None:
    """Given back to the minute it was taken in, also once that minute is over; a
    minute whose slot a later one took is out of the hour: nothing to take from,
    and the later minute's count stays."""
    row = RateCounts(1).row(0)
    where = row.add("acme", 3, NOON + 59)
    assert where is not None
    row.give_back(3, NOON + 59, where)  # the refusal came in the next minute
    assert row.sent("acme", NOON + 61) == 0
    row.add("acme", 2, NOON + 60 * 61)  # the same slot, an hour and a minute on
    row.give_back(1, NOON, where)
    assert row.sent("acme", NOON + 60 * 61) == 2


def test_a_count_given_back_after_its_slot_went_to_another_takes_from_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Looked up by the tenant, a give-back whose slot had been given away and the
    tenant counted again in another took the newer message's count: 5 given back
    from 3 left none counted."""
    monkeypatch.setattr(ratelimit, "SLOTS", 2)
    counts = RateCounts(1)
    row = counts.row(0)
    first = row.add("acme", 5, NOON)  # a message waiting for the upstream
    row.add("globex", 9, NOON)
    row.add("initech", 10, NOON)  # a crowded row: acme's slot is the least counted
    assert counts.sent("acme", NOON) == 0
    second = row.add("acme", 3, NOON)  # the next message: globex's slot
    assert first is not None and second is not None and second[0] != first[0]
    row.give_back(5, NOON, first)  # the upstream refused the first
    assert counts.sent("acme", NOON) == 3
    assert counts.sent("initech", NOON) == 10


def test_a_count_given_back_after_its_slot_was_taken_back_at_its_place_takes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tenant coming back most often takes back its own place, held by a newcomer
    counted little: the give-back found its key there and took the newer count."""
    monkeypatch.setattr(ratelimit, "SLOTS", 1)
    counts = RateCounts(1)
    row = counts.row(0)
    first = row.add("acme", 5, NOON)
    row.add("globex", 1, NOON)  # acme's slot, given away
    second = row.add("acme", 3, NOON)  # taken back: the same slot
    assert first is not None and second is not None and second[0] == first[0]
    row.give_back(5, NOON, first)
    assert counts.sent("acme", NOON) == 3


def test_tenants_whose_hashes_meet_in_one_slot_are_counted_apart() -> None:
    names: dict[int, str] = {}
    for number in range(100_000):
        name = f"tenant{number}"
        start = key_of(name) % SLOTS
        if start in names:
            other = name
            break
        names[start] = name
    else:
        pytest.fail("no two names met")
    one = names[key_of(other) % SLOTS]
    counts = RateCounts(2)
    counts.row(0).add(one, 1, NOON)
    counts.row(0).add(other, 4, NOON)
    assert counts.row(1).sent(one, NOON) == 1
    assert counts.row(1).sent(other, NOON) == 4


def test_a_forked_worker_counts_into_the_shared_memory() -> None:
    counts = RateCounts(2)
    pid = os.fork()
    if pid == 0:  # the "worker"
        counts.row(1).add("acme", 6, NOON)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert counts.row(0).sent("acme", NOON) == 6
    # a worker restarted in the same place goes on from its row, not beside it
    again = counts.row(1)
    again.add("acme", 1, NOON)
    assert counts.row(0).sent("acme", NOON) == 7


LIMIT = 30


@pytest.fixture
def limited(policy_file: Path, tmp_path: Path) -> Iterator[Relay]:
    """Acme may send to LIMIT recipients an hour; two workers share the count."""
    port = free_port()
    path = configure(policy_file, port)
    limit = f"    default_user: jan\n    recipients_per_hour: {LIMIT}\n"
    text = path.read_text().replace("    default_user: jan\n", limit, 1)
    path.write_text(text + f"metrics: {{address: 127.0.0.1, port: {free_port()}}}\n")
    with serving(path, port, tmp_path / "relay.log") as running:
        yield running


def deliver(
    port: int, recipients: list[str], sender: str = "jan@acme.example"
) -> tuple[int, bytes]:
    """One message on a connection of its own (the kernel hands them to either worker)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        client.mail(sender)
        for rcpt in recipients:
            client.rcpt(rcpt)
        return client.data(MESSAGE.replace(b"jan@acme.example", sender.encode()))


def test_a_real_relay_refuses_past_the_limit_across_its_workers(limited: Relay) -> None:
    """Both workers take some of the hour's mail before it is full: counted per worker,
    neither would be at the limit when the last message comes."""
    sent: list[str] = []
    while len({limited.queued_by().get(qid) for qid in sent}) < 2:
        assert len(sent) < LIMIT - 4, "every message went to one worker"
        code, text = deliver(limited.port, [f"r{len(sent)}@example.org"])
        assert code == 250, text
        sent.append(text.decode().rsplit(" ", 1)[1])
        limited.wait_for(lambda: sent[-1] in limited.queued_by(), "its queued line")
    rest = [f"s{n}@example.org" for n in range(LIMIT - len(sent))]
    assert deliver(limited.port, rest)[0] == 250  # the hour is full now, not past it
    code, text = deliver(limited.port, ["late@example.org"])
    assert (code, text) == (
        450,
        f"4.7.1 Tenant acme has sent to {LIMIT} recipients in the last hour; this message's"
        f" 1 would make {LIMIT + 1}, of {LIMIT} allowed: try again later".encode(),
    )
    code, text = deliver(limited.port, [f"t{n}@example.org" for n in range(LIMIT + 1)])
    assert (code, text) == (
        550,
        f"5.7.1 {LIMIT + 1} recipients, more than tenant acme may send to in an hour"
        f" ({LIMIT})".encode(),
    )
    refused = "refused client=127.0.0.1 login=- from=<jan@acme.example> to=<late@example.org>:"
    assert f"{refused} 450 4.7.1 Tenant acme" in limited.log()
    rejected = [r for r in audit_records(limited) if r["event"] == "rejected"]
    assert [r["reply"][:9] for r in rejected] == ["450 4.7.1", "550 5.7.1"]
    # another tenant's mail is not held up by acme's limit
    assert deliver(limited.port, ["one@example.org"], "hank@globex.example")[0] == 250
    # the supervisor reads the workers' counts for Prometheus
    port = re.search(r"metrics: \{address: 127.0.0.1, port: (\d+)\}", limited.policy.read_text())
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=10) as answer:
        scraped = answer.read().decode()
    assert f'relay_tenant_recipients_last_hour{{tenant="acme"}} {LIMIT}.0' in scraped
    assert f'relay_tenant_recipients_per_hour_limit{{tenant="acme"}} {LIMIT}.0' in scraped
    assert 'relay_tenant_recipients_last_hour{tenant="globex"} 1.0' in scraped  # no limit
    assert 'relay_tenant_recipients_per_hour_limit{tenant="globex"}' not in scraped


def test_preview_shows_the_limit_and_refuses_what_no_hour_could_take(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hour's count is the running relay's; only a message over the limit on its
    own is refused whatever it holds, as over SMTP."""
    text = policy_file.read_text().replace(
        "    default_user: jan\n", "    default_user: jan\n    recipients_per_hour: 2\n", 1
    )
    policy_file.write_text(text)
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE)
    args = ["preview", "-c", str(policy_file), str(eml), "--rcpt", "one@example.org"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert (
        "Tenant:      Acme AS (acme), at most 2 recipients an hour (the hour's count is not"
        " checked here)\n"
    ) in said
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tenant"]["recipients_per_hour"] == 2
    more = [*args, "--rcpt", "two@example.org", "--rcpt", "three@example.org"]
    assert main(more) == 65
    refused = capsys.readouterr().err
    assert "would refuse this message: 550 5.7.1 3 recipients, more than tenant acme" in refused


def test_preview_counts_no_recipient_on_the_suppression_list(
    policy_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As the relay counts: three recipients, one of them never sent to, is two."""
    text = policy_file.read_text().replace(
        "    default_user: jan\n", "    default_user: jan\n    recipients_per_hour: 2\n", 1
    )
    policy_file.write_text(text)
    (tmp_path / "state").mkdir()
    assert main(["suppression", "add", "-c", str(policy_file), "gone@example.org"]) == 0
    eml = tmp_path / "m.eml"
    eml.write_bytes(MESSAGE)
    args = ["preview", "-c", str(policy_file), str(eml), "--rcpt", "one@example.org"]
    assert main([*args, "--rcpt", "gone@example.org", "--rcpt", "two@example.org"]) == 0
    assert "would refuse" not in capsys.readouterr().err


def test_a_limit_a_reload_brings_in_holds_the_hour_already_sent(
    policy_file: Path, tmp_path: Path
) -> None:
    """The limit is put in when a login is found stolen: what it sent before counts."""
    port = free_port()
    path = configure(policy_file, port)
    with serving(path, port, tmp_path / "relay.log") as relay:
        for n in range(5):
            assert deliver(port, [f"r{n}@example.org"])[0] == 250
        limited = path.read_text().replace(
            "    default_user: jan\n", "    default_user: jan\n    recipients_per_hour: 6\n", 1
        )
        reload_in_every_worker(relay, limited)
        assert deliver(port, ["r5@example.org"])[0] == 250
        code, text = deliver(port, ["r6@example.org"])
        assert (code, text[:48]) == (450, b"4.7.1 Tenant acme has sent to 6 recipients in th")


def test_mail_the_upstream_refused_while_the_erp_waited_does_not_count(
    policy_file: Path, tmp_path: Path
) -> None:
    """With ``immediate`` the ERP is told the upstream's 550: nothing was sent."""
    refusing = Sink(refuse={"gone@example.org": UNKNOWN})
    with SinkServer(refusing) as sink:
        port = free_port()
        path = immediate(policy_file, port, sink.port)
        text = path.read_text().replace(
            "    default_user: jan\n", "    default_user: jan\n    recipients_per_hour: 2\n", 1
        )
        path.write_text(text)
        with RelayProcess(path, port, tmp_path / "relay.log"):
            assert submit(port, ("gone@example.org",), MESSAGE)[0] == 550
            assert submit(port, ("one@example.org",), MESSAGE)[0] == 250
            assert submit(port, ("two@example.org",), MESSAGE)[0] == 250
            assert submit(port, ("three@example.org",), MESSAGE)[0] == 450


def _limits(**limits: int | None) -> Policy:
    """A policy of these tenants, with these ``recipients_per_hour`` (None: no limit)."""
    tenants = {
        name: Tenant(
            name, name, f"post@{name}.example", (), "default", None, {}, frozenset(), {}, limit
        )
        for name, limit in limits.items()
    }
    return dataclasses.replace(minimal_policy(), tenants=MappingProxyType(tenants))


def test_one_recipient_sent_to_in_the_hour_is_said_in_the_singular() -> None:
    """``has sent to 1 recipients`` where the limit is one, which the policy allows."""
    acme = _limits(acme=1).tenants["acme"]
    refused = ratelimit.refusal(acme, 1, 1)
    assert refused is not None
    assert refused.line == (
        "450 4.7.1 Tenant acme has sent to 1 recipient in the last hour; this message's"
        " 1 would make 2, of 1 allowed: try again later"
    )


def test_tenants_without_a_limit_make_room_for_one_with_a_limit() -> None:
    """A worker's row held 4,096 tenants: each tenant after them, limited or not,
    went uncounted, and a stolen login's tenant sent past its limit."""
    counts = RateCounts(2)
    policy = _limits(acme=50)
    row = counts.row(0, lambda: policy)
    for n in range(SLOTS):
        row.add(f"tenant{n}", 1, NOON)
    assert row.add("acme", 5, NOON)
    for n in range(
        SLOTS, 2 * SLOTS
    ):  # each counts more than acme: acme keeps its slot all the same
        assert row.add(f"tenant{n}", 9, NOON)
    assert counts.row(1).sent("acme", NOON + 60) == 5


def test_a_limit_a_reload_brings_in_keeps_the_slot_before_the_tenants_next_message() -> None:
    """Whether a slot was kept was written with the tenant's counts: after a reload
    limited it, its slot in a worker it had not sent through since still said
    "no limit", a crowded row gave it away, and the hour it had sent was forgotten."""
    policies = [_limits(acme=None)]
    counts = RateCounts(2)
    row = counts.row(0, lambda: policies[-1])
    row.add("acme", 45, NOON)
    policies.append(_limits(acme=50))  # the reload: a stolen login found
    for n in range(2 * SLOTS):  # each counts more than acme
        row.add(f"tenant{n}", 100, NOON + 60)
    assert counts.row(1).sent("acme", NOON + 120) == 45


def test_the_table_is_sized_for_the_limited_tenants_not_every_one() -> None:
    """Sized for every tenant, a row took about 1 KB of shared memory a tenant
    and a worker: 155 MB for 20,000 tenants and 8 workers."""
    unlimited = {f"tenant{n}": None for n in range(20_000)}
    assert SharedCounts.made(_limits(**unlimited)).rates.row(0).slots == SLOTS
    limited = {f"limited{n}": 10 for n in range(3000)}
    assert SharedCounts.made(_limits(**unlimited, **limited)).rates.row(0).slots == 6000


def test_a_limited_tenant_with_no_room_left_is_said_to_be_uncounted() -> None:
    """Limited tenants keep their slots: one that finds every slot near its place
    kept is told so (False), for its mail to be refused, not let through uncounted."""
    counts = RateCounts(1)
    policy = _limits(**{f"tenant{n}": 1 for n in range(2 * SLOTS)})
    row = counts.row(0, lambda: policy)
    for n in range(2 * SLOTS):
        if not row.add(f"tenant{n}", 1, NOON):
            break
    else:
        pytest.fail("every limited tenant found room")
    assert counts.sent(f"tenant{n}", NOON) == 0
    assert sum(counts.sent(f"tenant{k}", NOON) for k in range(n)) == n  # none gave its slot up


def _limited(policy_file: Path, **limits: int) -> Policy:
    text = policy_file.read_text()
    for tenant, limit in limits.items():
        at = text.index(f"  {tenant}:\n") + len(f"  {tenant}:\n")
        text = f"{text[:at]}    recipients_per_hour: {limit}\n{text[at:]}"
    policy_file.write_text(text)
    return load(policy_file)


async def _replies(
    policy: Policy, acceptor: Acceptor, engine: Engine, senders: list[str]
) -> list[str]:
    """The reply to one message to one recipient from each sender, in turn."""
    said = []
    async with running(engine):
        for n, sender in enumerate(senders):
            data = MESSAGE.replace(b"jan@acme.example", sender.encode())
            submission = Submission(
                "local", "127.0.0.1", None, sender, (f"r{n}@example.org",), data
            )
            try:
                said.append((await acceptor.process(policy, submission))[:3])
            except SmtpReply as refused:
                said.append(refused.line)
    return said


async def test_a_full_row_still_holds_a_limited_tenant_to_its_limit(
    policy_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row of one slot, taken by a tenant with no limit: acme's mail was let
    through uncounted, past its limit."""
    monkeypatch.setattr(ratelimit, "SLOTS", 1)
    policy = _limited(policy_file, acme=2)
    spool = Spool(tmp_path / "spool")
    engine = Engine(spool, lambda: policy, attempt, Recorder(None))
    rates = RateCounts(1).row(0, lambda: policy)
    acceptor = Acceptor(spool, engine, Recorder(None), rates=rates)
    senders = ["hank@globex.example", *["jan@acme.example"] * 3]
    said = await _replies(policy, acceptor, engine, senders)
    assert said[:3] == ["250"] * 3
    assert said[3].startswith("450 4.7.1 Tenant acme has sent to 2 recipients in the last hour")


async def test_a_limited_tenant_that_cannot_be_counted_is_refused_and_said_each_minute(
    policy_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one slot is globex's, limited too: acme's mail is refused for now, as
    sending it uncounted would let it past its limit unseen; the log says so
    again a minute on, not once a process."""
    monkeypatch.setattr(ratelimit, "SLOTS", 1)
    policy = _limited(policy_file, acme=20, globex=20)
    now = [NOON]
    spool = Spool(tmp_path / "spool")
    engine = Engine(spool, lambda: policy, attempt, Recorder(None))
    rates = RateCounts(1).row(0, lambda: policy)
    acceptor = Acceptor(spool, engine, Recorder(None), rates=rates, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="relay"):
        said = await _replies(policy, acceptor, engine, ["hank@globex.example", "jan@acme.example"])
        assert said == [
            "250",
            "451 4.3.0 Tenant acme's recipients cannot be counted against its limit of 20 an"
            " hour: the relay has no room for the count; try again later",
        ]
        await _replies(policy, acceptor, engine, ["jan@acme.example"])
        now[0] += 61
        await _replies(policy, acceptor, engine, ["jan@acme.example"])
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, errors
    assert errors[0].startswith("tenant acme: no room to count its recipients in this worker's")
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert len(refused) == 3 and all("451 4.3.0 Tenant acme's" in line for line in refused)


def _a_row_of_two_kept() -> tuple[ratelimit.RateRow, float]:
    """A row with room for two tenants, both kept at one start: 5 and 9 counted."""
    tenants = {t: SimpleNamespace(id=t, recipients_per_hour=10) for t in ("a", "b", "c")}
    policy = SimpleNamespace(tenants=tenants)
    table = SharedTable("t", 1, 2, ratelimit.BUCKETS + 1, ratelimit.REACH)
    row = ratelimit.RateRow(table.row(0), lambda: policy)  # type: ignore[arg-type, return-value]
    start = 1_000_000 * 60.0
    assert row.add("a", 5, start) is not None and row.add("b", 9, start) is not None
    return row, start


def test_a_slot_that_counted_nothing_for_an_hour_goes_to_a_newcomer() -> None:
    """Even a limited tenant's: its hour is over. Two kept tenants fill a row of
    two; an hour and more later a third is counted in an idle one's place."""
    row, start = _a_row_of_two_kept()
    assert row.add("c", 1, start + 60) is None  # both kept, both counting
    assert row.add("c", 1, start + 62 * 60) is not None
    assert row.sent("c", start + 62 * 60) == 1


def test_a_slot_still_counting_its_minute_sixty_back_is_not_given_away() -> None:
    """That minute counts whole (the hour is never short): its slot goes to a
    newcomer only a minute later, or the tenant's count went a minute early."""
    row, start = _a_row_of_two_kept()
    assert row.add("c", 1, start + 60 * 60) is None
    assert row.sent("a", start + 60 * 60) == 5
    assert row.add("c", 1, start + 61 * 60) is not None


def test_a_message_to_suppressed_recipients_only_counts_as_one() -> None:
    """Its failure notice goes out signed all the same: counted as none, a stolen
    login sent such notices past every limit."""
    rcpts = ["a@example.org", "b@example.org"]
    assert ratelimit.counted(rcpts, rcpts) == 1
    assert ratelimit.counted(rcpts, rcpts[:1]) == 1
    assert ratelimit.counted(rcpts, []) == 2
