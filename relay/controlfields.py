"""The ERP's own header fields that decide something: the user (the identify
header), the document type (a classify rule's ``header``) or the Reply-To (a
``header:`` source). With two different values of one, which decided was
whichever the relay read first, and nobody was told."""

from __future__ import annotations

from relay.errors import Rejected
from relay.message import MessageView
from relay.policy.values import is_message_header


def refuse_differing(view: MessageView, name: str, read_for: str) -> None:
    """Refused as a second Subject is (``pipeline``), not read first-wins. A
    field of the message itself (``Keywords``, ``Received``) may be there
    many times, each meant: a rule matches any. The same value twice is one
    value, as an ERP that writes its header twice means."""
    if is_message_header(name):
        return
    found = view.get_all(name)
    if len({value.strip() for value in found}) > 1:
        raise Rejected(
            550,
            "5.6.0",
            f"Header field {name} appears {len(found)} times with different values;"
            f" the relay reads it {read_for} and cannot tell which one is meant",
        )
