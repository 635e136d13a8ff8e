"""Readers for the policy's value kinds: addresses, domains, header names, CIDRs, regexes.

Each value is refused at load time if it could not work at send time,
because a relay that starts and then fails (or, worse, writes a broken
header) on the first real invoice is harder to diagnose than ``relay check``.
"""

from __future__ import annotations

import functools
import os
import pwd
import re
import re._constants as re_constants
import re._parser as re_parser
import ssl
import stat
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path

from yaml.nodes import Node, ScalarNode

from relay.alabels import a_labels
from relay.audit.events import NOTICE_TYPE
from relay.headers import fits_smtp
from relay.passwd import password_text
from relay.policy.files import RefusedFile, read_limited
from relay.policy.schema import Ctx, text
from relay.visible import escaped

_LABEL = r"[^\W_](?:[\w-]*[^\W_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LOCAL = re.compile(r"[^@\s<>()\[\],;:\"\\\x00-\x1f\x7f]+")
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOC_TYPE = re.compile(r"[\w.-]+")


def address(ctx: Ctx, node: Node, path: str) -> str | None:
    """``local@domain`` as written (case kept: it is shown in headers)."""
    value = text(ctx, node, path, "an address like name@example.com")
    if value is None:
        return None
    if not is_address(value):
        ctx.problem(node, path, f"{value!r} {_not_address(value)}")
        return None
    return value


def is_address(value: str) -> bool:
    """ASCII, and within SMTP's limits (RFC 5321 4.5.3.1): anything else could not
    be sent without SMTPUTF8, or written into a header line."""
    local, at, domain = value.rpartition("@")
    return bool(
        at
        and value.isascii()
        and fits_smtp(value)
        and _LOCAL.fullmatch(local)
        and _is_domain(domain)
    )


def _not_address(value: str) -> str:
    local, at, domain = value.rpartition("@")
    written = f"{local}@{_a_labels(domain)}"
    if at and local.isascii() and not domain.isascii() and is_address(written):
        return f"is not ASCII: write it with its domain's A-labels: {written}"
    if not value.isascii():
        return "is not ASCII: the relay sends no SMTPUTF8"
    if not fits_smtp(value):
        return "is longer than SMTP allows: 64 characters before the @, 254 in all"
    return "is not an address like name@example.com"


def is_header_name(value: str) -> bool:
    return bool(_HEADER_NAME.fullmatch(value))


def domain(ctx: Ctx, node: Node, path: str) -> str | None:
    value = text(ctx, node, path, "a domain name like example.com")
    if value is None:
        return None
    if not _is_domain(value):
        ctx.problem(node, path, f"{value!r} {_not_domain(value, 'a domain name like example.com')}")
        return None
    if not value.isascii():  # DKIM's d= and SMTP without SMTPUTF8 take A-labels only
        ctx.problem(node, path, f"{value!r} is not ASCII: write it as {_a_labels(value)!r}")
        return None
    return value.lower()


def _a_labels(value: str) -> str:
    try:
        return a_labels(value)
    except UnicodeError:
        return "xn--..."


def _not_domain(value: str, expected: str) -> str:
    """Why ``value`` is not ``expected``; for a Unicode name, IDNA2008's reason
    to refuse it, as an older (IDNA2003) converter, Python's own codec among
    them, gives some (☃, a joiner it drops) a form that is no use."""
    try:
        a_labels(value)
    except UnicodeError as error:
        if value.isascii():
            return f"is not {expected}"
        why = (
            f"is not {expected}: IDNA2008, which registries and browsers use, refuses it ({error})"
        )
        old = _idna2003_form(value)
        return (
            f"{why}; IDNA2003 tools still convert it, to {old!r}: not a form to use" if old else why
        )
    return f"is not {expected}"


def _idna2003_form(value: str) -> str | None:
    try:
        return value.encode("idna").decode("ascii")
    except UnicodeError:
        return None


def helo_name(ctx: Ctx, node: Node, path: str) -> str | None:
    """What EHLO may say (RFC 5321 4.1.3): a domain, or an address literal such as
    ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` for a host without a name."""
    value = text(ctx, node, path, "a host name like relay.example.com")
    if value is None:
        return None
    literal = value[1:-1] if value.startswith("[") and value.endswith("]") else None
    if literal is not None and _is_address_literal(literal):
        return value
    if literal is None and _is_domain(value) and not value.isascii():  # EHLO takes A-labels only
        ctx.problem(node, path, f"{value!r} is not ASCII: write it as {_a_labels(value)!r}")
        return None
    if literal is None and _is_domain(value) and not _NUMERIC.fullmatch(value):
        return value.lower()  # all digits and dots is no host name: 192.0.2.01 passed
    ctx.problem(node, path, f"{value!r} {_not_helo_name(value)}")
    return None


