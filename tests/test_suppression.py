"""The suppression list's file, its lookups, the policy's hard_bounce codes, and
what decide and preview make of a listed recipient."""

from __future__ import annotations

import io
import logging
import os
import pwd
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import PolicyError
from relay.policy.load import load
from relay.preview import NoRecipient, render, submission_from_file
from relay.suppression import (
    BOUNCE,
    COMPLAINT,
    MANUAL,
    Backlog,
    Suppression,
    SuppressionError,
    SuppressionFile,
    SuppressionList,
)
from relay.suppression.entry import REASONS, time_text
from relay.suppression.index import Builder
from tests.policyfiles import variant

WHEN = "2026-03-04T05:06:07.000Z"


def _entry(address: str, tenant: str | None = None, reason: str = BOUNCE) -> Suppression:
    return Suppression(address, tenant, reason, WHEN, "550 5.1.1 User unknown", "Q1")


def test_an_added_entry_is_found_in_any_case_and_by_a_reader_that_read_before(
    tmp_path: Path,
) -> None:
    """Each worker keeps its reader: what another one adds later is read on its
    next lookup, from where it stopped."""
    path = tmp_path / "suppression.jsonl"
    reader, writer = SuppressionFile(path), SuppressionFile(path)
    assert len(reader.current()) == 0  # no file yet: nothing suppressed
    writer.create()
    writer.add([_entry("Gone@Example.org")])
    first = reader.current()
    found = first.find("gone@example.ORG", "acme")
    assert found == Suppression("gone@example.ORG", None, BOUNCE, WHEN)  # details: in the file
    writer.add([_entry("other@example.org")])
    second = reader.current()
    assert second.find("other@example.org", "acme") is not None
    assert first.find("other@example.org", "acme") is None  # a snapshot does not change
    assert reader.current() is second  # nothing new: nothing read


def test_a_tenants_own_entry_keeps_its_tenant_only(tmp_path: Path) -> None:
    listed = SuppressionFile(tmp_path / "s.jsonl")
    listed.add([_entry("buyer@example.org", "acme", COMPLAINT)])
    snapshot = listed.current()
    assert snapshot.find("buyer@example.org", "acme") is not None
    assert snapshot.find("buyer@example.org", "globex") is None


def test_a_removal_takes_one_scope_and_the_last_line_wins(tmp_path: Path) -> None:
    listed = SuppressionFile(tmp_path / "s.jsonl")
    listed.add([_entry("a@example.org"), _entry("a@example.org", "acme", MANUAL)])
    listed.remove([("a@example.org", None)], by="alice")
    snapshot = listed.current()
    assert snapshot.find("a@example.org", "globex") is None
    found = snapshot.find("a@example.org", "acme")
    assert found == Suppression("a@example.org", "acme", MANUAL, WHEN)
    listed.add([_entry("a@example.org")])
    assert listed.current().find("a@example.org", "globex") is not None
    lines = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(lines) == 4 and '"op":"remove"' in lines[2] and '"by":"alice"' in lines[2]


def test_a_line_cut_short_by_a_crash_spoils_no_other(tmp_path: Path) -> None:
    """A writer that died mid-line left it without its line end: the next append
    ends it first, and the reader skips it, saying where, but keeps the rest."""
    path = tmp_path / "s.jsonl"
    listed = SuppressionFile(path)
    listed.add([_entry("a@example.org")])
    with path.open("ab") as f:
        f.write(b'{"v":1,"op":"add","address":"half@exa')
    reader = SuppressionFile(path)
    assert reader.current().find("a@example.org", "acme") is not None
    listing = reader.entries()
    assert listing.problems == [] and listing.unfinished  # it may still be being written
    listed.add([_entry("b@example.org")])
    snapshot = reader.current()
    assert snapshot.find("b@example.org", "acme") is not None
    assert snapshot.find("half@example.org", "acme") is None
    listing = reader.entries()
    assert len(listing.problems) == 1 and listing.problems[0].startswith(f"{path}:2: ")
    assert not listing.unfinished


def test_a_line_read_while_it_was_being_written_is_taken_once_it_is_whole(
    tmp_path: Path,
) -> None:
    """A reader takes no lock, so it may read another writer's line half written:
    the half is kept for the rest, or the worker that read it would never list
    the address, and would go on sending to it."""
    path = tmp_path / "s.jsonl"
    SuppressionFile(path).add([_entry("a@example.org")])
    line = (
        b'{"v":1,"op":"add","address":"gone@example.org","tenant":null,'
        b'"reason":"manual","since":"2026-01-02T03:04:05.000Z"}\n'
    )
    reader = SuppressionFile(path)
    with path.open("ab") as f:
        f.write(line[:30])
        f.flush()
        assert reader.current().find("gone@example.org", "acme") is None
        f.write(line[30:])
    assert reader.current().find("gone@example.org", "acme") is not None


