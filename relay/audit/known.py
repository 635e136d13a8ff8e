"""What ``relay audit search`` says of a tenant, user or document type the
policy in force does not name.

Such a value is searched for all the same: the log keeps the records of
tenants, users and types removed from the policy since. But a misspelt one
matches nothing, and a helpdesk reading only the empty table concludes the
user sent nothing; the note on stderr says why it may be empty. A user's
address given for the user ID is the one mistake whose intent is certain:
that user is searched for.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from relay.audit import events
from relay.identify import a_label_address
from relay.policy.model import DEFAULT_DOC_TYPE, Policy
from relay.policy.schema import hint

AS_GIVEN = "searching the log as given"


@dataclass
class Filters:
    """The tenant and user to search for, and the notes to print first."""

    tenant: str | None
    user: str | None
    notes: list[str] = field(default_factory=list)


def check(policy: Policy, tenant: str | None, user: str | None, doc_type: str | None) -> Filters:
    """A user is looked for among the given tenant's when the policy has it:
    another tenant's user of that ID would match nothing either."""
    found = Filters(tenant, user)
    tenants = policy.tenants
    if tenant and tenant.strip() and tenant not in tenants:
        found.notes.append(
            f"the policy has no tenant {tenant!r}{_choices('tenants', tenant, tenants)}; {AS_GIVEN}"
        )
    if user and user.strip():
        _user(policy, found, user)
    doc_types = {rule.doc_type for rule in policy.classify} | {
        DEFAULT_DOC_TYPE,
        events.NOTICE_TYPE,
    }
    if doc_type and doc_type.strip() and doc_type not in doc_types:
        found.notes.append(
            f"the policy has no document type {doc_type!r}"
            f"{_choices('types', doc_type, doc_types)}; {AS_GIVEN}"
        )
    return found


LISTED = 10  # names listed in a note at most: a provider's policy has hundreds of tenants


def _choices(what: str, word: str, names: Collection[str]) -> str:
    if len(names) > LISTED:
        return hint(word, names)
    return f" (its {what}: {_listed(sorted(names))})"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown if len(names) <= LISTED else f"{shown}, ..."


def _user(policy: Policy, found: Filters, user: str) -> None:
    tenant = policy.tenants.get(found.tenant or "")
    scope = [tenant] if tenant is not None else list(policy.tenants.values())
    ids = {u for t in scope for u in t.users}
    if user in ids:
        having = sorted(t.id for t in scope if user in t.users)
        if len(having) > 1:  # tenants name their users alike: each one's is found
            found.notes.append(
                f"user {user!r} is in {len(having)} tenants ({_listed(having)});"
                f" --tenant picks one: {AS_GIVEN}"
            )
        return
    address = (a_label_address(user) or user) if "@" in user else ""
    ref = policy.addresses.get(address.lower()) if address else None
    if ref is not None:
        said = f"{user!r} is an address of user {ref.user!r} of tenant {ref.tenant!r}"
        if found.tenant in (None, ref.tenant):
            found.tenant, found.user = ref.tenant, ref.user
            found.notes.append(f"{said}; --user takes the ID: searching for that user")
        else:
            found.notes.append(f"{said}; --user takes the ID: {AS_GIVEN}")
        return
    where = f"tenant {tenant.id!r}" if tenant is not None else "the policy"
    found.notes.append(f"{where} has no user {user!r}{hint(user, ids)}; {AS_GIVEN}")