def _is_address_literal(literal: str) -> bool:
    """RFC 5321 4.1.3's, which has no zone: Python reads ``fe80::1%eth0``, and
    the relay then sent ``EHLO [IPv6:fe80::1%eth0]``."""
    version, address = (6, literal[5:]) if literal[:5].lower() == "ipv6:" else (4, literal)
    try:
        return ip_address(address).version == version and "%" not in address
    except ValueError:
        return False


def _not_helo_name(value: str) -> str:
    expected = "a host name like relay.example.com, or an address literal like [192.0.2.1]"
    address = _without_literal(value)
    try:
        ipv6 = ip_address(address).version == 6
    except ValueError:
        ipv6 = False
    if not ipv6 and is_ip(address):  # a domain in form only: DNS names no host 192.0.2.1
        return (
            f"is not {expected}: an IPv4 address is written as an address literal"
            f" (RFC 5321 4.1.3); write [{address}]"
        )
    if not ipv6:
        return _not_domain(value, expected)
    bare, _, zone = address.partition("%")
    if zone:
        return (
            f"is not an address literal: %{zone} names an interface, which an address"
            f" literal cannot (RFC 5321 4.1.3); write [IPv6:{bare}]"
        )
    return f"is not {expected}: an IPv6 address is written [IPv6:{bare}]"


def _without_literal(value: str) -> str:
    """``[IPv6:::1]`` and ``[192.0.2.1]`` as the bare address ``ip_address`` reads."""
    inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    return inner[5:] if inner[:5].lower() == "ipv6:" else inner


_NUMERIC = re.compile(r"[0-9.]+|.*:.*")


def listen_address(ctx: Ctx, node: Node, path: str) -> str | None:
    """An IP address, or a host name the relay resolves when it binds. 999.1.1.1
    and [::1] passed, and relay serve then failed at its start (exit 71)."""
    value = text(ctx, node, path, "a listen address like 127.0.0.1")
    if value is None:
        return None
    bare = _bracketed_ip(value)
    if bare is not None:
        ctx.problem(node, path, f"expected an IP address without brackets: write {bare}")
        return None
    if is_ip(value) or (not _NUMERIC.fullmatch(value) and _is_domain(value)):
        return _resolvable(value)
    host, _, port = value.rpartition(":")
    bare = _bracketed_ip(host)
    if port.isdigit() and bare is not None:
        message = f"expected an IP address without brackets: write {bare}"
        ctx.problem(node, path, f"{message}; the port goes in port: {port}")
        return None
    expected = "an IP address like 127.0.0.1 or ::1, or a host name"
    if _NUMERIC.fullmatch(value):
        expected = "an IP address like 127.0.0.1 or ::1"
    if port.isdigit() and (is_ip(host) or _is_domain(host)):
        expected += f"; the port goes in port: {port}"
    ctx.problem(node, path, f"{value!r} is not {expected}")
    return None


def _bracketed_ip(value: str) -> str | None:
    """The IP address in ``[::1]``, as a URL or Postfix writes it, or None."""
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else None
    return bare if bare is not None and is_ip(bare) else None


def upstream_host(ctx: Ctx, node: Node, path: str) -> str | None:
    """What the relay connects to, as it is given to the resolver: ``host:
    127.0.0.1:30150`` or ``smtp://smtp.example`` passed, and every delivery
    was then deferred with ``host not found`` until the message expired."""
    value = text(ctx, node, path, "a host name")
    if value is None:
        return None
    if _is_host(value):
        return _resolvable(value)
    message = f"expected a host name or IP address, not {value!r}"
    if _is_host(value.strip()):
        ctx.problem(node, path, message + f"; write it without the spaces: {value.strip()}")
        return None
    bare = value.partition("://")[2] or value
    bare = bare.rstrip("/")
    host, _, port = bare.rpartition(":")
    host = _without_literal(host)
    if port.isdigit() and _is_host(host):
        message += f"; write host: {host} and put the port in port: {port}"
    elif _without_literal(bare) != value:
        message += f"; write host: {_without_literal(bare)}"
    ctx.problem(node, path, message)
    return None


def tls_name(ctx: Ctx, node: Node, path: str) -> str | None:
    """The name an upstream's certificate is issued for, where ``host`` is an
    address it does not name; in A-labels, as ``host`` is, since TLS compares
    those. A port or a URL in it matches no certificate."""
    value = text(ctx, node, path, "a host name")
    if value is None:
        return None
    if _is_host(value):
        return _resolvable(value)
    expected = "the host name the upstream's certificate is issued for, like mail.example.com"
    ctx.problem(node, path, f"expected {expected}, not {value!r}")
    return None


