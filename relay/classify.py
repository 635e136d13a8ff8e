"""Which kind of document a message carries (invoice, quote, ...).

The document type selects the Reply-To chain and the automatic BCC. Rules
are tried in policy order and the first whose conditions all match wins, so
a sysadmin can put precise rules (an ERP header) before loose ones (subject
words in several languages).
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.message import MessageView
from relay.policy.model import DEFAULT_DOC_TYPE, Condition, ConditionKind, DocumentRule


@dataclass(frozen=True)
class Classification:
    doc_type: str
    rule: str | None  # id of the rule that matched
    reason: str


def classify(rules: tuple[DocumentRule, ...], view: MessageView) -> Classification:
    for rule in rules:
        evidence = [_match(c, view) for c in rule.conditions]
        if all(e is not None for e in evidence):
            why = " and ".join(e for e in evidence if e)
            return Classification(rule.doc_type, rule.id, f"rule {rule.id!r}: {why}")
    return Classification(DEFAULT_DOC_TYPE, None, f"no rule matched; type {DEFAULT_DOC_TYPE!r}")


def _match(condition: Condition, view: MessageView) -> str | None:
    """What matched, as evidence for the reasons, or None when nothing did."""
    if condition.kind is ConditionKind.SUBJECT:
        candidates = [("Subject", view.subject)]
    elif condition.kind is ConditionKind.HEADER:
        candidates = [(condition.header, v) for v in view.get_all(condition.header)]
    else:
        candidates = [("attachment", name) for name in view.attachments]
    for label, value in candidates:
        found = condition.pattern.search(value)
        if found:
            return f"{label} matches {found.group(0)!r}"
    return None
