"""The YAML layer of the policy loader: node trees that remember where they came from.

PyYAML's ``safe_load`` throws positions away, silently keeps the last of
two equal keys and turns ``no`` into ``False``. The loader therefore works
on composed nodes, which keep their marks and their source text, and every
problem found is collected here with its place in the file so that a
sysadmin sees all of them at once, in file order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from relay.policy import indentation
from relay.policy.files import RefusedFile, read_limited
from relay.policy.indentation import has_text, indent_of

try:
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

MERGE_TAG = "tag:yaml.org,2002:merge"
STR_TAG = "tag:yaml.org,2002:str"
NULL_TAG = "tag:yaml.org,2002:null"

#: The most the policy file may hold: a policy of 50,000 users, each with a
#: name, an address and two aliases, is 9.2 MiB, so even a file of many
#: comments and long names is well below it; /dev/zero, or a log file named
#: by mistake, is not.
MAX_POLICY_SIZE = 64 * 2**20


@dataclass(order=True)
class _Problem:
    line: int
    col: int
    seq: int
    text: str = field(compare=False)


class Problems:
    """Every problem of one policy file, each with its line and column (1-based)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self._items: list[_Problem] = []
        self._warnings: list[_Problem] = []
        self.merges = _Merges()  # the file's merge keys, as expanded so far

    def add(
        self, where: Node | yaml.Mark | tuple[int, int] | None, path: str, message: str
    ) -> None:
        self._items.append(self._located(where, path, message, len(self._items)))

    def warn(
        self, where: Node | yaml.Mark | tuple[int, int] | None, path: str, message: str
    ) -> None:
        """Not a mistake in the file, but the relay would fail on this host: only
        ``relay check`` reports it, and the policy still loads."""
        said = f"warning: {path}" if path else "warning"  # the file's own, of no key
        warning = self._located(where, said, message, len(self._warnings))
        self._warnings.append(warning)

    def _located(
        self, where: Node | yaml.Mark | tuple[int, int] | None, path: str, message: str, seq: int
    ) -> _Problem:
        text = f"{path}: {message}" if path else message
        if where is None:
            return _Problem(0, 0, seq, f"{self.file}: {text}")
        if isinstance(where, Node):
            where = where.start_mark
        if not isinstance(where, tuple):
            where = (where.line + 1, where.column + 1)
        line, col = where
        return _Problem(line, col, seq, f"{self.file}:{line}:{col}: {text}")

    def __len__(self) -> int:
        return len(self._items)

    def in_file_order(self) -> list[str]:
        return [p.text for p in sorted(self._items)]

    def warnings_in_file_order(self) -> list[str]:
        return [p.text for p in sorted(self._warnings)]


def read(
    path: Path, problems: Problems, data: bytes | None = None
) -> tuple[bytes | None, Node | None]:
    """The file's bytes (``data`` when given) and its node tree; either is None
    when it cannot be had."""
    if data is None:
        try:
            data = read_bytes(path)
        except RefusedFile as exc:
            problems.add(None, "", f"the policy file {exc.reason}")
            return None, None
        except OSError as exc:
            problems.add(None, "", f"cannot read the policy file: {exc.strerror or exc}")
            return None, None
    if _utf16(data):
        problems.add((1, 1), "", 'the file is UTF-16 text (Notepad\'s "Unicode"): save it as UTF-8')
        return data, None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        problems.add(_position(data, exc.start), "", f"the file is not UTF-8 text ({exc.reason})")
        return data, None
    separator = _LINE_SEPARATOR.search(text)
    if separator:
        problems.add(_position(text, separator.start()), "", _line_separator(separator.group()))
        return data, None
    odd = _odd_line_end(text)
    if odd is not None:
        problems.add(*odd)
        return data, None
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        where, path, said = _syntax_problem(_line_feeds(text), exc)
        problems.add(where, path, said + (_CR_ONLY if _cr_only(text) else ""))
        return data, None
    except yaml.reader.ReaderError as exc:
        problems.add(*_unacceptable(text, exc))
        return data, None
    except yaml.YAMLError as exc:
        problems.add((1, 1), "", f"YAML syntax error: {exc}")
        return data, None
    if node is None:
        problems.add((1, 1), "", "the policy file is empty")
    elif not _aliases_within_bounds(node, text, problems):
        return data, None
    return data, node


