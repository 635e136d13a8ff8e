"""Every reply but the greeting and HELO's and EHLO's carries an RFC 3463
enhanced status code, as the EHLO reply's ENHANCEDSTATUSCODES promises (RFC 2034)."""

from __future__ import annotations

import ast
import inspect
import re

import aiosmtpd.smtp
import pytest

from relay.ingress import protocol
from tests.ingress_harness import Raw, Relay
from tests.minimal_policy import listener

CODED = re.compile(r"[245][0-9][0-9] [245]\.[0-9]{1,3}\.[0-9]{1,3} ")

# Commands that between them reach every reply aiosmtpd words itself, each
# group on a connection of its own, to stay below the hard error limit.
GROUPS = [
    [b"MAIL FROM:<a@b.example>", b"AUTH PLAIN", b"HELO", b"HELO client.example", b"AUTH A B C"],
    [b"EHLO", b"EHLO client.example", b"", b"\xff", b"BDAT 10", b"EXPN x", b"NOOP", b"HELP"],
    [b"EHLO client.example", b"HELP MAIL", b"HELP BOGUS", b"VRFY", b"VRFY <a@b.example>"],
    [b"EHLO client.example", b"VRFY <<>", b"STARTTLS", b"STARTTLS x", b"AUTH", b"AUTH A B C"],
    [b"EHLO client.example", b"AUTH NONE", b"RCPT TO:<a@b.example>", b"DATA", b"MAIL"],
    [
        b"EHLO client.example",
        b"MAIL TO:<a@b.example>",
        b"MAIL FROM:<a@b.example> BODY=9BIT",
        b"MAIL FROM:<a@b.example> SMTPUTF8=x",
        b"MAIL FROM:<a@b.example> SIZE=999999999",
    ],
    [
        b"EHLO client.example",
        b"MAIL FROM:<a@b.example>",
        b"MAIL FROM:<>",
        b"RCPT",
        b"RCPT FROM:<a@b.example>",
        b"DATA",
        b"RCPT TO:<a@b.example>",
        b"DATA x",
        b"RSET x",
        b"RSET",
        b"QUIT x",
        b"QUIT",
    ],
]


def _uncoded(command: bytes, reply: str) -> bool:
    """Without a code where RFC 2034 wants one: the greeting and HELO's and
    EHLO's replies need none, and a 3xx has no class of codes."""
    greeted = command.startswith((b"HELO ", b"EHLO ")) and reply.startswith("250")
    return not CODED.match(reply) and not greeted and not reply.startswith("354 ")


@pytest.mark.parametrize("group", GROUPS)
def test_every_reply_a_session_can_get_has_a_code(group: list[bytes]) -> None:
    """aiosmtpd's own said ``503 Error: need MAIL command``, ``500 Error: bad
    syntax`` and the like."""
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        replies = {command: raw.cmd(command) for command in group}
    assert {command: reply for command, reply in replies.items() if _uncoded(command, reply)} == {}


def test_the_ehlo_reply_offers_enhanced_status_codes() -> None:
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        assert "250-ENHANCEDSTATUSCODES" in raw.ehlo()


def test_replies_that_were_wrong_beside_their_lack_of_code() -> None:
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        assert raw.cmd(b"AUTH PLAIN") == "503 5.5.1 Error: send HELO first"
        raw.ehlo()
        assert raw.cmd(b"AUTH") == "501 5.5.4 Syntax: AUTH <mechanism> [initial-response]"
        assert raw.cmd(b"BDAT 10") == '500 5.5.2 Error: command "BDAT" not recognized'
        assert raw.cmd(b"HELP NOOP") == "214 2.0.0 Syntax: NOOP [ignored]"


def test_help_gives_the_syntax_a_refusal_gives() -> None:
    """HELP said ``MAIL FROM: <address>``, with a space the refusals had lost."""
    mail = "Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
    rcpt = "Syntax: RCPT TO:<address> [SP <mail-parameters>]"
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"HELP MAIL") == f"214 2.0.0 {mail}"
        assert raw.cmd(b"MAIL TO:<a@b.example>") == f"501 5.5.4 {mail}"
        assert raw.cmd(b"MAIL FROM:<a@b.example>").startswith("250")
        assert raw.cmd(b"HELP RCPT") == f"214 2.0.0 {rcpt}"
        assert raw.cmd(b"RCPT FROM:<a@b.example>") == f"501 5.5.4 {rcpt}"


@pytest.mark.parametrize("topic", [b"FOO", b"STARTTLS"])
def test_help_on_a_topic_it_has_none_for_is_a_504(topic: bytes) -> None:
    """It was a 501, a syntax error, carrying the list HELP alone gives."""
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"HELP " + topic) == (
            "504 5.5.4 HELP topic unknown; HELP alone lists the commands"
        )
        assert raw.cmd(b"HELP").startswith("214 2.0.0 Supported commands: AUTH DATA ")


def _pushed_literals() -> set[str]:
    """aiosmtpd's replies written as literals, an f-string's fields as ``{}``."""
    tree = ast.parse(inspect.getsource(aiosmtpd.smtp))
    parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in parts
        ):
            text = node.value
        else:
            continue
        if re.match(r"[245][0-9][0-9] ", text):
            found.add(text)
    return found


# The greeting, HELO's and EHLO's last line, and HELP's, which the relay words itself.
EXEMPT = {"220 {} {}", "250 {}", "250 HELP", "250 Syntax: "}


def test_every_reply_aiosmtpd_words_is_coded_or_given_a_code() -> None:
    """So that a reply of another aiosmtpd release is not sent without a code
    behind ENHANCEDSTATUSCODES unnoticed: a success must be in the table, an
    error at least gets a code by its reply code."""
    better = protocol.RelaySMTP(None, listener_name="x", allow=(), connections=set())._better
    given = {literal: better.get(literal, literal) for literal in _pushed_literals() - EXEMPT}
    coded = {
        literal: reply if reply[0] == "2" or CODED.match(reply) else protocol._with_code(reply)
        for literal, reply in given.items()
    }
    assert {literal: reply for literal, reply in coded.items() if not CODED.match(reply)} == {}
    assert len(coded) > 40


@pytest.mark.parametrize(
    ("reply", "coded"),
    [
        ('500 Error: command "X" not recognized', '500 5.5.2 Error: command "X" not recognized'),
        ("502 Could not VRFY x", "502 5.5.1 Could not VRFY x"),
        ("451 Something", "451 4.0.0 Something"),
    ],
)
def test_an_error_reply_with_a_variable_part_gets_a_code(reply: str, coded: str) -> None:
    assert protocol._with_code(reply) == coded