def _resolvable(value: str) -> str:
    """A host name in A-labels, as the resolver and TLS's name check are given
    it: Python's socket and ssl convert a Unicode one as IDNA2003 does, and
    ``host: faß.example`` connected to fass.example, another domain's server."""
    return value if value.isascii() or is_ip(value) else a_labels(value)


def _is_host(value: str) -> bool:
    """An IP address (IPv6 without brackets), or a host name, which may end in a dot."""
    name = value.removesuffix(".")
    return is_ip(value) or (not _NUMERIC.fullmatch(name) and bool(_is_domain(name)))


def _is_domain(value: str) -> bool:
    """A name DNS can hold: labels of at most 63 octets, 253 in all, in their
    A-label form. A longer one passed, and every delivery to it bounced as if
    the recipient's address were wrong (or the listener did not start). A
    Unicode name is read as IDNA2008 does (``relay.alabels``): one whose labels
    need a joiner or a combining mark (Persian, Hindi) was no domain."""
    try:
        encoded = a_labels(value)
    except UnicodeError:
        return False
    return bool(_DOMAIN.fullmatch(encoded)) and len(encoded) <= 253


def is_ip(value: str) -> bool:
    try:
        ip_address(value)
    except ValueError:
        return False
    return True


def header_name(ctx: Ctx, node: Node, path: str) -> str | None:
    value = text(ctx, node, path, "a header name like X-ERP-User")
    if value is None:
        return None
    if not is_header_name(value):
        ctx.problem(node, path, f"{value!r} is not a header name like X-ERP-User")
        return None
    return value


#: Headers of the message itself (RFC 5322's, MIME's), or that the relay writes
#: or signs: a control header is removed from every message, so none of these
#: may be one.
_MESSAGE_HEADERS = frozenset(
    {
        *("from", "to", "cc", "bcc", "subject", "date", "message-id", "reply-to", "sender"),
        *("mime-version", "dkim-signature", "received", "return-path", "in-reply-to"),
        *("references", "comments", "keywords"),
    }
)
#: ``Content-*`` (MIME), ``Resent-*`` (RFC 5322 3.6.6), ``List-*`` (RFC 2369,
#: 2919, 8058: the one-click unsubscribe fields the relay signs)
_MESSAGE_PREFIXES = ("content-", "resent-", "list-")


def is_message_header(name: str) -> bool:
    """A header of the message itself (``Subject``, ``Content-Type``), never a control header."""
    lower = name.lower()
    return lower in _MESSAGE_HEADERS or lower.startswith(_MESSAGE_PREFIXES)


def control_header(ctx: Ctx, node: Node, path: str) -> str | None:
    """A header meant for the relay only. ``identify.header: Subject`` passed,
    and the relay then took the Subject out of every message it sent."""
    value = header_name(ctx, node, path)
    if value is None:
        return None
    if is_message_header(value):
        message = (
            f"{value} is a header of the message itself, but control headers (the identify"
            " header is one) are removed before sending; expected a header meant for the"
            " relay only, like X-ERP-User"
        )
        ctx.problem(node, path, message)
        return None
    return value


def selector(ctx: Ctx, node: Node, path: str) -> str | None:
    value = text(ctx, node, path, "a DKIM selector like s1")
    if value is None:
        return None
    if not _is_domain(value):
        ctx.problem(node, path, f"{value!r} is not a DKIM selector (DNS labels like s1)")
        return None
    if not value.isascii():  # s= and the TXT record's name take A-labels only, as d= does
        ctx.problem(node, path, f"{value!r} is not ASCII: write it as {_a_labels(value)!r}")
        return None
    return value


def env_name(ctx: Ctx, node: Node, path: str) -> str | None:
    value = text(ctx, node, path, "an environment variable name")
    if value is None:
        return None
    if not _ENV_NAME.fullmatch(value):
        ctx.problem(node, path, f"{value!r} is not an environment variable name")
        return None
    return value


def doc_type(ctx: Ctx, node: Node, path: str) -> str | None:
    """A document type; "default" is taken, it names the fallback Reply-To chain,
    and so is "notice", the audit log's type of the relay's failure notices: a
    rule's "notice" put an ERP's documents among them, in the report's notice
    row and in ``relay audit search --doc-type notice``."""
    value = text(ctx, node, path, "a document type like invoice")
    if value is None:
        return None
    if not _DOC_TYPE.fullmatch(value):
        ctx.problem(node, path, f"{value!r} is not a document type like invoice")
        return None
    if value == "default":
        ctx.problem(node, path, '"default" is reserved for the default Reply-To chain')
        return None
    if value == NOTICE_TYPE:
        ctx.problem(
            node,
            path,
            f'"{NOTICE_TYPE}" is reserved for the relay\'s failure notices in the audit log:'
            " name the type another way (payment-notice)",
        )
        return None
    return value


