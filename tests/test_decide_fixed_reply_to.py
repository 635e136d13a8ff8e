"""A fixed Reply-To address in the policy, with the name of the desk behind it."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import PolicyError
from relay.policy.load import load
from relay.policy.model import ReplyToKind, ReplyToSource
from tests.test_decisions import BASE, header, msg, run

CHAIN = "quote: [keep]"


def fixed(policy_file: Path, item: str) -> Path:
    policy_file.write_text(policy_file.read_text().replace(CHAIN, f"quote: [{item}]"))
    return policy_file


@pytest.mark.parametrize(
    ("item", "source", "reply_to"),
    [
        (
            "'Office Desk <desk@acme.example>'",
            ReplyToSource(ReplyToKind.ADDRESS, "desk@acme.example", "Office Desk"),
            "Office Desk <desk@acme.example>",
        ),
        (
            """'"Desk, Office" <desk@acme.example>'""",
            ReplyToSource(ReplyToKind.ADDRESS, "desk@acme.example", "Desk, Office"),
            '"Desk, Office" <desk@acme.example>',
        ),
        (
            "desk@acme.example",
            ReplyToSource(ReplyToKind.ADDRESS, "desk@acme.example"),
            "desk@acme.example",
        ),
        (  # read as a header's: the escapes were kept, then escaped again
            """'"Sales \\"East\\"" <desk@acme.example>'""",
            ReplyToSource(ReplyToKind.ADDRESS, "desk@acme.example", 'Sales "East"'),
            '"Sales \\"East\\"" <desk@acme.example>',
        ),
        (  # as written: an @ or a comment is no reason to drop the name
            "'Support @ Acme (Sales) <desk@acme.example>'",
            ReplyToSource(ReplyToKind.ADDRESS, "desk@acme.example", "Support @ Acme (Sales)"),
            '"Support @ Acme (Sales)" <desk@acme.example>',
        ),
    ],
)
def test_a_fixed_reply_to_may_carry_a_name(
    policy_file: Path, item: str, source: ReplyToSource, reply_to: str
) -> None:
    """``'Office Desk <desk@...>' is not an address`` was all the policy said."""
    policy = fixed(policy_file, item)
    assert load(policy).tenants["acme"].reply_to["quote"] == (source,)
    base = [f for f in BASE if not f.startswith("Subject")]
    p = run(policy, msg(*base, "Subject: Quote 5"))
    assert header(p, "Reply-To") == reply_to
    assert f"Reply-To from fixed address: {reply_to}" in p.decision.reasons


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("'Office Desk <desk@>'", "'Office Desk <desk@>' is not an address like name@example.com"),
        ("'Desk <desk@acme.example'", "is not an address like name@example.com"),
    ],
)
def test_a_fixed_reply_to_that_is_no_mailbox_is_refused(
    policy_file: Path, item: str, problem: str
) -> None:
    with pytest.raises(PolicyError) as caught:
        load(fixed(policy_file, item))
    (said,) = caught.value.problems
    assert "tenants.acme.reply_to.quote[0]: " in said and problem in said