def test_a_replaced_file_is_read_again_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    reader = SuppressionFile(path)
    SuppressionFile(path).add([_entry("a@example.org"), _entry("b@example.org")])
    assert len(reader.current()) == 2
    fresh = tmp_path / "new.jsonl"
    SuppressionFile(fresh).add([_entry("c@example.org")])
    fresh.replace(path)  # a sysadmin's cleaned-up copy put in place
    snapshot = reader.current()
    assert len(snapshot) == 1 and snapshot.find("c@example.org", "acme") is not None
    assert snapshot.find("a@example.org", "acme") is None


def test_entries_that_are_not_are_skipped_and_named(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(
        f'{{"v":1,"op":"add","address":"ok@example.org","tenant":null,"reason":"bounce","since":"{WHEN}"}}\n'
        f'{{"v":1,"op":"add","address":"x@example.org","tenant":null,"reason":"angry","since":"{WHEN}"}}\n'
        '{"v":1,"op":"zap","address":"y@example.org"}\n'
        "[1, 2]\n"
        '{"v":1,"op":"add","address":"z@example.org","tenant":null,"reason":"bounce","since":"x"}\n'
    )
    reader = SuppressionFile(path)
    assert len(reader.current()) == 1
    listing = reader.entries()
    assert [e.address for e in listing.entries] == ["ok@example.org"]
    assert [p.split(": ", 1)[0] for p in listing.problems] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    assert "reason 'angry' is not one of bounce, complaint, manual" in listing.problems[0]
    assert "since 'x' is not a time" in listing.problems[3]


def test_a_hand_written_domain_alone_is_a_line_skipped_at_its_number(tmp_path: Path) -> None:
    """A Postfix map lists a whole domain; the list holds addresses. Taken, the
    line matched no recipient ever, and ``list`` showed it as if the domain were
    kept from mail."""
    path = tmp_path / "s.jsonl"
    path.write_text(
        f'{{"v":1,"op":"add","address":"ok@example.org","tenant":null,"reason":"bounce","since":"{WHEN}"}}\n'
        f'{{"v":1,"op":"add","address":"olddomain.example","tenant":null,"reason":"manual","since":"{WHEN}"}}\n'
    )
    reader = SuppressionFile(path)
    assert len(reader.current()) == 1
    listing = reader.entries()
    assert [e.address for e in listing.entries] == ["ok@example.org"]
    assert listing.problems == [
        f"{path}:2: not a suppression entry, skipped:"
        " address and since must be text, with an address"
    ]


def test_a_line_with_a_misspelt_key_is_skipped_and_its_key_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A remove line's misspelt ``tenant`` removed the entry for all tenants,
    and a misspelt ``detail`` was dropped, with nothing logged; a misspelt
    ``address`` was logged as ``'address'``, which says nothing of the line.
    An add line with every key it needs is taken with the odd one: skipped,
    its address was sent to again."""
    path = tmp_path / "s.jsonl"
    SuppressionFile(path).add([_entry("kept@example.org")])
    with path.open("a") as f:
        f.write('{"v":1,"op":"remove","address":"kept@example.org","tenat":"acme"}\n')
        f.write(f'{{"op":"add","adress":"x@example.org","tenant":null,"since":"{WHEN}"}}\n')
        f.write(
            f'{{"op":"add","address":"y@example.org","tenant":null,"reason":"complaint",'
            f'"since":"{WHEN}","detial":"asked us"}}\n'
        )
    with caplog.at_level(logging.WARNING, logger="relay"):
        snapshot = SuppressionFile(path).current()
    assert snapshot.find("kept@example.org", "acme") is not None
    assert snapshot.find("x@example.org", "acme") is None
    assert snapshot.find("y@example.org", "acme") is not None
    assert caplog.messages == [
        f"{path}:2: not a suppression entry, skipped: unknown key 'tenat' (did you mean"
        " 'tenant'?): a remove line has op and address, and may have v, tenant, time and by",
        f"{path}:3: not a suppression entry, skipped: unknown key 'adress' (did you mean"
        " 'address'?): an add line has op, address, tenant, reason and since, and may have"
        " v, detail, queue_id and by",
        f"{path}:4: an entry, taken without its unknown key 'detial' (did you mean"
        " 'detail'?): an add line has op, address, tenant, reason and since, and may have"
        " v, detail, queue_id and by",
    ]


def test_entries_with_a_key_of_another_system_are_said_once_a_reading(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A list brought over from another system, a key of its own on every line,
    put a warning a line in the log, from every worker, and held their start."""
    path = tmp_path / "s.jsonl"
    _write_entries_of_another_system(path, 500)
    file = SuppressionFile(path)
    with caplog.at_level(logging.WARNING, logger="relay"):
        snapshot = file.current()
    assert snapshot.find("a499@example.org", "acme") is not None
    assert caplog.messages == [
        f"{path}:1: an entry, taken without its unknown key 'source': an add line has op,"
        " address, tenant, reason and since, and may have v, detail, queue_id and by; and"
        " 499 more entries with keys the relay does not know"
    ]
    assert file.entries().problems == caplog.messages


def _write_entries_of_another_system(path: Path, count: int) -> None:
    """Add lines each with a key the relay does not know, as another MTA's export has."""
    path.write_text(
        "".join(
            f'{{"op":"add","address":"a{i}@example.org","tenant":null,"reason":"bounce",'
            f'"since":"{WHEN}","source":"old-mta"}}\n'
            for i in range(count)
        )
    )


def test_one_more_entry_with_a_key_of_another_system_is_said_in_the_singular(
    tmp_path: Path,
) -> None:
    """It was ``and 1 more entries``."""
    path = tmp_path / "s.jsonl"
    _write_entries_of_another_system(path, 2)
    (said,) = SuppressionFile(path).entries().problems
    assert said.endswith("; and 1 more entry with keys the relay does not know")


def test_a_line_without_a_key_it_needs_names_it_and_what_is_expected(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"v":1,"op":"add","address":"x@example.org","tenant":null,"since":"x"}\n')
    (problem,) = SuppressionFile(path).entries().problems
    assert problem.endswith(
        "skipped: no key 'reason': an add line has op, address, tenant, reason and since,"
        " and may have v, detail, queue_id and by"
    )


EITHER_LINE = (
    "an add line has op, address, tenant, reason and since, and may have v, detail, queue_id"
    " and by; a remove line has op and address, and may have v, tenant, time and by"
)


def test_a_hand_added_line_without_an_op_says_what_it_lacks(tmp_path: Path) -> None:
    """Its misspelt key was said with ``a line's op is add or remove``, of a line
    that had no op at all."""
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"adress": "x@example.org"}\n'
        '{"address": "y@example.org"}\n'
        '{"op": "ad", "adress": "z@example.org"}\n'
    )
    assert SuppressionFile(path).entries().problems == [
        f"{path}:1: not a suppression entry, skipped: unknown key 'adress' (did you mean"
        f" 'address'?), and no key 'op': {EITHER_LINE}",
        f"{path}:2: not a suppression entry, skipped: no key 'op': {EITHER_LINE}",
        f"{path}:3: not a suppression entry, skipped: unknown key 'adress' (did you mean"
        f" 'address'?), and op 'ad' is neither add nor remove: {EITHER_LINE}",
    ]


