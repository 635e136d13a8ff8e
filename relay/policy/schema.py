"""Typed readers over located YAML nodes: each value is checked where it stands.

A reader either returns the value or records a problem at the node and
returns None, so that one pass over the file finds every problem. The
readers are strict where YAML 1.1 is lenient: a string field never accepts
what YAML turned into a boolean, a date or a reformatted number, because
``name: no`` silently becoming ``False`` is worse than asking for quotes.
"""

from __future__ import annotations

import enum
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from difflib import get_close_matches
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from relay.policy.yamlsource import NULL_TAG, STR_TAG, Problems, is_null, is_plain, pairs

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")

_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_IMPLICIT = {
    "tag:yaml.org,2002:bool": "the boolean",
    _INT_TAG: "the number",
    _FLOAT_TAG: "the number",
    NULL_TAG: "null",
    "tag:yaml.org,2002:timestamp": "the date",
}
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")
_INJECTION = re.compile(r"[\r\n\x00]")
_RESOLVER = Resolver()


class _Unfit(Exception):
    """The text is not of the type its tag names (``!!bool x``, ``!!int 0o9``)."""


class Ctx:
    """Where problems go and where the policy's relative paths start."""

    def __init__(self, problems: Problems, base: Path) -> None:
        self.problems = problems
        self.base = base
        #: listeners that take mail without a login from any address: whether
        #: that lets anyone send as a user depends on the identify section, read later
        self.open_listeners: list[tuple[Node, str, str]] = []
        #: headers the classify rules and Reply-To chains read, each (node, path,
        #: name): one the relay does not remove as a control header goes on to the
        #: recipients
        self.read_headers: list[tuple[Node, str, str]] = []
        #: what each listener binds, (address, port, path, IPs): the metrics
        #: endpoint, read later, must not take one of their ports
        self.sockets: list[tuple[str, int, str, frozenset[IPv4Address | IPv6Address]]] = []
        #: allow entries of the family a listener does not take: (its port, the
        #: entry, node, path, message), said unless a listener on that port takes
        #: the entry's family and allows its network (``allows``)
        self.other_family: list[tuple[int | None, IPv4Network | IPv6Network, Node, str, str]] = []
        #: each listener's port, the IP versions its addresses take, its allow list
        self.allows: list[tuple[int, frozenset[int], tuple[IPv4Network | IPv6Network, ...]]] = []
        #: each listener's max_message_size, (node, path, name, bytes): its reserve
        #: is judged against the state directory's file system, read later
        self.message_sizes: list[tuple[Node, str, str | None, int]] = []
        #: whether a listener offers AUTH (not ``auth: off``; with tls, or on loopback):
        #: a tenant that takes mail only with a login takes none without one
        self.logins_taken = False
        #: the uid the relay runs as (``run_as``'s, else this process's), read before
        #: the files it names: a secret another user owns, that user may read or
        #: replace; None when ``run_as`` names no user of this host, or when root
        #: checks a policy without it: the unit's ``User=`` runs the relay, whom a
        #: warning to chown the keys to root had locked out of them
        self.service_uid: int | None = os.getuid() or None

    def problem(self, where: Node | None, path: str, message: str) -> None:
        self.problems.add(where, path, message)

    def path(self, text: str) -> Path:
        path = Path(text)
        return path if path.is_absolute() else tidy(self.base / path)


