"""Header fields that are there but say nothing: an empty Reply-To the tenant
keeps. Through a real relay to a sink, as an ERP sends them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import headers, message
from tests.dkimtools import assert_opendkim_ok, dkimpy_verify
from tests.relayproc import RelayProcess
from tests.sink import SinkServer, free_port
from tests.test_decide_reply_to import NO_SUBJECT, preview
from tests.test_decisions import BODY, msg, run
from tests.test_queue_e2e import configure, relay_cli, send

QUOTE = (*NO_SUBJECT, "Subject: Quote 5")  # the tenant keeps a quote's Reply-To
REMOVED = "Reply-To not kept: the message's is empty, which RFC 5322 3.6.2 does not allow: removed"


@pytest.fixture
def relay(policy_file: Path, tmp_path: Path) -> Iterator[tuple[RelayProcess, SinkServer]]:
    with SinkServer() as sink:
        port = free_port()
        policy = configure(policy_file, port, sink.port)
        with RelayProcess(policy, port, tmp_path / "relay.log") as proc:
            yield proc, sink


def _queued(policy: Path, queue_id: str) -> dict:
    done = relay_cli(policy, "audit", "search", "--queue-id", queue_id, "--format", "json")
    assert done.returncode == 0, done.stderr
    (record,) = [r for r in map(json.loads, done.stdout.splitlines()) if r["event"] == "received"]
    return record


@pytest.mark.parametrize(
    "empty", ["Reply-To:", "Reply-To: \t", "Reply-To:\r\n ", "Reply-To:\r\nReply-To: "]
)
def test_an_empty_reply_to_the_tenant_keeps_is_removed(
    relay: tuple[RelayProcess, SinkServer],
    dns_records: dict[str, str],
    tmp_path: Path,
    empty: str,
) -> None:
    """It went upstream as it came, under the relay's signature, though RFC
    5322 wants an address in it: a client may answer it to nobody."""
    proc, sink = relay
    queue_id = send(proc.port, msg(*QUOTE, empty), ("one@example.org",))
    (got,) = sink.sink.wait(1)
    assert message.read(got.data).get_all("Reply-To") == ()
    assert "reply-to" not in [f.name.lower() for f in headers.split(got.data)[0]]
    assert got.data.endswith(b"\r\n\r\n" + BODY)
    assert dkimpy_verify(got.data, dns_records)
    assert_opendkim_ok(got.data, dns_records, tmp_path)
    record = _queued(proc.policy, queue_id)
    assert record["reply_to_after"] == ""
    assert REMOVED in record["reasons"]
    shown = relay_cli(proc.policy, "audit", "show", queue_id)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"\n    Reply-To +-> \(removed\)\n", shown.stdout), shown.stdout


def test_preview_says_an_empty_reply_to_is_removed(policy_file: Path, tmp_path: Path) -> None:
    eml = tmp_path / "quote.eml"
    eml.write_bytes(msg(*QUOTE, "Reply-To: "))
    out = preview(policy_file, eml)
    assert f"  - {REMOVED}\n" in out
    assert "\nReply-To:      ->  -\n" in out
    assert "\nRemoved:     Reply-To\n" in out


def test_a_reply_to_with_an_address_is_still_kept(policy_file: Path) -> None:
    p = run(policy_file, msg(*QUOTE, "Reply-To: desk@acme.example"))
    assert message.read(p.message).get_all("Reply-To") == ("desk@acme.example",)
    assert "Reply-To kept as the message has it" in p.decision.reasons


def test_an_empty_reply_to_no_source_replaces_is_removed(policy_file: Path) -> None:
    """A chain of headers the message lacks left the empty one "as it was"."""
    text = policy_file.read_text().replace("quote: [keep]", 'quote: ["header:X-Partner"]')
    policy_file.write_text(text)
    p = run(policy_file, msg(*QUOTE, "Reply-To:"))
    assert message.read(p.message).get_all("Reply-To") == ()
    assert (
        "no Reply-To source gave an address, and the message's is empty, which RFC 5322"
        " 3.6.2 does not allow: removed (before it: header X-Partner is missing)"
    ) in p.decision.reasons