def cidr(ctx: Ctx, node: Node, path: str) -> IPv4Network | IPv6Network | None:
    value = text(ctx, node, path, "a CIDR like 10.0.0.0/8")
    if value is None:
        return None
    if "%" in value:  # Python takes fe80::1%eth0 and matches fe80::1 on any interface
        zone = value.partition("/")[0].partition("%")[2]
        without = value.replace(f"%{zone}", "")
        ctx.problem(node, path, f"%{zone} names an interface, not clients: write {without}")
        return None
    try:
        network = ip_network(value, strict=False)
    except ValueError as exc:
        ctx.problem(node, path, f"invalid CIDR: {_not_cidr(value) or exc}")
        return None
    if ip_address(value.partition("/")[0]) != network.network_address:
        ctx.problem(node, path, _host_bits(value, network))
        return None
    mapped = _mapped_ipv4(network)
    return network if mapped is None else mapped


def _not_cidr(value: str) -> str | None:
    """What is wrong with a CIDR whose address is one, which ``ipaddress`` says
    no more of than of any text: ``fd00::/129`` and ``[fd00::]/64`` were said
    not to be networks at all."""
    several = _several_networks(value)
    if several is not None:
        return several
    host, slash, prefix = value.partition("/")
    bare = _bracketed_ip(host)
    if bare is not None:
        return f"{value!r}: write it without brackets, {bare}{slash}{prefix}"
    if not slash or not is_ip(host):
        return None
    version = ip_address(host).version
    longest = 32 if version == 4 else 128
    if prefix.isdigit() and int(prefix) <= longest:
        return None
    return f"{value!r}: the prefix length of an IPv{version} network is 0 to {longest}"


_NETWORK_SEPARATORS = re.compile(r"[\s,]+")
ONE_PER_ITEM = "one network per list item, in CIDR form like 10.0.0.0/8"


def _several_networks(value: str) -> str | None:
    """A pasted Postfix ``mynetworks`` line, whose networks are separated by
    spaces or commas: the last one's prefix was said to be out of range."""
    words = _words(value)
    if len(words) < 2:
        return None
    netmask = _netmask_cidr(words)
    if netmask is not None:
        return f"{value!r}: an address and its netmask: write it in CIDR form, {netmask}"
    if all(_is_network(word) for word in words):
        return f"{value!r}: {ONE_PER_ITEM}: write each as its own item"
    return f"{value!r}: {ONE_PER_ITEM}"


def networks_in_text(value: str) -> str:
    """What to write for ``allow`` given as one string rather than a list:
    ``allow: "10.0.0.0/8, 127.0.0.1"`` was said only not to be a list."""
    words = _words(value)
    netmask = _netmask_cidr(words)
    if netmask is not None:
        return f"{ONE_PER_ITEM}: write [{netmask}]"
    if all(_is_network(word) for word in words):
        return f"{ONE_PER_ITEM}: write [{', '.join(words)}]"
    return ONE_PER_ITEM


def _words(value: str) -> list[str]:
    return [word for word in _NETWORK_SEPARATORS.split(value) if word]


def _netmask_cidr(words: list[str]) -> str | None:
    """``10.0.0.0 255.0.0.0`` in CIDR form: told to write each word as its own
    item, a sysadmin allowed two hosts instead of the /8."""
    if len(words) != 2 or not all(_is_ipv4(word) for word in words):
        return None
    try:
        network = IPv4Network(f"{words[0]}/{words[1]}", strict=False)
    except ValueError:
        return None
    # the network, not the address with its prefix (host bits are refused); no
    # hint for a mask of 0.0.0.0, which would open the listener to everyone
    return str(network) if network.prefixlen else None


def _is_ipv4(value: str) -> bool:
    return is_ip(value) and ip_address(value).version == 4


def _is_network(value: str) -> bool:
    try:
        ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _host_bits(value: str, network: IPv4Network | IPv6Network) -> str:
    """``10.1.2.3/8`` was taken as 10.0.0.0/8: a typo for /32, or a host's
    address with its LAN's mask, let in far more clients than meant."""
    host = value.partition("/")[0]
    whole = network.max_prefixlen
    return (
        f"{value} has host bits set: it would mean {network}; write {network},"
        f" or {host}/{whole} for that one address"
    )


