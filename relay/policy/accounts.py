"""Builders for the sections that name each other: upstreams, tenants with users, logins.

References (a login's tenant, a tenant's upstream, a Reply-To document type)
are checked against the names the file declares, not against the entries
that validated, so one broken tenant does not drag a cascade of "no such
tenant" problems behind it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import replace
from ipaddress import ip_address
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from yaml.nodes import Node, SequenceNode

from relay import passwd
from relay.hostport import host_port
from relay.policy import names, selfloop, values
from relay.policy.model import (
    DATA_TIMEOUT,
    DirectoryUpstream,
    Login,
    ReplyToKind,
    ReplyToSource,
    SmtpUpstream,
    Tenant,
    TenantAuth,
    TlsMode,
    Upstream,
    User,
    UserRef,
    sends_as,
)
from relay.policy.schema import Ctx, Map, hint, items, text
from relay.policy.sections import display_name_template
from relay.upstream import helo

_NO_PASSWORD = "do not put passwords in the policy; "
_SMTP_FORBIDDEN = {"password": _NO_PASSWORD + "use password_file or password_env"}
_LOGIN_FORBIDDEN = {"password": _NO_PASSWORD + "put a `relay passwd` hash in password_hash"}
_SMTP_KEYS = ("type", "host", "port", "tls", "username", "password_file", "password_env")
_SMTP_KEYS += ("timeout", "data_timeout", "helo_name", "ca_file", "tls_name")
_SMTP_KEYS += ("sender", "sender_name", "fallback")
_TENANT_KEYS = ("name", "address", "upstream", "verified_domains", "default_user")
_TENANT_KEYS += ("reply_to", "bcc_sender", "users", "recipients_per_hour", "auth")
_LOGIN_KEYS = ("password_hash", "tenant", "users")
_DEFAULT_REPLY_TO = (ReplyToSource(ReplyToKind.SENDER), ReplyToSource(ReplyToKind.COMPANY))
_REPLY_TO = "sender, company, keep, header:NAME or an address"


def upstreams(ctx: Ctx, root: Map) -> tuple[Mapping[str, Upstream] | None, set[str]]:
    """The upstreams, and the names declared (for the tenants' references)."""
    found: dict[str, Upstream | None] = {}
    with_fallback: dict[str, Map] = {}
    entries = root.entries("upstreams", "a mapping of upstream names to upstreams")
    if root.has("upstreams") and not entries:
        ctx.problem(root.get("upstreams"), "upstreams", "at least one upstream is needed")
    for name, key, node, path in entries:
        m = Map(ctx, node, path, (*_SMTP_KEYS, "path"), ("type",), _SMTP_FORBIDDEN, at=key)
        kind = m.text("type", "one of: smtp, directory")
        if kind == "directory":
            _no_fallback_for_a_directory(ctx, m)
            m.only(("type", "path"), "a directory upstream", told=("fallback",))
            m.require("path")
            directory = m.read("path", values.file_path)
            if directory is not None and not _can_be_directory(ctx, m, directory):
                directory = None
            found[name] = DirectoryUpstream(name, directory) if directory else None
        elif kind == "smtp":
            m.only(_SMTP_KEYS, "an smtp upstream")
            m.require("host")
            found[name] = _with_sender(ctx, m, _smtp(ctx, m, name))
            if m.has("fallback"):
                with_fallback[name] = m
        else:
            _no_known_type(ctx, m, kind)
            found[name] = None
    for name, m in with_fallback.items():  # once every upstream is known
        found[name] = _with_fallback(ctx, m, name, found)
    names = set(found)
    if not found or None in found.values():
        return None, names
    return MappingProxyType(found), names


def _no_fallback_for_a_directory(ctx: Ctx, m: Map) -> None:
    if m.has("fallback"):
        message = (
            "a directory upstream takes no fallback: writing a file never finds it"
            " unreachable, so no mail would ever go to one"
        )
        ctx.problem(m.get("fallback"), m.sub("fallback"), message)


def _with_fallback(
    ctx: Ctx, m: Map, name: str, found: Mapping[str, Upstream | None]
) -> Upstream | None:
    """The upstream with the names of those its mail goes through when it cannot
    be used (Postfix's ``smtp_fallback_relay``), each checked against what the
    file declares: a name that failed to load is not judged again."""
    chosen: list[str] = []
    ok = True
    for node, path in m.items("fallback", "a list of upstream names"):
        other = text(ctx, node, path, "an upstream name")
        problem = None if other is None else _unfit_fallback(name, other, chosen, found)
        if other is None or problem is not None:
            if problem is not None:
                ctx.problem(node, path, problem)
            ok = False
            continue
        chosen.append(other)
    upstream = found[name]
    if upstream is None or not ok:
        return None
    return replace(upstream, fallback=tuple(chosen))


def _unfit_fallback(
    name: str, other: str, chosen: list[str], found: Mapping[str, Upstream | None]
) -> str | None:
    """Why ``other`` cannot stand in for upstream ``name``, or None. Its sender
    must be the same: the message was rewritten and DKIM-signed for the From
    and envelope sender of ``name`` before it was queued, and an account
    refuses any other sender (``550 5.7.60``)."""
    if other == name:
        return f"{other!r} is this upstream itself: a fallback is another upstream"
    if other in chosen:
        return f"{other!r} is already in this list"
    if other not in found:
        return f"no upstream {other!r}" + hint(other, [n for n in found if n != name])
    upstream, stand_in = found[name], found[other]
    if isinstance(stand_in, DirectoryUpstream):
        return (
            f"{other!r} is a directory upstream: mail failed over to it would be written to"
            " files and counted as delivered, never sent; a fallback must be an smtp upstream"
        )
    if upstream is None or stand_in is None:
        return None  # said where it is written
    theirs, ours = sends_as(stand_in), sends_as(upstream)
    if theirs.lower() != ours.lower():
        return (
            f"{other!r} sends as {_as(theirs)}, this upstream as {_as(ours)}: its mail is"
            " rewritten and DKIM-signed for this upstream's sender before it is queued,"
            " and an account refuses any other sender; give both the same sender"
        )
    return None


def _as(address: str) -> str:
    return address or "the platform's addresses (no sender)"


def _can_be_directory(ctx: Ctx, m: Map, directory: Path) -> bool:
    """The relay makes the directory (and its parents) at each delivery; a file
    in the way passed, and every delivery was then deferred with File exists."""
    existing = next(p for p in (directory, *directory.parents) if os.path.lexists(p))
    if os.path.isdir(existing):
        return True
    where = "is" if existing == directory else f"is in the way of {directory}:"
    message = f"{existing} {where} not a directory; the relay writes each message into one"
    ctx.problem(m.get("path"), m.sub("path"), message)
    return False


def _no_known_type(ctx: Ctx, m: Map, kind: str | None) -> None:
    """A type missing or misspelt hid every other problem of the upstream until
    it was fixed. Each value is still checked, as the one type that has its key
    reads it; what depends on the type (its required keys, settings that go
    together) waits for a known one."""
    if kind is not None:
        message = "expected one of: smtp, directory" + hint(kind, ("smtp", "directory"))
        ctx.problem(m.get("type"), m.sub("type"), message)
    _smtp_values(m)
    m.read("path", values.file_path)


class _SmtpValues(NamedTuple):
    host: str | None
    tls: TlsMode | None
    port: int | None
    username: str | None
    password_file: Path | None
    password_env: str | None
    timeout: float | None
    data_timeout: float | None
    helo_name: str | None
    ca_file: tuple[Path, str] | None
    tls_name: str | None


def _smtp_values(m: Map) -> _SmtpValues:
    """Each key of an smtp upstream, read on its own."""
    tls = m.choice("tls", TlsMode, TlsMode.AUTO)
    return _SmtpValues(
        host=m.read("host", values.upstream_host),
        tls=tls,
        port=m.integer("port", 465 if tls is TlsMode.IMPLICIT else 587, 1, 65535, "a port number"),
        username=m.text("username", "a user name"),
        password_file=m.read("password_file", values.password_file),
        password_env=m.read("password_env", values.env_name),
        timeout=m.number("timeout", 60),
        data_timeout=m.number("data_timeout", DATA_TIMEOUT),
        helo_name=m.read("helo_name", values.helo_name),
        ca_file=m.read("ca_file", values.ca_file),
        tls_name=m.read("tls_name", values.tls_name),
    )


def _smtp(ctx: Ctx, m: Map, name: str) -> SmtpUpstream | None:
    v = _smtp_values(m)
    ok = None not in (v.host, v.tls, v.port, v.timeout, v.data_timeout)
    for key in ("helo_name", "ca_file", "tls_name", "password_file", "password_env", "username"):
        ok = ok and (getattr(v, key) is not None or not m.has(key))
    ok = _checked_only_with_tls(ctx, m, v) and ok
    if m.has("password_file") and m.has("password_env"):
        message = "set password_file or password_env, not both"
        ctx.problem(m.get("password_env"), m.sub("password_env"), message)
        ok = False
    if not m.has("username") and (m.has("password_file") or m.has("password_env")):
        ctx.problem(m.node, m.sub("username"), "a password needs a username")
        ok = False
    if not ok:
        return None
    if not _loopback(v.host):
        _warn_unless_qualified(ctx, m, v.helo_name)
    if v.tls is TlsMode.NONE and v.username is not None and not _loopback(v.host):
        _warn_about_plain_login(ctx, m)
    if v.password_env is not None:
        _warn_if_unset_or_empty(ctx, m, v.password_env)
    _warn_of_tls_unlike_port(ctx, m, v.port, v.tls)
    _warn_of_a_loop(ctx, m, v.host, v.port)
    ca = v.ca_file
    settings = {**v._asdict(), "ca_file": None if ca is None else ca[0]}
    return SmtpUpstream(name, **settings, ca_pem=None if ca is None else ca[1])


def _checked_only_with_tls(ctx: Ctx, m: Map, v: _SmtpValues) -> bool:
    """What says how the certificate is checked means nothing where mail may go
    in plain text: a sysadmin who set it wants TLS, and would not know it is off."""
    ok = True
    for key in ("ca_file", "tls_name"):
        if getattr(v, key) is not None and v.tls in (TlsMode.NONE, TlsMode.AUTO):
            message = (
                "needs tls: starttls or implicit (with none or auto mail may go in plain text)"
            )
            ctx.problem(m.get(key), m.sub(key), message)
            ok = False
    return ok


def _with_sender(ctx: Ctx, m: Map, upstream: SmtpUpstream | None) -> SmtpUpstream | None:
    """The address a company's own account sends as. Servers such as Microsoft
    365 refuse every message whose From or envelope sender is another address
    (``550 5.7.60``), so all mail through it goes out as that address."""
    sender = m.read("sender", values.address)
    sender_name = m.read("sender_name", display_name_template)
    if m.has("sender_name") and not m.has("sender"):
        message = "a sender_name needs a sender: the address the account sends as"
        ctx.problem(m.get("sender_name"), m.sub("sender_name"), message)
        return None
    if upstream is None or None in _given(m, sender=sender, sender_name=sender_name):
        return None
    if sender is not None and sender_name is not None:
        node, path = m.get("sender_name"), m.sub("sender_name")
        names.warn_of_address_placeholder(ctx, node, path, sender_name, sender)
    return replace(upstream, sender=sender, sender_name=sender_name)


def _given(m: Map, **read: str | None) -> list[str | None]:
    """The values read of the keys the upstream has: None among them is a problem."""
    return [value for key, value in read.items() if m.has(key)]


def _loopback(host: str) -> bool:
    """An upstream on this host, which takes whatever name EHLO gives."""
    try:
        return selfloop.unmapped(ip_address(host)).is_loopback
    except ValueError:
        return host.lower() in helo.LOOPBACK_NAMES


def _warn_unless_qualified(ctx: Ctx, m: Map, given: str | None) -> None:
    """EHLO gives ``helo_name``, else this host's name, which upstreams refuse
    unless it is qualified (``localhost``, a bare ``erp01``): unset, not a
    mistake in the file, but delivery from this host would fail."""
    if given is not None:
        if not given.startswith("[") and not helo.qualified(given):
            message = (
                f"{given!r} is not a fully qualified domain name, which upstream servers"
                " may refuse in EHLO: give this host's name in DNS"
            )
            ctx.problems.warn(m.get("helo_name"), m.sub("helo_name"), message)
        return
    name = helo.local_hostname()
    if not helo.qualified(name):
        message = (
            f"not set, and this host's name {name!r} is not a fully qualified domain name,"
            " which upstream servers may refuse in EHLO: set helo_name to this host's name in DNS"
        )
        ctx.problems.warn(m.node, m.sub("helo_name"), message)


def _warn_about_plain_login(ctx: Ctx, m: Map) -> None:
    """``tls: none`` sends the password as asked (``auto`` never does, without TLS),
    but anyone on the path reads it. Not on loopback: no wire to read it off."""
    message = (
        "none with a username: the password is sent to the upstream in plain text,"
        " which anyone on the path can read; set tls: starttls or implicit"
    )
    ctx.problems.warn(m.get("tls"), m.sub("tls"), message)


def _warn_of_tls_unlike_port(ctx: Ctx, m: Map, port: int, tls: TlsMode) -> None:
    """Port 465 is TLS from the first byte (RFC 8314), 25 and 587 greet in plain
    text: the other way round, each side waits for the other to speak, and every
    delivery is deferred with ``no answer`` until the message expires. A warning:
    a server may serve either on any port."""
    if port == 465 and tls is not TlsMode.IMPLICIT:
        message = (
            f"465 is the port of implicit TLS, whose server greets only after a TLS"
            f" handshake, which tls: {tls.value} never begins: every delivery would time"
            " out; set tls: implicit"
        )
    elif port in (25, 587) and tls is TlsMode.IMPLICIT:
        message = (
            f"{port} is a port whose server greets in plain text (and offers STARTTLS),"
            " while tls: implicit waits for a TLS handshake: every delivery would time out;"
            " set tls: starttls, or port: 465"
        )
    else:
        return
    ctx.problems.warn(m.get("port") or m.get("tls"), m.sub("port"), message)


def _warn_of_a_loop(ctx: Ctx, m: Map, host: str, port: int) -> None:
    """The listeners are read before the upstreams, so ``ctx.sockets`` has them."""
    own = selfloop.own_listener(host, port, ctx.sockets)
    if own is None:
        return
    path, address = own
    key = "port" if m.has("port") else "host"
    message = (
        f"{host_port(host, port)} is this relay's own listener {path} ({host_port(address, port)}):"
        " mail sent to this upstream comes back into the relay, which sends it here again,"
        " a loop; set host and port to the server that mail is to leave by"
    )
    ctx.problems.warn(m.get(key), m.sub(key), message)


def _warn_if_unset_or_empty(ctx: Ctx, m: Map, name: str) -> None:
    """The relay reads the variable at each delivery, so an unset one is no
    mistake in the file; but the unit runs ``relay check`` with the service's
    environment, where it will be unset for serve too. An empty one
    (``Environment=SMARTHOST_PASSWORD=``) is no password either."""
    value = os.environ.get(name)
    if value is not None and value.strip():
        return
    said, state = ("is not set", "unset") if value is None else ("is empty", "empty")
    message = (
        f"{name} {said} in this environment: relay serve run in it would defer every"
        f" message to this upstream (environment variable {name} {state})"
    )
    ctx.problems.warn(m.get("password_env"), m.sub("password_env"), message)


class Roster:
    """What the tenants declare: users per tenant, default users, and every address
    or alias seen so far (to refuse one used by two users)."""

    def __init__(self) -> None:
        self.users: dict[str, set[str]] = {}
        self.default_user: dict[str, str | None] = {}
        self.addresses: dict[str, UserRef] = {}
        self._where: dict[str, str] = {}
        #: each user's own address (not its aliases), with where it is written
        self.user_addresses: list[tuple[Node, str, str]] = []
        #: the tenants with ``auth: required``, with where it is written
        self.login_only: dict[str, tuple[Node | None, str]] = {}

    def claim(self, ctx: Ctx, node: Node, path: str, address: str, ref: UserRef) -> None:
        key = address.lower()
        if key in self._where:
            ctx.problem(node, path, f"{address} is already used by {self._where[key]}")
            return
        self.addresses[key] = ref
        self._where[key] = path


def warn_of_bounce_address(ctx: Ctx, roster: Roster, return_path: str) -> None:
    """A user's automatic BCC copies and failure notices go to the user's
    address; at the platform's bounce address ``relay bounce`` reads them, finds
    no bounce in them, and ignores them: lost without a word."""
    for node, path, address in roster.user_addresses:
        if address.lower() == return_path.lower():
            message = (
                f"{address} is where bounces go (the platform's return_path; left out,"
                " its from_address): this user's automatic BCC copies and failure notices"
                " would go there too, where relay bounce ignores them as no bounce, and"
                " they are lost; give the user an address of their own"
            )
            ctx.problems.warn(node, path, message)


def warn_of_tenants_no_login_reaches(ctx: Ctx, roster: Roster, logins: Mapping[str, Login]) -> None:
    """A tenant that takes mail only with one of its logins, and has none, or no
    listener where one is given, sends nothing: every message in its name is an
    unknown sender's."""
    with_logins = {login.tenant for login in logins.values()}
    for tenant_id, (node, path) in roster.login_only.items():
        if tenant_id not in with_logins:
            message = (
                f"no login is of tenant {tenant_id!r}, which takes mail only with one of"
                " its logins: none of its users' mail is taken"
            )
            ctx.problems.warn(node, path, message)
        elif not ctx.logins_taken:
            message = (
                f"tenant {tenant_id!r} takes mail only with one of its logins, and no"
                " listener offers AUTH (each has auth: off, or is off loopback without"
                " tls): none of its users' mail is taken"
            )
            ctx.problems.warn(node, path, message)


def tenants(
    ctx: Ctx,
    root: Map,
    upstream_names: Collection[str],
    doc_types: Collection[str],
    roster: Roster,
    key_domains: Collection[str] = (),
) -> Mapping[str, Tenant] | None:
    found: dict[str, Tenant | None] = {}
    verified: dict[str, str] = {}  # domain -> the tenant that verified it first
    entries = root.entries("tenants", "a mapping of tenant ids to tenants")
    if root.has("tenants") and not entries:
        ctx.problem(root.get("tenants"), "tenants", "at least one tenant is needed")
    for tenant_id, key, node, path in entries:
        required = ("name", "address", "upstream", "users")
        m = Map(ctx, node, path, _TENANT_KEYS, required, at=key)
        found[tenant_id] = _tenant(
            ctx, m, tenant_id, upstream_names, doc_types, roster, key_domains, verified
        )
    if not found or None in found.values():
        return None
    return MappingProxyType(found)


def _tenant(
    ctx: Ctx,
    m: Map,
    tenant_id: str,
    upstream_names: Collection[str],
    doc_types: Collection[str],
    roster: Roster,
    key_domains: Collection[str],
    verified: dict[str, str],
) -> Tenant | None:
    """``verified``: each domain verified so far, with its tenant; a domain
    verified for two lets either's users send from it, signed and DMARC-aligned,
    the slip of a copied tenant block."""
    name = m.read("name", names.company)
    address = m.read("address", values.address)
    users = _users(ctx, m, tenant_id, roster)
    default_user = m.text("default_user", "a user id of this tenant")
    roster.default_user[tenant_id] = default_user
    declared = roster.users[tenant_id]
    if default_user is not None and declared and default_user not in declared:
        message = f"no user {default_user!r} in this tenant" + hint(default_user, declared)
        ctx.problem(m.get("default_user"), m.sub("default_user"), message)
        default_user = None
    upstream = m.text("upstream", "an upstream name")
    if upstream is not None and upstream not in upstream_names:
        message = f"no upstream {upstream!r}" + hint(upstream, upstream_names)
        ctx.problem(m.get("upstream"), m.sub("upstream"), message)
        upstream = None
    listed = m.items("verified_domains", "a list of domains")
    domains = [values.domain(ctx, n, p) for n, p in listed]
    for (node, path), domain in zip(listed, domains, strict=True):
        if domain is not None and domain.lower() not in key_domains:
            # its users keep their own From, which only a key for it signs
            message = (
                f"no DKIM key for {domain} in dkim.keys: its users' mail keeps their From"
                " and goes out unsigned, which DMARC at many receivers refuses"
            )
            ctx.problems.warn(node, path, message)
        other = verified.setdefault(domain.lower(), tenant_id) if domain else tenant_id
        if other != tenant_id:
            message = (
                f"{domain} is verified for tenant {other} too: the users of either send"
                " from it, signed with its key"
            )
            ctx.problems.warn(node, path, message)
    bcc = [_doc_type(ctx, n, p, doc_types) for n, p in m.items("bcc_sender", "a list of types")]
    reply_to = _reply_to(ctx, m, doc_types)
    per_hour = m.integer("recipients_per_hour", None, 1, 10_000_000, "a number of recipients")
    auth = m.choice("auth", TenantAuth, TenantAuth.OPTIONAL)
    if auth is TenantAuth.REQUIRED:
        roster.login_only[tenant_id] = (m.get("auth"), m.sub("auth"))
    if None in (name, address, upstream, users, reply_to, auth, *domains, *bcc):
        return None
    if per_hour is None and m.has("recipients_per_hour"):
        return None
    if default_user is None and m.has("default_user"):
        return None
    return Tenant(
        id=tenant_id,
        name=name,
        address=address,
        verified_domains=tuple(domains),
        upstream=upstream,
        default_user=default_user,
        reply_to=reply_to,
        bcc_sender=frozenset(bcc),
        users=users,
        recipients_per_hour=per_hour,
        auth=auth,
    )


def _users(ctx: Ctx, tenant: Map, tenant_id: str, roster: Roster) -> Mapping[str, User] | None:
    found: dict[str, User | None] = {}
    entries = tenant.entries("users", "a mapping of user ids to users")
    roster.users[tenant_id] = {user_id for user_id, *_ in entries}
    if tenant.has("users") and not entries:
        ctx.problem(tenant.get("users"), tenant.sub("users"), "a tenant needs at least one user")
        return None
    for user_id, key, node, path in entries:
        m = Map(ctx, node, path, ("name", "address", "aliases"), ("name", "address"), at=key)
        ref = UserRef(tenant_id, user_id)
        name = m.read("name", names.person)
        address = m.read("address", values.address)
        if address is not None:
            roster.claim(ctx, m.get("address"), m.sub("address"), address, ref)
            roster.user_addresses.append((m.get("address"), m.sub("address"), address))
        aliases = []
        for alias_node, alias_path in m.items("aliases", "a list of addresses"):
            alias = values.address(ctx, alias_node, alias_path)
            if alias is not None:
                roster.claim(ctx, alias_node, alias_path, alias, ref)
            aliases.append(alias.lower() if alias is not None else None)
        ok = name is not None and address is not None and None not in aliases
        found[user_id] = User(user_id, tenant_id, name, address, tuple(aliases)) if ok else None
    if not found or None in found.values():
        return None
    return MappingProxyType(found)


def _doc_type(ctx: Ctx, node: Node, path: str, doc_types: Collection[str]) -> str | None:
    value = text(ctx, node, path, "a document type")
    if value is not None and value not in doc_types:
        message = f"no document type {value!r} in classify" + hint(value, doc_types)
        ctx.problem(node, path, message)
        return None
    return value


def _reply_to(
    ctx: Ctx, tenant: Map, doc_types: Collection[str]
) -> Mapping[str, tuple[ReplyToSource, ...]] | None:
    chains: dict[str, tuple[ReplyToSource, ...] | None] = {}
    entries = tenant.entries("reply_to", "a mapping of document types to Reply-To lists")
    for doc_type, key_node, node, path in entries:
        if doc_type == "default" or doc_type in doc_types:
            chains[doc_type] = _chain(ctx, node, path)
            continue
        near = hint(doc_type, {"default", *doc_types})
        ctx.problem(key_node, path, f"no document type {doc_type!r} in classify{near}")
        chains[doc_type] = None
    chains.setdefault("default", _DEFAULT_REPLY_TO)
    if None in chains.values():
        return None
    return MappingProxyType(chains)


def _chain(ctx: Ctx, node: Node, path: str) -> tuple[ReplyToSource, ...] | None:
    """Sources tried in order; ``keep`` ends the chain, so it may only come last."""
    entries = items(ctx, node, path, f"a list of: {_REPLY_TO}")
    if not entries:
        if isinstance(node, SequenceNode):
            ctx.problem(node, path, f"expected at least one of: {_REPLY_TO}")
        return None
    sources = [_source(ctx, item, item_path) for item, item_path in entries]
    for source, (item, item_path) in zip(sources[:-1], entries[:-1], strict=True):
        if source is not None and source.kind is ReplyToKind.KEEP:
            ctx.problem(item, item_path, "keep ends the chain, so it can only be the last item")
            return None
    return None if None in sources else tuple(sources)


def _source(ctx: Ctx, node: Node, path: str) -> ReplyToSource | None:
    value = text(ctx, node, path, _REPLY_TO)
    if value is None:
        return None
    if value in ("sender", "company", "keep"):
        return ReplyToSource(ReplyToKind(value))
    if value.startswith("header:"):
        name = value.removeprefix("header:").strip()
        if values.is_header_name(name):
            ctx.read_headers.append((node, path, name))
            return ReplyToSource(ReplyToKind.HEADER, name)
        ctx.problem(node, path, f"{name!r} is not a header name like X-Responsible")
        return None
    if "@" in value:
        return _fixed_address(ctx, node, path, value)
    near = hint(value, ("sender", "company", "keep"))
    ctx.problem(node, path, f"expected {_REPLY_TO}, not {value!r}{near}")
    return None


def _fixed_address(ctx: Ctx, node: Node, path: str, value: str) -> ReplyToSource | None:
    """``desk@acme.example`` or ``Office Desk <desk@acme.example>``: replies to a
    shared desk read better with its name, taken as written (``@``, brackets and
    parentheses included); a quoted one is unquoted, its escapes undone. One
    mailbox only: the header holds the name and address as one, and a second
    became part of the first's name."""
    count = names.mailboxes(value)
    if count > 1:
        ctx.problem(node, path, names.more_than_one(value, count))
        return None
    name, bracketed, address = value.rpartition("<")
    if bracketed and address.endswith(">"):
        name, address = _unquoted(name.strip()), address[:-1]
    else:
        name, address = "", value
    if not values.is_address(address):
        ctx.problem(node, path, f"{value!r} is not an address like name@example.com")
        return None
    whose, where = "the address replies go to", "that address is the one in <>"
    problem = names.encoded_word(name) or names.address_in(name, where, whose, address)
    if problem:
        ctx.problem(node, path, f"{value!r}: its name {problem}")
        return None
    return ReplyToSource(ReplyToKind.ADDRESS, address, name)


def _unquoted(name: str) -> str:
    """``"Sales \\"East\\""`` is ``Sales "East"``: its backslashes kept, the header
    escaped them again, and recipients read ``Sales \\"East\\"``."""
    if len(name) < 2 or name[0] != '"' or name[-1] != '"':
        return name
    return re.sub(r"\\(.)", r"\1", name[1:-1])


def logins(
    ctx: Ctx, root: Map, declared: Mapping[str, Collection[str]]
) -> Mapping[str, Login] | None:
    found: dict[str, Login | None] = {}
    for name, key, node, path in root.entries("logins", "a mapping of login names to logins"):
        m = Map(ctx, node, path, _LOGIN_KEYS, _LOGIN_KEYS[:2], _LOGIN_FORBIDDEN, at=key)
        password_hash = m.read("password_hash", _password_hash)
        tenant = m.text("tenant", "a tenant id")
        if tenant is not None and tenant not in declared:
            message = f"no tenant {tenant!r}" + hint(tenant, declared)
            ctx.problem(m.get("tenant"), m.sub("tenant"), message)
            tenant = None
        users = _login_users(ctx, m, tenant, declared)
        ok = password_hash is not None and tenant is not None and None not in users
        found[name] = Login(name, password_hash, tenant, tuple(users)) if ok else None
    if None in found.values():
        return None
    return MappingProxyType(found)


def _password_hash(ctx: Ctx, node: Node, path: str) -> str | None:
    """Parsed as the verifier parses it: a hash it cannot read passed before,
    and then every AUTH of the login failed as if the password were wrong."""
    value = text(ctx, node, path, "a password hash made with `relay passwd`")
    if value is None:
        return None
    try:
        passwd.parse_hash(value)
    except passwd.MalformedHash as exc:
        message = f"expected a hash made with `relay passwd`; no password can match this one: {exc}"
        ctx.problem(node, path, message)
        return None
    weak = passwd.weaker(value)
    if weak is not None:
        ctx.problems.warn(node, path, f"a weak hash: {weak}; make it again with `relay passwd`")
    return value


def _login_users(
    ctx: Ctx, m: Map, tenant: str | None, declared: Mapping[str, Collection[str]]
) -> list[str | None]:
    """A user listed twice is a problem: a login is its user for ``auth_login``
    only when it lists one, and with ``[jan, jan]`` mail whose From no user has
    was refused, where ``[jan]`` sends it as Jan."""
    users: list[str | None] = []
    for node, path in m.items("users", "a list of user ids"):
        user = _login_user(ctx, node, path, tenant, declared)
        if user is not None and user in users:
            ctx.problem(node, path, f"{user!r} is listed twice")
        users.append(user)
    return users


def _login_user(
    ctx: Ctx, node: Node, path: str, tenant: str | None, declared: Mapping[str, Collection[str]]
) -> str | None:
    user = text(ctx, node, path, "a user id")
    if user is not None and tenant is not None and user not in declared[tenant]:
        near = hint(user, declared[tenant])
        ctx.problem(node, path, f"no user {user!r} in tenant {tenant!r}{near}")
        return None
    return user