def test_a_hand_written_value_is_said_as_json_writes_it(tmp_path: Path) -> None:
    """``{"op": null}`` was said to have ``op None``, and a list ``['add']``:
    Python's spelling, not the line's."""
    add = f'"op": "add", "address": "x@example.org", "tenant": null, "since": "{WHEN}"'
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"op": null, "address": "x@example.org"}\n'
        '{"op": true, "address": "x@example.org"}\n'
        '{"op": ["add"], "address": "x@example.org"}\n'
        f'{{{add}, "reason": null}}\n'
        f'{{{add}, "reason": {{"why": "bounce"}}}}\n'
        f'{{{add}, "reason": ["bøunce"]}}\n'
    )
    skipped = f"{path}:%d: not a suppression entry, skipped:"
    assert SuppressionFile(path).entries().problems == [
        f"{skipped % 1} op null is neither add nor remove: {EITHER_LINE}",
        f"{skipped % 2} op true is neither add nor remove: {EITHER_LINE}",
        f'{skipped % 3} op ["add"] is neither add nor remove: {EITHER_LINE}',
        f"{skipped % 4} reason null is not one of bounce, complaint, manual",
        f'{skipped % 5} reason {{"why": "bounce"}} is not one of bounce, complaint, manual',
        f'{skipped % 6} reason ["bøunce"] is not one of bounce, complaint, manual',
    ]


ONE = "each line is one whole JSON object, in UTF-8"


def _skipped_alike(path: Path, caplog: pytest.LogCaptureFixture, why: list[str]) -> None:
    """The tools' reading and the worker's say why each of the first lines is
    skipped, in order, and take the last, ``kept@example.org``, alone."""
    said = [f"{path}:{n}: not a suppression entry, skipped: {w}" for n, w in enumerate(why, 1)]
    assert SuppressionFile(path).entries().problems == said
    with caplog.at_level(logging.WARNING, logger="relay"):
        snapshot = SuppressionFile(path).current()
    assert caplog.messages == said
    assert len(snapshot) == 1 and snapshot.find("kept@example.org", "acme") is not None


