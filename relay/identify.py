"""Which user of which tenant sent a message, and whether they may.

ERPs identify their users in different ways (their own AUTH login, the
envelope sender, the From header, a header of their own), so the policy
lists the sources in the order to try. The first source that names a known
user wins; a login may then still forbid that user, which is refused rather
than silently sent under another identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.alabels import a_labels, idna2003_form
from relay.controlfields import refuse_differing
from relay.errors import Rejected
from relay.message import MessageView, address_list, decode
from relay.policy.model import (
    IdentitySource,
    Login,
    Policy,
    Tenant,
    TenantAuth,
    UnknownSender,
    User,
    UserRef,
)
from relay.submission import Submission


@dataclass(frozen=True)
class Identity:
    tenant: Tenant
    user: User
    login: str | None
    source: str  # which source named the user, or "default"
    reasons: tuple[str, ...]


def unknown_login(name: str) -> Rejected:
    """A session whose login a reload removed: it logged in, so its client (and
    the audit record of the refusal) may be told which name is gone. A 4xx, as
    for a password changed: 535 is AUTH's reply, and an ERP took the 5xx at
    the end of its data for its document's fault and dropped it; logging in
    again, it hears AUTH's own 535, and keeps the document."""
    return Rejected(
        454,
        "4.7.0",
        f"Temporary authentication failure: no login {name!r} in the policy since this"
        " session logged in; log in again",
    )


def identify(policy: Policy, submission: Submission, view: MessageView) -> Identity:
    """A session whose login a reload removed sends no more: read as no login at
    all, it would no longer be bound to its tenant, and could send as any. Nor
    does one whose login's password a reload changed, the first thing done
    about a leaked password; its client is told to log in again (a 4xx, so
    that an ERP whose own password was changed first keeps its document)."""
    login = policy.logins.get(submission.auth_login) if submission.auth_login else None
    if submission.auth_login and login is None:
        raise unknown_login(submission.auth_login)
    if login is not None and submission.auth_hash not in (None, login.password_hash):
        raise Rejected(
            454,
            "4.7.0",
            f"Temporary authentication failure: the password of login {login.login!r}"
            " changed since this session logged in; log in again",
        )
    reasons: list[str] = []
    if login is not None:
        reasons.append(f"AUTH login {login.login!r} belongs to tenant {login.tenant!r}")
    for source in policy.identify.order:
        found = _lookup(policy, source, submission, view, login)
        if found is None:
            continue
        ref, why = found
        if not _may_be_without_login(policy, login, ref):
            raise _unknown(policy, submission, view, [(ref.tenant, why)])
        _authorise(login, ref)
        reasons.append(why)
        return _identity(policy, ref, login, source.value, reasons)
    return _fallback(policy, submission, view, login, reasons)


def _may_be_without_login(policy: Policy, login: Login | None, ref: UserRef) -> bool:
    """A session without a login is no user of a tenant with ``auth: required``:
    its sender is refused as an unknown one's (a different reply would tell
    any client which addresses are that tenant's users). Not passed on to a
    later source or the default user: the tenant's invoice then went out as
    another tenant's user, as a login of that other tenant may not send it."""
    return login is not None or policy.tenants[ref.tenant].auth is not TenantAuth.REQUIRED


def _lookup(
    policy: Policy,
    source: IdentitySource,
    submission: Submission,
    view: MessageView,
    login: Login | None,
) -> tuple[UserRef, str] | None:
    if source is IdentitySource.AUTH_LOGIN:
        if login is not None and len(login.users) == 1:
            ref = UserRef(login.tenant, login.users[0])
            return ref, f"AUTH login {login.login!r} is bound to user {ref.user!r}"
        return None
    if source is IdentitySource.ENVELOPE_SENDER:
        ref = _user_at(policy, submission.mail_from)
        if ref is not None:
            return ref, f"envelope sender <{submission.mail_from}> is user {ref.user!r}"
        return None
    if source is IdentitySource.HEADER_FROM:
        found = _users_in_from(policy, view)
        if not found:
            return None
        address, ref = _the_user(policy, login, found)
        return ref, f"From address <{address}> is user {ref.user!r}"
    return _lookup_header(policy, view, login)


