"""Indentation slips in the policy YAML, in a sysadmin's words.

A key one space out of line makes PyYAML say ``did not find expected key``
or ``mapping values are not allowed in this context``, with the place right
but no word of indentation, naming (if anything) a block that the line
does not belong to. The blocks still open above the line, as the scanner
saw them, say which indentations the line could have had.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from relay.quantity import quantity

# what the parser says at a line indented to no open block's keys (libyaml,
# then PyYAML's own parser), and at one indented more than its block's keys
# after a plain value, which it reads as more of that value
_MATCHES_NO_BLOCK = (
    "did not find expected key",
    "did not find expected '-' indicator",
    "expected <block end>, but found",
)
_MORE_OF_A_VALUE = (
    "mapping values are not allowed in this context",
    "mapping values are not allowed here",
)
_CHECK_ABOVE = "check the indentation of the lines above it"


@dataclass
class _Block:
    """A block mapping or list still open: where its first key or '-' is."""

    line: int  # 1-based
    indent: int  # spaces before its keys or its '-'
    path: str  # as the policy's problems name keys: listeners[0].port
    is_list: bool
    key: str = ""  # a mapping's latest key
    items: int = 0  # a list's items so far
    indentless: bool = False  # a list whose '-' are at its key's indentation
    keys: int = 0  # a mapping's keys so far
    step: int | None = None  # how much deeper than the mapping it is a value in

    def named(self) -> str:
        if self.is_list:
            return f"the items ('-') of {self.path}" if self.path else "the top-level items"
        return f"the keys of {self.path}" if self.path else "the top-level keys"

    def said(self) -> str:
        return f"{self.named()}, from line {self.line}, are {_indented(self.indent)}"


def explain(
    text: str,
    problem: str | None,
    stop: yaml.Mark | None,
    loader: type,
    lost_colon: int | None = None,
) -> tuple[tuple[int, int], str] | None:
    """(line, column), 1-based, of the line a syntax error stopped on, and what
    is wrong with its indentation; None when the error is not about that.
    ``lost_colon``: the line of a list item of one word that may as well be
    the slip, a key whose ':' was left out, which is then said too."""
    if stop is None or problem is None:
        return None
    lines = text.split("\n")
    if stop.line >= len(lines):
        return None
    line = lines[stop.line]
    indent = indent_of(line)
    before = line[indent : stop.column]
    if problem.startswith(_MATCHES_NO_BLOCK) and not before:
        deeper_only = False
    elif problem in _MORE_OF_A_VALUE and _plain_key(before):
        deeper_only = True
    else:
        return None
    seen: list[_Block] = []
    blocks = _open_blocks(text, stop.line, loader, seen)
    if not blocks:
        return None
    moved = _key_far_from_dash(lines, stop.line, indent, blocks) or _first_item_moved(
        lines, stop.line, indent, blocks
    )
    if moved is not None:
        return moved
    lost = (
        None if lost_colon is None else f"the item on line {lost_colon} is a key that lost its ':'"
    )
    either = None
    if indent > blocks[-1].indent:
        early, either = _ended_early(text, lines, stop.line, indent, blocks, loader)
        if early is not None:
            return early if lost is None else (early[0], f"{early[1]}, or {lost}")
    above = lost or either or _CHECK_ABOVE
    keyed = deeper_only and not before.startswith("- ")
    said = (
        _said_of_key(blocks, indent, seen, above)
        if keyed
        else _said(blocks, indent, deeper_only, seen, above)
    )
    return None if said is None else ((stop.line + 1, indent + 1), said)


def _ended_early(
    text: str, lines: list[str], line: int, indent: int, blocks: list[_Block], loader: type
) -> tuple[tuple[tuple[int, int], str] | None, str | None]:
    """The line above, when it may be the slip: indented less than the block it
    was in, it ended that block, and the parser stops at the next line, right
    where it is, as deeper than the block the line above went back to.

    The lines after tell: going on as the stopped line is indented, or as a
    block the line above ended (the rest of the block it left), the line above
    is named (first of the pair); going back to where the line above is, it may
    as well be right and the stopped line too deep, so the stopped line is
    named with the line above as the other way (second of the pair)."""
    above = next((n for n in range(line - 1, -1, -1) if has_text(lines[n])), None)
    if above is None:
        return None, None
    its = indent_of(lines[above])
    before = _open_blocks(text, above, loader)
    kept = 0
    while kept < min(len(before), len(blocks)) and _same(before[kept], blocks[kept]):
        kept += 1
    ended = next((b for b in before[kept:] if b.indent == indent and its < indent), None)
    if ended is None:
        return None, None
    after = _indent_after(lines, line)
    if after is not None and (after == indent or after in {b.indent for b in before[kept:]}):
        said = (
            f"the indentation of this line ({_spaces(its)}) ends {ended.named()}, from line"
            f" {ended.line} ({_spaces(ended.indent)}), but line {line + 1} below it is"
            f" indented as they are: indent this line as they are, or line {line + 1} as the"
            " block it belongs to"
        )
        return ((above + 1, its + 1), said), None
    return None, (
        f"line {above + 1} above it, which ends {ended.named()}, from line {ended.line}"
        f" ({_spaces(ended.indent)}), belongs in that block"
    )


def _first_item_moved(
    lines: list[str], line: int, indent: int, blocks: list[_Block]
) -> tuple[tuple[int, int], str] | None:
    """A list's first item, when it is the slip: its key is out of line with the
    item's keys under it, from the stopped line on, which agree with each other.
    The parser stops at the first of those, which is right, and the list's
    indentation is that item's alone, so nothing else tells where it belongs."""
    if len(blocks) < 2 or blocks[-1].is_list or not blocks[-2].is_list:
        return None
    keys, items = blocks[-1], blocks[-2]
    if items.items != 1 or keys.keys != 1 or keys.line != items.line:
        return None
    item = keys.line - 1
    under = next((n for n in range(item + 1, line + 1) if has_text(lines[n])), None)
    if under != line or indent == keys.indent or _indent_after(lines, line) != indent:
        return None
    if _another_item(lines, line, indent, items.indent):
        return None  # its '-' is where the list's next one is: the keys moved, not it
    dash = indent - (keys.indent - items.indent)
    outer = blocks[-3] if len(blocks) > 2 else None
    if dash < 0 or (outer is not None and dash <= outer.indent):
        return None  # or at its key's indentation, which the lines may as well be wrong for
    its = indent_of(lines[item])
    which = f"the first item of {items.path}" if items.path else "the first item"
    move = f"indent this line {_spaces(dash)}" if dash else "do not indent this line"
    said = (
        f"the indentation of this line ({_spaces(its)}), {which}, puts its key"
        f" {_spaces(keys.indent)} in, but the item's other keys, from line {line + 1}, are"
        f" indented {_spaces(indent)}: {move}, so that its key is where they are, or indent"
        " them as its key"
    )
    return (item + 1, its + 1), said


