"""A tenant's ``recipients_per_hour``: the shared counts, the policy key, and a real relay
with two workers refusing what passes the limit."""

from __future__ import annotations

import inspect
import json
import os
import re
import smtplib
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.cli import main
from relay.pipeline import Acceptor
from relay.ratelimit import SLOTS, RateCounts
from relay.sharedtable import key_of
from tests.relayproc import RelayProcess
from tests.sink import Sink, SinkServer
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
    row.add("acme", 3, NOON)
    row.add("acme", -3, NOON)
    assert row.sent("acme", NOON) == 0
    row.add("acme", -5, NOON)
    assert row.sent("acme", NOON) == 0


def test_a_count_given_back_goes_to_its_own_minute_or_nowhere() -> None:
    """Given back to the minute it was taken in, also once that minute is over; a
    minute whose slot a later one took is out of the hour: nothing to take from,
    and the later minute's count stays."""
    row = RateCounts(1).row(0)
    row.add("acme", 3, NOON + 59)
    row.add("acme", -3, NOON + 59)  # the refusal came in the next minute
    assert row.sent("acme", NOON + 61) == 0
    row.add("acme", 2, NOON + 60 * 61)  # the same slot, an hour and a minute on
    row.add("acme", -1, NOON)
    assert row.sent("acme", NOON + 60 * 61) == 2


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