def test_a_line_that_is_no_json_object_says_where_and_what_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited line in Latin-1, or one that is no JSON, was said in
    Python's words: ``'utf-8' codec can't decode byte 0xf8 in position 24``,
    ``Expecting value: line 1 column 1 (char 0)``, which name neither the
    file's encoding nor a line cut short."""
    add = f'"op": "add", "tenant": null, "reason": "manual", "since": "{WHEN}"'
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b'{"op": "add", "address": "j\xf8rn@example.org"}\n'
        b"gone@example.org\n"
        + f'{{{add}, "address": "cut@exa\n'.encode()
        + f"{{{add}, 'address': 'x@example.org'}}\n".encode()
        + f'{{{add}, "address": "a@example.org"}}{{"op": "add"}}\n'.encode()
        + b'["add", "b@example.org"]\n'
        + f'{{{add}, "address": "kept@example.org"}}\n'.encode()
    )
    _skipped_alike(
        path,
        caplog,
        [
            f"not UTF-8 at byte 28 of the line (0xf8; saved as Latin-1?): {ONE}",
            f"not a JSON object: 'gone@example.org' at column 1: {ONE}",
            f"not a JSON object: cut off after column 106, before the object ends"
            f" (a write that stopped, or an edit?): {ONE}",
            f"not a JSON object: at column 88, expected a key in double quotes,"
            f" found \"'address': 'x@example.org'}}\": {ONE}",
            f'more after the JSON object, at column 115: \'{{"op": "add"}}\': {ONE}',
            f'not a JSON object but a list ["add", "b@example.org"]: {ONE}',
        ],
    )