def read_bytes(path: Path) -> bytes:
    """The policy file's bytes; raises OSError or RefusedFile. It was read whole
    whatever it was: a FIFO made check, and a reload, wait for a writer forever,
    and /dev/zero ended them in a MemoryError."""
    return read_limited(path, MAX_POLICY_SIZE, "a policy file")


#: Values aliases (*name) may bring into the file, in all: an anchor used in a
#: few places, or a small one in each of 50,000 users, stays well below it; a
#: "billion laughs" (each anchor a list of ten aliases to the one before, or a
#: mapping of 100 tenants aliasing one of 100 users, each aliasing 100
#: addresses: 4 KB that check took 37 s and 630 MB to walk) does not.
MAX_ALIASED = 1_000_000


def _aliases_within_bounds(root: Node, text: str, problems: Problems) -> bool:
    """Whether the values aliases bring in stay within MAX_ALIASED; reports the
    alias that takes them past it when not. The node tree shares an anchored
    node wherever an alias names it, so the loader walks it once per alias."""
    if "*" not in text:  # no alias at all: nothing to count
        return True
    crossing = _AliasCount().crossing(root)
    if crossing is None:
        return True
    aliases = (e for e in yaml.parse(text, Loader=_Loader) if isinstance(e, yaml.AliasEvent))
    alias = next(e for i, e in enumerate(aliases) if i == crossing)
    message = (
        f"the file expands (through aliases, here *{alias.anchor}) to more than"
        f" {MAX_ALIASED:,} values; refer to each anchor in fewer places"
    )
    problems.add(alias.start_mark, "", message)
    return False