def _users_in_from(policy: Policy, view: MessageView) -> list[tuple[str, UserRef]]:
    """The users the From's mailboxes are, in their order, each with the first
    of its addresses there: a user's address and alias together are one user."""
    found: dict[UserRef, str] = {}
    for _, address in view.mailboxes("From"):
        ref = _user_at(policy, address)
        if ref is not None:
            found.setdefault(ref, address)
    return [(address, ref) for ref, address in found.items()]


def _the_user(
    policy: Policy, login: Login | None, found: list[tuple[str, UserRef]]
) -> tuple[str, UserRef]:
    """A From naming two users left the sender to field order: the first got
    the Reply-To, the automatic copy and the audit record. A user this
    session may not be (another tenant's, one its login does not list, or
    one of a tenant that needs a login it lacks) is the one given back,
    wherever it stands, for the refusals in ``identify``: passed over, the
    other tenant's invoice went out as this one's user; and a login bound to
    Jan was told a From of Jan and Kari was ambiguous, when Kari was the one
    it may not be. Two users it may be are refused here. An address that is
    no user's leaves no doubt: the From is written for the user as it would
    be without it."""
    barred = [
        (address, ref)
        for address, ref in found
        if not _may_be_without_login(policy, login, ref)
        or (login is not None and not _login_allows(login, ref))
    ]
    if barred:
        return barred[0]
    if len(found) > 1:
        named = ", ".join(f"{address} is user {ref.user}" for address, ref in found)
        raise Rejected(550, "5.7.1", f"Sender ambiguous: From names more than one user ({named})")
    return found[0]


def _lookup_header(
    policy: Policy, view: MessageView, login: Login | None
) -> tuple[UserRef, str] | None:
    name = policy.identify.header

    def meaning(written: str) -> UserRef | None:
        return _header_user(policy, login, decode(written).strip(), address_list(written))

    refuse_differing(view, name, "to find the sending user", meaning)
    value = (view.get(name) or "").strip()
    ref = _header_user(policy, login, value, view.mailboxes(name)) if value else None
    if ref is None:
        return None
    return ref, f"header {name}: {value!r} is user {ref.user!r}"


def _header_user(
    policy: Policy, login: Login | None, value: str, mailboxes: Sequence[tuple[str, str]]
) -> UserRef | None:
    """The ERP's own header may carry an address, a mailbox (``Kari <kari@…>``,
    split as written: an encoded word of its name is never an address) or the
    user's id in the tenant, in any case: ``Kari`` for the id ``kari`` fell
    through to the default user, whose name then went on the invoice."""
    ref = _user_at(policy, value)
    for _, address in mailboxes if ref is None else ():
        ref = _user_at(policy, address)
        if ref is not None:
            return ref
    if ref is None:
        tenant_id = login.tenant if login is not None else policy.identify.default_tenant
        tenant = policy.tenants.get(tenant_id) if tenant_id else None
        user = _user_id(tenant, value) if tenant is not None else None
        if tenant is not None and user is not None:
            ref = UserRef(tenant.id, user)
    return ref


def _user_at(policy: Policy, address: str) -> UserRef | None:
    """The user of an address or alias, its domain also in Unicode: the policy
    holds A-labels only (``xn--bcher-kva.example``), and an ERP writing
    ``bücher.example`` was an unknown sender, or the default user's."""
    ref = policy.addresses.get(address.lower())
    if ref is not None:
        return ref
    written = a_label_address(address)
    return None if written in (None, address) else policy.addresses.get(written.lower())