def _mapped_ipv4(network: IPv4Network | IPv6Network) -> IPv4Network | None:
    """An IPv4-mapped network (``::ffff:127.0.0.0/104``) as the IPv4 one it
    names: clients are matched by their IPv4 address, and only an IPv4 listener
    takes them (the relay's IPv6 sockets are IPv6 only)."""
    if network.version != 6 or network.prefixlen < 96:
        return None
    start = network.network_address.ipv4_mapped  # type: ignore[union-attr]
    if start is None:
        return None
    return IPv4Network((start, network.prefixlen - 96))


def regex(ctx: Ctx, node: Node, path: str) -> re.Pattern[str] | None:
    value = text(ctx, node, path, "a regular expression", multiline=True)
    if value is None:
        return None
    control = _CONTROL.search(value)
    if control is not None:
        ctx.problem(node, path, _control_character(node, value, control.group()))
        return None
    depth = _group_depth(value)
    if depth > MAX_GROUP_DEPTH:
        message = (
            f"the regular expression nests its groups {depth} deep; the relay reads"
            f" {MAX_GROUP_DEPTH} at most"
        )
        ctx.problem(node, path, message)
        return None
    try:
        compiled = re.compile(value)
        backtracks = _repeats_a_repeat(re_parser.parse(value))
    except re.error as exc:
        ctx.problem(node, path, f"invalid regular expression: {exc}")
        return None
    except RecursionError:  # re's own parser, and the walk below, recurse per group
        ctx.problem(node, path, "the regular expression nests its groups too deeply")
        return None
    except OverflowError:  # a{99999999999}: re's limit is below the count
        ctx.problem(node, path, "invalid regular expression: a repeat count is too large")
        return None
    if backtracks:
        message = (
            "a repeated group holds a repeat of its own, as in (\\w+\\s?)+: on some"
            " subjects or file names such a pattern takes exponential time, and every"
            " session of that worker waits; repeat one of the two only"
        )
        ctx.problems.warn(node, path, message)
    return compiled


_REPEATS = (re_constants.MAX_REPEAT, re_constants.MIN_REPEAT)

#: ``re``'s parser recurses per group, and so does the backtracking check: left
#: to the stack, the deepest pattern taken moved with the Python version (328
#: groups on 3.11, 489 on 3.13) and with the caller's depth, so ``relay check``
#: passed patterns that ``relay serve`` refused.
MAX_GROUP_DEPTH = 100


#: a group's inline flags: what it turns on, what off (``(?x)``, ``(?ix:``, ``(?-x:``)
_FLAGS = re.compile(r"\(\?([aiLmsux]*)(?:-([imsx]*))?[:)]")


def _group_depth(pattern: str) -> int:
    """How deep the pattern's groups nest, read from its text: an escaped
    parenthesis, one in a character class and one in a comment (``(?#...)``,
    or ``#`` to the line's end where the x flag is on) open nothing, nor do a
    backreference by name (``(?P=n)``) and a conditional group's condition
    (``(?(1)``)."""
    depth = deepest = 0
    escaped = False
    class_from = -1  # where the character class's members begin, -1 outside one
    comment_ends = ""  # ")" or "\n" in a comment, "" outside one
    verbose = [False]  # the x flag in each group open, the pattern's own first
    for i, char in enumerate(pattern):
        if escaped:  # in a comment too: re's own reading skips "\)" there
            escaped = False
        elif char == "\\":
            escaped = True
        elif comment_ends:
            comment_ends = "" if char == comment_ends else comment_ends
        elif class_from >= 0:
            if char == "]" and i > class_from:  # a first "]" is a member
                class_from = -1
        elif char == "[":
            class_from = i + 2 if pattern[i + 1 : i + 2] == "^" else i + 1
        elif pattern.startswith(("(?#", "(?P="), i):  # a comment, a backreference
            comment_ends = ")"
        elif char == "#" and verbose[-1]:
            comment_ends = "\n"
        elif char == "(":
            flags = _FLAGS.match(pattern, i)
            on = verbose[-1]
            if flags is not None:
                on = ("x" in flags[1] or on) and "x" not in (flags[2] or "")
            if flags is not None and flags[0].endswith(")"):  # (?x): the rest of the pattern
                verbose[0] = on if depth == 0 else verbose[0]  # after (?i) or (?#...) too
                continue
            verbose.append(on)
            depth += 1
            deepest = max(deepest, depth)
            if pattern.startswith("(?(", i):  # (?(1)yes|no): the condition is no group
                comment_ends = ")"
        elif char == ")":
            depth = max(depth - 1, 0)
            if len(verbose) > 1:
                verbose.pop()
    return deepest