def _key_far_from_dash(
    lines: list[str], line: int, indent: int, blocks: list[_Block]
) -> tuple[tuple[int, int], str] | None:
    """An item's key written more than one space after its '-' (``-  id: x``),
    when that is the slip: the item's next key, on the stopped line, is where the
    first key would be with fewer spaces. Moving the '-', or every other key,
    as told for an item moved whole, left the list unlike the rest of the file."""
    if len(blocks) < 2 or blocks[-1].is_list or not blocks[-2].is_list:
        return None
    keys, items = blocks[-1], blocks[-2]
    item = keys.line - 1
    text = lines[item]
    its = indent_of(text)
    if keys.keys != 1 or its != items.indent or not text[its:].startswith("-"):
        return None
    if text[its + 1 : keys.indent].strip() or not its + 1 < indent < keys.indent:
        return None
    under = next((n for n in range(item + 1, line + 1) if has_text(lines[n])), None)
    after = _indent_after(lines, line)
    if under != line or not (after is None or after == indent or after <= items.indent):
        return None
    named = f"the first item of {items.path}" if items.path else "the first item"
    if items.items > 1:
        named = f"item {items.path}[{items.items - 1}]"
    them = ", or indent them as its key" if after == indent else ""
    said = (
        f"the key of this line, {named}, is {_spaces(keys.indent - its - 1)} after its '-'"
        f" ({_spaces(keys.indent)} in), but the item's other keys, from line {line + 1}, are"
        f" indented {_spaces(indent)}: delete {_spaces(keys.indent - indent)} after the '-',"
        f" so that its key is where they are{them}"
    )
    return (item + 1, its + 2), said