class _AliasCount:
    """The values each node stands for, with the aliases within it expanded, as
    the loader walks them: a merge source counts once per mapping (merge keys
    expand each source's entries once, and a key only once), an alias to a node
    that encloses it once (the loader walks no deeper than the policy goes)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}
        self.aliased = 0
        self.aliases = 0

    def crossing(self, root: Node) -> int | None:
        """The index, among the file's aliases in document order, of the one
        that takes the values brought in by aliases past MAX_ALIASED."""
        stack = [_Frame(root, None)]
        self.sizes[id(root)] = 1
        while stack:
            frame = stack[-1]
            child = next(frame.children, None)
            if child is None:
                stack.pop()
                self.sizes[id(frame.node)] = frame.size
                if stack:
                    stack[-1].size += frame.size
                continue
            node, merged = child
            if id(node) in self.sizes:
                frame.size += self._alias(node, merged)
                if self.aliased > MAX_ALIASED:
                    return self.aliases - 1
            elif isinstance(node, ScalarNode):
                self.sizes[id(node)] = 1
                frame.size += 1
            else:
                self.sizes[id(node)] = 1  # while within it
                if merged is not None:
                    merged.add(id(node))
                stack.append(_Frame(node, merged))
        return None

    def _alias(self, node: Node, merged: set[int] | None) -> int:
        self.aliases += 1
        if merged is not None:
            if id(node) in merged:
                return 0
            merged.add(id(node))
        size = self.sizes[id(node)]
        self.aliased += size
        return size


class _Frame:
    """A collection being counted: its children still to come, and its size so far."""

    def __init__(self, node: Node, merged: set[int] | None) -> None:
        self.node = node
        self.size = 1
        self.children = _children(node, merged)


def _children(node: Node, merged: set[int] | None) -> Iterator[tuple[Node, set[int] | None]]:
    """Each child, with the merge sources its mapping has counted when it is one."""
    if isinstance(node, SequenceNode):
        for item in node.value:
            yield item, merged
        return
    sources: set[int] = set()
    for key, value in node.value:
        yield key, None
        yield value, sources if key.tag == MERGE_TAG else None


# Slips the parser notices only further down: the context names the line to fix.
def _syntax_problem(
    text: str, exc: yaml.MarkedYAMLError
) -> tuple[yaml.Mark | tuple[int, int] | None, str, str]:
    """Where a syntax error sends the sysadmin, and what it says there.

    PyYAML names the place where it gave up. For the two commonest slips
    that is not the line to fix: a key missing its ':' is noticed on the
    next line, and a value whose closing quote is missing runs on to the
    next quote in the file, often many lines down, where the parser stops
    at a line that is right (or inside it, at a regular expression's
    backslash, not an escape in double quotes).
    """
    stop, opened = exc.problem_mark, exc.context_mark
    end = None if stop is None else _past_the_end(text, stop)
    at = (
        "the end of the file"
        if stop is None or end is not None
        else f"{stop.line + 1}:{stop.column + 1}"
    )
    if exc.problem == "could not find expected ':'" and opened is not None:
        return opened, "", f"YAML syntax error: a key without ':' after it ({exc.problem} at {at})"
    quoted = "quoted scalar" in (exc.context or "") and opened is not None
    if quoted and (stop is None or end is not None or opened.line < stop.line):
        return opened, "", _runaway(_char_at(text, opened), at, exc.problem)
    token = None if stop is None else _runaway_quote(text, stop.line)
    if token is not None:
        return token.start_mark, "", _runaway(token.style, at, exc.problem)
    keyless = None if stop is None or exc.problem not in _KEYLESS else _keyless(text, stop)
    keyless_said = f"YAML syntax error: a key without ':' after it ({exc.problem} at {at})"
    if keyless is not None and keyless.sure:
        return keyless.at, "", keyless_said
    if stop is not None and _in_indentation(text, stop, "\t"):
        return stop, "", f"{_syntax_message(exc)}: a tab indents this line; YAML takes only spaces"
    lost_colon = None if keyless is None else keyless.at[0]
    misindented = indentation.explain(text, exc.problem, stop, _Loader, lost_colon)
    if misindented is not None:
        line, said = misindented
        return line, "", f"YAML syntax error: {said} ({exc.problem} at {at})"
    if keyless is not None:
        return keyless.at, "", keyless_said
    if end is not None:
        context = ""
        if opened is not None and _past_the_end(text, opened) is None:
            context = f", {exc.context} at {opened.line + 1}:{opened.column + 1}"
        said = f"YAML syntax error: the file ends here, unfinished ({exc.problem}{context})"
        return end, "", said
    return stop, "", _syntax_message(exc)


def _past_the_end(text: str, stop: yaml.Mark) -> tuple[int, int] | None:
    """The end of the file's last line, where the parser stopped at it or after
    it: on a line an editor does not show (3:1 of a file of two lines), or one
    of blanks."""
    shown = text.rstrip(" \t\n").split("\n")
    if (stop.line, stop.column) < (len(shown) - 1, len(shown[-1])):
        return None
    return len(shown), len(shown[-1]) + 1


def _utf16(data: bytes) -> bool:
    """Notepad's "Unicode": a byte-order mark, or without one ASCII every other
    byte, which was said to be no UTF-8 text, or an unacceptable character #x0000."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    return len(data) >= 2 and (data[0] == 0) != (data[1] == 0)


def _in_indentation(text: str, mark: yaml.Mark, char: str) -> bool:
    """Whether ``char`` is in the indentation of the mark's line, up to the mark:
    the parser names a tab there only as a character that starts no token."""
    lines = text.split("\n")
    line = lines[mark.line] if mark.line < len(lines) else ""
    head = line[: mark.column + 1]
    return char in head and not head.strip(" \t")


# what the parser says on the line after a key whose ':' is missing, when that
# line is a nested mapping, a list, or the next key of the same mapping
_KEYLESS = (
    "mapping values are not allowed in this context",
    "mapping values are not allowed here",
    "did not find expected key",
)
#: a comment: a '#' at the line's start or after a space, to the end. Written
#: with the space before it, the pattern took time in the square of a run of
#: spaces with no '#' after it: 30 s for a file of blank lines 30,000 wide.
_COMMENT = re.compile(r"(?:^|(?<=\s))#.*$")


@dataclass(frozen=True)
class _Keyless:
    """A line that may be a key whose ':' was left out; not ``sure`` when the
    line under it may as well be a key indented too far."""

    at: tuple[int, int]  # 1-based
    sure: bool = True


