"""Which kind of document a message carries (invoice, quote, ...).

The document type selects the Reply-To chain and the automatic BCC. Rules
are tried in policy order and the first whose conditions all match wins, so
a sysadmin can put precise rules (an ERP header) before loose ones (subject
words in several languages).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.controlfields import refuse_differing
from relay.message import MessageView
from relay.policy.model import DEFAULT_DOC_TYPE, Condition, ConditionKind, DocumentRule
from relay.policy.values import is_message_header


@dataclass(frozen=True)
class Classification:
    doc_type: str
    rule: str | None  # id of the rule that matched
    reason: str


def classify(rules: tuple[DocumentRule, ...], view: MessageView) -> Classification:
    for rule in rules:
        evidence = _evidence(rule, view)
        if evidence is not None:
            why = " and ".join(e for e in evidence if e)
            return Classification(rule.doc_type, rule.id, f"rule {rule.id!r}: {why}")
    return Classification(DEFAULT_DOC_TYPE, None, f"no rule matched; type {DEFAULT_DOC_TYPE!r}")


def _evidence(rule: DocumentRule, view: MessageView) -> list[str] | None:
    """What each condition matched, in the rule's order; None at the first that
    does not. Attachment names are looked for last: they need the message's
    MIME structure parsed, which for a message of 25 MB takes a third of a
    second and some 200 MB, and a rule whose subject failed needs none of it."""
    found: dict[int, str] = {}
    cheap_first = sorted(
        enumerate(rule.conditions), key=lambda item: item[1].kind is ConditionKind.ATTACHMENT
    )
    for index, condition in cheap_first:
        evidence = _match(condition, view)
        if evidence is None:
            return None
        found[index] = evidence
    return [found[index] for index in sorted(found)]


def _match(condition: Condition, view: MessageView) -> str | None:
    """What matched, as evidence for the reasons, or None when nothing did.

    A field's value is matched without the white space around it, as the
    identify header is read: an ERP that pads a fixed-width field
    (``invoice  ``) or folds right after the colon means the same value,
    and an anchored pattern (``^invoice$``) must not miss it. An attachment
    is named with its file: among several PDFs, the pattern alone did not
    say which one made the type.
    """
    if condition.kind is ConditionKind.SUBJECT:
        candidates = [("Subject", view.subject.strip())]
    elif condition.kind is ConditionKind.HEADER:
        if not is_message_header(condition.header):  # Keywords, Received: each meant, any matches
            refuse_differing(view, condition.header, "for the document type")
        candidates = [(condition.header, v.strip()) for v in view.get_all(condition.header)]
    else:
        candidates = [(f"attachment {name!r}", name) for name in view.attachments]
    for label, value in candidates:
        found = condition.pattern.search(value)
        if found:
            return f"{label} matches {found.group(0)!r}"
    return None