def tidy(path: Path) -> Path:
    """``path`` without its ``..`` where that names the same file: the example's
    ``../state`` put ``/srv/relay/config/../state`` in every log line, audit
    record and notice. Kept as it is where a link comes before a ``..``: the
    system takes ``..`` after the link, and the text would name another file."""
    if ".." not in path.parts:
        return path
    short = Path(os.path.normpath(path))
    return short if os.path.realpath(short) == os.path.realpath(path) else path


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def hint(word: str, choices: Collection[str]) -> str:
    """The did-you-mean suffix for a near miss, else nothing."""
    close = get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Map:
    """One YAML mapping with a fixed set of keys; unknown, duplicate and missing keys
    are problems as soon as it is opened. A key with an empty (null) value counts
    as absent, so optional keys may be left blank."""

    def __init__(
        self,
        ctx: Ctx,
        node: Node | None,
        path: str,
        keys: Collection[str],
        required: Collection[str] = (),
        forbidden: Mapping[str, str] | None = None,
        at: Node | None = None,
    ) -> None:
        self.ctx, self.node, self.path = ctx, node, path
        # an empty value has no stable position of its own; its key has
        self._at = at if at is not None and node is not None and is_null(node) else node
        self.ok = True
        self._items: dict[str, tuple[ScalarNode, Node]] = {}
        if node is None:
            return
        if isinstance(node, MappingNode):
            forbidden = forbidden or {}
            for key, key_node, value in pairs(node, path, ctx.problems):
                if key in keys:
                    self._items[key] = (key_node, value)
                elif key in forbidden:
                    ctx.problem(key_node, join(path, key), forbidden[key])
                else:
                    ctx.problem(key_node, join(path, key), "unknown key" + _key_hint(key, keys))
        elif not is_null(node):
            ctx.problem(node, path, "expected a mapping")
            self.ok = False
            return
        self.require(*required)

    def require(self, *keys: str) -> None:
        """Missing keys are located at the mapping (or the empty value) that lacks them."""
        if self._at is None:
            return
        for key in keys:
            if key not in self._items:
                self.ctx.problem(self._at, join(self.path, key), "required key is missing")
            elif is_null(self._items[key][1]):
                where = self._items[key][0]
                self.ctx.problem(where, join(self.path, key), "required key has no value")

    def only(self, keys: Collection[str], what: str, told: Collection[str] = ()) -> None:
        """Refuse keys that exist, but not for this variant (e.g. ``host`` of a directory);
        ``told``: keys the caller refused with a reason of its own."""
        for key, (key_node, _) in self._items.items():
            if key not in keys and key not in told:
                message = f"unknown key for {what}" + _key_hint(key, keys)
                self.ctx.problem(key_node, join(self.path, key), message)

    def has(self, key: str) -> bool:
        return self.get(key) is not None

    def get(self, key: str) -> Node | None:
        item = self._items.get(key)
        if item is None or is_null(item[1]):
            return None
        return item[1]

    def sub(self, key: str) -> str:
        return join(self.path, key)

    def map(self, key: str, keys: Collection[str], required: Collection[str] = ()) -> Map:
        """The mapping under ``key``; when the key is absent, an empty one with no problems."""
        return Map(self.ctx, self.get(key), self.sub(key), keys, required)

    def read(self, key: str, reader: Callable[[Ctx, Node, str], T]) -> T | None:
        node = self.get(key)
        return None if node is None else reader(self.ctx, node, self.sub(key))

    def text(self, key: str, what: str = "a string") -> str | None:
        node = self.get(key)
        return None if node is None else text(self.ctx, node, self.sub(key), what)

    def choice(self, key: str, kind: type[E], default: E | None = None) -> E | None:
        node = self.get(key)
        return default if node is None else choice(self.ctx, node, self.sub(key), kind)

    def integer(self, key: str, default: int | None, low: int, high: int, what: str) -> int | None:
        node = self.get(key)
        if node is None:
            return default
        return integer(self.ctx, node, self.sub(key), low, high, what)

    def number(self, key: str, default: float, off: bool = False) -> float | None:
        node = self.get(key)
        return default if node is None else number(self.ctx, node, self.sub(key), off)

    def items(self, key: str, what: str) -> list[tuple[Node, str]]:
        node = self.get(key)
        return [] if node is None else items(self.ctx, node, self.sub(key), what)

    def entries(self, key: str, what: str) -> list[tuple[str, ScalarNode, Node, str]]:
        """The (name, key node, value, path) of a mapping whose keys the sysadmin chose."""
        node = self.get(key)
        if node is None:
            return []
        path = self.sub(key)
        if not isinstance(node, MappingNode):
            self.ctx.problem(node, path, f"expected {what}")
            return []
        return [
            (name, k, v, join(path, name)) for name, k, v in pairs(node, path, self.ctx.problems)
        ]


