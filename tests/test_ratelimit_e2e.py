"""A tenant's ``recipients_per_hour`` on a real relay with two workers: a refusal
found by its tenant in the audit log, and what the hour counts."""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sink import free_port
from tests.test_ratelimit import deliver
from tests.test_workers import (
    MESSAGE,
    Relay,
    configure,
    relay_cli,
    reload_in_every_worker,
    serving,
)

LIMIT = 3
FULL = f"4.7.1 Tenant acme has sent to {LIMIT} recipients in the last hour".encode()


@pytest.fixture
def limited(policy_file: Path, tmp_path: Path) -> Iterator[Relay]:
    """Acme may send to LIMIT recipients an hour."""
    port = free_port()
    path = configure(policy_file, port)
    limit = f"    default_user: jan\n    recipients_per_hour: {LIMIT}\n"
    path.write_text(path.read_text().replace("    default_user: jan\n", limit, 1))
    with serving(path, port, tmp_path / "relay.log") as running:
        yield running


def submit(port: int, data: bytes, sender: str = "jan@acme.example") -> tuple[int, bytes]:
    """``data`` as it is, on a connection of its own, to one recipient."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo()
        client.mail(sender)
        client.rcpt("one@example.org")
        return client.data(data)


def audit(relay: Relay, command: str, *args: str) -> str:
    done = relay_cli("audit", command, "-c", str(relay.policy), *args)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout


def rejected_of(relay: Relay, *args: str) -> list[dict]:
    out = audit(relay, "search", "--status", "rejected", "--format", "json", *args)
    return [json.loads(line) for line in out.splitlines()]


def test_a_refusal_after_the_sender_is_known_names_its_tenant_and_user(limited: Relay) -> None:
    """What a sysadmin asks when a login may be stolen: what did acme's mail try
    past its limit? The refusal named the tenant, its record did not, and a
    search by tenant found nothing. A refusal before the sender is known
    (an unknown sender) names nobody, and is no tenant's."""
    twice = MESSAGE.replace(b"Subject: x\r\n", b"Subject: x\r\nSubject: y\r\n")
    assert submit(limited.port, twice)[0] == 550  # a field given twice, after identify
    unknown = MESSAGE.replace(b"jan@acme.example", b"x@nowhere.example")
    assert submit(limited.port, unknown, "x@nowhere.example")[0] == 550
    for n in range(LIMIT):
        assert deliver(limited.port, [f"r{n}@example.org"])[0] == 250
    late = MESSAGE.replace(b"Subject: x\r\n", b"Subject: x\r\nMessage-ID: <late-1@erp.example>\r\n")
    code, text = submit(limited.port, late)
    assert (code, text[: len(FULL)]) == (450, FULL)

    every = rejected_of(limited)
    assert [(r["reply"][:9], r.get("tenant"), r.get("user")) for r in every] == [
        ("550 5.6.0", "acme", "jan"),
        ("550 5.7.1", None, None),
        ("450 4.7.1", "acme", "jan"),
    ]
    assert all("found_by" in r for r in (every[0], every[2]))
    assert "found_by" not in every[1]
    assert rejected_of(limited, "--tenant", "acme") == [every[0], every[2]]
    assert rejected_of(limited, "--user", "jan", "--tenant", "acme") == [every[0], every[2]]
    assert rejected_of(limited, "--tenant", "globex") == []
    assert rejected_of(limited, "--tenant", "acme", "--doc-type", "invoice") == []
    # the accepted mail is still found by its tenant, the refusals beside it
    found = audit(limited, "search", "--tenant", "acme", "--format", "json").splitlines()
    events = [json.loads(line)["event"] for line in found]
    assert events.count("rejected") == 2 and events.count("received") == LIMIT

    table = audit(limited, "search", "--status", "rejected", "--tenant", "acme").splitlines()
    assert [row.split()[1:5] for row in table[1:]] == [["rejected", "-", "acme", "jan"]] * 2
    shown = audit(limited, "show", "<late-1@erp.example>")
    assert f"rejected from 127.0.0.1: 450 {FULL.decode()}" in shown
    assert f"\n    tenant acme, user jan (found by {every[2]['found_by']})\n" in shown
    report = [json.loads(row) for row in audit(limited, "report", "--format", "json").splitlines()]
    assert [(r["tenant"], r["sent"]) for r in report] == [("acme", LIMIT)]  # refusals not sent


