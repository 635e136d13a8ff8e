"""The ``relay audit`` subcommands as functions of parsed arguments and streams.

``relay/cli.py`` owns the argument parser and where the directory and key
come from (the policy); these functions own everything after that, so they
are tested without a process. Exit codes follow grep: 0 found, 1 nothing
found (or, for verify, tampered), 2 bad arguments or an unreadable log.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TextIO

from relay.audit import known, reader, render, retained
from relay.audit.chain import Anchor, verify
from relay.audit.reader import DamagedFile
from relay.audit.search import OutOfRange, Owners, parse_when, report, search, show
from relay.errors import OutputError
from relay.policy.model import Policy
from relay.quantity import quantity

OUTPUTS = ("table", "json", "csv")
SHOW_OUTPUTS = ("text", "json")
_ANCHOR = re.compile(r"(?:head:\s*)?(?:seq\s+)?(\d+)(?:\s+hash\s+|\s*:\s*)([0-9a-fA-F]{64})")
REPORT_OUTPUTS = ("text", "json", "csv")


def search_main(
    directory: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    tenant: str | None = None,
    user: str | None = None,
    recipient: str | None = None,
    doc_type: str | None = None,
    status: str | None = None,
    message_id: str | None = None,
    queue_id: str | None = None,
    output: str = "table",
    out: TextIO,
    err: TextIO,
    policy: Policy | None = None,
) -> int:
    """``relay audit search``: 0 when something matched, 1 when nothing did.
    With the ``policy`` in force, a tenant, user or type it does not name
    gets a note (``relay.audit.known``)."""
    if output not in OUTPUTS:
        err.write(f"relay audit search: output {output!r} is not one of {', '.join(OUTPUTS)}\n")
        return 2
    try:
        _check_times(since, until)
        if policy is not None:
            checked = known.check(policy, tenant, user, doc_type)
            tenant, user = checked.tenant, checked.user
            err.write("".join(f"note: {note}\n" for note in checked.notes))
        _note_deleted(directory, since, "they are not in this search", err)
        found = search(
            directory,
            since,
            until,
            tenant,
            user,
            recipient,
            doc_type,
            status,
            message_id,
            queue_id,
        )
        count = render.write_records(found, out, output, Owners(directory, since, until))
        _warn_unread("search", directory, err)
    except ValueError as exc:
        err.write(f"relay audit search: {exc}\n")
        return 2
    except OSError as exc:
        return _unreadable("search", directory, exc, err)
    return 0 if count else 1


def show_main(
    directory: Path, ident: str, *, output: str = "text", out: TextIO, err: TextIO
) -> int:
    """``relay audit show ID``: one message's timeline, by queue ID or Message-ID."""
    try:
        records = show(directory, ident)
    except DamagedFile as exc:
        err.write(f"relay audit show: {exc}\n")
        return 2
    except OSError as exc:
        return _unreadable("show", directory, exc, err)
    if not records:
        err.write(f"relay audit show: no records for {ident!r}\n")
        return 1
    if output == "json":
        render.write_jsonl(records, out)
    else:
        out.write(render.timeline(records))
    return 0


def report_main(
    directory: Path,
    *,
    since: str | None = None,
    until: str | None = None,
    output: str = "text",
    out: TextIO,
    err: TextIO,
) -> int:
    """``relay audit report``: per tenant and document type, what happened."""
    try:
        _check_times(since, until)
        _note_deleted(directory, since, "this report does not count them", err)
        rows = report(directory, since, until)
        _warn_unread("report", directory, err)
    except ValueError as exc:
        err.write(f"relay audit report: {exc}\n")
        return 2
    except OSError as exc:
        return _unreadable("report", directory, exc, err)
    render.write_report(rows, out, output)
    return 0


def verify_main(
    directory: Path,
    since: str | date | None,
    out: TextIO,
    err: TextIO,
    hmac_key: bytes | None = None,
    anchor: str | None = None,
) -> int:
    """``relay audit verify [--since DATE] [--anchor 'seq N hash H']``: 0 intact,
    1 tampered, 2 unreadable. The anchor is a head printed before, pasted as is."""
    try:
        day = _when(since)
    except ValueError as exc:
        err.write(f"relay audit verify: bad --since: {exc}\n")
        return 2
    head = None
    if anchor is not None:
        found = _ANCHOR.fullmatch(anchor.strip())
        if found is None:
            err.write(f"relay audit verify: bad --anchor {anchor!r}: give the head verify"
                      " printed, 'seq N hash H' (or N:H)\n")  # fmt: skip
            return 2
        head = Anchor(int(found.group(1)), found.group(2).lower())
    try:
        # the day files are UTC days: 2024-05-07T01:00+05:00 is on 2024-05-06
        result = verify(directory, hmac_key, day.astimezone(UTC).date() if day else None, head)
    except OSError as exc:
        return _unreadable("verify", directory, exc, err)
    err.write("".join(f"note: {note}\n" for note in result.notes))
    if result.problem is not None:
        err.write(f"relay audit verify: TAMPERED: {result.problem}\n")
        records = quantity(result.records, "record")
        if result.at_start:
            whole = "is" if result.records == 1 else "are"
            err.write(f"  (the {records} from there on {whole} whole)\n")
        else:
            err.write(f"  ({records} verified before the problem was found)\n")
        return 1
    span = f" (seq {result.first_seq}..{result.last_seq})" if result.records else ""
    files = quantity(result.files, "file")
    out.write(f"audit log intact: {quantity(result.records, 'record')} in {files}{span}\n")
    if result.head:
        out.write(f"head: seq {result.last_seq} hash {result.head}\n")
    return 0


def _note_deleted(directory: Path, since: str | None, outcome: str, err: TextIO) -> None:
    """A window over days retention deleted finds nothing, as one in which nothing
    was sent does: which of the two it is must be said."""
    said = retained.deleted_before(directory, since)
    if said is not None:
        err.write(f"note: {said}; {outcome}\n")


def _warn_unread(verb: str, directory: Path, err: TextIO) -> None:
    """What was left out is said where a count or a listing cannot show it."""
    err.write("".join(f"relay audit {verb}: warning: {why}\n" for why in reader.unread(directory)))


def _unreadable(verb: str, directory: Path, exc: OSError, err: TextIO) -> int:
    """Exit 2 for a log that could not be read. A reader that went away
    (``| head``) is no fault of the log: that goes on up to the command line,
    which ends quietly as for every listing. Nor is a failed write of the
    output (``> /dev/full``): the command line reports that."""
    if isinstance(exc, (BrokenPipeError, OutputError)):
        raise exc
    err.write(f"relay audit {verb}: {directory}: {exc.strerror or exc}\n")
    return 2


def _check_times(*values: str | None) -> None:
    for value in values:
        _when(value)


def _when(value: str | date | None) -> datetime | None:
    """``parse_when``, its refusal of what is no time at all saying what is one:
    Python's own ("Invalid isoformat string") names no form a person could type."""
    try:
        return parse_when(value)
    except OutOfRange:
        raise
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time: use 2024-05-01, 2024-05-01T10:00Z or 7d, 12h, 30m"
        ) from None