def _another_item(lines: list[str], line: int, indent: int, dash: int) -> bool:
    """Whether the first line after ``line`` (0-based) less indented than
    ``indent`` is another item of a list whose '-' are ``dash`` spaces in."""
    for text in lines[line + 1 :]:
        if has_text(text) and indent_of(text) < indent:
            return indent_of(text) == dash and text.lstrip(" ").startswith("-")
    return False


def _indent_after(lines: list[str], line: int) -> int | None:
    """The indentation the file goes on at after ``line`` (0-based): the lines
    deeper than it are its own value's, and say nothing of where it belongs."""
    own = indent_of(lines[line])
    for text in lines[line + 1 :]:
        if has_text(text) and indent_of(text) <= own:
            return indent_of(text)
    return None


def has_text(line: str) -> bool:
    """Whether the line holds more than blanks or a comment."""
    text = line.strip()
    return bool(text) and not text.startswith("#")


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _same(one: _Block, other: _Block) -> bool:
    return (one.line, one.indent, one.is_list) == (other.line, other.indent, other.is_list)


def _plain_key(before: str) -> bool:
    """Whether the text before the parser's stop, past the indentation, is a
    key as the line's first thing (an item's, after '- ')."""
    key = before[2:] if before.startswith("- ") else before
    return bool(key.strip()) and ":" not in key and key[0] not in "\"'[{|>&*!%@`#-"


def _said_of_key(
    blocks: list[_Block], indent: int, seen: list[_Block], above: str = _CHECK_ABOVE
) -> str | None:
    """For a key read as more of the value above it: under a list's item, the
    block it could belong to is a mapping the list is in, not the list."""
    innermost = blocks[-1]
    mapping = next((b for b in reversed(blocks) if not b.is_list and b.indent < indent), None)
    if not innermost.is_list or indent <= innermost.indent or mapping is None:
        return _said(blocks, indent, True, seen, above)
    return (
        f"the indentation of this line ({_spaces(indent)}) is deeper than {innermost.named()},"
        f" from line {innermost.line} ({_spaces(innermost.indent)}), so it reads as more of"
        f" the item above it, but it is a key: {mapping.said()}; indent it as they are,"
        f" or {above}"
    )


def _said(
    blocks: list[_Block],
    indent: int,
    deeper_only: bool,
    seen: list[_Block],
    above: str = _CHECK_ABOVE,
) -> str | None:
    innermost = blocks[-1]
    if indent > innermost.indent:
        astray = _first_key_astray(blocks, len(blocks) - 1, indent, seen)
        otherwise = (
            above
            if astray is None
            else f"the block's first key, on line {astray.line}, is indented wrongly"
        )
        return (
            f"the indentation of this line ({_spaces(indent)}) does not match the block it"
            f" is in: {innermost.said()}; indent it as they are, or {otherwise}"
        )
    if deeper_only:
        return None
    outer = next((b for b in reversed(blocks) if b.indent <= indent), None)
    if outer is innermost and outer.is_list and outer.indent == indent:
        return (
            f"the indentation of this line ({_spaces(indent)}) is that of {outer.named()},"
            f" from line {outer.line}, but it is no item: start it with '- ', or indent it"
            " as the block it belongs to"
        )
    if outer is innermost:  # the line's own block: the slip is not its indentation
        return None
    inner = next(b for b in blocks if b.indent > indent)
    if outer is not None and outer.indent == indent:
        if outer.is_list:
            what, otherwise = "no item", ", or start a new item with '- '"
        elif inner.is_list:
            what, otherwise = "an item ('-')", ""
        else:
            return None
        return (
            f"the indentation of this line ({_spaces(indent)}) is that of {outer.named()},"
            f" from line {outer.line}, but it is {what}: indent it as {inner.named()},"
            f" from line {inner.line} ({_spaces(inner.indent)}){otherwise}"
        )
    them = inner.said() if outer is None else f"{inner.said()}, {outer.said()}"
    astray = _first_key_astray(blocks, blocks.index(inner), indent, seen)
    otherwise = (
        ""
        if astray is None
        else f", or the first key of {astray.path}, on line {astray.line}, is indented wrongly"
    )
    return (
        f"the indentation of this line ({_spaces(indent)}) does not match any block it"
        f" could belong to: {them}; indent it as the ones it belongs with{otherwise}"
    )