def test_a_line_the_json_reader_gives_up_on_is_skipped_in_words_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line of a thousand ``[`` raised RecursionError out of the reading, and
    the relay did not start; a 5,000-digit number said Python's limit. A quote
    left open before the line's end was said to be a line cut short by the
    worker's reading (which reads the line feed too) and rightly by the tools'.
    A byte order mark, or a character cut off at the end, were said as
    something else."""
    add = f'"op": "add", "tenant": null, "reason": "manual", "since": "{WHEN}"'
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        b"[" * 100_000  # Python 3.13's JSON reader goes deeper than 3.11's: 5,000 it reads
        + b"\n"
        + f'{{{add}, "address": "n@example.org", "detail": {"9" * 5000}}}\n'.encode()
        + f'{{{add}, "address": "open@example.org}}\r\n'.encode()
        + "\ufeff".encode()
        + f'{{{add}, "address": "bom@example.org"}}\n'.encode()
        + b'{"op": "add", "address": "j\xc3\n'
        + f'{{{add}, "address": "kept@example.org"}}\n'.encode()
    )
    _skipped_alike(
        path,
        caplog,
        [
            f"not a JSON object: nested deeper than the relay reads: {ONE}",
            f"not a JSON object: a number too long to read: {ONE}",
            f"not a JSON object: the text in quotes from column 99 has no end quote: {ONE}",
            f"a byte order mark (U+FEFF) before the JSON object, as some editors"
            f" save UTF-8: {ONE}, without it",
            f"not UTF-8 at byte 28 of the line (0xc3; a character cut off at the"
            f" line's end): {ONE}",
        ],
    )


def test_a_line_in_utf_16_or_with_a_character_cut_in_two_is_said_so_not_latin_1(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A line saved as UTF-16 had no hint (its ASCII is valid UTF-8, a NUL beside
    each character), or was said to be Latin-1 at its byte order mark or at
    a letter's own byte; a UTF-8 character cut in two within the line was
    said to be Latin-1 too. A Latin-1 letter before ASCII begins a UTF-8
    character as much, and is said as both."""
    add = f'"op": "add", "tenant": null, "reason": "manual", "since": "{WHEN}"'
    line = f'{{{add}, "address": "j\u00f8rn@example.org"}}'
    path = tmp_path / "s.jsonl"
    path.write_bytes(
        ("\ufeff" + line).encode("utf-16-le")
        + b"\n"
        + ("\ufeff" + line).encode("utf-16-be")
        + b"\n"
        + b"\x00"  # a UTF-16 line's line feed is two bytes: the next line begins with its NUL
        + line.encode("utf-16-le")
        + b"\n"
        + line.replace("\u00f8", "o").encode("utf-16-be")
        + b"\n"
        + f'{{{add}, "address": "a@example.org", "detail": "1 \u20ac"}}\n'.encode()[:-4]
        + b'"}\n'
        + f'{{{add}, "address": "b@example.org", "detail": "\u00f8 \u00e6"}}\n'.encode()[:-4]
        + b'"}\n'
        + f'{{{add}, "address": "c@example.org", "detail": "caf\u00e9"}}\n'.encode("latin-1")
        + f'{{{add}, "address": "d@example.org", "detail": "pr\u00e9\u2019s"}}\n'.encode("cp1252")
        + f'{{{add}, "address": "f@example.org", "detail": "caf\u00e9\u2026"}}\n'.encode("cp1252")
        + f'{{{add}, "address": "e@example.org", "detail": "\u3042"}}\n'.encode()[:-4]
        + b'"}\n'
        + f'{{{add}, "address": "kept@example.org"}}\n'.encode()
    )
    _skipped_alike(
        path,
        caplog,
        [
            f'saved as UTF-16 (Notepad\'s "Unicode"; the line begins with a byte order mark,'
            f" 0xff 0xfe), not UTF-8: {ONE}",
            f'saved as UTF-16 (Notepad\'s "Unicode"; the line begins with a byte order mark,'
            f" 0xfe 0xff), not UTF-8: {ONE}",
            f'saved as UTF-16 (Notepad\'s "Unicode"; a NUL every other byte), not UTF-8: {ONE}',
            f'saved as UTF-16 (Notepad\'s "Unicode"; a NUL every other byte), not UTF-8: {ONE}',
            "not UTF-8 at byte 129 of the line (0xe2 0x82, the first 2 bytes of a 3-byte UTF-8"
            f" character, then 0x22, which is no part of it: a character cut short): {ONE}",
            "not UTF-8 at byte 130 of the line (0xc3, the first byte of a 2-byte UTF-8"
            f" character, then 0x22, which is no part of it: a character cut short): {ONE}",
            "not UTF-8 at byte 130 of the line (0xe9, the first byte of a 3-byte UTF-8"
            " character, then 0x22, which is no part of it: a character cut short, or saved as"
            f" Latin-1?): {ONE}",
            "not UTF-8 at byte 129 of the line (0xe9 0x92, the first 2 bytes of a 3-byte UTF-8"
            " character, then 0x73, which is no part of it: a character cut short, or saved as"
            f" Latin-1?): {ONE}",
            "not UTF-8 at byte 130 of the line (0xe9 0x85, the first 2 bytes of a 3-byte UTF-8"
            " character, then 0x22, which is no part of it: a character cut short, or saved as"
            f" Latin-1?): {ONE}",
            "not UTF-8 at byte 127 of the line (0xe3 0x81, the first 2 bytes of a 3-byte UTF-8"
            f" character, then 0x22, which is no part of it: a character cut short): {ONE}",
        ],
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_list_made_by_root_belongs_to_the_state_directorys_owner(tmp_path: Path) -> None:
    """``sudo relay suppression add`` before the relay ever listed anything: a
    root-owned file would keep the service user from adding the next bounce."""
    nobody = pwd.getpwnam("nobody")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    SuppressionFile(state / "s.jsonl").add([_entry("a@example.org")])
    st = os.stat(state / "s.jsonl")
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert st.st_mode & 0o777 == 0o640


def test_an_unreadable_list_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.mkdir()
    with pytest.raises(SuppressionError, match=f"cannot read the suppression list {path}"):
        SuppressionFile(path).current()
    with pytest.raises(SuppressionError, match="no state directory"):
        SuppressionFile(tmp_path / "missing" / "s.jsonl").create()


def test_the_policy_takes_hard_bounce_codes_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    base = Path(__file__).parent / "policies" / "minimal.yaml"
    default = load(base).suppression
    assert default is not None and default.hard_bounce == {"5.1.1", "5.1.10", "5.2.1"}
    assert default.file.name == "suppression.jsonl"
    own = variant(
        tmp_path / "own", "tenants:", "suppression: {hard_bounce: [5.1.1, 5.4.1]}\ntenants:"
    )
    settings = load(own).suppression
    assert settings is not None and settings.hard_bounce == {"5.1.1", "5.4.1"}
    none = variant(tmp_path / "none", "tenants:", "suppression: {hard_bounce: []}\ntenants:")
    settings = load(none).suppression
    assert settings is not None and settings.hard_bounce == frozenset()
    bad = variant(
        tmp_path / "bad", "tenants:", "suppression:\n  hard_bounce: [5.1, 4.2.2]\ntenants:"
    )
    with pytest.raises(PolicyError) as caught:
        load(bad)
    problems = "\n".join(caught.value.problems)
    assert f"{bad}:" in problems and "suppression.hard_bounce[0]" in problems
    assert "suppression.hard_bounce[1]: expected a permanent enhanced status code" in problems
    assert "'4.2.2'" in problems


MESSAGE = (
    b"From: jan@acme.example\nTo: buyer@example.org, gone@example.org\n"
    b"Subject: Invoice 4711\n\nPlease find the invoice attached.\n"
)


def test_preview_and_decide_leave_a_listed_recipient_out_and_say_why(
    policy_file: Path,
) -> None:
    """The invoice's automatic BCC goes to the sender as before; the listed
    recipient is in no envelope, with the reason in the report."""
    policy = load(policy_file)
    assert policy.suppression is not None
    policy.suppression.file.parent.mkdir(parents=True)
    SuppressionFile(policy.suppression.file).add([_entry("Gone@example.org")])
    submission = submission_from_file(MESSAGE, None, None, [])
    text = render(policy, submission, as_json=False)
    assert "Recipients:  buyer@example.org, jan@acme.example\n" in text
    assert "Suppressed:  gone@example.org\n" in text
    assert (
        f"not sent to gone@example.org: on the suppression list since {WHEN}"
        " (a delivery to it failed as to an address that does not exist or takes no mail)"
    ) in text


def test_a_tenants_own_entry_keeps_the_address_out_of_that_tenants_mail_alone(
    policy_file: Path,
) -> None:
    """An entry is scoped by the tenant's id (``acme``), not its name (``Acme
    AS``): looked up by the name, Acme's invoice went to the address that had
    bounced for Acme. Another tenant's mail still goes to it."""
    policy = load(policy_file)
    assert policy.suppression is not None
    policy.suppression.file.parent.mkdir(parents=True)
    SuppressionFile(policy.suppression.file).add([_entry("gone@example.org", "acme")])
    text = render(policy, submission_from_file(MESSAGE, None, None, []), as_json=False)
    assert "Recipients:  buyer@example.org, jan@acme.example\n" in text
    assert "Suppressed:  gone@example.org\n" in text
    globex = MESSAGE.replace(b"From: jan@acme.example", b"From: hank@globex.example")
    text = render(policy, submission_from_file(globex, None, None, []), as_json=False)
    assert "Recipients:  buyer@example.org, gone@example.org\n" in text


def test_a_file_rewritten_in_place_is_read_again_from_its_start(tmp_path: Path) -> None:
    """``cat kept.jsonl > suppression.jsonl`` keeps the inode and may leave the
    file larger than what was read: read on from the old offset, a worker kept
    the removed entries and missed the new ones until its restart."""
    path = tmp_path / "s.jsonl"
    SuppressionFile(path).add([_entry("a@example.org")])
    reader = SuppressionFile(path)
    assert reader.current().find("a@example.org", "acme") is not None
    other = SuppressionFile(tmp_path / "other.jsonl")
    other.add([_entry(f"n{i}@example.org") for i in range(5)])
    inode = os.stat(path).st_ino
    path.write_bytes((tmp_path / "other.jsonl").read_bytes())
    assert os.stat(path).st_ino == inode
    snapshot = reader.current()
    assert snapshot.find("a@example.org", "acme") is None
    assert all(snapshot.find(f"n{i}@example.org", "acme") is not None for i in range(5))
    assert len(snapshot) == 5


def test_an_edit_in_place_that_keeps_the_length_is_read(tmp_path: Path) -> None:
    """A typo corrected in an editor that writes in place: the file's size and its
    last bytes stayed, and the workers kept the old address until a restart
    while the tools showed the new one."""
    path = tmp_path / "s.jsonl"
    SuppressionFile(path).add([_entry("scoped@example.org"), _entry("other@example.org")])
    reader = SuppressionFile(path)
    assert reader.current().find("scoped@example.org", "acme") is not None
    inode, before = os.stat(path).st_ino, os.stat(path).st_mtime_ns
    with path.open("r+b") as f:
        text = f.read().replace(b"scoped@", b"scopex@")
        f.seek(0)
        f.write(text)
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))  # a coarse clock's tick
    assert os.stat(path).st_ino == inode
    snapshot = reader.current()
    assert snapshot.find("scoped@example.org", "acme") is None
    assert snapshot.find("scopex@example.org", "acme") is not None
    assert snapshot.find("other@example.org", "acme") is not None