def a_label_address(address: str) -> str | None:
    """``address`` with its domain in A-labels (IDNA2008, ``relay.alabels``), as
    the policy holds domains; None when the domain has no A-label form."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{a_labels(domain)}"
    except UnicodeError:
        converted = idna2003_form(domain)
        return None if converted is None else f"{local}@{converted}"


def _user_id(tenant: Tenant, value: str) -> str | None:
    """``value`` as one of the tenant's user ids: as written, else the one id
    that differs from it in case only."""
    if value in tenant.users:
        return value
    alike = [user for user in tenant.users if user.lower() == value.lower()]
    return alike[0] if len(alike) == 1 else None


def _login_allows(login: Login, ref: UserRef) -> bool:
    return ref.tenant == login.tenant and (not login.users or ref.user in login.users)


def _authorise(login: Login | None, ref: UserRef) -> None:
    if login is None or _login_allows(login, ref):
        return
    if ref.tenant != login.tenant:
        # the other tenant's user is not named: its ERP would learn who is whose
        raise Rejected(
            550, "5.7.1", f"Login {login.login} may not send as a user of another tenant"
        )
    raise Rejected(550, "5.7.1", f"Login {login.login} may not send as user {ref.user}")


def _fallback(
    policy: Policy,
    submission: Submission,
    view: MessageView,
    login: Login | None,
    reasons: list[str],
) -> Identity:
    tried = _describe_tried(policy, submission, view)
    passed: list[tuple[str, str]] = []
    if policy.identify.unknown_sender is UnknownSender.DEFAULT:
        found = _default_user(policy, login)
        if found is not None:
            ref, which = found
            if _may_be_without_login(policy, login, ref):
                _authorise(login, ref)
                reasons.append(f"no user matched ({tried}); using {which}")
                return _identity(policy, ref, login, "default", reasons)
            passed.append((ref.tenant, f"the default user is {ref.user!r}"))
    raise _unknown(policy, submission, view, passed)


def _default_user(policy: Policy, login: Login | None) -> tuple[UserRef, str] | None:
    """The user an unknown sender's mail goes out as, and how to say so. A login
    bound to one user is that user: the tenant's default_user, when another,
    had all its mail refused (``Login … may not send as user kari``)."""
    if login is not None and len(login.users) == 1:
        ref = UserRef(login.tenant, login.users[0])
        return ref, f"user {ref.user!r}, the one user of login {login.login!r}"
    tenant_id = login.tenant if login is not None else policy.identify.default_tenant
    tenant = policy.tenants.get(tenant_id) if tenant_id else None
    if tenant is None or tenant.default_user is None:
        return None
    ref = UserRef(tenant.id, tenant.default_user)
    return ref, f"default user {ref.user!r} of tenant {ref.tenant!r}"


def _unknown(
    policy: Policy, submission: Submission, view: MessageView, passed: list[tuple[str, str]]
) -> Rejected:
    """``passed``: (tenant, why) of users found that need a login this session
    has not; only the refusal's note names them, for the sysadmin."""
    tried = _describe_tried(policy, submission, view)
    return Rejected(550, "5.7.1", f"Sender not known to this relay ({tried})", _note(passed))


def _note(passed: list[tuple[str, str]]) -> str | None:
    whys: dict[str, list[str]] = {}
    for tenant, why in passed:
        whys.setdefault(tenant, []).append(why)
    return (
        "; ".join(
            f"{' and '.join(said)}, of tenant {tenant!r}, which takes mail only with one of"
            " its logins, and this session has none"
            for tenant, said in whys.items()
        )
        or None
    )


def _describe_tried(policy: Policy, submission: Submission, view: MessageView) -> str:
    sender = submission.mail_from or "<>"
    from_header = ", ".join(a for _, a in view.mailboxes("From")) or "none"
    tried = f"envelope sender {sender}, From {from_header}"
    name = policy.identify.header
    uses_header = IdentitySource.HEADER in policy.identify.order
    value = (view.get(name) or "").strip() if name and uses_header else ""
    return f"{tried}, {name} {value!r}" if value else tried


def _identity(
    policy: Policy, ref: UserRef, login: Login | None, source: str, reasons: list[str]
) -> Identity:
    return Identity(
        tenant=policy.tenants[ref.tenant],
        user=policy.user(ref),
        login=login.login if login is not None else None,
        source=source,
        reasons=tuple(reasons),
    )
