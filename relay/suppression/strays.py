"""Entries for tenants the policy does not have: a tenant renamed in the policy
left them behind, and an entry applies to its own tenant's mail alone, so its
addresses (a customer who complained, say) got that tenant's mail again under
the new name, with nothing said. They are named, never moved: only the
sysadmin knows which new name an old one became."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from pathlib import Path

from relay import statefiles
from relay.suppression.entry import Key, Suppression, parse
from relay.suppression.store import SuppressionError

_TENANT = re.compile(rb'"tenant":\s*"([^"\\]*)"')


def stray_tenants(path: Path, tenants: Collection[str]) -> Counter[str]:
    """Entries by tenant, of the tenants not in ``tenants``. The tenants a line
    names are found in the file's bytes first, and its lines parsed only when
    one is not the policy's (or a line has an escape): a reload reads it, and
    parsing 100,000 lines takes a good part of a second."""
    try:
        with statefiles.open_read(path) as f:
            chunk = f.read()
    except (FileNotFoundError, NotADirectoryError):  # no list there (yet)
        return Counter()
    except OSError as exc:
        raise SuppressionError(f"cannot read the suppression list {path}: {exc}") from exc
    named = {name.decode("utf-8", "replace") for name in set(_TENANT.findall(chunk))}
    if named <= set(tenants) and b"\\" not in chunk:
        return Counter()
    found: dict[Key, str | None] = {}
    for line in chunk.split(b"\n"):
        try:
            change = parse(line) if line.strip() else None
        except ValueError:
            continue  # the workers' reading says it
        if isinstance(change, Suppression):
            found[change.key] = change.tenant
        elif change is not None:
            found.pop((change[0].lower(), change[1]), None)
    return Counter(t for t in found.values() if t is not None and t not in tenants)


def stray_warning(path: Path, tenants: Collection[str]) -> str | None:
    """The warning ``relay check``, ``serve`` and a reload give, or None."""
    strays = stray_tenants(path, tenants)
    if not strays:
        return None
    total = sum(strays.values())
    each = ", ".join(f"{tenant} ({count})" for tenant, count in sorted(strays.items()))
    old = sorted(strays)[0]
    return (
        f"suppression list {path}: {total} {'entry is' if total == 1 else 'entries are'} for"
        f" tenants the policy does not have: {each}; they keep no tenant's mail from those"
        f" addresses. For a renamed tenant, move each (relay suppression list marks them):"
        f" relay suppression remove ADDRESS --tenant {old}, then relay suppression add"
        f" ADDRESS --tenant NEW --reason REASON"
    )
