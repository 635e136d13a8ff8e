"""``relay suppression list|add|remove``: the sysadmin's view of the list.

``relay/cli.py`` owns the argument parser and finds the file (the policy's
state settings); these functions own everything after that, so they are
tested without a process. ``list`` exits like grep: 0 something listed, 1
nothing matched. ``add`` and ``remove`` print one line per change; ``remove``
exits 1 when an address named had no entry, as the queue tools do for an
unknown ID, having removed the others. Each takes an address as ``add``
does: without the spaces around it, its domain in the xn-- form, and one
that is not ASCII then refused (2).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict
from typing import TextIO

from relay.suppression.entry import MANUAL, Suppression, now
from relay.suppression.store import Listing, SuppressionError, SuppressionFile

EX_BADARG = 2  # as argparse's own refusals
EX_NOINPUT = 66  # the list cannot be read, as the queue tools' unreadable spool
EX_CANTCREAT = 73  # the list cannot be written

COLUMNS = ("address", "tenant", "reason", "since", "by", "detail")
_NAMED_UNLISTED = 10
_NAMED_REFUSED = 10
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def list_main(
    file: SuppressionFile,
    addresses: Sequence[str],
    tenant: str | None,
    *,
    as_json: bool = False,
    tenants: Collection[str] | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    """``relay suppression list``: with ``tenant``, the entries that keep
    addresses from that tenant's mail (its own and those for all tenants).
    An entry for a tenant not in ``tenants`` (the policy's) is marked: it
    keeps no mail from its address since the tenant was renamed."""
    addresses = _taken(addresses)
    refusal = _unlistable(addresses)
    if refusal is not None:
        err.write(f"relay suppression list: {refusal}\n")
        return EX_BADARG
    snapshot = _read(file, "list", err, addresses or None)
    if snapshot is None:
        return EX_NOINPUT
    wanted = {a.lower() for a in addresses}
    entries = [
        e
        for e in snapshot
        if (not wanted or e.key[0] in wanted) and (tenant is None or e.tenant in (tenant, None))
    ]
    if as_json:
        for entry in entries:
            out.write(json.dumps(asdict(entry)) + "\n")
    else:
        _write_table([_row(e, tenants) for e in entries], out)
    _say_unlisted(file, addresses, entries, tenant, err)
    return 0 if entries else 1


def _say_unlisted(
    file: SuppressionFile,
    addresses: Sequence[str],
    entries: Sequence[Suppression],
    tenant: str | None,
    err: TextIO,
) -> None:
    """Each address asked about and not found, naming the list looked in: run
    with another relay's policy file (staging's), "is X listed?" got an empty
    table, as for an address truly not on production's list. Past a few, a
    count: a customer file checked through ``-`` is mostly not listed."""
    found = {e.key[0] for e in entries}
    scope = "" if tenant is None else f" for tenant {tenant}"
    missing = [a for a in _unique(addresses) if a.lower() not in found]
    if len(missing) > _NAMED_UNLISTED:
        missing = [f"{len(missing)} of the addresses asked about"]
    for address in missing:
        said = f"relay suppression list: {address}: not on the list {file.path}{scope}"
        err.write(_printable(said) + "\n")


def add_main(
    file: SuppressionFile,
    addresses: Sequence[str],
    tenant: str | None,
    *,
    reason: str = MANUAL,
    note: str = "",
    by: str,
    tenants: Collection[str] | None = None,
    out: TextIO,
    err: TextIO,
) -> int:
    """``relay suppression add``: ``tenants`` the policy's, None when only its
    state settings loaded (then any tenant is taken). Nothing is added when an
    argument is refused, so a typo does not leave half the list changed."""
    addresses = _taken(addresses)
    refusals = _refusals(addresses, tenant, tenants)
    unsaid = _not_text(note, tenant)
    if unsaid is not None:
        refusals.append(unsaid)
    if refusals:
        err.write(f"relay suppression add: nothing added: {refusals[0]}\n")
        err.write("".join(f"relay suppression add: {r}\n" for r in refusals[1:]))
        return EX_BADARG
    when = now()
    new = [Suppression(a, tenant, reason, when, note, None, by) for a in _unique(addresses)]
    try:
        listing = file.add_unlisted(new)
    except SuppressionError as exc:
        err.write(f"relay suppression add: nothing added: {exc}\n")
        return EX_CANTCREAT
    _warn(file, listing, err)
    listed = {e.key: e for e in listing.entries}
    for entry in new:
        was = listed.get(entry.key)
        if was is not None:
            out.write(
                _printable(f"{entry.address}: already listed ({_describe(was)}), left as it is")
                + "\n"
            )
        else:
            out.write(_printable(f"{entry.address}: added ({reason}, {_scope(tenant)})") + "\n")
    return 0


def remove_main(
    file: SuppressionFile,
    addresses: Sequence[str],
    tenant: str | None,
    *,
    by: str,
    out: TextIO,
    err: TextIO,
) -> int:
    """``relay suppression remove``: without ``tenant``, every entry of each
    address, whatever its scope; with it, that tenant's entry only."""
    addresses = _taken(addresses)
    refusal = _unlistable(addresses)
    if refusal is not None:
        err.write(f"relay suppression remove: nothing removed: {refusal}\n")
        return EX_BADARG
    snapshot = _read(file, "remove", err, addresses)
    if snapshot is None:
        return EX_NOINPUT
    listed = _entries_of(snapshot, addresses)
    gone: list[Suppression] = []
    missing: list[str] = []
    for address in _unique(addresses):
        found = [e for e in listed.get(address.lower(), ()) if tenant in (None, e.tenant)]
        gone += found
        if not found:
            missing.append(address)
    try:
        file.remove((e.key for e in gone), by)
    except SuppressionError as exc:
        err.write(f"relay suppression remove: nothing removed: {exc}\n")
        return EX_CANTCREAT
    out.write("".join(_printable(f"{e.address}: removed ({_describe(e)})") + "\n" for e in gone))
    scope = "" if tenant is None else f" for tenant {tenant}"
    for address in missing:
        also = (
            " (its entry for all tenants keeps it from that tenant's mail too:"
            " remove that one without --tenant)"
            if tenant is not None and any(e.tenant is None for e in listed.get(address.lower(), ()))
            else ""
        )
        # which list: another relay's policy file (staging's) has none of production's
        said = f"relay suppression remove: {address}: not on the list {file.path}{scope}{also}"
        err.write(_printable(said) + "\n")
    return 1 if missing else 0