def test_a_hand_written_line_without_its_end_is_said_when_it_is_ended(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It was taken silently the moment the relay's next entry ended it."""
    path = tmp_path / "s.jsonl"
    SuppressionFile(path).add([_entry("a@example.org")])
    cut = (
        '{"v":1,"op":"add","address":"partial@example.org","tenant":null,'
        '"reason":"manual","since":"2026-01-02T03:04:05.000Z"}'
    )
    with path.open("a") as f:
        f.write(cut)
    assert SuppressionFile(path).current().find("partial@example.org", "acme") is None
    with caplog.at_level(logging.WARNING, logger="relay"):
        SuppressionFile(path).add([_entry("b@example.org")])
    (said,) = caplog.messages
    assert said.startswith(f"suppression list {path}: its last line had no line end")
    assert said.endswith(cut)
    assert SuppressionFile(path).current().find("partial@example.org", "acme") is not None


@pytest.mark.parametrize("since", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:30:00-05:00"])
def test_a_time_out_of_range_is_a_skipped_line_not_a_failed_lookup(
    tmp_path: Path, since: str
) -> None:
    """A hand-written year 1 was taken, then failed every message to the address
    with a 451 when its entry was turned back into text; so did a time in 9999
    whose offset puts it in the year 10000 in UTC."""
    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"v":1,"op":"add","address":"odd@example.org","tenant":null,"reason":"manual",'
        f'"since":"{since}"}}\n'
    )
    reader = SuppressionFile(path)
    assert reader.current().find("odd@example.org", "acme") is None
    assert reader.entries().problems == [
        f"{path}:1: not a suppression entry, skipped: since '{since}' is not a time"
    ]


def test_a_time_without_an_offset_is_utc_whatever_the_local_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The list's times are UTC, as the relay writes them: a hand-written one
    without an offset, read in the server's zone, moved by its offset."""
    import time

    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"v":1,"op":"add","address":"a@example.org","tenant":null,"reason":"manual",'
        '"since":"2026-03-04T05:06:07"}\n'
    )
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        found = SuppressionFile(path).current().find("a@example.org", "acme")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert found is not None and found.since == "2026-03-04T05:06:07.000Z"


