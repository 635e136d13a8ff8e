"""What retention deleted, said where a search or report reaches before the log's start.

A window over days retention deleted finds nothing, as one in which nothing
was sent does: an auditor must be told which it is. Only the log's first
records are read, and its ``pruned`` records, newest file first, only when
the window does reach before them.
"""

from __future__ import annotations

from datetime import UTC, date
from pathlib import Path
from typing import Any

from relay.audit import reader
from relay.audit.search import parse_when

_PRUNED = b'"event":"pruned"'


def deleted_before(directory: Path, since: str | date | None) -> str | None:
    """Why the records before the oldest kept are not there, when a window from
    ``since`` (None: the log's start) reaches before it; None when it does not,
    or nothing was deleted (the log starts at seq 1)."""
    files = reader.day_files(directory)
    first = _first_record(files)
    if first is None or not isinstance(first[0].get("seq"), int) or first[0]["seq"] == 1:
        return None
    seq, name = first[0]["seq"], first[1]
    start = parse_when(since)
    day = start.astimezone(UTC).date() if start is not None else date.min
    if day >= (reader.day_of(name) or date.max):
        return None
    pruned = _newest_pruned(files)
    if pruned is None or not isinstance(pruned.get("through_seq"), int):
        return (
            f"the log starts at seq {seq} in {name}: {_span(1, seq - 1)} are not in it"
            " and no retention record explains it (relay audit verify)"
        )
    through = pruned["through_seq"]
    deleted = [f for f in pruned.get("files") or [] if isinstance(f, str)]
    if deleted and day > (reader.day_of(deleted[-1]) or date.max):
        return None  # the window begins after the days retention deleted
    said = (
        f"the log starts after retention at seq {seq} in {name}: {_span(1, through)} were"
        f" deleted by retention (older than {reader.retention_age(pruned)}) at"
        f" {pruned.get('time')}" + (f", the files through {deleted[-1]}" if deleted else "")
    )
    if through < seq - 1:
        said += f"; {_span(through + 1, seq - 1)} are missing too (relay audit verify)"
    return said


def _first_record(files: list[reader.DayFile]) -> tuple[dict[str, Any], str] | None:
    """The oldest record kept, and the name of its file."""
    for file in files:
        for block in reader.chunks(file, 1 << 16):  # a damaged .gz: DamagedFile, named
            for line in block.split(b"\n")[:-1]:
                record = reader.parse(line + b"\n")
                if record is not None:
                    return record, file.name
    return None


def _newest_pruned(files: list[reader.DayFile]) -> dict[str, Any] | None:
    """Retention writes its record into the newest file when it runs, daily: the
    last one written names the most it deleted."""
    for file in reversed(files):
        found = None
        for block in reader.chunks(file):
            at = block.rfind(_PRUNED)
            if at >= 0:
                line = block[block.rfind(b"\n", 0, at) + 1 : block.index(b"\n", at) + 1]
                found = reader.parse(line) or found
        if found is not None:
            return found
    return None


def _span(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first}..{last}"
