"""docs/audit-log.md is checked against the code: its example records and its jq recipes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.audit import AuditLog, events, verify
from relay.audit.chain import GENESIS_HASH, seal
from tests.test_audit_fixture import Clock, build

DOC = (Path(__file__).parent.parent / "docs" / "audit-log.md").read_text()
EXAMPLES = dict(re.findall(r"<!-- example: (\w+) -->\n```json\n(.*?)\n```", DOC))
RECIPES = dict(re.findall(r"<!-- jq-recipe: ([\w-]+) -->\n```sh\n(.*?)\n```", DOC, re.DOTALL))


def test_every_event_has_a_valid_example() -> None:
    assert set(EXAMPLES) == set(events.SCHEMA)
    for event, line in EXAMPLES.items():
        record = json.loads(line)
        assert record["event"] == event
        optional = frozenset(k for k in record if (event, k) in events.OPTIONAL)
        assert tuple(record) == events.fields(event, optional)
        own = {k: v for k, v in record.items() if k not in ("v", "seq", "time", "prev", "hash")}
        events.check(own)
        stored = record.pop("hash")
        assert seal(record) == (line, stored)


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_the_hand_check_of_a_hash() -> None:
    script = re.search(r"<!-- hand-check -->\n```sh\n(.*?)\n```", DOC, re.DOTALL)
    assert script is not None
    for line in EXAMPLES.values():
        run = subprocess.run(
            ["bash", "-c", script.group(1)], env={"line": line, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert run.stdout.split()[0] == json.loads(line)["hash"]


def test_the_documented_genesis_hash() -> None:
    assert GENESIS_HASH in DOC


@pytest.fixture(scope="module")
def recent_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture log ending yesterday, two days compressed: "last week" must find it."""
    directory = tmp_path_factory.mktemp("audit")
    today = datetime.now(UTC).replace(hour=9, minute=0, second=0, microsecond=0)
    build(directory, start=today - timedelta(days=3))
    AuditLog(directory, compress_after_days=1, clock=Clock(today)).maintain()
    assert len(list(directory.glob("*.gz"))) == 2
    return directory


def _expected(directory: Path) -> dict[str, object]:
    head = verify(directory)
    return {
        "failed-for-tenant-last-week": lambda out: [json.loads(x)["seq"] for x in out] == [9],
        "documents-to-recipient": lambda out: [x.split("\t")[1:] for x in out] == [
            ["acme", "jan", "invoice", "<inv-1001@erp.acme.example>"],
            ["globex", "hank", "invoice", "<g-5@erp.globex.example>"],
        ],
        "message-timeline": lambda out: [x.split("\t")[1:3] for x in out] == [
            ["received", ""], ["queued", ""], ["delivered", "buyer@customer.example"],
            ["deferred", "ap@customer.example"], ["delivered", "jan@acme.example"],
            ["delivered", "ap@customer.example"], ["complained", "buyer@customer.example"],
        ],
        "sent-per-tenant": lambda out: sorted(out) == [
            "acme\tinvoice\t1", "acme\tquote\t1", "globex\tinvoice\t1"
        ],
        "bounces-and-complaints": lambda out: [x.split("\t")[1:] for x in out] == [
            ["bounced", "buyer@customer.example", "5.2.2", "Q0000000000000G1"],
            ["complained", "buyer@customer.example", "abuse", "Q0000000000000A1"],
        ],
        "deletions": lambda out: [x.split(" ", 1)[1] for x in out] == [
            "root deleted Q0000000000000A2: eva@acme.example"
        ],
        "head": lambda out: out == [f"seq 18 hash {head.head}"],
    }  # fmt: skip


def test_every_recipe_has_a_check(recent_log: Path) -> None:
    assert len(RECIPES) >= 5
    assert set(RECIPES) == set(_expected(recent_log))


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_jq_recipe(name: str, recent_log: Path) -> None:
    run = subprocess.run(
        ["bash", "-o", "pipefail", "-c", RECIPES[name]],
        cwd=recent_log, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert _expected(recent_log)[name](out), out  # type: ignore[operator]