def test_a_remove_line_whose_tenant_is_not_text_is_skipped_at_its_number(
    tmp_path: Path,
) -> None:
    """A tenant written by hand as a list (``["acme"]``) stopped every reading of
    the list; the entry it meant to remove stays, the line named."""
    path = tmp_path / "s.jsonl"
    path.write_text(
        f'{{"v":1,"op":"add","address":"a@example.org","tenant":"acme","reason":"bounce","since":"{WHEN}"}}\n'
        '{"v":1,"op":"remove","address":"a@example.org","tenant":["acme"]}\n'
    )
    reader = SuppressionFile(path)
    assert reader.current().find("a@example.org", "acme") is not None
    listing = reader.entries()
    assert [e.address for e in listing.entries] == ["a@example.org"]
    assert listing.problems == [
        f"{path}:2: not a suppression entry, skipped: address or tenant is not text"
    ]


def test_check_warns_of_a_hard_bounce_code_about_the_platform_not_the_address(
    tmp_path: Path,
) -> None:
    from relay.policy.load import check_main

    path = variant(tmp_path, "tenants:", "suppression: {hard_bounce: [5.1.1, 5.7.1]}\ntenants:")
    out, err = io.StringIO(), io.StringIO()
    assert check_main(path, out, err) == 0
    warned = err.getvalue()
    assert "warning: suppression.hard_bounce[1]: 5.7.1 says nothing of the address" in warned
    assert "5.1.1 says" not in err.getvalue()


def test_the_backlog_keeps_an_address_first_refusal_and_names_what_it_loses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    backlog = Backlog(limit=2)
    first = Suppression(
        "a@example.org", None, BOUNCE, "2026-01-01T00:00:00.000Z", "550 5.1.1", "Q1"
    )
    again = Suppression(
        "A@example.org", None, BOUNCE, "2026-01-02T00:00:00.000Z", "550 5.1.1", "Q2"
    )
    backlog.keep([first, again], OSError("read-only"))
    assert backlog.kept() == [first]
    assert caplog.text.count("kept in memory") == 1
    more = [Suppression(f"{n}@example.org", None, BOUNCE, WHEN) for n in "bc"]
    backlog.keep(more, OSError("read-only"))
    assert backlog.kept() == more  # the oldest goes first
    backlog.written(more[:1])
    assert backlog.kept() == more[1:] and "written again" not in caplog.text
    backlog.abandon()
    assert "stopping with 1 address refused" in caplog.text
    assert (
        "and 1 more not named; add them with `relay suppression add`: c@example.org" in caplog.text
    )
    assert not backlog


def test_no_automatic_copy_goes_out_of_a_document_no_recipient_gets(policy_file: Path) -> None:
    """The sender's copy went upstream alone, a record of a sending that did not
    happen, followed by the notice that none of its recipients got it."""
    policy = load(policy_file)
    assert policy.suppression is not None
    policy.suppression.file.parent.mkdir(parents=True)
    SuppressionFile(policy.suppression.file).add(
        [_entry("gone@example.org"), _entry("buyer@example.org")]
    )
    text = render(policy, submission_from_file(MESSAGE, None, None, []), as_json=False)
    assert "Recipients:  none\n" in text and "BCC added:   none\n" in text
    assert "no automatic BCC: every recipient is on the suppression list" in text