def _repeats_a_repeat(items: re_parser.SubPattern) -> bool:
    """Whether an unbounded repeat's body is itself little more than an unbounded
    repeat, as in ``(\\w+\\s?)+`` or ``(a*)*``: the classic catastrophic
    backtracking of Python's ``re``, which cannot be stopped once begun. A body
    with something else it must match (``(,\\d+)*``) splits the input one way
    only and passes. Possessive repeats and atomic groups do not backtrack."""
    for op, av in items:
        if op in _REPEATS:
            if av[1] == re_constants.MAXREPEAT and _ambiguous(list(av[2])):
                return True
            children = [av[2]]
        elif op is re_constants.SUBPATTERN:
            children = [av[-1]]
        elif op is re_constants.BRANCH:
            children = av[1]
        elif op in (re_constants.ASSERT, re_constants.ASSERT_NOT):
            children = [av[1]]
        else:
            continue
        if any(_repeats_a_repeat(child) for child in children):
            return True
    return False


def _ambiguous(body: list[tuple]) -> bool:
    """Whether a repeated body could match as one unbounded repeat alone."""
    if len(body) == 1 and body[0][0] is re_constants.SUBPATTERN:
        return _ambiguous(list(body[0][1][-1]))
    if len(body) == 1 and body[0][0] is re_constants.BRANCH:
        return any(_ambiguous(list(branch)) for branch in body[0][1][1])
    unbounded = [i for i in body if i[0] in _REPEATS and i[1][1] == re_constants.MAXREPEAT]
    required = [i for i in body if not (i[0] in _REPEATS and i[1][0] == 0)]
    if not required:
        return bool(unbounded)
    return len(required) == 1 and (
        required[0] in unbounded
        or (required[0][0] is re_constants.SUBPATTERN and _ambiguous(list(required[0][1][-1])))
    )


# Tab and line ends stay allowed: a verbose (?x) pattern may span lines.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]")
_YAML_ESCAPES = {"\0": "0", "\a": "a", "\b": "b", "\v": "v", "\f": "f", "\x1b": "e"}
_YAML_ESCAPES |= {"\x85": "N", "\u2028": "L", "\u2029": "P"}


def _control_character(node: ScalarNode, value: str, found: str) -> str:
    r"""Why a regex holds a control character, which no subject or file name has:
    YAML read an escape in double quotes as one, so "(?i)\b(invoice)\b" became
    backspaces around the word, and the rule never matched."""
    code = f"U+{ord(found):04X}"
    letter = _YAML_ESCAPES.get(found)
    if node.style != '"' or letter is None:
        escape = escaped(found)
        return f"contains the control character {code}; if meant, write {escape} in single quotes"
    if letter == "b":
        what = r"a backspace: YAML reads \b in double quotes as a backspace, not a word boundary"
    else:
        what = f"{code}: YAML reads \\{letter} in double quotes as that character"
    return f"contains {what}; write the pattern in single quotes: {_single_quoted(value)}"


def _single_quoted(value: str) -> str:
    """The pattern as it was typed, in YAML single quotes, where a backslash is a
    backslash and the regex reads the escapes."""
    typed = _CONTROL.sub(_typed, value)
    return "'" + typed.replace("'", "''") + "'"


# the escapes a Python regex reads as YAML does; \e, \N, \L and \P it refuses
_SAME_IN_REGEX = frozenset("0abvf")


def _typed(found: re.Match[str]) -> str:
    char = found.group()
    letter = _YAML_ESCAPES.get(char)
    return "\\" + letter if letter in _SAME_IN_REGEX else escaped(char)


_VARIABLE = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*|\{[^}]*\}?)")


def file_path(ctx: Ctx, node: Node, path: str) -> Path | None:
    """A path relative to the policy file's directory, so a policy moves with its files."""
    value = text(ctx, node, path, "a file path")
    if value is None:
        return None
    unexpanded = _unexpanded(value)
    if unexpanded is not None:
        message = (
            f"{unexpanded} is not expanded (no shell reads the policy), so this names"
            f" {ctx.path(value)}; write the path in full"
        )
        ctx.problem(node, path, message)
        return None
    return ctx.path(value)


def _unexpanded(value: str) -> str | None:
    """What a shell would have expanded: ``~/dkim`` was read as a directory
    named ``~`` beside the policy, and ``$STATE/queue`` as one named ``$STATE``."""
    if value.startswith("~"):
        return value.partition("/")[0]
    variable = _VARIABLE.search(value)
    return None if variable is None else variable.group()


def existing_file(ctx: Ctx, node: Node, path: str) -> Path | None:
    """The path, if there is anything there: reading it says what else is wrong."""
    resolved = file_path(ctx, node, path)
    if resolved is not None and not os.path.lexists(resolved):
        ctx.problem(node, path, f"no such file: {resolved}")
        return None
    return resolved


