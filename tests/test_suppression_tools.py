"""``relay suppression list|add|remove`` as a sysadmin runs them, against a real list."""

from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from relay.cli import main
from relay.record import operator
from relay.suppression import BOUNCE, Suppression, SuppressionFile, store, tools
from relay.suppression.entry import parse, read_line
from relay.suppression.store import added
from relay.suppression.strays import stray_tenants
from tests.policyfiles import variant

ROOT = Path(__file__).resolve().parent.parent
BUYER = "buyer@customer.example"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    """minimal.yaml (one tenant, acme) with its state directory beside it."""
    path = variant(tmp_path, "version: 1\n", "version: 1\n")
    (tmp_path / "state").mkdir()
    return path


def listed(policy: Path) -> Path:
    return policy.parent / "state" / "suppression.jsonl"


def run(policy: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], str]:
    """The command in this process: its exit status, output lines and stderr."""
    code = main(["suppression", *args, "-c", str(policy)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def relay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip


def test_an_entry_is_added_to_a_list_that_has_some(tmp_path: Path) -> None:
    """The append checks that the last line is ended: it read from a descriptor
    opened write-only, so every add after the first failed (EBADF), the relay's
    own for a hard bounce as well."""
    file = SuppressionFile(tmp_path / "suppression.jsonl")
    file.add([Suppression("one@example.net", None, BOUNCE, "2026-12-01T10:00:00.000Z")])
    file.add([Suppression("two@example.net", None, BOUNCE, "2026-12-01T10:00:01.000Z")])
    assert [e.address for e in file.entries().entries] == ["one@example.net", "two@example.net"]


def test_add_then_list(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(policy, capsys, "add", "Buyer@Customer.example", "--note", "asked us")
    assert (code, out, err) == (0, ["Buyer@Customer.example: added (manual, all tenants)"], "")
    code, out, err = run(policy, capsys, "list")
    assert (code, err) == (0, "")
    assert out[0].split() == ["address", "tenant", "reason", "since", "by", "detail"]
    address, tenant, reason, since, by, *detail = out[1].split()
    assert (address, tenant, reason, by, detail) == (
        "Buyer@Customer.example", "*", "manual", operator(), ["asked", "us"]
    )  # fmt: skip
    assert since.startswith("20") and since.endswith("Z")
    code, out, _ = run(policy, capsys, "list", "--json", "BUYER@customer.EXAMPLE")
    assert code == 0
    assert [json.loads(line) for line in out] == [
        {"address": "Buyer@Customer.example", "tenant": None, "reason": "manual",
         "since": since, "detail": "asked us", "queue_id": None, "by": by}
    ]  # fmt: skip


def test_list_exits_1_when_nothing_matched(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(policy, capsys, "list")[0] == 1  # no file yet: nothing ever suppressed
    assert run(policy, capsys, "add", BUYER)[0] == 0
    unlisted = f"relay suppression list: other@customer.example: not on the list {listed(policy)}"
    assert run(policy, capsys, "list", "other@customer.example") == (
        1,
        ["address  tenant  reason  since  by  detail"],
        unlisted + "\n",
    )
    assert run(policy, capsys, "list", "--json", "other@customer.example") == (
        1,
        [],
        unlisted + "\n",
    )


def test_list_names_the_list_an_address_asked_about_is_not_on(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run with another relay's policy file, "is X listed?" got an empty table
    and nothing to say which list had been read; a found address says nothing."""
    assert run(policy, capsys, "add", BUYER, "--tenant", "acme")[0] == 0
    code, out, err = run(policy, capsys, "list", BUYER, "other@customer.example")
    assert (code, len(out)) == (0, 2)
    assert err == (
        f"relay suppression list: other@customer.example: not on the list {listed(policy)}\n"
    )
    many = [f"customer{n}@customer.example" for n in range(11)]
    code, out, err = run(policy, capsys, "list", BUYER, *many)
    assert (code, len(out)) == (0, 2)
    assert err == (
        "relay suppression list: 11 of the addresses asked about:"
        f" not on the list {listed(policy)}\n"
    )
    code, out, err = run(policy, capsys, "list", "other@customer.example", "--tenant", "acme")
    assert (code, len(out)) == (1, 1)
    assert err.endswith(
        f": other@customer.example: not on the list {listed(policy)} for tenant acme\n"
    )


def test_a_state_directory_that_is_not_there_is_not_an_empty_list(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A mistyped ``state_directory`` (or ``-c``): "is X listed?" was answered
    "no" (exit 1), as for a relay that never suppressed anything."""
    (policy.parent / "state").rmdir()
    file = listed(policy)
    why = f"{file}: no such directory (has the relay run with this policy?)\n"
    assert run(policy, capsys, "list", BUYER) == (66, [], f"relay suppression list: {why}")
    assert run(policy, capsys, "remove", BUYER) == (66, [], f"relay suppression remove: {why}")
    code, _, err = run(policy, capsys, "add", BUYER)
    assert code == 73 and "no state directory" in err  # adding says why it cannot make it


def test_listing_for_a_tenant_the_policy_does_not_have_says_so(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo read as "this tenant has no entries of its own"."""
    assert run(policy, capsys, "add", BUYER)[0] == 0
    code, out, err = run(policy, capsys, "list", "--tenant", "acmee")
    assert code == 0 and len(out) == 2  # the entry for all tenants
    assert err == (
        "relay suppression list: the policy has no tenant 'acmee': these are the entries"
        " for all tenants, and any left for it\n"
    )
    assert run(policy, capsys, "list", "--tenant", "acme")[2] == ""


def test_adding_an_address_listed_for_that_scope_leaves_it(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(policy, capsys, "add", BUYER, "--reason", "complaint")[0] == 0
    lines = listed(policy).read_text().splitlines()
    code, out, _ = run(policy, capsys, "add", BUYER.upper(), "other@customer.example")
    assert code == 0
    assert out[0].startswith(f"{BUYER.upper()}: already listed (complaint since 20")
    assert out[0].endswith(", all tenants), left as it is")
    assert out[1] == "other@customer.example: added (manual, all tenants)"
    assert listed(policy).read_text().splitlines()[: len(lines)] == lines
    assert len(listed(policy).read_text().splitlines()) == len(lines) + 1


def test_a_tenants_entry_is_its_own(policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(policy, capsys, "add", BUYER)[0] == 0
    code, out, _ = run(policy, capsys, "add", BUYER, "other@customer.example", "--tenant", "acme")
    assert (code, out) == (
        0,
        [f"{BUYER}: added (manual, tenant acme)",
         "other@customer.example: added (manual, tenant acme)"],
    )  # fmt: skip
    other_tenant = Suppression(BUYER, "globex", BOUNCE, "2026-12-01T10:00:00.000Z")
    SuppressionFile(listed(policy)).add([other_tenant])  # one the policy had then
    code, out, _ = run(policy, capsys, "list", "--tenant", "acme")
    assert [line.split()[:2] for line in out[1:]] == [
        [BUYER, "*"], [BUYER, "acme"], ["other@customer.example", "acme"]
    ]  # fmt: skip
    code, out, _ = run(policy, capsys, "remove", BUYER, "--tenant", "acme")
    assert code == 0
    assert len(out) == 1 and out[0].startswith(f"{BUYER}: removed (manual since 20")
    assert out[0].endswith(", tenant acme)")
    code, out, _ = run(policy, capsys, "list")
    assert [line.split()[:2] for line in out[1:]] == [
        [BUYER, "*"], [BUYER, "globex"], ["other@customer.example", "acme"]
    ]  # fmt: skip


def test_remove_without_a_tenant_removes_every_scope(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(policy, capsys, "add", BUYER)
    run(policy, capsys, "add", BUYER, "--tenant", "acme")
    code, out, _ = run(policy, capsys, "remove", BUYER.upper())
    assert code == 0
    assert [line.rsplit(", ", 1)[1] for line in out] == ["all tenants)", "tenant acme)"]
    assert run(policy, capsys, "list")[0] == 1


def test_removing_an_address_not_listed_exits_1_and_removes_the_others(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The list is named: another relay's policy file (staging's, meaning
    production's) looks in another, and said only "not on the list"."""
    run(policy, capsys, "add", BUYER)
    code, out, err = run(policy, capsys, "remove", "nobody@customer.example", BUYER)
    assert code == 1
    assert len(out) == 1 and out[0].startswith(f"{BUYER}: removed (")
    listed = policy.parent / "state" / "suppression.jsonl"
    assert err == f"relay suppression remove: nobody@customer.example: not on the list {listed}\n"
    assert run(policy, capsys, "list")[0] == 1
    code, _, err = run(policy, capsys, "remove", "nobody@customer.example", "--tenant", "acme")
    assert code == 1
    assert err.endswith(f": nobody@customer.example: not on the list {listed} for tenant acme\n")


def test_list_and_remove_take_an_address_as_add_does(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """list answered "nothing matched" for a listed address pasted with a space."""
    assert run(policy, capsys, "add", "Gone@Example.ORG")[0] == 0
    code, out, _ = run(policy, capsys, "add", " gone@example.org\t")
    assert code == 0 and out[0].startswith("gone@example.org: already listed (manual since ")
    code, out, err = run(policy, capsys, "list", "gone@example.org ")
    assert (code, len(out), err) == (0, 2, "")
    code, out, _ = run(policy, capsys, "remove", " gone@example.org ")
    assert code == 0 and [line.split(":")[0] for line in out] == ["Gone@Example.ORG"]


def test_a_domain_in_unicode_is_taken_in_its_xn_form(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused as "not an address (ASCII only: a domain in its xn-- form)", which
    left the sysadmin to work out the form the relay sends to and lists."""
    code, out, err = run(policy, capsys, "add", "user@bücher.example")
    assert (code, out, err) == (0, ["user@xn--bcher-kva.example: added (manual, all tenants)"], "")
    code, out, err = run(policy, capsys, "list", "user@BÜCHER.example")
    assert (code, out[1].split()[0], err) == (0, "user@xn--bcher-kva.example", "")
    code, out, err = run(policy, capsys, "remove", "user@bücher.example")
    assert (code, [line.split(":")[0] for line in out]) == (0, ["user@xn--bcher-kva.example"])
    assert run(policy, capsys, "list")[0] == 1


@pytest.mark.parametrize(
    ("written", "form"),
    [
        ("kunde@faß.example", "kunde@xn--fa-hia.example"),
        ("kunde@ς.example", "kunde@xn--3xa.example"),
        (
            # Persian, a ZWNJ between its two parts
            "kunde@\u0646\u0627\u0645\u0647\u200c\u0627\u06cc.example",
            "kunde@xn--mgba3gch31f060k.example",
        ),
    ],
)
def test_a_unicode_domain_is_listed_in_the_form_registries_resolve(
    policy: Path, capsys: pytest.CaptureFixture[str], written: str, form: str
) -> None:
    """IDNA2008's form, as ERPs, browsers and registries write it: Python's codec
    (IDNA2003) made faß.example fass.example, and a stranger there was kept
    from every tenant's mail while the customer still got it."""
    code, out, err = run(policy, capsys, "add", written)
    assert (code, out, err) == (0, [f"{form}: added (manual, all tenants)"], "")
    code, out, err = run(policy, capsys, "list", written)
    assert (code, out[1].split()[0], err) == (0, form, "")


@pytest.mark.parametrize(
    "args, refused",
    [
        (["buyer.customer.example"], "'buyer.customer.example' is not an address"),
        (["jørn@customer.example"], "'jørn@customer.example' is not an address"),
        (
            ["jørn@bücher.example"],
            "'jørn@xn--bcher-kva.example' is not an address like name@example.com"
            " (ASCII only before the @: the relay sends to no other address)",
        ),
        (
            ["a@bü..example"],
            "'a@bü..example' is not an address like name@example.com (its domain has no xn-- form)",
        ),
        (
            ["kunde@a\u200cb.example"],  # IDNA2003 dropped the joiner: kunde@ab.example
            "'kunde@a\\u200cb.example' is not an address like name@example.com"
            " (its domain has no xn-- form)",
        ),
        (["--tenant", "globex"], "the policy has no tenant 'globex' (its tenants: acme)"),
    ],
)
def test_an_argument_refused_changes_nothing(
    policy: Path, capsys: pytest.CaptureFixture[str], args: list[str], refused: str
) -> None:
    run(policy, capsys, "add", "other@customer.example")
    before = listed(policy).read_bytes()
    code, out, err = run(policy, capsys, "add", BUYER, *args)
    assert (code, out) == (2, [])
    assert err.startswith(f"relay suppression add: nothing added: {refused}")
    assert listed(policy).read_bytes() == before


def test_any_tenant_is_taken_while_only_the_state_settings_load(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The policy's tenants cannot be known then; the list must still be editable."""
    for key in (policy.parent / "keys").iterdir():
        key.unlink()
    code, out, err = run(policy, capsys, "add", BUYER, "--tenant", "globex")
    assert (code, out) == (0, [f"{BUYER}: added (manual, tenant globex)"])
    assert "does not load, but its state settings do" in err


def test_a_torn_last_line_is_warned_of_and_the_rest_listed(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A crash mid-write leaves half a line: the list is still read, and said to be damaged."""
    run(policy, capsys, "add", BUYER)
    with listed(policy).open("ab") as f:
        f.write(b'{"v":1,"op":"add","address":"half@cust')
    code, out, err = run(policy, capsys, "list")
    assert (code, [line.split()[0] for line in out[1:]]) == (0, [BUYER])
    assert err == (
        f"relay suppression: warning: {listed(policy)}: the last line has no line end"
        " (cut short, or being written), not read\n"
    )
    assert run(policy, capsys, "add", "other@customer.example")[0] == 0  # ends the torn line
    done = relay("suppression", "list", "-c", str(policy))  # its log said it once more
    rows = [line.split()[0] for line in done.stdout.splitlines()[1:]]
    assert (done.returncode, rows) == (0, [BUYER, "other@customer.example"])
    assert done.stderr.startswith(
        f"relay suppression: warning: {listed(policy)}:2: not a suppression entry, skipped: "
    )
    assert done.stderr.count("\n") == 1


def test_an_added_entry_reaches_a_reader_that_had_read_the_list(policy: Path) -> None:
    """What the daemon's workers do: each holds what it read and reads what was appended."""
    assert relay("suppression", "add", BUYER, "-c", str(policy)).returncode == 0
    worker = SuppressionFile(listed(policy))
    assert worker.current().find("someone@customer.example", "acme") is None
    done = relay("suppression", "add", "someone@customer.example", "--tenant", "acme",
                 "--reason", "complaint", "-c", str(policy))  # fmt: skip
    assert done.returncode == 0, done.stderr
    found = worker.current().find("Someone@Customer.example", "acme")
    assert found is not None and (found.reason, found.tenant) == ("complaint", "acme")
    assert worker.current().find(BUYER, "acme") is not None
    done = relay("suppression", "remove", BUYER, "-c", str(policy))
    assert done.returncode == 0, done.stderr
    assert worker.current().find(BUYER, "acme") is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("json_lines", [False, True], ids=["table", "json"])
def test_a_listing_that_cannot_be_written_is_exit_74(policy: Path, json_lines: bool) -> None:
    SuppressionFile(listed(policy)).add(
        [Suppression(BUYER, None, BOUNCE, "2026-12-01T10:00:00.000Z")]
    )
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "relay", "suppression", "list", "-c", str(policy),
             *(["--json"] if json_lines else [])],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=60, check=False, cwd=ROOT,
        )  # fmt: skip
    assert (done.returncode, done.stderr) == (
        74,
        "relay: cannot write the output: No space left on device\n",
    )


def test_a_policy_that_does_not_load_at_all_is_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "relay.yaml"
    bad.write_text("version: 1\nplatform:\n  from_adress: x@y.example\n")
    for verb in (["list"], ["add", BUYER], ["remove", BUYER]):
        assert run(bad, capsys, *verb)[0] == 78
    assert not (tmp_path / "state" / "suppression.jsonl").exists()


def test_removing_a_tenants_entry_it_does_not_have_points_at_the_one_for_all(
    tmp_path: Path,
) -> None:
    """``list --tenant acme`` shows the address (the entry for all tenants keeps it
    from acme's mail); ``remove --tenant acme`` finding no entry of acme's own
    said only "not on the list for tenant acme"."""
    file = SuppressionFile(tmp_path / "s.jsonl")
    file.add([Suppression("dead@x.example", None, "bounce", "2026-01-01T00:00:00.000Z")])
    out, err = io.StringIO(), io.StringIO()
    code = tools.remove_main(file, ["dead@x.example"], "acme", by="alice", out=out, err=err)
    assert code == 1
    assert "its entry for all tenants keeps it from that tenant's mail too" in err.getvalue()


def _line(address: str, tenant: str | None = None, op: str = "add", **more: object) -> str:
    record = {"v": 1, "op": op, "address": address, "tenant": tenant}
    if op == "add":
        record |= {"reason": "manual", "since": "2026-12-01T10:00:00.000Z", "detail": "", "by": "x"}
    else:
        record |= {"time": "2026-12-01T10:00:01.000Z", "by": "x"}
    return json.dumps(record | more) + "\n"


def test_a_few_addresses_read_as_the_whole_list_reads_them(tmp_path: Path) -> None:
    """Only the lines naming them are parsed (a 500,000-entry list took each
    command 4 s and 600 MB for one address); what is found is the same."""
    path = tmp_path / "suppression.jsonl"
    path.write_text(
        _line("Gone@Example.org")
        + _line("xgone@example.org")  # another address ending the same
        + _line("gone@example.org.uk")
        + _line("gone@example.org", "acme")
        + _line("other@example.org", detail='"gone@example.org"')  # named, not its address
        + '{"v":1,"op":"add","address":"gone@example.org"}\n'  # line 6: not an entry
        + _line("GONE@example.org", "acme", op="remove")
        + _line("kept@example.org", "beta")
        + _line("gone@example.org", "beta")
        + _line("@").replace('"@"', '"orders\\/eu@x.example"')  # as PHP writes "/"
        + _line("@").replace('"@"', '"sales\\u0026marketing@x.example"')  # as Go writes "&"
        + _line("@").replace('"@"', '"\u212aari@x.example"')  # a Kelvin sign: k in lower case
        + '{"v":1,"op":"add","address":"gone@exam'  # cut short
    )
    file = SuppressionFile(path)
    whole = file.entries()
    assert {"orders/eu@x.example", "sales&marketing@x.example"} <= {e.key[0] for e in whole.entries}
    wanted_ones = (
        {"gone@example.org"},
        {"GONE@EXAMPLE.ORG", "kept@example.org"},
        {"no@x.org"},
        {"orders/eu@x.example"},
        {"Sales&Marketing@x.example"},
        {"kari@x.example"},
    )
    for wanted in wanted_ones:
        few = file.entries(wanted)
        lower = {a.lower() for a in wanted}
        assert few.entries == [e for e in whole.entries if e.key[0] in lower]
        assert few.unfinished
    few = file.entries({"gone@example.org"})
    assert [(e.address, e.tenant) for e in few.entries] == [
        ("Gone@Example.org", None),
        ("gone@example.org", "beta"),
    ]
    assert len(few.problems) == 1 and few.problems == [p for p in whole.problems if ":6: " in p], (
        few.problems
    )


def test_many_addresses_are_looked_for_as_a_few_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 64 addresses every line was parsed, under the list's lock: a
    message to 65 recipients at a dead domain held it 1.3 s on a
    100,000-entry list, and the other workers and ``relay bounce`` waited.
    Only the lines naming them are parsed, however many they are."""
    path = tmp_path / "suppression.jsonl"
    others = "".join(_line(f"other{i}@example.org") for i in range(500))
    path.write_text(
        others + _line("Dead7@Gone.example", "acme") + _line("dead9@gone.example", "acme")
    )
    parsed: list[bytes] = []
    monkeypatch.setattr(store, "read_line", lambda line: parsed.append(line) or read_line(line))
    items = [
        Suppression(f"dead{i}@gone.example", "acme", BOUNCE, "2026-12-02T10:00:00.000Z", "550")
        for i in range(101)
    ]
    read = SuppressionFile(path).add_unlisted(items)
    assert len(parsed) == 2
    assert [e.address for e in added(items, read)] == [
        f"dead{i}@gone.example" for i in range(101) if i not in (7, 9)
    ]


def test_an_add_decides_under_the_lock_what_is_listed_already(tmp_path: Path) -> None:
    """Decided before it took the file's lock, an add beside the relay's bounce
    for the same address replaced the bounce's entry (its first date and its
    reason), and ten adds at once listed the address ten times."""
    path = tmp_path / "suppression.jsonl"
    file = SuppressionFile(path)
    file.create()
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a worker appending a bounce
        out, err = io.StringIO(), io.StringIO()
        adding = threading.Thread(
            target=tools.add_main,
            args=(file, ["race@example.org"], None),
            kwargs={"by": "root", "out": out, "err": err},
        )
        adding.start()
        adding.join(0.5)
        assert adding.is_alive()  # waits for the lock
        bounce = Suppression("race@example.org", None, BOUNCE, "2026-12-01T10:00:00.000Z")
        os.write(fd, json.dumps({"v": 1, "op": "add", **asdict(bounce)}).encode() + b"\n")
    finally:
        os.close(fd)  # and the lock with it
    adding.join(10)
    assert out.getvalue().startswith("race@example.org: already listed (bounce since 2026-12-01")
    assert [e.reason for e in file.entries().entries] == [BOUNCE]
    assert path.read_text().count("race@example.org") == 1


def _stdin(text: str) -> io.TextIOWrapper:
    """Standard input as a shell gives it: bytes under a text layer."""
    return io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8")


def test_addresses_on_stdin_go_in_as_one_call_all_or_nothing(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list brought over went through xargs, which stopped at an apostrophe and
    split a long list into calls, some added before one refused the rest."""

    def run_with(stdin: str, *args: str) -> tuple[int, list[str], str]:
        monkeypatch.setattr(sys, "stdin", _stdin(stdin))
        return run(policy, capsys, *args)

    refused = run_with("a@example.org\nexample.org\n", "add", "-")
    assert refused[:2] == (2, [])
    assert "'example.org' is not an address" in refused[2]
    assert not listed(policy).exists() or listed(policy).read_text() == ""
    lines = "O'Brien@example.ie\r\n\n  kari@example.org \n" + "".join(
        f"customer{i}@example.net\n" for i in range(3000)
    )
    code, out, _ = run_with(lines, "add", "-", "--reason", "bounce")
    assert code == 0 and len(out) == 3002
    assert out[:2] == [
        "O'Brien@example.ie: added (bounce, all tenants)",
        "kari@example.org: added (bounce, all tenants)",
    ]
    assert run_with("o'brien@example.ie\n", "list", "-")[0] == 0
    assert run_with("customer7@example.net\n", "remove", "-", BUYER)[0] == 1  # BUYER had none
    assert run_with("customer7@example.net\n", "list", "-")[0] == 1


def test_an_address_named_twice_in_two_cases_is_one_entry(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list brought over from two systems names an address as each wrote it:
    the relay takes it in any case, so it is one entry, added and removed once."""
    monkeypatch.setattr(sys, "stdin", _stdin("Gone@Example.org\ngone@example.org\n"))
    code, out, err = run(policy, capsys, "add", "-", "GONE@example.org")
    assert (code, out, err) == (0, ["Gone@Example.org: added (manual, all tenants)"], "")
    assert len(listed(policy).read_text().splitlines()) == 1
    code, out, err = run(policy, capsys, "remove", "gone@example.org", "Gone@Example.ORG")
    assert (code, err, len(out)) == (0, "", 1)
    assert out[0].startswith("Gone@Example.org: removed (manual since ")
    assert len(listed(policy).read_text().splitlines()) == 2


def test_a_list_on_stdin_with_a_byte_order_mark_goes_in(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saved by Notepad, or as utf-8-sig as docs/suppression.md's own export does:
    the whole list was refused, its first line said to be no address."""
    monkeypatch.setattr(sys, "stdin", _stdin("\ufeffkunde7@example.org\r\nkunde8@example.org\r\n"))
    code, out, err = run(policy, capsys, "add", "-")
    assert (code, err) == (0, "")
    assert out == [
        "kunde7@example.org: added (manual, all tenants)",
        "kunde8@example.org: added (manual, all tenants)",
    ]


def test_a_byte_order_mark_is_no_part_of_a_list_given_as_text_alone(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Standard input replaced by a text stream without bytes below it (an
    embedding program's) goes by the same rule as a shell's."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\ufeffkunde7@example.org\n"))
    code, out, err = run(policy, capsys, "add", "-")
    assert (code, out, err) == (0, ["kunde7@example.org: added (manual, all tenants)"], "")


def test_a_note_in_latin1_bytes_is_refused_and_nothing_written(policy: Path) -> None:
    """``--note "$(printf 'M\\xfcller')"`` (Latin-1 bytes, the locale UTF-8) was a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "suppression", "add", "-c", str(policy), BUYER,
         "--note", os.fsdecode(b"M\xfcller")],
        capture_output=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == (
        b"relay suppression add: nothing added: --note 'M\\udcfcller' is not UTF-8 text"
        b" (Latin-1 bytes?): give it in UTF-8\n"
    )
    assert not listed(policy).exists() or listed(policy).read_text() == ""


@pytest.mark.parametrize("verb", ["add", "remove", "list"])
def test_no_address_on_stdin_is_refused_not_read_as_every_entry(
    policy: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    run(policy, capsys, "add", BUYER)
    monkeypatch.setattr(sys, "stdin", _stdin("\n \n"))
    assert run(policy, capsys, verb, "-") == (
        2,
        [],
        f"relay suppression {verb}: no address on stdin\n",
    )
    assert run(policy, capsys, "list")[0] == 0


def test_a_closed_stdin_is_no_address_not_a_traceback(policy: Path) -> None:
    """Exit 1 with a traceback read as "nothing matched" for list."""
    done = subprocess.run(
        [sys.executable, "-m", "relay", "suppression", "list", "-c", str(policy), "-"],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT, stdin=subprocess.DEVNULL,
        preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (2, "relay suppression list: no address on stdin\n")


def test_entries_for_tenants_gone_are_counted_as_the_list_has_them_now(tmp_path: Path) -> None:
    """Removed entries do not count, nor do those for all tenants; a tenant a line
    spells with an escape is still found."""
    path = tmp_path / "suppression.jsonl"
    file = SuppressionFile(path)
    file.add(Suppression(a, t, BOUNCE, "2024-01-01T00:00:00Z") for a, t in (
        ("a@x.example", "acme"), ("b@x.example", "acme"), ("c@x.example", None),
        ("d@x.example", "globex"), ("e@x.example", "kept"),
    ))  # fmt: skip
    file.remove([("b@x.example", "acme")], by="test")
    assert stray_tenants(path, {"kept"}) == {"acme": 1, "globex": 1}
    assert stray_tenants(path, {"kept", "acme", "globex"}) == {}
    escaped = path.read_bytes().replace(b'"tenant":"kept"', b'"tenant":"\\u006bept"')
    path.write_bytes(escaped)
    assert stray_tenants(path, {"acme", "globex"}) == {"kept": 1}
    assert stray_tenants(tmp_path / "none.jsonl", set()) == {}


def test_an_entry_removed_in_another_case_is_no_stray(tmp_path: Path) -> None:
    """The relay takes an address in any case, and so a removal of it: a
    removal written by hand in another case still had its entry counted as
    one left for a tenant gone, at every check and reload."""
    path = tmp_path / "suppression.jsonl"
    file = SuppressionFile(path)
    file.add([Suppression("Buyer@Customer.example", "acme", BOUNCE, "2024-01-01T00:00:00Z")])
    file.remove([("BUYER@customer.EXAMPLE", "acme")], by="test")
    assert file.current().find(BUYER, "acme") is None
    assert stray_tenants(path, {"kept"}) == {}


def test_only_the_lines_of_tenants_gone_are_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A note with a quote in it (written with an escape), or the line a tenant's
    entry was moved with, had every line of the list parsed at each check,
    start and reload: a second and 100 MB for 100,000 entries."""
    from relay.suppression import strays

    path = tmp_path / "suppression.jsonl"
    file = SuppressionFile(path)
    file.add(
        Suppression(f"a{n}@x.example", "acme", BOUNCE, "2024-01-01T00:00:00Z", '550 "gone"')
        for n in range(50)
    )
    file.add([Suppression("c@x.example", "old", BOUNCE, "2024-01-01T00:00:00Z")])
    file.remove([("c@x.example", "old")], by="test")
    parsed: list[bytes] = []
    monkeypatch.setattr(strays, "parse", lambda line: parsed.append(line) or parse(line))
    assert stray_tenants(path, {"acme"}) == {}
    assert len(parsed) == 2  # old's entry and its removal


POSTFIX_MAP = (
    "# recipient_access\r\n"
    "gone@customer.example    REJECT\r\n"
    "olddomain.example        REJECT\r\n"
    "baduser@                 550 No such user\r\n"
    ".sub.example             REJECT\r\n"
    "@parked.example          REJECT\r\n"
    "left@customer.example    554 Left the company\r\n"
    "boss@customer.example    OK\r\n"
)


def _recipe() -> str:
    """docs/suppression.md's recipe for a Postfix access map, as written there."""
    text = (ROOT / "docs" / "suppression.md").read_text()
    start = text.index("    tr -d '\\r' < /etc/postfix/recipient_access")
    block = text[start : text.index("\n\n", start)]
    return "\n".join(line.removeprefix("    ") for line in block.splitlines())


def test_the_docs_recipe_for_a_postfix_access_map_takes_its_addresses(
    policy: Path, tmp_path: Path
) -> None:
    access = tmp_path / "recipient_access"
    access.write_text(POSTFIX_MAP, newline="")
    script = (
        _recipe()
        .replace("/etc/postfix/recipient_access", str(access))
        .replace("sudo -u erp-relay relay", f"{sys.executable} -m relay")
        .replace("/etc/erp-relay/relay.yaml", str(policy))
    )
    done = subprocess.run(
        ["bash", "-c", "set -o pipefail\n" + script],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gone@customer.example: added (manual, all tenants)",
        "left@customer.example: added (manual, all tenants)",
    ]


def test_every_line_refused_is_named_so_a_list_is_cleaned_in_one_run(policy: Path) -> None:
    """It named the first only: a Postfix map's domain and ``user@`` entries
    took a run each to find."""
    lines = "gone@customer.example\nolddomain.example\nbaduser@\n.sub.example\n"
    lines += "".join(f"domain{i}.example\n" for i in range(12))
    done = subprocess.run(
        [sys.executable, "-m", "relay", "suppression", "add", "-c", str(policy), "-"],
        input=lines, capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    said = done.stderr.splitlines()
    assert said[:4] == [
        "relay suppression add: nothing added: 'olddomain.example' is not an address"
        " like name@example.com",
        "relay suppression add: 'baduser@' is not an address like name@example.com",
        "relay suppression add: '.sub.example' is not an address like name@example.com",
        "relay suppression add: 'domain0.example' is not an address like name@example.com",
    ]
    assert said[10:] == ["relay suppression add: and 5 more that are not addresses"]
    assert not listed(policy).exists() or listed(policy).read_text() == ""


ADD_KEYS = (
    "an add line has op, address, tenant, reason and since, and may have v, detail, queue_id and by"
)


def test_a_misspelt_key_is_named_to_a_command_that_names_addresses(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line whose ``address`` key was misspelt by hand was never read by a
    command naming addresses: "not on the list", with nothing said of the
    line. A misspelt ``tenant`` in a remove line removed the entry for all
    tenants, and a misspelt ``detail`` was dropped, without a word either; the
    entry with it is still taken, so that its address stays listed."""
    run(policy, capsys, "add", BUYER, "kept@customer.example")
    with listed(policy).open("a") as f:
        f.write(_line("gone@customer.example").replace('"address"', '"adress"'))
        f.write(_line("kept@customer.example", op="remove").replace('"tenant"', '"tenat"'))
        f.write(_line("typo@customer.example", detial="asked us"))
    warning = f"relay suppression: warning: {listed(policy)}:%d: not a suppression entry, skipped:"
    adress = f"{warning % 3} unknown key 'adress' (did you mean 'address'?): {ADD_KEYS}"
    code, out, err = run(policy, capsys, "list", "gone@customer.example")
    assert (code, out[1:]) == (1, [])
    assert err.splitlines() == [
        adress,
        f"relay suppression list: gone@customer.example: not on the list {listed(policy)}",
    ]
    code, out, err = run(policy, capsys, "remove", "kept@customer.example")
    assert code == 0 and len(out) == 1
    assert out[0].startswith("kept@customer.example: removed (manual since ")
    assert err.splitlines() == [
        adress,
        f"{warning % 4} unknown key 'tenat' (did you mean 'tenant'?): a remove line has op and"
        " address, and may have v, tenant, time and by",
    ]
    code, out, err = run(policy, capsys, "list", "typo@customer.example")
    assert code == 0 and out[1].startswith("typo@customer.example ")
    assert err.splitlines()[1] == (
        f"relay suppression: warning: {listed(policy)}:5: an entry, taken without its"
        f" unknown key 'detial' (did you mean 'detail'?): {ADD_KEYS}"
    )


def test_a_line_saved_in_latin_1_is_named_in_words_by_the_tools(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its warning was Python's: ``'utf-8' codec can't decode byte 0xf8 in
    position 26: invalid start byte``."""
    run(policy, capsys, "add", BUYER)
    with listed(policy).open("ab") as f:
        f.write(_line("jorn@customer.example").replace("jorn", "j\u00f8rn").encode("latin-1"))
    code, out, err = run(policy, capsys, "list")
    assert (code, [line.split()[0] for line in out[1:]]) == (0, [BUYER])
    assert err == (
        f"relay suppression: warning: {listed(policy)}:2: not a suppression entry, skipped:"
        " not UTF-8 at byte 36 of the line (0xf8; saved as Latin-1?): each line is one whole"
        " JSON object, in UTF-8\n"
    )


def test_a_list_saved_as_utf_16_is_named_so_by_the_tools(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The list opened in Notepad and saved as its "Unicode": the first line was
    said to be Latin-1 at the byte order mark, the others to be no JSON object
    at a NUL, which named neither UTF-16 nor how to mend it."""
    run(policy, capsys, "add", BUYER)
    run(policy, capsys, "add", "jorn@customer.example")
    listed(policy).write_bytes(listed(policy).read_text().encode("utf-16-le"))
    hint = (
        ' not a suppression entry, skipped: saved as UTF-16 (Notepad\'s "Unicode"; {}),'
        " not UTF-8: each line is one whole JSON object, in UTF-8"
    )
    _, out, err = run(policy, capsys, "list")
    assert out[1:] == []
    assert err.splitlines()[:2] == [
        f"relay suppression: warning: {listed(policy)}:1:" + hint.format("a NUL every other byte"),
        f"relay suppression: warning: {listed(policy)}:2:" + hint.format("a NUL every other byte"),
    ]
    listed(policy).write_bytes(b"\xff\xfe" + listed(policy).read_bytes())
    _, _, err = run(policy, capsys, "list")
    assert err.splitlines()[0] == f"relay suppression: warning: {listed(policy)}:1:" + hint.format(
        "the line begins with a byte order mark, 0xff 0xfe"
    )


def test_a_line_without_an_address_key_is_named_when_the_last_line_is_unended(
    policy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The address on a last line with no line end was counted among the lines':
    the counts agreed, the line naming none was not looked for, and the
    address it meant was "not on the list" with nothing said of it."""
    run(policy, capsys, "add", BUYER)
    with listed(policy).open("a") as f:
        f.write(_line("gone@customer.example").replace('"address"', '"adress"'))
        f.write(_line("late@customer.example").rstrip("\n"))
    code, _out, err = run(policy, capsys, "list", "gone@customer.example")
    assert code == 1
    assert f"{listed(policy)}:2: not a suppression entry, skipped: unknown key 'adress'" in err