def _read(
    file: SuppressionFile, verb: str, err: TextIO, addresses: Sequence[str] | None = None
) -> list[Suppression] | None:
    """The entries (of ``addresses`` only, when given), skipped lines said on
    ``err``; None (said) when it cannot be read.

    A missing file is an empty list, but not in a directory that is not there
    either: a mistyped ``state_directory`` or ``-c`` then answered "is X
    listed?" with "no" (exit 1)."""
    try:
        listing = file.entries(addresses)
    except SuppressionError as exc:
        err.write(f"relay suppression {verb}: {exc}\n")
        return None
    if not listing.entries and not file.path.parent.is_dir():
        err.write(
            f"relay suppression {verb}: {file.path}: no such directory"
            " (has the relay run with this policy?)\n"
        )
        return None
    _warn(file, listing, err)
    return listing.entries


def _warn(file: SuppressionFile, listing: Listing, err: TextIO) -> None:
    for problem in listing.problems:
        err.write(_printable(f"relay suppression: warning: {problem}") + "\n")
    if listing.unfinished:
        err.write(
            f"relay suppression: warning: {file.path}: the last line has no line end"
            " (cut short, or being written), not read\n"
        )


def _refusals(
    addresses: Sequence[str], tenant: str | None, tenants: Collection[str] | None
) -> list[str]:
    """Every argument refused, not the first only: a list brought over from a
    Postfix map took one run per bad line to clean. Past a few, a count."""
    from relay.policy.values import is_address

    refused = [_not_an_address(a) for a in _unique(addresses) if not is_address(a)]
    if len(refused) > _NAMED_REFUSED:
        more = len(refused) - _NAMED_REFUSED
        refused[_NAMED_REFUSED:] = [f"and {more} more that are not addresses"]
    if tenant is not None and tenants is not None and tenant not in tenants:
        known = ", ".join(sorted(tenants)) or "none"
        refused.append(f"the policy has no tenant {tenant!r} (its tenants: {known})")
    return refused


