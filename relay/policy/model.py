"""The typed, frozen policy every pipeline stage reads.

The YAML file is parsed and validated once (see ``relay.policy.load``) into
these objects; the stages are then pure functions over them, so a running
policy can be swapped atomically and two messages never see half of one.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

DEFAULT_DOC_TYPE = "other"  # the type of a message no classify rule matches


class AuthMode(enum.Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    OFF = "off"


class TenantAuth(enum.Enum):
    """Whether a tenant's users may be found in a session without a login: on a
    listener that takes such sessions, any client it allows could otherwise
    send as any tenant's users, signed with their keys."""

    REQUIRED = "required"
    OPTIONAL = "optional"


class IdentitySource(enum.Enum):
    """Where the sending user can be read from, tried in the policy's order."""

    AUTH_LOGIN = "auth_login"
    ENVELOPE_SENDER = "envelope_sender"
    HEADER_FROM = "header_from"
    HEADER = "header"


class UnknownSender(enum.Enum):
    REJECT = "reject"
    DEFAULT = "default"


class ReplyToKind(enum.Enum):
    SENDER = "sender"
    COMPANY = "company"
    HEADER = "header"
    ADDRESS = "address"
    KEEP = "keep"


class TlsMode(enum.Enum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"
    AUTO = "auto"


class ListenerTls(enum.Enum):
    """How a listener with a certificate serves TLS: after STARTTLS, or from the
    first byte (implicit TLS, port 465: the "SSL/TLS" of ERPs, RFC 8314)."""

    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class TlsVersion(enum.Enum):
    """The oldest TLS version a listener takes (``tls.min_version``), as Postfix's
    ``smtpd_tls_protocols`` lets a sysadmin choose: a legacy ERP (old .NET or
    Windows) speaks only TLS 1.0 or 1.1, which the relay refused without a say."""

    V1_0 = "1.0"
    V1_1 = "1.1"
    V1_2 = "1.2"
    V1_3 = "1.3"


class DkimAlgorithm(enum.Enum):
    RSA = "rsa"
    ED25519 = "ed25519"


class ConditionKind(enum.Enum):
    HEADER = "header"
    SUBJECT = "subject"
    ATTACHMENT = "attachment"


@dataclass(frozen=True)
class TlsFiles:
    """The files as named, and their bytes as read and checked (see ``tlspair``),
    and the oldest TLS version served with them: a reload takes it up as it
    takes up a renewed pair, so it is not compared as a listener's settings are."""

    cert: Path
    key: Path
    cert_pem: bytes = field(repr=False, compare=False)
    key_pem: bytes = field(repr=False, compare=False)
    min_version: TlsVersion = field(default=TlsVersion.V1_2, compare=False)


@dataclass(frozen=True)
class Listener:
    name: str
    address: str
    port: int
    auth: AuthMode
    tls: TlsFiles | None
    allow: tuple[IPv4Network | IPv6Network, ...]
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    immediate: float = 0.0  # seconds to wait for the first delivery attempt; 0: answer at once
    max_connections_per_client: int | None = None  # open at once, all workers; None: no limit
    max_connections: int | None = None  # open at once from all clients, all workers; likewise
    tls_mode: ListenerTls = ListenerTls.STARTTLS  # with ``tls``: how it is served


@dataclass(frozen=True)
class Login:
    """An AUTH credential of one ERP installation, bound to one tenant."""

    login: str
    password_hash: str
    tenant: str
    users: tuple[str, ...]  # empty: any user of the tenant


@dataclass(frozen=True)
class User:
    id: str
    tenant: str
    name: str
    address: str
    aliases: tuple[str, ...]  # further addresses that identify this user (lower case)


@dataclass(frozen=True)
class ReplyToSource:
    kind: ReplyToKind
    value: str = ""  # header name for HEADER, the address for ADDRESS
    name: str = ""  # the display name with ADDRESS ("Office Desk <desk@...>"); "": none


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    address: str  # the company's own address ("company" Reply-To)
    verified_domains: tuple[str, ...]  # users of these domains keep their own From
    upstream: str
    default_user: str | None
    reply_to: Mapping[str, tuple[ReplyToSource, ...]]  # document type or "default"
    bcc_sender: frozenset[str]  # document types that get the automatic BCC
    users: Mapping[str, User]
    recipients_per_hour: int | None = None  # None: no limit (``relay.ratelimit``)
    # ``required``: its mail only from sessions logged in with one of its logins
    auth: TenantAuth = TenantAuth.OPTIONAL


@dataclass(frozen=True)
class Condition:
    kind: ConditionKind
    pattern: re.Pattern[str]
    header: str = ""  # only for HEADER


@dataclass(frozen=True)
class DocumentRule:
    id: str
    doc_type: str
    conditions: tuple[Condition, ...]  # all must match


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    algorithm: DkimAlgorithm
    key_file: Path
    private_key: bytes  # PEM (rsa) or base64 seed (ed25519), read at load time


#: Seconds to wait for the reply to the end of a message, its sending included:
#: RFC 5321 4.5.3.2.6's ten minutes (Postfix's ``smtp_data_done_timeout``).
#: The server may be scanning it; given up on too soon, it is sent again and
#: its recipients get it twice.
DATA_TIMEOUT = 600.0


@dataclass(frozen=True)
class SmtpUpstream:
    name: str
    host: str
    port: int
    tls: TlsMode
    username: str | None
    password_file: Path | None
    password_env: str | None
    timeout: float
    helo_name: str | None = None  # sent in EHLO; None: upstream.helo.local_hostname()
    ca_file: Path | None = None  # CA certificates the upstream's must chain to; None: the system's
    ca_pem: str | None = field(default=None, repr=False)  # its text, as the policy loaded it
    tls_name: str | None = None  # the name its certificate is checked for; None: ``host``
    data_timeout: float = DATA_TIMEOUT
    # the address the account sends as: From and envelope sender of all its mail
    sender: str | None = None
    sender_name: str | None = None  # display-name template with it; None: the platform's
    # other upstreams' names, tried in order in the same attempt when this one is
    # unusable or suspended (``Engine._attempt``); not compared: the same host with
    # another list keeps its suspension and its delivery slots over a reload
    fallback: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class DirectoryUpstream:
    name: str
    path: Path


Upstream = SmtpUpstream | DirectoryUpstream


def sends_as(upstream: Upstream) -> str:
    """The address mail through the upstream is From and enveloped as, when it is
    a company's own account (``sender``); "" for the platform's addresses."""
    return (upstream.sender or "") if isinstance(upstream, SmtpUpstream) else ""


@dataclass(frozen=True)
class Platform:
    from_address: str
    display_name: str  # template over {user.name}, {user.address}, {tenant.name}
    return_path: str  # envelope sender used upstream
    hostname: str  # right-hand side of generated Message-IDs


@dataclass(frozen=True)
class Identify:
    order: tuple[IdentitySource, ...]
    header: str  # the ERP's user header, e.g. X-ERP-User
    unknown_sender: UnknownSender
    default_tenant: str | None  # for UNKNOWN_SENDER.DEFAULT without a login


@dataclass(frozen=True)
class QueueSettings:
    directory: Path  # the spool
    first_retry: float  # seconds before the first retry of a deferred recipient
    max_retry: float  # ceiling of the exponential backoff
    lifetime: float  # after this, pending recipients expire
    concurrency: int  # deliveries at once per upstream


@dataclass(frozen=True)
class AuditSettings:
    directory: Path
    hmac_key: bytes | None  # read at load; makes the hash chain unforgeable
    record_subject: bool  # privacy: subjects are left out unless asked for
    compress_after_days: int | None
    retention_days: int | None


@dataclass(frozen=True)
class SuppressionSettings:
    file: Path  # the list, in the state directory (``relay.suppression``)
    # enhanced status codes (RFC 3463) of a permanent refusal that add its address
    hard_bounce: frozenset[str]


@dataclass(frozen=True)
class MetricsSettings:
    """Where /metrics, /healthz and /readyz are served, over HTTP with no login."""

    address: str
    port: int


@dataclass(frozen=True)
class UserRef:
    tenant: str
    user: str


@dataclass(frozen=True)
class Sources:
    """What a policy was built from: the file's text and every file it read (keys,
    certificates, password files), by path."""

    text: bytes
    files: Mapping[str, bytes]


@dataclass(frozen=True)
class Policy:
    source: Path
    digest: str  # sha256 over the policy file and the files it read: the policy version
    platform: Platform
    listeners: tuple[Listener, ...]
    identify: Identify
    classify: tuple[DocumentRule, ...]
    control_headers: tuple[str, ...]  # relay-only headers stripped before sending
    dkim_keys: tuple[DkimKey, ...]
    upstreams: Mapping[str, Upstream]
    logins: Mapping[str, Login]
    tenants: Mapping[str, Tenant]
    addresses: Mapping[str, UserRef]  # lower-case address/alias -> user
    queue: QueueSettings
    audit: AuditSettings
    workers: int = 1  # processes receiving and delivering, each with its own event loop
    run_as: str | None = None  # the service user a relay started as root becomes; None: stays
    suppression: SuppressionSettings | None = None  # None: no list (a policy built in code)
    metrics: MetricsSettings | None = None  # None: no metrics section, nothing served
    sources: Sources | None = field(default=None, repr=False, compare=False)
    # what the file says that a reload could not take up (listeners, workers, a
    # certificate clients would refuse): said by ``relay status`` until a restart
    pending: tuple[str, ...] = field(default=(), compare=False)

    def user(self, ref: UserRef) -> User:
        return self.tenants[ref.tenant].users[ref.user]

    def keys_for(self, domain: str) -> tuple[DkimKey, ...]:
        domain = domain.lower()
        return tuple(k for k in self.dkim_keys if k.domain == domain)