def _keyless(text: str, stop: yaml.Mark) -> _Keyless | None:
    """The nearest line above the parser's stop with text, when it is a word
    or two with no ':' after them, as a key whose ':' was left out is: the
    parser only notices on a later line. Not when the stop's own line has a
    ':' before the stop: the slip is there.

    A list item of one word is a whole value (``- 127.0.0.0/8``) with a key
    indented too far under it, or an item's key that lost its ':' (``- id``
    of ``- id: invoice-header``), the line under it being the item's next
    key: the list's other items tell which, and an item alone is either."""
    lines = text.split("\n")
    if stop.line >= len(lines) or ":" in lines[stop.line][: stop.column]:
        return None
    for number in range(stop.line - 1, -1, -1):
        content = _COMMENT.sub("", lines[number]).rstrip()
        if not content.strip():
            continue
        stripped = content.lstrip()
        is_item = stripped.startswith("- ")
        item = stripped[2:].lstrip() if is_item else stripped
        plain = item and item[0] not in "\"'[{|>&*!%@`" and ":" not in item
        if not plain or _in_block_scalar(text, number):
            return None
        at = (number + 1, len(content) - len(item) + 1)
        if not is_item or len(item.split()) > 1:
            return _Keyless(at)
        under_it = indent_of(lines[stop.line]) >= at[1] - 1  # where its keys would be
        if not under_it:
            return None  # not the item's next key: out of line whatever the item is
        kinds = _other_items(lines, number)
        if MappingNode in kinds:
            return _Keyless(at)
        return _Keyless(at, sure=False) if not kinds else None
    return None


def _in_block_scalar(text: str, line: int) -> bool:
    """Whether ``line`` (0-based) is text of a literal or folded value (``|``,
    ``>``): its words are the value's, whatever they look like. The file's
    tokens are read only when a line that may start such a value is near:
    reading them all took a second for a slip at the end of a 2 MB policy."""
    if not _block_scalar_may_hold(text.split("\n"), line):
        return False
    try:
        for token in yaml.scan(text, Loader=_Loader):
            if token.start_mark.line >= line:
                return False
            end = token.end_mark
            if getattr(token, "style", None) in ("|", ">") and (line, 0) < (end.line, end.column):
                return True
    except yaml.YAMLError:
        pass  # the error being explained: the value, if any, is before it
    return False


def _block_scalar_may_hold(lines: list[str], line: int) -> bool:
    """Whether a literal or folded value may run on to ``line`` (0-based): its
    text is indented at least a space, so it cannot have begun above the last
    line before that starts at its first column, and the line it begins on
    has its '|' or '>', outside a comment. False is sure; True is a maybe."""
    for number in range(line - 1, -1, -1):
        text = lines[number]
        if not text.lstrip(" ").startswith("#") and ("|" in text or ">" in text):
            return True
        if text and text[0] != " ":
            return False
    return False


def _other_items(lines: list[str], number: int) -> set[type[Node]]:
    """The node types (a mapping, a scalar) of the items nearest above and
    below the list item on line ``number`` (0-based) in its list; of the
    ones YAML reads on their own."""
    dash = indent_of(lines[number])
    kinds: set[type[Node]] = set()
    for step in (-1, 1):
        n = number + step
        while 0 <= n < len(lines) and (not has_text(lines[n]) or indent_of(lines[n]) > dash):
            n += step
        if not 0 <= n < len(lines) or indent_of(lines[n]) < dash:
            continue  # the list's end
        if not re.match(r"-( |$)", _COMMENT.sub("", lines[n]).strip()):
            continue  # the mapping's next key, after a list at its indentation
        own = [lines[n].replace("-", " ", 1)]
        for line in lines[n + 1 :]:
            if has_text(line) and indent_of(line) <= dash:
                break
            own.append(line)
        try:
            node = yaml.compose("\n".join(own), Loader=_Loader)
        except (yaml.YAMLError, RecursionError):  # PyYAML's own parser recurses per level
            continue  # a slip of its own, or too deep to read: it tells nothing
        if isinstance(node, MappingNode | ScalarNode):
            kinds.add(type(node))
    return kinds


def _runaway(quote: str, at: str, problem: str | None) -> str:
    return (
        f"YAML syntax error: the value quoted with {quote} here is not closed on its line:"
        f" it runs on to {at}, where the parser stopped ({problem})"
    )