def _first_key_astray(
    blocks: list[_Block], at: int, indent: int, seen: list[_Block]
) -> _Block | None:
    """blocks[at], when its indentation is its first key's alone and that key,
    not the line, may be the slip: the line is as much deeper than the mapping
    around as the file's other blocks are (2 or 4 spaces in a file with no
    other), and the first key is not."""
    block = blocks[at]
    if at == 0 or block.is_list or block.keys != 1 or block.step is None:
        return None
    steps = {b.step for b in seen if b.step is not None and b is not block}
    step = indent - blocks[at - 1].indent
    return block if step in (steps or {2, 4}) and block.step not in steps else None


def _open_blocks(
    text: str, line: int, loader: type, seen: list[_Block] | None = None
) -> list[_Block]:
    """The block mappings and lists open at the end of the line before ``line``
    (0-based), outermost first, each named by its key path; ``seen`` gets every
    block opened before it, ended or not.

    A list whose '-' are not indented under its key has no start or end of its
    own in the scanner's tokens: it starts at its first '-' and ends at the
    next key of the mapping it is in, or with that mapping."""
    blocks: list[_Block] = []
    path = ""  # of the value the next block would be
    flow = 0  # within [...] or {...}: keys there are no block's
    after_key = False
    try:
        for token in yaml.scan(text, Loader=loader):
            if token.start_mark.line >= line:
                break
            if isinstance(token, yaml.BlockEndToken | yaml.KeyToken) and not flow:
                while blocks and blocks[-1].indentless:
                    blocks.pop()
            top = blocks[-1] if blocks else None
            if isinstance(token, yaml.BlockMappingStartToken | yaml.BlockSequenceStartToken):
                mark = token.start_mark
                is_list = isinstance(token, yaml.BlockSequenceStartToken)
                step = None if top is None or top.is_list else mark.column - top.indent
                blocks.append(_Block(mark.line + 1, mark.column, path, is_list, step=step))
                if seen is not None:
                    seen.append(blocks[-1])
            elif isinstance(token, yaml.BlockEndToken) and blocks:
                blocks.pop()
            elif isinstance(token, yaml.FlowMappingStartToken | yaml.FlowSequenceStartToken):
                flow += 1
            elif isinstance(token, yaml.FlowMappingEndToken | yaml.FlowSequenceEndToken):
                flow -= 1
            elif flow or top is None:
                pass
            elif isinstance(token, yaml.BlockEntryToken):
                if not top.is_list:
                    mark = token.start_mark
                    top = _Block(mark.line + 1, mark.column, path, True, indentless=True)
                    blocks.append(top)
                path = f"{top.path}[{top.items}]"
                top.items += 1
            elif isinstance(token, yaml.KeyToken) and not top.is_list:
                top.keys += 1
            elif isinstance(token, yaml.ScalarToken) and after_key and not top.is_list:
                top.key = token.value
            elif isinstance(token, yaml.ValueToken) and not top.is_list:
                path = f"{top.path}.{top.key}" if top.path else top.key
            # a key's anchor (&name) or tag (!!str) comes between it and its text
            props = yaml.AnchorToken | yaml.TagToken
            after_key = isinstance(token, yaml.KeyToken) or (after_key and isinstance(token, props))
    except yaml.YAMLError:
        pass  # the error being explained, or one after it: the blocks before it are read
    return blocks


def _spaces(n: int) -> str:
    return "none" if n == 0 else quantity(n, "space")


def _indented(n: int) -> str:
    return f"indented {_spaces(n)}" if n else "not indented"