def test_a_tenant_at_its_limit_is_warned_of_once_an_hour_in_each_worker(limited: Relay) -> None:
    """The stolen login's brake was an INFO line per refusal, out of sight of
    ``journalctl -p warning``; at a WARNING each, an ERP's retries flood it.
    One message over any hour's limit is no full hour: warned of, it hid the
    warning of the hour that filled next."""
    assert deliver(limited.port, [f"x{n}@example.org" for n in range(LIMIT + 1)])[0] == 550
    limited.wait_for(lambda: " INFO refused client=" in limited.log(), "the refusal's line")
    assert " WARNING tenant " not in limited.log()
    for n in range(LIMIT):
        assert deliver(limited.port, [f"r{n}@example.org"])[0] == 250
    for _ in range(6):
        assert submit(limited.port, MESSAGE)[0] == 450
    warned = re.findall(r"relay\[(\d+)\] WARNING tenant (.*)", limited.log())
    assert warned, limited.log()
    assert len({pid for pid, _ in warned}) == len(warned)  # one for each worker at most
    assert {text for _, text in warned} == {
        f"acme reached its recipients_per_hour limit of {LIMIT}: its mail is refused while the"
        " hour is full (a stolen login?); said once an hour, each refusal is logged"
    }
    assert limited.log().count(" INFO refused client=") == 7


def test_recipients_on_the_suppression_list_do_not_count(limited: Relay) -> None:
    """Nothing goes to them, so they take nothing of the hour: an ERP mailing a
    list full of bounced addresses was held to its limit early. The recipients
    sent to still count, in a message that has both; one sent to nobody counts
    as one, for the signed notice it makes, which a stolen login sent past
    every limit."""
    gone = [f"gone{n}@example.org" for n in range(LIMIT + 1)]
    done = relay_cli("suppression", "add", "-c", str(limited.policy), *gone)
    assert done.returncode == 0, done.stderr
    assert deliver(limited.port, [*gone, "r0@example.org"])[0] == 250  # counts 1, not 5
    assert deliver(limited.port, gone)[0] == 250  # to nobody: counts 1 all the same
    for n in range(2, LIMIT):
        assert deliver(limited.port, [f"r{n}@example.org"])[0] == 250
    code, text = deliver(limited.port, ["late@example.org"])
    assert (code, text[: len(FULL)]) == (450, FULL)
    assert deliver(limited.port, [gone[0]])[0] == 450  # its notice would go past the limit


def test_a_logins_try_to_send_as_another_tenants_user_is_its_tenants(limited: Relay) -> None:
    """A stolen login's first move is another tenant's sender: its refusal was on
    record with the login and no tenant, and the login's tenant's search, which
    the docs point to for what a stolen login tried, missed it."""
    with smtplib.SMTP("127.0.0.1", limited.port, timeout=20) as client:
        client.ehlo()
        client.login("erp-acme", "demo-password")
        client.mail("hank@globex.example")
        client.rcpt("one@example.org")
        data = MESSAGE.replace(b"jan@acme.example", b"hank@globex.example")
        named = b"Subject: x\r\nMessage-ID: <x-1@erp>\r\n"
        code, _ = client.data(data.replace(b"Subject: x\r\n", named))
    assert code == 550
    every = rejected_of(limited)
    assert [(r["auth_login"], r.get("tenant"), r.get("user")) for r in every] == [
        ("erp-acme", "acme", None)
    ]
    assert rejected_of(limited, "--tenant", "acme") == every
    assert rejected_of(limited, "--tenant", "globex") == []
    shown = audit(limited, "show", "<x-1@erp>")
    said = "\n    login erp-acme of tenant acme, refused before its sender was known\n"
    assert said in shown, shown


def test_a_removed_logins_tries_are_its_tenants_still(limited: Relay) -> None:
    """Removing a stolen login is the first answer to the theft: the session's
    tries after the reload were on record with no tenant."""
    with smtplib.SMTP("127.0.0.1", limited.port, timeout=20) as client:
        client.ehlo()
        client.login("erp-acme", "demo-password")
        text = limited.policy.read_text()
        start = text.index("  erp-acme:\n")
        end = text.index("  erp-acme-jan:\n")
        reload_in_every_worker(limited, text[:start] + text[end:])
        client.mail("jan@acme.example")
        client.rcpt("one@example.org")
        code, reply = client.data(MESSAGE)
    assert (code, reply[:5]) == (454, b"4.7.0"), reply
    every = rejected_of(limited)
    assert [(r["auth_login"], r.get("tenant")) for r in every] == [("erp-acme", "acme")]
