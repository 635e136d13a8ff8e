"""Output for people (aligned tables, a message's story) and for tools (JSON lines, CSV).

Text output replaces control characters: recipients, subjects and upstream
replies come from outside, and an escape sequence must not reach an
auditor's terminal. JSON lines are the stored records exactly as written;
CSV keeps every field, one column each, so spreadsheets get the full record,
with a text cell that a spreadsheet would run as a formula made text.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import zip_longest
from typing import Any, TextIO

from relay import message
from relay.audit import events
from relay.audit.chain import canonical
from relay.audit.search import REPORT_COLUMNS, recipients_of
from relay.quantity import quantity

#: Rows aligned together before they are printed.
TABLE_BLOCK = 2000
TABLE_COLUMNS = ("time", "event", "queue_id", "tenant", "user", "doc_type", "recipient", "reply")
# and what a terminal shows other than as written: bidi overrides turned a
# subject "\u202egnp.exe" round, and a zero-width space hid itself; the
# joiners and marks (U+200C-U+200F) stay, which Persian names and emoji need
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b\u2028-\u202e\u2060-\u2069\ufeff]")
_NESTED = {"dkim": ("domain", "selector"), "suppression": ("reason", "since")}
# Fields added within version 1, after the first CSV: their columns come last, in
# the order they were added, so that a script reading the columns by position
# reads the same columns as before.
_ADDED_LATER = ("found_by", "reasons", "for_tenant", "detail")
# What a spreadsheet takes a cell to be a formula by (OWASP, "CSV Injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_columns() -> tuple[str, ...]:
    names: list[str] = []
    for spec in events.SCHEMA.values():
        for name, _ in spec:
            if name in _NESTED and name != "dkim":
                names += [
                    f"{name}.{part}" for part in _NESTED[name] if f"{name}.{part}" not in names
                ]
            elif name not in names and name not in _ADDED_LATER:
                names.append(name)
    return (*events.HEAD, *names, *events.TAIL, *_ADDED_LATER)


CSV_COLUMNS = _csv_columns()


def _safe(value: Any) -> str:
    if value is None:
        return "-"
    return _CONTROL.sub("?", str(value))


def csv_row(record: dict[str, Any]) -> dict[str, str]:
    """Lists joined with spaces, DKIM keys as domain/selector, nested fields flattened."""
    row = {}
    for key, value in record.items():
        if key == "dkim":
            row[key] = _cell(" ".join(f"{k['domain']}/{k['selector']}" for k in value))
        elif key == "reasons":  # sentences, not addresses: a line each in the cell
            row[key] = _cell("\n".join(value))
        elif isinstance(value, dict):
            row.update({f"{key}.{part}": _cell(v) for part, v in value.items()})
        else:
            row[key] = _cell(value)
    return row


def _cell(value: Any) -> str:
    """Numbers as they are: none is a formula, and a sign must stay a sign."""
    if isinstance(value, int):
        return str(value)
    return _not_a_formula(_plain(value))


def _not_a_formula(text: str) -> str:
    """Excel and LibreOffice run a cell that starts like a formula: a Subject
    ``=HYPERLINK(...)`` a client wrote would send the auditor's rows where it
    points. A leading ``'`` is OWASP's advice; only such cells get it, so every
    other cell is as stored."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def write_csv(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    count = 0
    for record in records:
        writer.writerow(csv_row(record))
        count += 1
    return count


def write_jsonl(records: Iterable[dict[str, Any]], out: TextIO) -> int:
    count = 0
    for record in records:
        out.write(canonical(record) + "\n")
        count += 1
    return count


def table_row(record: dict[str, Any], owner: Mapping[str, Any] | None = None) -> list[str]:
    """``owner`` (the message's ``received`` record) fills in tenant, user and type."""
    reply = record.get("reply")
    if reply is None and record.get("event") == "bounced":
        reply = f"{record.get('dsn_status')} {record.get('diagnostic') or ''}".strip()
    elif record.get("event") == "listed":
        reply = _listing(record)
    cells = {**record, "recipient": " ".join(recipients_of(record)) or None, "reply": reply}
    if owner is not None and "tenant" not in record:
        cells.update({k: owner.get(k) for k in ("tenant", "user", "doc_type")})
    return [_safe(cells.get(c)) for c in TABLE_COLUMNS]