def _key_hint(key: str, keys: Collection[str]) -> str:
    return hint(key, keys) or f" (expected one of: {', '.join(keys)})"


def text(
    ctx: Ctx, node: Node, path: str, what: str = "a string", multiline: bool = False
) -> str | None:
    """A string, as written; CR, LF and NUL are refused because strings end up in headers."""
    if not isinstance(node, ScalarNode):
        ctx.problem(node, path, f"expected {what}")
        return None
    if node.tag == STR_TAG or (
        is_plain(node) and node.tag in (_INT_TAG, _FLOAT_TAG) and _DECIMAL.fullmatch(node.value)
    ):
        value = node.value
    elif node.tag in _IMPLICIT and _explicit(node):
        ctx.problem(node, path, _tagged(node, what))
        return None
    elif is_plain(node) and node.tag == NULL_TAG and not node.value:
        ctx.problem(node, path, f"expected {what}, found no value")
        return None
    elif is_plain(node) and node.tag in _IMPLICIT:
        meaning = _meaning(node)
        ctx.problem(
            node,
            path,
            f"expected {what}, but YAML reads the unquoted {node.value}"
            f' as {meaning}; put it in quotes: "{node.value}"',
        )
        return None
    else:
        ctx.problem(node, path, f"expected {what}")
        return None
    if not value.strip():
        ctx.problem(node, path, f"expected {what}, not an empty string")
        return None
    if not multiline and _INJECTION.search(value):
        ctx.problem(node, path, "must not contain CR, LF or NUL (header injection)")
        return None
    return value


def _meaning(node: ScalarNode) -> str:
    label = _IMPLICIT[node.tag]
    if node.tag == NULL_TAG:
        return "null, i.e. no value"
    try:
        value = _construct(node)
    except _Unfit:
        return label.replace("the ", "a ")
    if isinstance(value, bool):
        return f"{label} {str(value).lower()}"
    return f"{label} {value}"


def _explicit(node: ScalarNode) -> bool:
    """Whether the file wrote the tag (``!!float x``): YAML did not guess the
    type from the text, so quotes alone would not make it a string."""
    implicit = (is_plain(node), not is_plain(node))
    return node.tag != _RESOLVER.resolve(ScalarNode, node.value, implicit)


def _tagged(node: ScalarNode, what: str) -> str:
    """What the tag does to the text: "makes x a boolean" was said of a ``!!bool x``
    it cannot read at all."""
    try:
        _construct(node)
    except _Unfit:
        kind = _IMPLICIT[node.tag].replace("the ", "a ")
        done = f"cannot read {node.value!r} as {kind}"
    else:
        done = f"makes {node.value} {_meaning(node)}"
    return (
        f"expected {what}, but the tag {_tag(node)} {done};"
        f' write it without the tag, in quotes: "{node.value}"'
    )


def _tag(node: ScalarNode) -> str:
    """The tag as a sysadmin writes it: !!bool, not tag:yaml.org,2002:bool."""
    return "!!" + node.tag.rsplit(":", 1)[-1]


def integer(ctx: Ctx, node: Node, path: str, low: int, high: int, what: str) -> int | None:
    value = _numeric(ctx, node, path, what, (_INT_TAG,))
    if value is None:
        return None
    if not low <= value <= high:
        bounds = "" if ".." in what else f" ({low}..{high})"  # a limit unsaid looked arbitrary
        ctx.problem(node, path, f"{value} is out of range: expected {what}{bounds}")
        return None
    return int(value)


