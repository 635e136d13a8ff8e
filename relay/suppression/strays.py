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
from typing import TYPE_CHECKING

from relay import statefiles
from relay.suppression.entry import Key, Suppression, parse
from relay.suppression.store import SuppressionError

if TYPE_CHECKING:
    from relay.policy.model import Policy

_TENANT = re.compile(rb'"tenant":\s*"([^"\\]*)"')
_TENANT_ESCAPED = re.compile(rb'"tenant":\s*"[^"]*\\')


def stray_tenants(path: Path, tenants: Collection[str]) -> Counter[str]:
    """Entries by tenant, of the tenants not in ``tenants``. Only a line naming
    such a tenant (or one whose name has an escape) is parsed, its entry or
    its removal, and the file is read a line at a time: a reload reads it,
    and parsing 100,000 lines whole took a good part of a second and three
    times the file in memory."""
    policy = {name.encode() for name in tenants}
    found: dict[Key, str | None] = {}
    try:
        with statefiles.read_plain(path) as f:
            for line in f:
                named = _TENANT.search(line)
                if named is None and not _TENANT_ESCAPED.search(line):
                    continue  # an entry for every tenant, or no entry
                if named is not None and named.group(1) in policy:
                    continue
                _take(line, found)
    except (FileNotFoundError, NotADirectoryError):  # no list there (yet)
        return Counter()
    except OSError as exc:
        why = exc.strerror if isinstance(exc, statefiles.NotAFile) else exc
        raise SuppressionError(f"cannot read the suppression list {path}: {why}") from exc
    return Counter(t for t in found.values() if t is not None and t not in tenants)


def _take(line: bytes, found: dict[Key, str | None]) -> None:
    try:
        change = parse(line)
    except ValueError:
        return  # the workers' reading says it
    if isinstance(change, Suppression):
        found[change.key] = change.tenant
    else:
        found.pop((change[0].lower(), change[1]), None)


def stray_warning(policy: Policy) -> str | None:
    """The warning ``relay check``, ``serve`` and a reload give, or None (also
    for a policy without a suppression list); raises SuppressionError."""
    if policy.suppression is None:
        return None
    path = policy.suppression.file
    strays = stray_tenants(path, policy.tenants.keys())
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