def ca_file(ctx: Ctx, node: Node, path: str) -> tuple[Path, str] | None:
    """A PEM file of CA certificates and its text, read here and kept with the
    policy: a wrong file is found by ``relay check``, not by the first
    delivery, and an edit is used from the reload that checks it on. Read per
    connection, a CA file emptied or replaced by mistake stopped the
    upstream's mail at once, while ``relay status`` said a reload would put
    it in use."""
    resolved = existing_file(ctx, node, path)
    found = None if resolved is None else _read(ctx, node, path, resolved, "a CA file")
    if resolved is None or found is None:
        return None
    try:
        pem = _pem_text(found[1])
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
        # not create_default_context: given an empty file, it trusts the system's CAs
        reason = "not PEM text" if isinstance(exc, UnicodeDecodeError) else str(exc)
        ctx.problem(node, path, f"cannot load CA certificates (PEM) from {resolved}: {reason}")
        return None
    return resolved, pem


@functools.lru_cache(maxsize=16)
def _pem_text(data: bytes) -> str:
    """One text for the upstreams that name the same CA file: 300 of them naming
    the system's bundle (220 KB) kept 66 MB of copies in every process."""
    return data.decode("ascii")


def certificate_file(ctx: Ctx, node: Node, path: str) -> tuple[Path, bytes] | None:
    """A listener's certificate (chain), as read."""
    resolved = existing_file(ctx, node, path)
    return None if resolved is None else _read(ctx, node, path, resolved, "a certificate file")


def key_file(ctx: Ctx, node: Node, path: str) -> tuple[Path, bytes] | None:
    """A listener's private key, as read: as secret as a DKIM key."""
    resolved = existing_file(ctx, node, path)
    found = None if resolved is None else _read(ctx, node, path, resolved, "a key file")
    if found is not None:
        warn_if_exposed(ctx, node, path, found[0])
    return found


def read_file(
    ctx: Ctx, node: Node, path: str, what: str = "a key file"
) -> tuple[Path, bytes] | None:
    """A small file read at load: a DKIM key, an HMAC key, a password."""
    resolved = file_path(ctx, node, path)
    if resolved is None:
        return None
    found = _read(ctx, node, path, resolved, what)
    if found is not None and not found[1].strip():
        ctx.problem(node, path, f"{resolved} is empty")
        return None
    return found


#: The most a file may hold: a key, a password or an HMAC key is a few KB at
#: most; a certificate chain a few KB more, a CA bundle some hundred KB
#: (Debian's 144 certificates are 215 KB).
_LIMITS = {
    "a key file": 64 * 1024,
    "a password file": 64 * 1024,
    "a certificate file": 4 * 1024 * 1024,
    "a CA file": 4 * 1024 * 1024,
}
LARGEST_FILE = max(_LIMITS.values())


def _read(ctx: Ctx, node: Node, path: str, resolved: Path, what: str) -> tuple[Path, bytes] | None:
    try:
        return resolved, read_limited(resolved, _LIMITS[what], what)
    except RefusedFile as exc:
        ctx.problem(node, path, str(exc))
    except OSError as exc:
        ctx.problem(node, path, f"cannot read {resolved}: {exc.strerror or exc}")
    return None


def warn_if_exposed(ctx: Ctx, node: Node, path: str, resolved: Path) -> None:
    """A secret any user of the host may read (or others may replace) is not a
    mistake the relay would fail on, so a warning, as OpenDKIM's "key data is
    not secure". Group read is left alone: a group of the service's user is
    how a key is commonly shared with it."""
    for message in _exposures(resolved, ctx.service_uid, _SECRET):
        ctx.problems.warn(node, path, message)


def warn_if_policy_exposed(ctx: Ctx, policy: Path, logins: bool) -> None:
    """Whoever may change the policy may add a login of their own and send as
    any tenant at the next reload, so its owner and directories are judged as
    a key's are. Reading it gives away only its logins' password hashes, which
    may be guessed at offline as /etc/shadow's: a policy every user may read
    is said only when it holds some, and no directory keeps others out."""
    readable = logins and _closed_to_others(policy) is None
    hidden = 0 if readable else stat.S_IROTH
    for message in _exposures(policy, ctx.service_uid, _POLICY, hidden):
        ctx.problems.warn(None, "", message)


_SECRET = "the secret it holds"
_POLICY = "the policy it holds"