MAX_SECONDS = 10 * 365 * 86400  # a retry or a queue lifetime past it is a typo, not a plan


def number(ctx: Ctx, node: Node, path: str, off: bool = False) -> float | None:
    """Seconds; past ``MAX_SECONDS`` the times computed from it left the calendar
    and the delivery that computed them failed in the relay itself. ``off``: 0 is
    how a sysadmin writes that a wait left out is not made, and means that."""
    zero = ", or 0 for off" if off else ""
    what = f"a positive number of seconds{zero}, at most {MAX_SECONDS} (10 years)"
    value = _numeric(ctx, node, path, what, (_INT_TAG, _FLOAT_TAG))
    if value is None:
        return None
    above = value >= 0 if off else value > 0
    if not (math.isfinite(value) and above and value <= MAX_SECONDS):
        ctx.problem(node, path, f"expected {what}")
        return None
    return abs(float(value))  # -0.0 is 0 too


def _numeric(
    ctx: Ctx, node: Node, path: str, what: str, tags: tuple[str, ...]
) -> int | float | None:
    """A number as YAML 1.1 reads it, except where that differs from what was meant:
    a leading zero makes octal (0465 is 309) or a string (0587), a colon base 60."""
    raw = node.value if isinstance(node, ScalarNode) and is_plain(node) else ""
    if _LEADING_ZERO.fullmatch(raw) and node.tag in (STR_TAG, _INT_TAG):
        ctx.problem(node, path, _leading_zero(node, raw))
        return None
    if not isinstance(node, ScalarNode) or node.tag not in tags:
        ctx.problem(node, path, f"expected {what}")
        return None
    try:
        value = _construct(node)
    except _Unfit:
        ctx.problem(node, path, _not_a_number(node, what))
        return None
    if ":" in raw:
        ctx.problem(node, path, f"YAML 1.1 reads {raw} as {value} (base 60); write {value}")
        return None
    return value


def _leading_zero(node: ScalarNode, raw: str) -> str:
    if node.tag == STR_TAG:
        meaning = "a string"
    else:
        try:
            meaning = f"octal, i.e. {_construct(node)}"
        except _Unfit:  # !!int 09
            meaning = "octal"
    decimal = int(raw.replace("_", ""))
    return f"YAML 1.1 reads {raw} as {meaning}; write it without the leading zero: {decimal}"


def _not_a_number(node: ScalarNode, what: str) -> str:
    if not _explicit(node):  # more digits than Python converts
        return f"expected {what}"
    return f"expected {what}, but the tag {_tag(node)} cannot read {node.value!r} as a number"


def _construct(node: ScalarNode) -> object:
    """Raises _Unfit where the text does not fit the tag: PyYAML's constructors
    then fail as each happens to (a KeyError for ``!!bool x``, an AttributeError
    for ``!!timestamp x``), and check, status and a reload ended in a traceback."""
    try:
        return SafeConstructor().construct_object(node)
    except (yaml.YAMLError, ArithmeticError, AttributeError, LookupError, ValueError) as exc:
        raise _Unfit(node.value) from exc


def choice(ctx: Ctx, node: Node, path: str, kind: type[E]) -> E | None:
    """An enum by its value. Uses the source text, so ``auth: off`` means "off", not False."""
    values = [member.value for member in kind]
    if isinstance(node, ScalarNode) and node.value in values:
        return kind(node.value)
    got = node.value if isinstance(node, ScalarNode) else ""
    ctx.problem(node, path, f"expected one of: {', '.join(values)}" + hint(got, values))
    return None


def items(ctx: Ctx, node: Node, path: str, what: str) -> list[tuple[Node, str]]:
    if not isinstance(node, SequenceNode):
        ctx.problem(node, path, f"expected {what}")
        return []
    return [(item, join(path, i)) for i, item in enumerate(node.value)]
