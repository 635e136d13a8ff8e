"""Apply the policy's header edits to the raw message.

Only the fields named in the edits change; every other header line keeps
its bytes and its folding and the body is passed on untouched, so the
recipient and the DKIM signature see what the ERP wrote plus our edits,
never a regenerated copy.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.headers import Field, fold, line_ending, split_at, without_blank_lines


@dataclass(frozen=True)
class HeaderEdits:
    """Field names are matched case-insensitively; ``set`` wins over ``remove``."""

    remove: tuple[str, ...] = ()  # every occurrence goes
    set: tuple[tuple[str, str], ...] = ()  # replaces the first occurrence in place, else appended
    drop_blank_lines: bool = False  # a kept field's lines of only white space go


def apply(raw: bytes, edits: HeaderEdits, split: tuple[list[Field], int] | None = None) -> bytes:
    """The message with ``edits`` made; every other byte as it came.

    New lines take the message's own line ending so a bare-LF message does
    not become a mix. Every new line is built (and refused with
    ``HeaderInjection``) before anything is assembled. When a header block
    is not closed by a blank line, one is put after it, so what is read as
    body here stays body for every reader downstream instead of becoming a
    continuation of a field we added. With ``drop_blank_lines`` a kept
    field's lines of only white space go, so no reader ends the header there.
    ``split`` is ``split_at(raw)`` when the caller has it already.
    """
    if not edits.remove and not edits.set and not edits.drop_blank_lines:
        return raw
    eol = line_ending(raw)
    new: dict[str, bytes] = {}
    for name, text in edits.set:
        key = name.lower()
        if key in new:
            raise ValueError(f"header edit sets {name} twice")
        line = fold(name, text)
        new[key] = line if eol == b"\r\n" else line.replace(b"\r\n", eol)
    remove = {name.lower() for name in edits.remove}

    fields, body = split or split_at(raw)
    out: list[bytes] = []
    placed: set[str] = set()
    for field in fields:
        key = field.name.lower()
        if key in new:
            if key not in placed:
                out.append(new[key])
                placed.add(key)
        elif key not in remove:
            out.append(without_blank_lines(field.raw) if edits.drop_blank_lines else field.raw)
    appended = [line for key, line in new.items() if key not in placed]
    if appended and out and not out[-1].endswith(b"\n"):
        out[-1] += eol
    out.extend(appended)
    if out and body < len(raw) and not raw.startswith((b"\r\n", b"\n"), body):
        out.append(eol)
    return b"".join([*out, memoryview(raw)[body:]])  # one copy of the body, not two


def prepend(raw: bytes, fields: bytes) -> bytes:
    """Ready-made field lines (DKIM-Signature) put before the message's first field."""
    if fields and not fields.endswith(b"\n"):
        raise ValueError("prepended header fields must end with a line ending")
    return fields + raw