def test_a_sender_on_the_list_is_not_said_to_get_a_copy(policy_file: Path) -> None:
    """The invoice's copy to a sender on the list was shown as added, with
    the sender among the suppressed further down; and a sender who named
    themselves was "already a recipient", though no copy went either way.
    The envelope is as before: the copy stays in ``bcc_added``."""
    policy = load(policy_file)
    assert policy.suppression is not None
    policy.suppression.file.parent.mkdir(parents=True)
    SuppressionFile(policy.suppression.file).add([_entry("jan@acme.example")])
    text = render(policy, submission_from_file(MESSAGE, None, None, []), as_json=False)
    assert "BCC added:   jan@acme.example (suppressed)\n" in text
    assert "Recipients:  buyer@example.org, gone@example.org\n" in text
    assert (
        "automatic BCC to the sender jan@acme.example ('invoice'), added, then suppressed:"
        " the sender is on the suppression list"
    ) in text
    own = submission_from_file(MESSAGE, None, None, ["buyer@example.org", "jan@acme.example"])
    text = render(policy, own, as_json=False)
    assert "Recipients:  buyer@example.org\n" in text
    assert (
        "no automatic BCC: jan@acme.example is already a recipient, and on the"
        " suppression list: the sender gets no copy"
    ) in text


def test_a_document_without_recipients_is_not_previewed_as_all_suppressed(
    policy_file: Path,
) -> None:
    """A preview of a file with no To or Cc, and so no recipients, said every
    recipient was on the (empty) list and left the copy out. With none there is
    nothing to preview; given one, the copy is there."""
    headless = MESSAGE.replace(b"To: buyer@example.org, gone@example.org\n", b"")
    with pytest.raises(NoRecipient):
        submission_from_file(headless, None, None, [])
    one = submission_from_file(headless, None, None, ["buyer@example.org"])
    text = render(load(policy_file), one, as_json=False)
    assert "BCC added:   jan@acme.example\n" in text
    assert "suppression list" not in text


_OPS = st.lists(
    st.lists(
        st.tuples(
            st.booleans(),  # add, else remove
            st.sampled_from(["a@x.example", "B@x.example", "c@y.example", "d@y.example"]),
            st.sampled_from([None, "acme", "beta"]),
            st.sampled_from(REASONS),
            st.integers(0, 10**12),
        ),
        max_size=12,
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_the_index_merges_each_reading_as_the_last_line_wins(batches: list) -> None:
    """Each batch is what one reading of the file found, merged at its snapshot;
    a snapshot taken before keeps what it had."""
    builder = Builder()
    model: dict[tuple[str, str | None], tuple[str, str]] = {}
    kept: list[tuple[SuppressionList, dict]] = []
    for batch in batches:
        for add, address, tenant, reason, ms in batch:
            if add:
                builder.add(address, tenant, reason, time_text(ms))
                model[address.lower(), tenant] = (reason, time_text(ms))
            else:
                builder.remove(address.upper(), tenant)
                model.pop((address.lower(), tenant), None)
        kept.append((builder.snapshot(), dict(model)))
    for snapshot, then in kept:
        assert len(snapshot) == len(then)
        for address in ("a@x.example", "b@x.example", "c@y.example", "d@y.example"):
            for tenant in ("acme", "beta", "gamma"):
                own = then.get((address, tenant)) or then.get((address, None))
                found = snapshot.find(address, tenant)
                got = None if found is None else (found.reason, found.since)
                assert got == own, (address, tenant)


def test_the_index_refuses_the_tenant_past_its_scopes_and_keeps_working() -> None:
    """A scope is kept in 16 bits: one tenant more would not fit, and a snapshot
    that stopped on it left every lookup of the worker failing. Its line is
    refused instead, as a line the list cannot take, and the others stay found."""
    from relay.suppression.index import MAX_SCOPES

    builder = Builder()
    for n in range(MAX_SCOPES):
        builder.add("a@example.org", f"t{n}", BOUNCE, WHEN)
    with pytest.raises(ValueError, match=f"more than {MAX_SCOPES} tenants"):
        builder.add("a@example.org", "one-more", BOUNCE, WHEN)
    snapshot = builder.snapshot()
    assert len(snapshot) == MAX_SCOPES
    last = snapshot.find("a@example.org", f"t{MAX_SCOPES - 1}")
    assert last is not None and last.tenant == f"t{MAX_SCOPES - 1}"
    assert snapshot.find("a@example.org", "one-more") is None