def _char_at(text: str, mark: yaml.Mark) -> str:
    lines = text.split("\n")
    line = lines[mark.line] if mark.line < len(lines) else ""
    return line[mark.column : mark.column + 1] or "a quote"


def _runaway_quote(text: str, line: int) -> yaml.ScalarToken | None:
    """The quoted value that began on an earlier line and ended on ``line``
    (0-based), where the parser stopped; None if there is none. A policy
    has no reason to quote across lines, so one that does is a quote left open."""
    found = None
    try:
        for token in yaml.scan(text, Loader=_Loader):
            if token.start_mark.line > line:
                break
            quoted = isinstance(token, yaml.ScalarToken) and token.style in ("'", '"')
            if quoted and token.start_mark.line < token.end_mark.line == line:
                found = token
    except yaml.YAMLError:
        pass  # the error being explained: the tokens before it are all there is
    return found


def _syntax_message(exc: yaml.MarkedYAMLError) -> str:
    message = f"YAML syntax error: {exc.problem}"
    if exc.context:
        mark = exc.context_mark
        where = f" at {mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        message += f" ({exc.context}{where})"
    return message


# YAML reads these as line breaks, editors and grep -n do not; pasted from a
# web page or a word processor, they are invisible
_LINE_SEPARATOR = re.compile("[\u0085\u2028\u2029]")
# a carriage return not before a line feed, in a file of line feeds (a file of
# carriage returns alone is an old Mac's: it loads, its syntax errors say so)
_LONE_CR = re.compile("\r(?!\n)")


_CR_ONLY = (
    "; the file's lines end in a carriage return alone (U+000D), as an old Mac saved"
    " them: YAML and the line number here count them as lines, grep and most editors"
    " see one long line; save the file with line feeds"
)


def _odd_line_end(text: str) -> tuple[tuple[int, int], str, str] | None:
    """A line end that YAML and an editor read apart: a carriage return alone in
    a file of line feeds, said where an editor shows it; or a line feed in a
    file of carriage returns alone, as ``echo >>`` adds to an old Mac's file,
    said at the line YAML counts, where deleting it is no fix."""
    if "\n" not in text:
        return None  # no line feed, or none but these: YAML reads the lines
    lone = _LONE_CR.search(text)
    if lone is None:
        return None
    if text.count("\r") - text.count("\r\n") <= text.count("\n"):
        return _position(text, lone.start()), "", _line_separator("\r")
    feed = text.index("\n")
    if text[feed - 1 : feed] == "\r":
        feed -= 1  # CR LF: one line end, the CR's
    before = _line_feeds(text[:feed])
    line = before.count("\n") + 1
    said = (
        "a line feed (U+000A) where the file's other lines end in a carriage return alone"
        " (U+000D), as an old Mac saved them: YAML reads both as line breaks, grep and most"
        " editors only the line feed, so their line numbers are not the ones here; save the"
        " file with line feeds alone"
    )
    return (line, len(before) - before.rfind("\n")), "", said


def _unacceptable(text: str, exc: yaml.reader.ReaderError) -> tuple[tuple[int, int], str, str]:
    """Where the reader stopped, found by the character itself: libyaml's
    position counts bytes, so a non-ASCII letter before it put the place lines
    off; and in a file of carriage returns alone, by YAML's lines."""
    cr_only = _cr_only(text)
    lines = _line_feeds(text) if cr_only else text
    at = lines.find(chr(exc.character))
    said = f"YAML syntax error: unacceptable character #x{exc.character:04x}"
    return (
        _position(lines, exc.position if at < 0 else at),
        "",
        said + (_CR_ONLY if cr_only else ""),
    )


def _cr_only(text: str) -> bool:
    """Whether the file's lines end in carriage returns alone, as an old Mac's."""
    return "\r" in text and "\n" not in text


