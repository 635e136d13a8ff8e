"""The ERP's own header fields that decide something: the user (the identify
header), the document type (a classify rule's ``header``) or the Reply-To (a
``header:`` source). With two different values of one, which decided was
whichever the relay read first, and nobody was told."""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable

from relay import headers
from relay.errors import Rejected
from relay.message import MessageView, address_list, decode

_SPACES = re.compile(r"\s+")


def refuse_differing(
    view: MessageView,
    name: str,
    read_for: str,
    meaning: Callable[[str], Hashable | None] = lambda written: None,
) -> None:
    """Refused as a second Subject is (``pipeline``), not read first-wins. Two
    values are one where they mean the same: the same user (``meaning``:
    ``kari``, ``Kari`` and her alias's address), the same address a Reply-To
    source takes, or the same words in any case and spacing, as an ERP that
    writes its header twice means. ``meaning`` is given each value as
    written: decoded first, a comma or ``@`` in an encoded word of a name
    split it into mailboxes of its own."""
    found = [value for field, value in view.written if field.lower() == name.lower()]
    if len(found) < 2:
        return
    if len({meaning(value) or _words(decode(value)) for value in found}) > 1:
        raise Rejected(
            550,
            "5.6.0",
            f"Header field {name} appears {len(found)} times with different values;"
            f" the relay reads it {read_for} and cannot tell which one is meant",
        )


def first_address(written: str) -> str | None:
    """What a Reply-To source's value means: the address it takes from it, the
    first SMTP can deliver to, however its name is written."""
    for _, address in address_list(written):
        if headers.deliverable(address):
            return address.lower()
    return None


def _words(value: str) -> str:
    return _SPACES.sub(" ", value.strip()).casefold()