def _not_text(note: str, tenant: str | None) -> str | None:
    """Why ``--note`` or ``--tenant`` cannot go on the list, which is UTF-8 text,
    or None: bytes in another encoding (``M\\xfcller`` in Latin-1) ended the
    command in a traceback."""
    for option, value in (("--note", note), ("--tenant", tenant or "")):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{option} {value!r} is not UTF-8 text (Latin-1 bytes?): give it in UTF-8"
    return None


def _taken(addresses: Sequence[str]) -> list[str]:
    """A space pasted with an address (``'gone@example.org '``) is no part of it.
    A domain in Unicode is taken in its xn-- form, the one the relay sends to
    and lists (``relay audit search`` takes it so too): refused, it was said to
    be no address, without the form to use."""
    return [_a_label(address.strip()) for address in addresses]


def _a_label(address: str) -> str:
    from relay.identify import a_label_address

    return a_label_address(address) or address


def _unlistable(addresses: Sequence[str]) -> str | None:
    """Why a name can be on no list, or None: ``add``'s refusal of what is not
    ASCII (the relay takes no such address either), where "nothing matched"
    hid that the xn-- form of an IDN is listed. Other names are looked up as
    they are: an entry the relay made must stay reachable by name."""
    for address in addresses:
        if not address.isascii():
            return _not_an_address(address)
    return None


def _not_an_address(address: str) -> str:
    return f"{address!r} is not an address like name@example.com{_not_ascii(address)}"


def _not_ascii(address: str) -> str:
    """What is not ASCII once its domain is in the xn-- form (``_taken``)."""
    if address.isascii():
        return ""
    if not address.rpartition("@")[0].isascii():
        return " (ASCII only before the @: the relay sends to no other address)"
    return " (its domain has no xn-- form)"


def _unique(addresses: Iterable[str]) -> list[str]:
    """Each address once, as first written: one named twice in any case is one entry."""
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return list(seen.values())


def _entries_of(
    snapshot: Iterable[Suppression], addresses: Iterable[str]
) -> dict[str, list[Suppression]]:
    """Each address's entries in every scope, by lower case, in one pass over the
    list: ``find`` answers for a tenant's mail, not for one scope exactly."""
    wanted = {a.lower() for a in addresses}
    found: dict[str, list[Suppression]] = {}
    for entry in snapshot:
        if entry.key[0] in wanted:
            found.setdefault(entry.key[0], []).append(entry)
    return found


def _describe(entry: Suppression) -> str:
    return f"{entry.reason} since {entry.since}, {_scope(entry.tenant)}"


def _scope(tenant: str | None) -> str:
    return "all tenants" if tenant is None else f"tenant {tenant}"


def _row(entry: Suppression, tenants: Collection[str] | None = None) -> list[str]:
    scope = entry.tenant or "*"
    if entry.tenant is not None and tenants is not None and entry.tenant not in tenants:
        scope = f"{entry.tenant} (not in the policy)"
    cells = (entry.address, scope, entry.reason, entry.since, entry.by, entry.detail)
    return [_printable(c) for c in cells]


def _write_table(rows: list[list[str]], out: TextIO) -> None:
    """Aligned columns, the last not padded, as ``relay audit search`` prints them."""
    rows = [list(COLUMNS), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        out.write("  ".join([*cells, row[-1]]).rstrip() + "\n")


def _printable(text: str) -> str:
    """Addresses and upstream replies come from outside; no escape sequence reaches the tty."""
    return _CONTROL.sub("?", text)