def _exposures(resolved: Path, service: int | None, held: str, hidden: int = 0) -> list[str]:
    """What exposes the file, ``hidden`` (mode bits) left out of its mode."""
    try:
        info = os.stat(resolved)
    except OSError:
        return []
    said = (
        _mode_exposes(resolved, info.st_mode, held, hidden),
        _owner_exposes(resolved, info.st_uid, service, held),
        _directory_exposes(resolved, service, held),
    )
    return [message for message in said if message is not None]


def _mode_exposes(resolved: Path, mode: int, held: str, hidden: int = 0) -> str | None:
    shown = f"{stat.S_IMODE(mode):04o}"
    mode &= ~hidden
    closed = _closed_to_others(resolved) if mode & stat.S_IROTH else None
    if closed is not None:
        return (
            f"{resolved}'s mode lets every user of this host read it (mode {shown}), though"
            f" {closed[0]} (mode {closed[1]:04o}) keeps them out as long as it stays there;"
            f" chmod o-rwx {resolved}"
        )
    if mode & stat.S_IROTH:
        return (
            f"{resolved} is readable by every user of this host (mode {shown}): {held} is not"
            f" safe; chmod o-rwx {resolved}"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{resolved} is writable by users other than its owner (mode {shown}): {held} is"
            f" not safe; chmod go-w {resolved}"
        )
    return None


def _owner_exposes(resolved: Path, owner: int, service: int | None, held: str) -> str | None:
    """Its owner may read it and chmod it whatever its mode: a 0600 key of
    nobody's passed, as OpenDKIM's check refuses it."""
    if service is None or owner in (0, service):
        return None
    trusted = "root" if service == 0 else f"root or {_user_name(service)}"
    return (
        f"{resolved} is owned by {_user_name(owner)}, not {trusted} (the user the relay runs"
        f" as), who may read or replace {held} whatever its mode; chown"
        f" {_user_name(service)} {resolved}"
    )


def _directory_exposes(resolved: Path, service: int | None, held: str) -> str | None:
    """The first directory on the file's path in which users other than its
    owner may rename or replace what leads to it, whatever its mode: on its
    real path, then on the path as written, where a link in a directory
    others may write is theirs to point elsewhere (a policy reached through
    one passed, and the next reload read theirs)."""
    real = Path(os.path.realpath(resolved))
    given = Path(os.path.abspath(resolved))
    for path in dict.fromkeys((real, given)):
        found = _path_exposes(resolved, path, service, held)
        if found is not None:
            return found
    return None


def _path_exposes(resolved: Path, path: Path, service: int | None, held: str) -> str | None:
    """A sticky directory (/tmp, 1777) lets none of them remove or rename what
    they do not own, so there only an entry neither root's nor the service
    user's is said (the file's own owner is said already)."""
    entry = path
    for directory in path.parents:
        try:
            mode, owner = os.stat(directory).st_mode, os.lstat(entry).st_uid
        except OSError:
            return None
        if not mode & (stat.S_IWGRP | stat.S_IWOTH):
            entry = directory
            continue
        shown = f"{stat.S_IMODE(mode):04o}"
        if not mode & stat.S_ISVTX:
            return (
                f"{resolved} is in {directory}, which users other than its owner may write"
                f" (mode {shown}): they may replace it and {held}; chmod go-w"
                f" {directory}"
            )
        said = entry == path and not entry.is_symlink()  # the file's own owner: said already
        if not said and service is not None and owner not in (0, service):
            return (
                f"{resolved} is in {entry}, owned by {_user_name(owner)} in {directory} (mode"
                f" {shown}), who may replace it and {held}; chown"
                f" {_user_name(service)} {entry}"
            )
        entry = directory
    return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _closed_to_others(resolved: Path) -> tuple[Path, int] | None:
    """The first directory on the file's real path that other users may not pass
    (no ``o+x``), and its mode: a key of mode 0644 in a 0750 directory was said
    to be readable by every user, which it was not."""
    for directory in Path(os.path.realpath(resolved)).parents:
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            return None
        if not mode & stat.S_IXOTH:
            return directory, stat.S_IMODE(mode)
    return None


def password_file(ctx: Ctx, node: Node, path: str) -> Path | None:
    """Read now only to be checked (the relay reads it again at each delivery, so
    a changed password needs no reload): a missing or unreadable file passed,
    and then every message to the upstream was deferred with 451."""
    found = read_file(ctx, node, path, "a password file")
    if found is None:
        return None
    resolved, data = found
    try:
        password = password_text(data)
    except UnicodeDecodeError as exc:
        ctx.problem(node, path, f"{resolved} is not UTF-8 text ({exc.reason})")
        return None
    if not password.strip():  # a byte-order mark and a line end: no password at all
        ctx.problem(node, path, f"{resolved} is empty")
        return None
    warn_if_exposed(ctx, node, path, resolved)
    return resolved
