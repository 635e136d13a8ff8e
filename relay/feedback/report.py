"""What a bounce or a complaint says, as the rest of the relay needs it."""

from __future__ import annotations

from dataclasses import dataclass

BOUNCE = "bounce"
COMPLAINT = "complaint"
DEFAULT_RECIPIENTS = 100  # the listeners' max_recipients when the policy has none
MOST_RECIPIENTS = DEFAULT_RECIPIENTS + 1  # a message's most, the sender's copy with them


@dataclass(frozen=True)
class Failure:
    """One recipient a report is about. ``status`` is the RFC 3463 code when the
    report gives one (``5.1.1``); ``diagnostic`` the receiving server's text."""

    recipient: str
    status: str | None = None
    diagnostic: str | None = None


@dataclass(frozen=True)
class Report:
    """A bounce (``kind`` BOUNCE: permanent failures only; delays and successes
    are not reports the relay acts on) or a complaint (COMPLAINT, with its
    ``feedback_type``: abuse, fraud, ...). ``message_id`` and ``envelope_id``
    are the original message's, as the report returned them,
    to find it in the audit log; ``queue_ids`` the IDs its returned Received
    fields name (``id …``), the relay's own queue ID among them when the
    header came back whole. ``unread``: recipients' status blocks past the
    most the relay acts on, not read."""

    kind: str
    failures: tuple[Failure, ...]
    message_id: str | None = None
    envelope_id: str | None = None
    feedback_type: str | None = None
    queue_ids: tuple[str, ...] = ()
    unread: int = 0
