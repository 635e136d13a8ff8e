"""An smtp upstream's ``fallback`` list: each name it cannot take is refused
where it is written, with what is expected, as ``relay check`` says it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from relay.errors import PolicyError
from relay.policy.load import check_main, load
from relay.policy.model import SmtpUpstream
from tests.policyfiles import variant
from tests.test_queue_e2e import relay_cli

_OUTBOX = "  outbox:\n    type: directory\n    path: outbox\n"


def _smtp(name: str, port: int, extra: str = "") -> str:
    return (
        f"  {name}:\n    type: smtp\n    host: 127.0.0.1\n    port: {port}\n    tls: none\n{extra}"
    )


def _upstreams(tmp_path: Path, text: str) -> Path:
    return variant(tmp_path, _OUTBOX, _OUTBOX + text)


def _checked(path: Path) -> tuple[int, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    status = check_main(path, out, err)
    located = re.compile(rf"{re.escape(str(path))}:\d+:\d+: (?!warning:)")
    return status, [line for line in err.getvalue().splitlines() if located.match(line)]


def _line(path: Path, text: str) -> int:
    (number,) = [n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    return number


def test_fallbacks_are_read_in_their_order(tmp_path: Path) -> None:
    path = _upstreams(
        tmp_path,
        _smtp("main", 2601, "    fallback: [second, third]\n")
        + _smtp("second", 2602)
        + _smtp("third", 2603, "    fallback: [main]\n"),
    )
    upstreams = load(path).upstreams
    main = upstreams["main"]
    assert isinstance(main, SmtpUpstream)
    assert main.fallback == ("second", "third")
    assert upstreams["third"].fallback == ("main",)  # type: ignore[union-attr]
    assert upstreams["second"].fallback == ()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("listed", "column", "message"),
    [
        ("[backpu]", 16, "no upstream 'backpu' (did you mean 'backup'?)"),
        ("[main]", 16, "'main' is this upstream itself: a fallback is another upstream"),
        ("[backup, backup]", 24, "'backup' is already in this list"),
        (
            "[outbox]",
            16,
            "'outbox' is a directory upstream: mail failed over to it would be written to"
            " files and counted as delivered, never sent; a fallback must be an smtp upstream",
        ),
        ("backup", 15, "expected a list of upstream names"),
    ],
    ids=["unknown", "itself", "twice", "directory", "not-a-list"],
)
def test_a_fallback_it_cannot_take_is_refused_where_it_is_written(
    tmp_path: Path, listed: str, column: int, message: str
) -> None:
    path = _upstreams(
        tmp_path, _smtp("main", 2601, f"    fallback: {listed}\n") + _smtp("backup", 2602)
    )
    status, said = _checked(path)
    assert status == 78
    where = "upstreams.main.fallback"
    if listed.startswith("["):
        where += f"[{listed.count(',')}]"
    line = _line(path, "fallback:")
    assert said == [f"{path}:{line}:{column}: {where}: {message}"]


@pytest.mark.parametrize(
    ("main_sender", "backup_sender", "refused"),
    [
        ("", "    sender: desk@acme.example\n", "desk@acme.example"),
        ("    sender: desk@acme.example\n", "", "the platform's addresses (no sender)"),
        ("    sender: desk@acme.example\n", "    sender: office@acme.example\n", None),
        ("    sender: Desk@Acme.example\n", "    sender: desk@acme.EXAMPLE\n", ""),
        ("", "", ""),
    ],
    ids=["only-fallback", "only-upstream", "different", "case", "neither"],
)
def test_a_fallback_sends_as_the_upstream_it_stands_in_for(
    tmp_path: Path, main_sender: str, backup_sender: str, refused: str | None
) -> None:
    path = _upstreams(
        tmp_path,
        _smtp("main", 2601, main_sender + "    fallback: [backup]\n")
        + _smtp("backup", 2602, backup_sender),
    )
    status, said = _checked(path)
    if refused == "":
        assert (status, said) == (0, [])
        return
    ours = "the platform's addresses (no sender)" if not main_sender else "desk@acme.example"
    theirs = refused or "office@acme.example"
    line = _line(path, "fallback:")
    assert status == 78
    assert said == [
        f"{path}:{line}:16: upstreams.main.fallback[0]: 'backup' sends as {theirs}, this"
        f" upstream as {ours}: its mail is rewritten and DKIM-signed for this upstream's"
        " sender before it is queued, and an account refuses any other sender; give both"
        " the same sender"
    ]


def test_a_directory_upstream_takes_no_fallback(tmp_path: Path) -> None:
    path = variant(tmp_path, "    path: outbox\n", "    path: outbox\n    fallback: [backup]\n")
    path.write_text(path.read_text().replace("tenants:", _smtp("backup", 2602) + "tenants:"))
    status, said = _checked(path)
    line = _line(path, "fallback:")
    assert status == 78
    assert said == [
        f"{path}:{line}:15: upstreams.outbox.fallback: a directory upstream takes no fallback:"
        " writing a file never finds it unreachable, so no mail would ever go to one"
    ]


def test_a_fallback_that_did_not_load_is_not_judged_again(tmp_path: Path) -> None:
    """One mistake, said once: the fallback's own, not a cascade at each list naming it."""
    path = _upstreams(
        tmp_path,
        _smtp("main", 2601, "    fallback: [backup]\n") + _smtp("backup", 99999),
    )
    with pytest.raises(PolicyError) as caught:
        load(path)
    (problem,) = caught.value.problems
    assert "upstreams.backup.port" in problem


def test_preview_lists_the_fallbacks_of_the_upstream_it_would_use(tmp_path: Path) -> None:
    path = _upstreams(
        tmp_path,
        _smtp("main", 2601, "    fallback: [backup]\n") + _smtp("backup", 2602),
    )
    path.write_text(path.read_text().replace("upstream: outbox", "upstream: main"))
    eml = tmp_path / "message.eml"
    eml.write_bytes(b"From: jan@acme.example\nTo: one@example.org\nSubject: Hello\n\nhi\n")
    shown = relay_cli(path, "preview", str(eml))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    at = lines.index("Upstream:    main (smtp 127.0.0.1:2601, tls none)")
    assert lines[at + 1] == "  fallback:  backup (smtp 127.0.0.1:2602, tls none)"
    as_json = json.loads(relay_cli(path, "preview", str(eml), "--json").stdout)
    assert as_json["fallback"] == ["backup (smtp 127.0.0.1:2602, tls none)"]


def test_relay_check_names_the_line_and_column(tmp_path: Path) -> None:
    path = _upstreams(
        tmp_path, _smtp("main", 2601, "    fallback: [bakup]\n") + _smtp("backup", 2602)
    )
    checked = relay_cli(path, "check")
    line = _line(path, "fallback:")
    assert checked.returncode == 78
    expected = f"{path}:{line}:16: upstreams.main.fallback[0]: no upstream 'bakup'"
    assert f"{expected} (did you mean 'backup'?)" in checked.stderr.splitlines()