def write_table(
    records: Iterable[dict[str, Any]],
    out: TextIO,
    owner: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None,
) -> int:
    """Aligned columns, printed every ``TABLE_BLOCK`` rows: a year's search must
    not hold its results in memory. Columns only widen; when a block needs them
    wider, the header is printed again above it. ``owner`` is asked, in log
    order, for the tenant, user and type of each event that lacks them."""
    widths: list[int] = []
    count = 0
    for block in _batched(records, TABLE_BLOCK):
        rows = [table_row(r, _owner_of(r, owner)) for r in block]
        wider = _widths([list(TABLE_COLUMNS), *rows], widths)
        if wider != widths:
            widths = wider
            _write_rows([list(TABLE_COLUMNS)], widths, out)
        _write_rows(rows, widths, out)
        count += len(rows)
    if not count:
        _aligned([list(TABLE_COLUMNS)], out)
    return count


def _owner_of(
    record: dict[str, Any], owner: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None
) -> Mapping[str, Any] | None:
    if owner is None or not record.get("queue_id") or "tenant" in record:
        return None
    return owner(record)


def _batched(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    block: list[dict[str, Any]] = []
    for record in records:
        block.append(record)
        if len(block) >= size:
            yield block
            block = []
    if block:
        yield block


def _widths(rows: Sequence[Sequence[str]], least: Sequence[int] = ()) -> list[int]:
    """Each column's width but the last's, which is not padded."""
    found = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return [max(pair) for pair in zip_longest(found, least, fillvalue=0)]


def _write_rows(rows: Iterable[Sequence[str]], widths: Sequence[int], out: TextIO) -> None:
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def _aligned(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    _write_rows(rows, _widths(rows), out)


def write_records(
    records: Iterable[dict[str, Any]],
    out: TextIO,
    output: str,
    owner: Callable[[dict[str, Any]], Mapping[str, Any] | None] | None = None,
) -> int:
    """In the named format (table, json, csv); how many records were written."""
    if output == "table":
        return write_table(records, out, owner)
    return write_csv(records, out) if output == "csv" else write_jsonl(records, out)


def timeline(records: Sequence[dict[str, Any]]) -> str:
    """A message's story: what was received and changed, then each recipient's fate.

    Messages that share a Message-ID (an ERP sending a document again) are
    told one after the other, each with its own recipients, by queue ID. A
    failure notice has no ``received`` record: its story starts from the
    ``notified`` record of the message it is about, which is told with it.
    """
    messages: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        messages.setdefault(r.get("queue_id"), []).append(r)
    links = {r.get("notice_queue_id"): r for r in records if r.get("event") == "notified"}
    stories = []
    for queue_id, each in messages.items():
        if all(r.get("event") == "notified" for r in each):
            # only links: the notices' stories, each told with its own records if it has any
            stories += [_story([], r) for r in each if r.get("notice_queue_id") not in messages]
        else:
            stories.append(_story(each, links.get(queue_id)))
    return "\n".join(stories)


def _story(records: Sequence[dict[str, Any]], link: dict[str, Any] | None = None) -> str:
    lines: list[str] = []
    if link is not None and not any(r.get("event") == "received" for r in records):
        lines += _notice(link, records)
    per_recipient: dict[str, list[str]] = {}
    for r in records:
        when, event = r.get("time"), r.get("event")
        if event == "received":
            lines += _received(r)
        elif event in (
            "delivered",
            "deferred",
            "failed",
            "expired",
            "suppressed",
            "bounced",
            "complained",
            "listed",
        ):
            per_recipient.setdefault(_safe(r.get("recipient")), []).append(
                f"    {when}  {event:<10} {_outcome(r)}".rstrip()
            )
        elif event == "queued":
            lines.append(
                f"{when}  queued for {quantity(len(r.get('recipients') or []), 'recipient')},"
                f" {r.get('size')} bytes (queue ID {_safe(r.get('queue_id'))})"
            )
        elif event == "notified":
            lines.append(
                f"{when}  failure notice to {_safe(r.get('recipient'))}"
                f" queued as {_safe(r.get('notice_queue_id'))}"
            )
        elif event == "deleted":
            gone = r.get("recipients") or []
            lines.append(f"{when}  deleted by {_safe(r.get('by'))}: {_safe(' '.join(gone))}")
            for address in gone:  # its last word, or a deferral reads as still waiting
                per_recipient.setdefault(_safe(address), []).append(
                    f"    {when}  {'deleted':<10} by {_safe(r.get('by'))}"
                )
        elif event in ("held", "released"):
            lines.append(f"{when}  {event} by {_safe(r.get('by'))}")
        elif event == "rejected":
            lines += _rejected(r)
        else:
            lines.append(f"{when}  {_safe(event)}")
    if per_recipient:
        lines.append("Recipients:")
        for address, steps in per_recipient.items():
            lines.append(f"  {address}")
            lines += steps
    return "\n".join(lines) + "\n"


def _notice(link: dict[str, Any], records: Sequence[dict[str, Any]]) -> list[str]:
    """What a notice is about, from the ``notified`` record that links it."""
    message_id = next((r["message_id"] for r in records if r.get("message_id")), None)
    notice = _safe(link.get("notice_queue_id"))
    lines = [
        f"Failure notice {_safe(message_id)}, queue ID {notice}",
        f"{link.get('time')}  written to {_safe(link.get('recipient'))} about message"
        f" {_safe(link.get('message_id'))}, queue ID {_safe(link.get('queue_id'))}",
    ]
    if not records:  # queued by ``relay bounce``, and the relay has not tried it yet
        lines.append(f"    no attempt on record yet: relay queue show {notice}")
    return lines


def _received(r: dict[str, Any]) -> list[str]:
    dkim = ", ".join(f"{k['domain']}/{k['selector']}" for k in r.get("dkim") or []) or "not signed"
    lines = [
        f"Message {_safe(r.get('message_id'))}, queue ID {_safe(r.get('queue_id'))}",
        f"{r.get('time')}  received from {_safe(r.get('client_address'))}"
        f" (login {_safe(r.get('auth_login'))}, listener {_safe(r.get('listener'))})",
        f"    tenant {_safe(r.get('tenant'))}, user {_safe(r.get('user'))}"
        + (f" (found by {_safe(r['found_by'])})" if "found_by" in r else "")
        + f", document {_safe(r.get('doc_type'))} (rule {_safe(r.get('rule'))})",
        f"    envelope <{_safe(r.get('mail_from'))}> to "
        + ", ".join(f"<{_safe(a)}>" for a in r.get("rcpt_tos") or []),
    ]
    if "subject" in r:
        lines.append(f"    subject   {_safe(r['subject'])}")
    lines += [
        f"    From      {_field(r.get('from_before'))} -> {_field(r.get('from_after'))}",
        f"    Reply-To  {_field(r.get('reply_to_before'))} -> {_reply_to_after(r)}",
        f"    BCC added {_safe(', '.join(r.get('bcc_added') or [])) or '(none)'}",
        f"    DKIM      {_safe(dkim)}",
        f"    upstream  {_safe(r.get('upstream'))}, {r.get('size')} bytes,"
        f" policy {_safe(str(r.get('policy_version'))[:12])}",
    ]
    lines += (f"    why       {_safe(reason)}" for reason in r.get("reasons") or [])
    return lines


def _rejected(r: dict[str, Any]) -> list[str]:
    when, reply = r.get("time"), _safe(r.get("reply"))
    lines = [f"{when}  rejected from {_safe(r.get('client_address'))}: {reply}"]
    if "user" in r:  # identified before the refusal
        lines.append(
            f"    tenant {_safe(r.get('tenant'))}, user {_safe(r['user'])}"
            + (f" (found by {_safe(r['found_by'])})" if "found_by" in r else "")
        )
    elif "tenant" in r:  # refused before, its session's login's
        lines.append(
            f"    login {_safe(r.get('auth_login'))} of tenant {_safe(r['tenant'])},"
            " refused before its sender was known"
        )
    return lines


def _reply_to_after(r: dict[str, Any]) -> str:
    """An empty string on record is an empty Reply-To the relay removed."""
    after = r.get("reply_to_after")
    if after == "":
        return "(removed)"
    return _field(after) if after else "(kept)"


def _field(value: Any) -> str:
    """A From or Reply-To on record as written, for a person to read. The
    record, and ``--format json``, keep what was sent."""
    return _safe(decoded_field(value) if isinstance(value, str) else value)


def decoded_field(value: str) -> str:
    """A From or Reply-To as written, for a person to read, here and in ``relay
    preview``: a name in encoded words (``=?utf-8?b?...?=``) decoded, and quoted
    where it holds a special: ``Gross, Jürgen <j@x>`` read as two mailboxes."""
    if "=?" not in value:
        return message.decode(value)
    return "".join(_readable(piece) for piece in _WORD_RUN_OR_QUOTED.split(value))


# a quoted string, or encoded words with only white space between them: the
# split keeps each as a piece of its own
_WORD = message.ENCODED_WORD
_WORD_RUN_OR_QUOTED = re.compile(rf'("(?:[^"\\]|\\.)*"|{_WORD}(?:\s+{_WORD})*)', re.DOTALL)
_WORD_RUN = re.compile(rf"{_WORD}(?:\s+{_WORD})*")
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,"]')


def _readable(piece: str) -> str:
    decoded = message.decode(piece)
    if decoded != piece and _WORD_RUN.fullmatch(piece) and _SPECIALS.search(decoded):
        return '"' + decoded.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return decoded


def _outcome(r: dict[str, Any]) -> str:
    event = r.get("event")
    if event == "delivered":
        return (
            f"{_safe(r.get('reply'))} (via {_safe(r.get('upstream'))}, attempt {r.get('attempts')})"
        )
    if event == "deferred":
        return f"{_safe(r.get('reply'))} (next attempt {_safe(r.get('next_attempt'))})"
    if event == "suppressed":
        s = r.get("suppression") or {}
        return f"on the suppression list ({_safe(s.get('reason'))}) since {_safe(s.get('since'))}"
    if event == "bounced":
        return f"{_safe(r.get('dsn_status'))} {_safe(r.get('diagnostic'))}"
    if event == "complained":
        return f"feedback type {_safe(r.get('feedback_type'))}"
    if event == "listed":
        s = r.get("suppression") or {}
        return (
            f"on the suppression list for {_scope(r)} since {_safe(s.get('since'))}"
            f" ({_safe(s.get('reason'))}: {_safe(r.get('detail'))})"
        )
    return _safe(r.get("reply")) if "reply" in r else ""


def _listing(r: dict[str, Any]) -> str:
    """The table's reply cell: why, and whose mail no longer goes there."""
    reason = (r.get("suppression") or {}).get("reason")
    return f"{reason}, {_scope(r)}: {r.get('detail')}"


def _scope(r: dict[str, Any]) -> str:
    tenant = r.get("for_tenant")
    return "every tenant" if tenant is None else f"tenant {_safe(tenant)}"


def write_report(rows: list[dict[str, Any]], out: TextIO, output: str) -> None:
    if output == "json":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    if output == "csv":
        writer = csv.DictWriter(out, REPORT_COLUMNS, lineterminator="\r\n")
        writer.writeheader()
        writer.writerows({c: _cell(v) for c, v in row.items()} for row in rows)
        return
    total = {"tenant": "TOTAL", "doc_type": ""}
    total.update({c: sum(r[c] for r in rows) for c in REPORT_COLUMNS[2:]})
    table = [[_safe(row[c]) for c in REPORT_COLUMNS] for row in [*rows, total]]
    _aligned([list(REPORT_COLUMNS), *table], out)