def _line_feeds(text: str) -> str:
    """The text with each line end as YAML counts one (CR LF, CR alone) a line
    feed, so that its lines are the parser's marks' lines."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _line_separator(char: str) -> str:
    what = "a carriage return alone" if char == "\r" else "an invisible line separator"
    return (
        f"{what} (U+{ord(char):04X}), as pasted from a web page or a"
        " word processor: YAML reads it as a line break, so every line number after it"
        " would be off and the text around it may mean something else; delete it"
    )


def _position(text: str | bytes, index: int) -> tuple[int, int]:
    before = text[:index]
    newline = "\n" if isinstance(before, str) else b"\n"
    line = before.count(newline) + 1
    return line, index - (before.rfind(newline) + 1) + 1


def is_plain(node: ScalarNode) -> bool:
    """Unquoted: only plain scalars get YAML 1.1's implicit bool/int/float/null tags."""
    return not node.style


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


Entry = tuple[str, ScalarNode, Node]

#: Values merge keys may bring into mappings, in all: a policy that merges
#: defaults into each of 50,000 users stays well below it; a "merge bomb" (each
#: anchor merging the one before ten times, 6 KB for 10^9 values) does not.
MAX_MERGED = 1_000_000
#: Merge keys within merged mappings: each level is a few Python frames, and
#: some 300 levels ended ``relay check`` in a RecursionError traceback.
MAX_MERGE_DEPTH = 100


class _Merges:
    """Each merge source's entries, expanded once, and the values merged so far.

    A shared source was walked again at every merge that named it, so a
    small file of nested merges hung ``relay check`` and a reload for an hour.
    """

    def __init__(self) -> None:
        self.expanded: dict[int, list[Entry]] = {}
        self.count = 0
        self.exceeded = False

    def spend(self, entries: int, merge_key: Node, path: str, problems: Problems) -> bool:
        """Whether ``entries`` more values may be merged; reports, once, when not."""
        if self.exceeded:
            return False
        self.count += entries
        if self.count <= MAX_MERGED:
            return True
        self.exceeded = True
        message = (
            f"the file expands (through merge keys, <<) to more than {MAX_MERGED:,} values;"
            " merge each anchor in fewer places"
        )
        problems.add(merge_key, path, message)
        return False


def pairs(
    node: MappingNode, path: str, problems: Problems, _active: frozenset[int] = frozenset()
) -> Iterator[Entry]:
    """A mapping's entries with string keys, each key once, merge keys (<<) expanded.

    PyYAML keeps the last of two equal keys without a word; here the second
    is a problem (and dropped) so an edit further down cannot silently undo
    one further up.
    """
    seen: dict[str, ScalarNode] = {}
    merged: list[Entry] = []
    for key_node, value in node.value:
        if key_node.tag == MERGE_TAG:
            merged.extend(_merged(key_node, value, path, problems, _active | {id(node)}))
            continue
        key = _key(key_node, path, problems)
        if key is None:
            continue
        first = seen.get(key)
        if first is not None:
            line, col = first.start_mark.line + 1, first.start_mark.column + 1
            problems.add(key_node, _join(path, key), f"duplicate key (first at {line}:{col})")
            continue
        seen[key] = key_node
        yield key, key_node, value
    for key, key_node, value in merged:
        if key not in seen:
            seen[key] = key_node
            yield key, key_node, value


def _merged(
    merge_key: Node, value: Node, path: str, problems: Problems, active: frozenset[int]
) -> Iterator[Entry]:
    if len(active) > MAX_MERGE_DEPTH:
        problems.add(merge_key, path, f"merge keys (<<) nest more than {MAX_MERGE_DEPTH} deep")
        return
    sources = value.value if isinstance(value, SequenceNode) else [value]
    merges = problems.merges
    for source in sources:
        if not isinstance(source, MappingNode) or id(source) in active:
            problems.add(source, path, "a merge key (<<) needs a mapping or a list of mappings")
            continue
        entries = merges.expanded.get(id(source))
        if entries is None:
            entries = merges.expanded[id(source)] = list(pairs(source, path, problems, active))
        if not merges.spend(len(entries), merge_key, path, problems):
            return
        yield from entries


def _key(node: Node, path: str, problems: Problems) -> str | None:
    if isinstance(node, ScalarNode) and node.tag == STR_TAG:
        return node.value
    if isinstance(node, ScalarNode) and is_plain(node):
        problems.add(
            node,
            path,
            f"YAML reads the unquoted key {node.value} as a {node.tag.rsplit(':', 1)[-1]},"
            f' not a name; put it in quotes: "{node.value}"',
        )
    else:
        problems.add(node, path, "expected a string as key")
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
