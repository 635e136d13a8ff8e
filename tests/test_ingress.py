"""The SMTP side over real sockets: smtplib, raw bytes and swaks against ``relay.ingress``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from relay.errors import Rejected
from relay.ingress import content, listen, protocol
from relay.ingress.authlimit import AuthFailures
from relay.ingress.protocol import RelaySMTP
from relay.passwd import hash_password
from relay.policy.model import AuthMode, TlsFiles
from relay.policy.tlspair import read_pair
from tests.certs import make_certs
from tests.ingress_harness import Raw, Recorder, Relay, swaks
from tests.minimal_policy import listener, policy

MESSAGE = (
    b"From: Jan <jan@acme.example>\r\n"
    b"To: one@example.org\r\n"
    b"Subject: Invoice 4711\r\n"
    b"\r\n"
    b"Hello,\r\n"
    b".leading dot survives\r\n"
    b"\xc3\x86 8-bit body\r\n"
)


@pytest.fixture
def relay() -> Iterator[Relay]:
    with Relay([listener()]) as running:
        yield running


def plain(login: str, password: str) -> str:
    return base64.b64encode(f"\0{login}\0{password}".encode()).decode()


# --- the normal path -------------------------------------------------------------


def test_message_reaches_process_exactly(relay: Relay) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.mail("erp@acme.example")
        client.rcpt("one@example.org")
        client.rcpt("two@example.org")
        code, reply = client.data(MESSAGE)
    assert (code, reply) == (250, b"2.0.0 Ok: queued as TEST")
    ((got_policy, sub),) = relay.process.calls
    assert got_policy is relay.policy
    assert sub.listener == "test"
    assert sub.client_address == "127.0.0.1"
    assert sub.auth_login is None
    assert sub.mail_from == "erp@acme.example"
    assert sub.rcpt_tos == ("one@example.org", "two@example.org")
    assert sub.data == MESSAGE


def only_connection(relay: Relay, raw: Raw) -> RelaySMTP:
    """The protocol object serving ``raw``, the relay's one connection."""
    raw.ehlo()
    assert relay.ingress is not None
    (protocol,) = relay.ingress.connections
    return protocol


def test_the_short_dir_lists_every_hook_aiosmtpd_looks_for(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        protocol = only_connection(relay, raw)
        handler = protocol.event_handler
        for obj, prefixes in ((protocol, ("auth_", "smtp_")), (handler, ("auth_", "handle_"))):
            full = [name for name in object.__dir__(obj) if name.startswith(prefixes)]
            assert sorted(full) == dir(obj)
        assert {"DATA", "MAIL", "RCPT", "EHLO", "AUTH", "STARTTLS"} <= protocol._smtp_methods.keys()
        assert {"PLAIN", "LOGIN"} <= protocol._auth_methods.keys()
        assert {"DATA", "EHLO", "MAIL", "RCPT"} <= protocol._handle_hooks.keys()


def test_a_hook_set_on_the_handler_itself_is_found(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        handler = only_connection(relay, raw).event_handler

    async def handle_NOOP(server: object, session: object, envelope: object, arg: str) -> str:
        return "250 2.0.0 hooked"

    handler.handle_NOOP = handle_NOOP
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"NOOP") == "250 2.0.0 hooked"


def test_the_ehlo_reply_goes_to_aiosmtpd_as_one_write(relay: Relay) -> None:
    lines = ["250-relay.test.example", "250-SIZE 100000", "250-AUTH LOGIN PLAIN", "250 HELP"]
    with Raw(relay.port) as raw:
        protocol = only_connection(relay, raw)
        hook = protocol.event_handler.handle_EHLO
        out = relay.call(hook(protocol, protocol.session, protocol.envelope, "erp", lines))
    assert out == ["\r\n".join([*lines[:-1], "250-ENHANCEDSTATUSCODES", lines[-1]])]


def test_ehlo_advertises_size_and_auth_but_not_smtputf8(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        assert raw.greeting == ["220 relay.test.example ESMTP ERP relay"]
        lines = raw.ehlo()
    keywords = [line[4:] for line in lines]
    assert "SIZE 100000" in keywords
    assert "AUTH LOGIN PLAIN" in keywords
    assert "8BITMIME" in keywords
    assert not any("SMTPUTF8" in k.upper() for k in keywords)


def test_null_sender_is_accepted_and_passed_as_empty(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<>").startswith("250")
        assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")
        _data(raw)
    assert relay.process.submissions[0].mail_from == ""


def test_policy_is_read_per_message(relay: Relay) -> None:
    first = relay.policy
    second = policy((listener(),), digest="1" * 64)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail("erp@acme.example", ["one@example.org"], MESSAGE)
        relay.policy = second
        client.sendmail("erp@acme.example", ["one@example.org"], MESSAGE)
    assert [p for p, _ in relay.process.calls] == [first, second]


# --- envelope checks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("MAIL FROM:<jørgen@acme.example>".encode(), "501 5.6.7 "),
        (b"MAIL FROM:<erp@acme.example> SMTPUTF8", "555 5.5.4 "),
    ],
)
def test_non_ascii_sender_refused(relay: Relay, command: bytes, expected: str) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        reply = raw.cmd(command)
    assert reply.startswith(expected), reply


def test_non_ascii_recipient_refused(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        reply = raw.cmd("RCPT TO:<kunde@bære.example>".encode())
    assert reply.startswith("501 5.6.7 "), reply


def test_a_non_ascii_address_is_named_in_the_reply_and_logged(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd refuses the line before MAIL or RCPT is handled: the reply did
    not say which address, and the log had no line for it."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd("MAIL FROM:<jørn@acme.example> SIZE=10".encode())
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd("rcpt to: <kåre@example.org>".encode())
        other = raw.cmd("NOOP kåre".encode())
    assert (
        sender == r"501 5.6.7 Non-ASCII address <j\xc3\xb8rn@acme.example>: SMTPUTF8 is not offered"
    )
    assert (
        recipient
        == r"501 5.6.7 Non-ASCII address <k\xc3\xa5re@example.org>: SMTPUTF8 is not offered"
    )
    assert other == "501 5.6.7 Non-ASCII characters are not allowed: SMTPUTF8 is not offered"
    assert refused_lines(caplog) == [
        rf"refused client=127.0.0.1 login=- from=<j\xc3\xb8rn@acme.example>: {sender}",
        rf"refused client=127.0.0.1 login=- from=<erp@acme.example> to=<k\xc3\xa5re@example.org>:"
        f" {recipient}",
    ]


def test_non_ascii_in_a_parameter_is_not_blamed_on_the_address(relay: Relay) -> None:
    """The address itself is ASCII: naming it as the non-ASCII one sent the ERP's
    developer after the wrong thing."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd("MAIL FROM:<erp@acme.example> ENVID=jø".encode())
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd("RCPT TO:<bob@example.org> ORCPT=rfc822;bø@example.org".encode())
        bare = raw.cmd("RCPT TO:bob@example.org ORCPT=<bø@example.org>".encode())
    generic = "501 5.6.7 Non-ASCII characters are not allowed: SMTPUTF8 is not offered"
    assert (sender, recipient, bare) == (generic, generic, generic)


def test_a_non_ascii_display_name_is_named_in_the_reply_and_logged(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused before MAIL or RCPT is handled, with a name before the path: the
    reply blamed nothing in particular, and the log had no line at all."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd('MAIL FROM:"Jørgen" <jan@acme.example>'.encode())
        unnamed = raw.cmd("MAIL FROM:<jan@acme.example> ENVID=jø".encode())
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd("RCPT TO:Kunde <kø@example.org>".encode())
    assert sender == (
        "501 5.6.7 Non-ASCII name before <jan@acme.example>: SMTPUTF8 is not offered;"
        " leave the name out of the envelope"
    )
    assert (
        recipient == r"501 5.6.7 Non-ASCII address <k\xc3\xb8@example.org>: SMTPUTF8 is not offered"
    )
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<jan@acme.example>: {sender}",
        f"refused client=127.0.0.1 login=- from=<jan@acme.example>: {unnamed}",
        rf"refused client=127.0.0.1 login=- from=<erp@acme.example> to=<k\xc3\xb8@example.org>:"
        f" {recipient}",
    ]


@pytest.mark.parametrize(
    "command",
    [
        b"MAIL FROM:jan AUTH=<kari@acme.example>",
        b"MAIL FROM:jan AUTH=<>",
        b"MAIL FROM:x AUTH=<kari@acme.example> <jan@acme.example>",
        b"MAIL FROM:<jan@acme.example> AUTH=<kari@acme.example>",
    ],
)
def test_an_auth_parameter_is_never_the_sender(
    relay: Relay, caplog: pytest.LogCaptureFixture, command: bytes
) -> None:
    """A word before ``AUTH=<…>`` was taken for a display name, and the
    parameter's address for the path: sent as kari, identified as kari, and
    delivered; before that, a refusal named the parameter's address."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        if raw.cmd(command).startswith("250"):
            assert raw.cmd(b"RCPT TO:<q4@example.org>").startswith("250")
            _data(raw)
    assert [s.mail_from for s in relay.process.submissions] in ([], ["jan@acme.example"])
    assert "from=<kari" not in caplog.text  # the command as sent may be quoted, not taken


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"MAIL FROM:<erp\racme@acme.example>", "553 5.1.7 Bad address syntax: "),
        (b"MAIL FROM:<no-domain>", "553 5.1.7 Bad address syntax: "),
        (b'MAIL FROM:<"erp@acme.example">', "553 5.1.7 Quoted local parts are not supported: "),
        (b'MAIL FROM:<"e rp"@acme.example>', "553 5.1.7 Quoted local parts are not supported: "),
        # the parser quotes a local part with a space: the reply quoted text never sent
        (b"MAIL FROM:<jan smith@acme.example>", "553 5.1.7 Bad address syntax: 'jan smith@acme"),
        (b"MAIL FROM:<erp@" + (b"d" * 60 + b".") * 5 + b"org>", "553 5.1.7 Address longer than"),
    ],
)
def test_malformed_sender_refused(
    relay: Relay, command: bytes, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        reply = raw.cmd(command)
        assert reply.startswith(expected)
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
    (line,) = refused_lines(caplog)
    assert line.startswith("refused client=127.0.0.1 login=- from=<") and line.endswith(reply)
    assert "\r" not in line


def test_a_display_name_before_the_path_is_dropped(relay: Relay) -> None:
    """As Postfix takes it (``strict_rfc821_envelopes = no``): an ERP that writes
    one was refused ``501`` at MAIL and could not send at all."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b'MAIL FROM:"Jan" <jan@acme.example>').startswith("250")
        assert raw.cmd(b"RSET").startswith("250")
        assert raw.cmd(b"MAIL FROM:Jan Janssens <jan@acme.example> SIZE=100").startswith("250")
        assert raw.cmd(b'RCPT TO: "Customer" <q4@example.org>').startswith("250")
        assert raw.cmd(b"RCPT TO:Jan J. Janssens (copy)<jan@acme.example>").startswith("250")
        # a name's non-ASCII letters as the From field writes them: encoded words
        assert raw.cmd(b"RCPT TO:=?UTF-8?Q?J=C3=B8rgen?= <q5@example.org>").startswith("250")
        _data(raw)
    (submission,) = relay.process.submissions
    assert submission.mail_from == "jan@acme.example"
    assert submission.rcpt_tos == ("q4@example.org", "jan@acme.example", "q5@example.org")


@pytest.mark.parametrize(
    "path",
    [
        b"<a<b@example.org>>",
        b"<a>b@example.org>",
        b"<q\r@example.org>",
        b'<"a b"@example.org>',
        b"<q@example.org> NOTIFY=SOMETIMES",
        b"<q@example.org> <r@example.org>",
    ],
)
def test_a_display_name_changes_no_refusal_of_the_path_after_it(relay: Relay, path: bytes) -> None:
    """The path is parsed and checked as if it stood alone: a name is no way
    around those checks."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        alone = raw.cmd(b"RCPT TO:" + path)
        named = raw.cmd(b'RCPT TO:"Customer" ' + path)
    assert alone.startswith(("501", "553", "555")), alone
    assert named == alone


SYNTAX = "501 5.5.4 Syntax: RCPT TO:<address> [SP <mail-parameters>]"


@pytest.mark.parametrize(
    "path",
    [
        b"<q4@example.org",
        b"<q4@example.org NOTIFY=NEVER",
        b'"Customer" <q4@example.org',
        b'<"q4>x"@example.org',  # the > is the quoted local part's
    ],
)
def test_a_path_not_closed_is_refused(relay: Relay, path: bytes) -> None:
    """aiosmtpd's parser took ``<q4@example.org`` for the address, and the message
    went to it: a path is ``<`` mailbox ``>`` (RFC 5321 4.1.2). At MAIL it is a
    bad sender's address (5.1.7), as other malformed senders are told."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = path.replace(b"q4@example.org", b"erp@acme.example")
        assert raw.cmd(b"MAIL FROM:" + sender) == "553 5.1.7 Error: malformed address"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:" + path) == "553 5.1.3 Error: malformed address"
        assert raw.cmd(b"RCPT TO:q4@example.org").startswith("250")  # no brackets: as before


@pytest.mark.parametrize(
    "path", [b"<jan@acme.example", b"<jan@b@acme.example>", b"<jan@>", b"<@>", b"<(x)>"]
)
def test_a_sender_the_parser_cannot_read_has_a_sender_s_status(
    relay: Relay, path: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """aiosmtpd refuses such a path with a recipient's status (5.1.3), also at
    MAIL, where ``<jan smith@acme.example>`` is told a sender's (5.1.7)."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd(b"MAIL FROM:" + path)
        assert sender == "553 5.1.7 Error: malformed address"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:" + path) == "553 5.1.3 Error: malformed address"
    assert f": {sender}" in refused_lines(caplog)[0]  # the log says what the client was told


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (b'"a<b"', SYNTAX),
        (b'"a>b"', SYNTAX),
        (b"Cus\rtomer", SYNTAX),
        (b'"Cus\x00tomer"', SYNTAX),
        (b"a@b.example", SYNTAX),
        (b'"Jan', "553 5.1.3 Quoted local parts are not supported: '\"Jan <q4@example.org>\"'"),
    ],
)
def test_a_name_that_is_no_display_name_is_refused_as_before(
    relay: Relay, name: bytes, expected: str
) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:" + name + b" <q4@example.org>") == expected


def test_a_refusal_with_no_path_found_logs_what_the_client_sent(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """It logged ``from=<?>`` alone, and the sysadmin had to guess."""
    caplog.set_level(logging.INFO, logger="relay")
    long_name = b"x" * 300
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd(b'MAIL FROM:"Jan\x01" <jan@acme.example>')
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd(b"RCPT TO:" + long_name + b"@ <q4@example.org>")
    sent = b"RCPT TO:" + long_name + b"@ <q4@example.org>"
    shown = sent[: protocol.SENT_LOGGED].decode()
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<?>: {sender}"
        r' (the client sent: MAIL FROM:"Jan\x01" <jan@acme.example>)',
        f"refused client=127.0.0.1 login=- from=<erp@acme.example> to=<?>: {recipient}"
        f" (the client sent: {shown} [{len(sent) - protocol.SENT_LOGGED} more characters"
        " not logged])",
    ]


def test_a_recipient_refused_after_the_null_sender_is_logged_with_an_empty_from(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """``from=<>`` as for every other line of a bounce's transaction, which a grep
    for the null sender finds; ``from=<<>>`` it did not."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<>").startswith("250")
        recipient = raw.cmd(b"RCPT TO:<customer>")
    assert recipient.startswith("553 ")
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<> to=<customer>: {recipient}"
    ]


def test_a_command_just_within_what_is_logged_is_logged_whole(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A line saying that 0 more characters were not logged has a sysadmin look
    for what was cut off."""
    caplog.set_level(logging.INFO, logger="relay")
    sent = b"RCPT TO:" + b"x" * (protocol.SENT_LOGGED - 26) + b"@ <q4@example.org>"
    assert len(sent) == protocol.SENT_LOGGED
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd(sent)
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<erp@acme.example> to=<?>: {recipient}"
        f" (the client sent: {sent.decode()})",
    ]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b'"postmaster@example.org"', "553 5.1.3 Quoted local parts are not supported: "),
        (b'"root@"', "553 5.1.3 Quoted local parts are not supported: "),
        (b'"a b"@example.org', "553 5.1.3 Quoted local parts are not supported: "),
        (b"a b@example.org", "553 5.1.3 Bad address syntax: 'a b@example.org'"),
        (b"Customer Name", "553 5.1.3 Bad address syntax: 'Customer Name'"),
        (b"root@[192.0.2.1]", "553 5.1.3 Bad address syntax: "),
        (b"root@-example.org", "553 5.1.3 Bad address syntax: "),
        (b"root.@example.org", "553 5.1.3 Bad address syntax: "),
        (b"root", "553 5.1.3 Bad address syntax: "),
        (b"l" * 65 + b"@example.org", "553 5.1.3 Address longer than SMTP allows (64 octets"),
    ],
)
def test_recipient_not_sent_as_given_refused(relay: Relay, path: bytes, expected: str) -> None:
    """What the relay accepts goes upstream and into the audit log unchanged;
    aiosmtpd parses these, but the upstream client would rewrite them."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:<" + path + b">").startswith(expected)
        assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")
        _data(raw)
    assert relay.process.submissions[0].rcpt_tos == ("one@example.org",)


QUOTED_GT = "Quoted local parts are not supported: "


def test_a_quoted_local_part_holding_a_gt_is_named_whole(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """``"a>b"`` is a quoted local part (RFC 5321 4.1.2): the path ends at the
    ``>`` after it. The refusal and the log quoted ``"a``, cut at the first."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd(b'MAIL FROM:<"a>b"@acme.example> AUTH=<>')
        assert sender == f"553 5.1.7 {QUOTED_GT}'\"a>b\"@acme.example'"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd(b'RCPT TO:"Customer" <"a>b"@example.org>')
        assert recipient == f"553 5.1.3 {QUOTED_GT}'\"a>b\"@example.org'"
        assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")
        _data(raw)
    assert relay.process.submissions[0].rcpt_tos == ("one@example.org",)
    logged = "\n".join(refused_lines(caplog))
    assert f'from=<"a>b"@acme.example>: {sender}' in logged
    assert f'to=<"a>b"@example.org>: {recipient}' in logged


def test_a_quote_that_opens_no_local_part_does_not_hide_the_path_s_end(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a whole local part is quoted: a ``"`` inside one (``o"brien``), or one
    never closed, is a character like any other, and the path still ends at its
    first ``>``. Read as quotes, such paths were refused as never closed,
    ``553 5.1.3 Error: malformed address``, a sender's with a recipient's status
    and the log with ``from=<?>``."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        sender = raw.cmd(b'MAIL FROM:<a"b@acme.example>')
        assert sender == "553 5.1.7 Bad address syntax: 'a\"b@acme.example'"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        recipient = raw.cmd(b'RCPT TO:<"a@example.org>')
        assert recipient == "553 5.1.3 Quoted local parts are not supported: '\"a@example.org'"
        assert raw.cmd(b'RCPT TO:<"a>b"@example.org').startswith("553 5.1.3 Error: malformed")
    logged = "\n".join(refused_lines(caplog))
    assert f'from=<a"b@acme.example>: {sender}' in logged
    assert f'to=<"a@example.org>: {recipient}' in logged


def test_a_recipient_given_twice_is_sent_once(relay: Relay) -> None:
    """Both went upstream, and the recipient got the message twice; the same
    address in other case is the same mailbox, as for the automatic BCC."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        for rcpt in (b"one@example.org", b"two@example.org", b"One@Example.org") + (
            b"one@example.org",
        ) * 5:  # no more than max_recipients (5) counted
            assert raw.cmd(b"RCPT TO:<" + rcpt + b">").startswith("250 2.1.5")
        _data(raw)
    assert relay.process.submissions[0].rcpt_tos == ("one@example.org", "two@example.org")


def test_null_recipient_refused(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        raw.cmd(b"MAIL FROM:<erp@acme.example>")
        assert raw.cmd(b"RCPT TO:<>").startswith("553 5.1.3 ")


def test_too_many_recipients(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        raw.cmd(b"MAIL FROM:<erp@acme.example>")
        for n in range(5):
            assert raw.cmd(b"RCPT TO:<r%d@example.org>" % n).startswith("250")
        assert raw.cmd(b"RCPT TO:<r5@example.org>") == "452 4.5.3 Too many recipients"
        _data(raw)
    assert len(relay.process.submissions[0].rcpt_tos) == 5


def test_refused_recipients_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """README: one line per refused message; a refused recipient had none, so
    an ERP's bad address or over-long list left no trace on the relay's side."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"RCPT TO:<early@example.org>").startswith("503 ")  # no transaction
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        bad = raw.cmd(b"RCPT TO:<c@[192.0.2.1]>")
        for n in range(5):
            assert raw.cmd(b"RCPT TO:<r%d@example.org>" % n).startswith("250")
        assert raw.cmd(b"RCPT TO:<r5@example.org>") == "452 4.5.3 Too many recipients"
        _data(raw)
    assert bad.startswith("553 5.1.3 ")
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<erp@acme.example> to=<c@[192.0.2.1]>: {bad}",
        "refused client=127.0.0.1 login=- from=<erp@acme.example> to=<r5@example.org>:"
        " 452 4.5.3 Too many recipients",
    ]


@pytest.mark.parametrize("end", [b"RSET", b"QUIT"])
def test_refused_recipients_log_is_bounded(end: bytes, caplog: pytest.LogCaptureFixture) -> None:
    """A transaction's first bad RCPTs are logged one by one and the rest
    counted in one line when the transaction ends, however it ends; the next
    transaction starts afresh. (A loop of them meets the hard error limit.)"""
    caplog.set_level(logging.INFO, logger="relay")
    count = protocol.RCPT_REFUSALS_LOGGED + 5
    prefix = "refused client=127.0.0.1 login=- from=<erp@acme.example>"
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        raw.send(b"".join(b"RCPT TO:<bad%d@[192.0.2.1]>\r\n" % n for n in range(count)))
        replies = [raw.reply()[-1] for _ in range(count)]
        assert raw.cmd(end).startswith(("250", "221"))
        if end == b"RSET":
            assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
            replies.append(raw.cmd(b"RCPT TO:<next@[192.0.2.1]>"))
            assert raw.cmd(b"QUIT").startswith("221")
        assert raw.closed()
        expected = [
            *(
                f"{prefix} to=<bad{n}@[192.0.2.1]>: {replies[n]}"
                for n in range(protocol.RCPT_REFUSALS_LOGGED)
            ),
            f"{prefix}: 5 more recipients refused, not logged one by one;"
            f" the last to=<bad{count - 1}@[192.0.2.1]>: {replies[count - 1]}",
        ]
        if end == b"RSET":
            expected.append(f"{prefix} to=<next@[192.0.2.1]>: {replies[-1]}")
        _wait_for(lambda: len(refused_lines(caplog)) >= len(expected))
    assert all(reply.startswith("553 5.1.3 ") for reply in replies)
    assert refused_lines(caplog) == expected


def _data(raw: Raw) -> None:
    """A small message, taken."""
    assert raw.cmd(b"DATA").startswith("354")
    assert raw.cmd(b"Subject: x\r\n\r\nx\r\n.").startswith("250")


def test_one_refused_recipient_past_those_logged_is_said_in_the_singular(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It was ``1 more recipients refused``."""
    caplog.set_level(logging.INFO, logger="relay")
    count = protocol.RCPT_REFUSALS_LOGGED + 1
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        raw.send(b"".join(b"RCPT TO:<bad%d@[192.0.2.1]>\r\n" % n for n in range(count)))
        last = [raw.reply()[-1] for _ in range(count)][-1]
        assert raw.cmd(b"QUIT").startswith("221")
        assert raw.closed()
        _wait_for(lambda: len(refused_lines(caplog)) > protocol.RCPT_REFUSALS_LOGGED)
    assert refused_lines(caplog)[-1] == (
        "refused client=127.0.0.1 login=- from=<erp@acme.example>: 1 more recipient refused,"
        f" not logged one by one; the last to=<bad{count - 1}@[192.0.2.1]>: {last}"
    )


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """The server's log of a connection's end follows the client's seeing it closed."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_allow_list_refuses_other_clients() -> None:
    with Relay([listener(allow=("10.0.0.0/8",))]) as relay, Raw(relay.port) as raw:
        assert raw.greeting[0].startswith("554 5.7.1 Client 127.0.0.1 is not allowed")
        assert raw.closed()
    assert relay.process.calls == []


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_ipv6_listener_and_allow_list() -> None:
    with Relay([listener(address="::1", allow=("::1/128",))]) as relay:
        with smtplib.SMTP("::1", relay.port, timeout=10) as client:
            client.sendmail("erp@acme.example", ["one@example.org"], MESSAGE)
        assert relay.process.submissions[0].client_address == "::1"
    with (
        Relay([listener(address="::1", allow=("127.0.0.0/8",))]) as relay,
        Raw(relay.port, host="::1") as raw,
    ):
        assert raw.greeting[0].startswith("554 5.7.1 ")


# --- size and line limits --------------------------------------------------------


def refused_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The log's lines for messages refused on the SMTP side."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]


def test_size_declared_too_big_refused(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        reply = raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=100001")
        assert raw.cmd(b"MAIL FROM:<> SIZE=100001") == reply
    assert reply == "552 5.3.4 Message size exceeds the maximum of 100000 bytes"
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<erp@acme.example>: {reply}",
        f"refused client=127.0.0.1 login=- from=<>: {reply}",
    ]


def test_a_size_given_twice_is_checked_by_the_larger(relay: Relay) -> None:
    """The last one counted, so ``SIZE=100001 SIZE=1`` passed the check at MAIL.
    Given twice the parameter is still taken: smtplib adds its own SIZE to one
    its caller gave, and aiosmtplib its BODY."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        too_big = "552 5.3.4 Message size exceeds the maximum of 100000 bytes"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=100001 SIZE=1") == too_big
        assert raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=1 SIZE=100001") == too_big
        assert raw.cmd(b"MAIL FROM:<erp@acme.example> BODY=7BIT BODY=8BITMIME SIZE=9") == (
            "250 2.1.0 OK"
        )
        assert raw.cmd(b"RSET").startswith("250")
        # a size that is no number is refused, as alone, not dropped for the other
        syntax = raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=abc")
        assert syntax.startswith("501 ")
        assert raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=abc SIZE=5") == syntax
        assert raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=5 SIZE=abc") == syntax
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        refused = client.sendmail(
            "erp@acme.example", ["one@example.org"], b"Subject: x\r\n\r\nx\r\n",
            mail_options=["SIZE=200"],
        )  # fmt: skip
    assert refused == {}


def test_size_enforced_on_data(relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    big = b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 120
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.mail("erp@acme.example")  # no SIZE: the limit must hold anyway
        client.rcpt("one@example.org")
        code, reply = client.data(big)
        assert code == 552
        assert reply.startswith(b"5.3.4 ")
        assert client.noop()[0] == 250
    assert relay.process.calls == []
    # the same fields as a refusal by the policy: a grep for the login or the recipient finds it
    assert refused_lines(caplog) == [
        "refused client=127.0.0.1 login=- from=<erp@acme.example> to=<one@example.org>:"
        f" 552 {reply.decode()}"
    ]


def test_a_message_refused_as_too_big_ends_its_transaction(relay: Relay) -> None:
    """The ERP's next message, a smaller one, is taken on the same connection, and
    goes only to its own recipients, none of the refused one's."""
    big = b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 120
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo()
        client.mail("erp@acme.example")
        client.rcpt("one@example.org")
        assert client.data(big)[0] == 552
        refused = client.sendmail(
            "erp@acme.example", ["two@example.org"], b"Subject: x\r\n\r\nx\r\n"
        )
    assert refused == {}
    assert [s.rcpt_tos for s in relay.process.submissions] == [("two@example.org",)]


@pytest.mark.parametrize("length", [998])
def test_longest_allowed_line_passes(relay: Relay, length: int) -> None:
    body = b"x" * length + b"\r\n" + b"." + b"y" * (length - 1) + b"\r\n"
    with Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(body.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert raw.reply()[-1].startswith("250")
    assert relay.process.submissions[0].data == body


@pytest.mark.parametrize("length", [999, 1000, 1001, 5000, 100_000])
def test_over_long_data_line_refused(length: int) -> None:
    with Relay([listener(max_message_size=1_000_000)]) as relay, Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(b"Subject: x\r\n\r\n" + b"x" * length + b"\r\nend\r\n.\r\n")
        reply = raw.reply()[-1]
        assert reply.startswith("554 5.6.0 Line too long"), reply
        assert raw.cmd(b"NOOP").startswith("250")
        assert relay.process.calls == []


def test_over_long_command_line_refused(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        reply = raw.cmd(b"MAIL FROM:<" + b"a" * 600 + b"@acme.example>")
        assert reply == "500 5.5.2 Command line too long"
        reply = raw.cmd(b"MAIL FROM:<" + b"a" * 5000 + b"@acme.example>")
        assert reply == "500 5.5.2 Command line too long"
        assert raw.cmd(b"NOOP").startswith("250")


def test_nul_in_data_refused(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(b"Subject: x\r\n\r\nnul \x00 here\r\n.\r\n")
        assert raw.reply()[-1].startswith("554 5.6.0 ")
    assert relay.process.calls == []


# --- SMTP smuggling --------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<ceo@acme.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
SMUGGLED += b"From: ceo@acme.example\r\n\r\nsmuggled\r\n"

VARIANTS = {
    "LF.LF": b"\n.\n",
    "CR.CR": b"\r.\r",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "LF.CR": b"\n.\r",
    "CR.LF": b"\r.\n",
    "CRLF.LFCRLF": b"\r\n.\n\r\n",
    "LFLF": b"\n\n",
}


@pytest.mark.parametrize("ending", VARIANTS.values(), ids=VARIANTS.keys())
def test_smuggling_sequence_never_ends_data(relay: Relay, ending: bytes) -> None:
    with Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(b"Subject: first\r\n\r\nbody" + ending + SMUGGLED + b".\r\n")
        reply = raw.reply()
        assert reply == [
            "550 5.6.11 Bare <CR> or <LF> received: lines must end with <CR><LF> (RFC 5321 2.3.8)"
        ]
        # Exactly one reply: nothing of the smuggled transaction was run.
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"
        # The session is clean: the next message goes through on its own.
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        assert raw.cmd(b"Subject: second\r\n\r\nok\r\n.").startswith("250 ")
    (sub,) = relay.process.submissions
    assert sub.data == b"Subject: second\r\n\r\nok\r\n"
    assert sub.rcpt_tos == ("one@example.org",)


@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["LF", "CR"])
def test_bare_newline_anywhere_refused(relay: Relay, bare: bytes) -> None:
    with Raw(relay.port) as raw:
        raw.envelope()
        raw.cmd(b"DATA")
        raw.send(b"Subject: x\r\n\r\nline one" + bare + b"line two\r\n.\r\n")
        assert raw.reply()[-1].startswith("550 5.6.11 ")
    assert relay.process.calls == []


def test_a_client_on_bare_line_feeds_hears_why_at_its_end_of_data(relay: Relay) -> None:
    """Its ``.<LF>`` does not end DATA (that would open the door to smuggling), so
    it waited, hearing nothing, until the idle timeout; now the silence after it
    gets the refusal and the connection ends, before anything after it is read."""
    with Raw(relay.port) as raw:
        raw.send(b"EHLO erp.example\nMAIL FROM:<erp@acme.example>\n")
        raw.reply()
        assert raw.reply() == ["250 2.1.0 OK"]
        raw.send(b"RCPT TO:<one@example.org>\n")
        assert raw.reply() == ["250 2.1.5 OK"]
        raw.send(b"DATA\n")
        assert raw.reply()[0].startswith("354")
        started = time.monotonic()
        raw.send(b"Subject: x\n\nbody\n.\n")
        assert raw.reply() == [
            "550 5.6.11 Bare <CR> or <LF> received: lines must end with <CR><LF> (RFC 5321 2.3.8)"
        ]
        assert time.monotonic() - started < 10  # not the idle timeout
        assert raw.closed()
    assert relay.process.calls == []


def test_a_client_on_bare_line_feeds_that_pipelines_quit_hears_why_too(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything after its ``.<LF>`` in the same write, and it heard nothing until
    the idle timeout's 421: a temporary failure, retried for ever."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.send(b"EHLO erp.example\nMAIL FROM:<erp@acme.example>\nRCPT TO:<one@example.org>\n")
        raw.reply()
        assert [raw.reply(), raw.reply()] == [["250 2.1.0 OK"], ["250 2.1.5 OK"]]
        raw.send(b"DATA\n")
        assert raw.reply()[0].startswith("354")
        started = time.monotonic()
        raw.send(b"From: a@b\nSubject: x\n\nbody\n.\nQUIT\n")
        (reply,) = raw.reply()
        assert time.monotonic() - started < 10  # not the idle timeout
        assert raw.closed()
    assert reply.startswith("550 5.6.11 ")
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=- from=<erp@acme.example> to=<one@example.org>: {reply}"
    ]
    assert relay.process.calls == []


def test_an_unknown_parameter_is_555_whatever_its_name(relay: Relay) -> None:
    """RFC 5321 4.1.2: a keyword may hold hyphens; ``X-FOO=1`` was a 501 syntax error."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        for parameter in (b"X-FOO=1", b"FOO", b"X-A-B"):
            assert raw.cmd(b"MAIL FROM:<a@b.example> " + parameter) == (
                "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
            )
        assert raw.cmd(b"MAIL FROM:<a@b.example> -X=1").startswith("501")
        assert raw.cmd(b"MAIL FROM:<a@b.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:<c@d.example> X-NOTIFY=NEVER") == (
            "555 5.5.4 RCPT TO parameters not recognized or not implemented"
        )


def test_controls_a_command_held_are_not_echoed_raw() -> None:
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        assert raw.cmd(b"NOOP\rRSET") == '500 5.5.2 Error: command "NOOP\\x0dRSET" not recognized'
        assert raw.cmd(b"NO\x00OP") == '500 5.5.2 Error: command "NO\\x00OP" not recognized'
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


def test_too_many_unknown_commands_is_a_421_before_the_close() -> None:
    """RFC 5321 3.8: a server closes the connection only after 221 or 421."""
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        replies = [raw.cmd(b"BOGUS") for _ in range(5)]
        assert replies[-1] == "421 4.7.0 Too many unrecognized commands, closing the connection"
        assert raw.closed()


def _replies_after_half_close(port: int, wire: bytes) -> list[str]:
    """Send ``wire``, close the sending side, read every reply until the server closes."""
    with Raw(port) as raw:
        raw.send(wire)
        raw.sock.shutdown(socket.SHUT_WR)
        replies = []
        with contextlib.suppress(EOFError):
            while True:
                replies.append(raw.reply()[-1])
    return replies


def test_a_client_that_closes_its_side_after_sending_hears_every_reply() -> None:
    """aiosmtpd cancelled the session at the client's end of stream: a message
    accepted after it got no 250 (a resend would duplicate it), and a second
    pipelined transaction was dropped."""
    transaction = b"MAIL FROM:<erp@acme.example>\r\nRCPT TO:<one@example.org>\r\nDATA\r\n"
    transaction += MESSAGE + b".\r\n"
    with Relay([listener()], Recorder(delay=0.3)) as relay:
        replies = _replies_after_half_close(relay.port, b"EHLO c.example\r\n" + transaction * 2)
        assert replies[1:] == [
            "250 2.1.0 OK", "250 2.1.5 OK", "354 End data with <CR><LF>.<CR><LF>",
            "250 2.0.0 Ok: queued as TEST",
        ] * 2  # fmt: skip
        assert len(relay.process.calls) == 2
        replies = _replies_after_half_close(
            relay.port, b"EHLO c.example\r\n" + transaction + b"QUIT\r\n"
        )
        assert replies[-2:] == ["250 2.0.0 Ok: queued as TEST", "221 2.0.0 Bye"]
        replies = _replies_after_half_close(  # the end comes inside the data: nothing kept
            relay.port, b"EHLO c.example\r\n" + transaction[:-40]
        )
        assert replies[-1] == "354 End data with <CR><LF>.<CR><LF>"
    assert len(relay.process.calls) == 3


# --- replies from the pipeline ---------------------------------------------------


def test_rejected_by_process_gives_its_exact_reply() -> None:
    refusal = Rejected(550, "5.7.1", "Sender not known to this relay: x@nowhere.example")
    with Relay([listener()], Recorder(error=refusal)) as relay, Raw(relay.port) as raw:
        raw.envelope()
        raw.cmd(b"DATA")
        assert raw.cmd(MESSAGE + b".") == refusal.line


@pytest.mark.parametrize(
    ("text", "told"),
    [
        (
            "Sender not known (From j\u00f6rg@acme.example)",
            "Sender not known (From j\\xf6rg@acme.example)",
        ),
        ("Sender not known (" + "a@b.example, " * 800 + "z@b.example)", None),
    ],
    ids=["non-ascii", "over-512-octets"],
)
def test_a_refusal_reaches_the_client_as_one_ascii_line_of_at_most_512_octets(
    text: str, told: str | None
) -> None:
    """A non-ASCII text could not be written (SMTPUTF8 is not offered): the client
    got 451 and retried a refused message for ever. smtplib read a 10 KB line as
    "Line too long" and dropped the connection instead of the refusal."""
    refusal = Rejected(550, "5.7.1", text)
    with (
        Relay([listener()], Recorder(error=refusal)) as relay,
        smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client,
    ):
        client.ehlo()
        client.mail("erp@acme.example")
        client.rcpt("one@example.org")
        code, reply = client.data(MESSAGE)
        assert client.noop()[0] == 250
    assert code == 550
    assert len(f"550 {reply.decode('ascii')}\r\n") <= 512
    if told is not None:
        assert reply.decode() == f"5.7.1 {told}"
    else:
        assert reply.startswith(b"5.7.1 Sender not known (a@b.example, ")
        assert b" ... " in reply
        assert reply.endswith(b"a@b.example, z@b.example)")


def test_unexpected_error_in_process_is_451_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="relay")
    with (
        Relay([listener()], Recorder(error=RuntimeError("boom"))) as relay,
        smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client,
    ):
        client.ehlo()
        client.mail("erp@acme.example")
        client.rcpt("one@example.org")
        code, reply = client.data(MESSAGE)
        assert (code, reply) == (451, b"4.3.0 Local error, try again later")
        assert client.noop()[0] == 250
    failed = [r for r in caplog.records if r.name == "relay" and r.exc_info]
    assert failed and "RuntimeError: boom" in caplog.text


@pytest.mark.parametrize("reply", ["", "ok", "250 fine\r\n250 injected", None])
def test_unusable_reply_from_process_is_451(reply: str) -> None:
    with Relay([listener()], Recorder(reply=reply)) as relay, Raw(relay.port) as raw:
        raw.envelope()
        raw.cmd(b"DATA")
        assert raw.cmd(MESSAGE + b".") == "451 4.3.0 Local error, try again later"
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


# --- AUTH ------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_success(relay: Relay, mechanism: str) -> None:
    done = swaks(
        relay.port,
        "--auth", mechanism, "--auth-user", "erp-acme", "--auth-password", "demo-password",
        "--from", "jan@acme.example", "--to", "customer@example.org",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 2.7.0 Authentication successful" in done.stdout
    assert relay.process.submissions[0].auth_login == "erp-acme"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_auth_failure(relay: Relay, mechanism: str) -> None:
    done = swaks(
        relay.port,
        "--auth", mechanism, "--auth-user", "erp-acme", "--auth-password", "wrong",
        "--from", "jan@acme.example", "--to", "customer@example.org",
    )  # fmt: skip
    assert done.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in done.stdout
    assert relay.process.calls == []


@pytest.mark.parametrize(
    ("login", "password"), [("erp-acme", "wrong"), ("nobody", "demo-password")]
)
def test_auth_failure_smtplib(relay: Relay, login: str, password: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(login, password)
        assert failed.value.smtp_code == 535


def test_an_empty_password_from_smtplib_is_named(relay: Relay) -> None:
    """An ERP set up without a password is told so, not that it is wrong
    (smtplib tries PLAIN, then LOGIN, and raises LOGIN's reply)."""
    with (
        smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client,
        pytest.raises(smtplib.SMTPAuthenticationError) as failed,
    ):
        client.login("erp-acme", "")
    assert failed.value.smtp_code == 501
    assert failed.value.smtp_error == b"5.5.2 Empty password in the credentials"


def test_auth_plain_with_foreign_authzid_refused(relay: Relay) -> None:
    blob = base64.b64encode(b"someone-else\0erp-acme\0demo-password")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH PLAIN " + blob).startswith("535 ")
        same = base64.b64encode(b"erp-acme\0erp-acme\0demo-password")
        assert raw.cmd(b"AUTH PLAIN " + same).startswith("235 ")


@pytest.mark.parametrize(
    "command", [b"AUTH PLAIN !!!", b"AUTH PLAIN " + base64.b64encode(b"no-separators")]
)
def test_auth_garbage_gets_501(relay: Relay, command: bytes) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(command).startswith("501 5.5.2 ")
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


@pytest.mark.parametrize("length", [600, 2000])
def test_long_password_logs_in(length: int) -> None:
    """smtplib sends AUTH PLAIN with the credentials on the command line (over
    aiosmtpd's 512 octets here, within RFC 4954's 12288), and LOGIN's password
    line is as long (over aiosmtpd's 1001 for the longer one)."""
    password = "p" * length
    logins = {"erp-long": hash_password(password)}
    with Relay([listener()], policy=policy((listener(),), logins=logins)) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(b"AUTH PLAIN " + plain("erp-long", password).encode()).startswith("235")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            assert client.login("erp-long", password)[0] == 235
            client.sendmail("erp@acme.example", ["one@example.org"], MESSAGE)
    assert relay.process.submissions[0].auth_login == "erp-long"


def test_auth_command_longer_than_rfc_4954_allows_refused(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH PLAIN " + b"A" * 12300) == "500 5.5.2 Command line too long"
        assert raw.cmd(b"MAIL FROM:<" + b"a" * 600 + b"@acme.example>") == (
            "500 5.5.2 Command line too long"  # the other commands keep their limit
        )
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


def test_long_auth_response_in_pieces_stays_in_step(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A response line over aiosmtpd's 1001 octets, sent in two writes."""
    login = base64.b64encode(b"x" * 1200)
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH LOGIN") == "334 VXNlcm5hbWU6"
        raw.send(login[:700])
        time.sleep(0.1)
        assert raw.cmd(login[700:]) == "334 UGFzc3dvcmQ6"
        assert raw.cmd(base64.b64encode(b"secret")).startswith("535 5.7.8 ")
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"
    assert "Traceback" not in caplog.text and "ValueError" not in caplog.text


def test_auth_response_longer_than_rfc_4954_allows_is_500_5_5_6(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH LOGIN") == "334 VXNlcm5hbWU6"
        raw.send(b"A" * 9000)
        time.sleep(0.1)
        reply = raw.cmd(b"A" * 9000 + b" NOOP")
        assert reply == "500 5.5.6 Authentication Exchange line is too long"
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"  # nothing of the long line was taken as a command
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()).startswith(
            "235 "
        )
    assert "Traceback" not in caplog.text


def test_a_logged_in_session_s_refusals_name_its_login(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal at MAIL or RCPT was logged without the login, where one after
    DATA names it: a grep for a login that sent bad addresses found nothing."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()).startswith(
            "235 "
        )
        sender = raw.cmd(b"MAIL FROM:<kari@>")
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>").startswith("250")
        recipient = raw.cmd(b"RCPT TO:<one@>")
    assert refused_lines(caplog) == [
        f"refused client=127.0.0.1 login=erp-acme from=<kari@>: {sender}",
        f"refused client=127.0.0.1 login=erp-acme from=<jan@acme.example> to=<one@>: {recipient}",
    ]


def test_refused_mails_counted_apart_are_said_under_the_login_they_had(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the ones logged one by one, refused MAILs are counted on one line at
    the end; it named the login the session had then, so refusals before a
    login were put on it."""
    caplog.set_level(logging.INFO, logger="relay")
    before = protocol.REFUSALS_LOGGED + 1
    with Raw(relay.port) as raw:
        raw.ehlo()
        for n in range(before):
            raw.cmd(f"MAIL FROM:<pre{n}@>".encode())
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()).startswith(
            "235 "
        )
        raw.cmd(b"MAIL FROM:<post@>")
        raw.cmd(b"QUIT")
    _wait_for(lambda: len(refused_lines(caplog)) >= before + 1)
    counted = refused_lines(caplog)[before - 1 :]
    assert [line.split(": ")[0] for line in counted] == [
        f"refused client=127.0.0.1 login=- from=<pre{before - 1}@>",
        "refused client=127.0.0.1 login=erp-acme from=<post@>",
    ]
    assert all("1 more message refused, not logged one by one" in line for line in counted)


def test_auth_cancelled_with_star(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH PLAIN") == "334 "
        assert raw.cmd(b"*") == "501 5.7.0 Auth aborted"
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


@pytest.mark.parametrize("command", [b"AUTH PLAIN", b"AUTH LOGIN"])
def test_a_client_gone_during_auth_is_no_failed_login(
    relay: Relay, command: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Its end of stream was read as empty answers: a failed login counted against
    its address, with the 1 s answer delay, for a client that had only gone."""
    caplog.set_level(logging.INFO, logger="relay")
    replies = _replies_after_half_close(relay.port, b"EHLO c.example\r\n" + command + b"\r\n")
    assert replies[-1].startswith("334")
    assert "AUTH failed" not in caplog.text


EMPTY_LOGIN = "501 5.5.2 Empty login name in the credentials"
EMPTY_PASSWORD = "501 5.5.2 Empty password in the credentials"


def _b64(text: bytes) -> bytes:
    return base64.b64encode(text)


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ([b"AUTH PLAIN ="], "501 5.5.2 Cannot split the PLAIN credentials"),
        ([b"AUTH PLAIN", b""], "501 5.5.2 Cannot split the PLAIN credentials"),
        ([b"AUTH PLAIN AAA="], EMPTY_LOGIN),
        ([b"AUTH PLAIN " + _b64(b"\0\0demo-password")], EMPTY_LOGIN),
        ([b"AUTH PLAIN " + _b64(b"erp-acme\0\0demo-password")], EMPTY_LOGIN),
        ([b"AUTH PLAIN " + _b64(b"\0erp-acme\0")], EMPTY_PASSWORD),
        ([b"AUTH PLAIN", _b64(b"\0erp-acme\0")], EMPTY_PASSWORD),
        ([b"AUTH LOGIN", b""], EMPTY_LOGIN),
        ([b"AUTH LOGIN ="], EMPTY_LOGIN),
        ([b"AUTH LOGIN", _b64(b"erp-acme"), b""], EMPTY_PASSWORD),
        ([b"AUTH LOGIN " + _b64(b"erp-acme"), b""], EMPTY_PASSWORD),
    ],
    ids=[
        "plain-empty-initial-response",
        "plain-empty-answer",
        "plain-both",
        "plain-login",
        "plain-login-authzid",
        "plain-password",
        "plain-answer",
        "login-answer",
        "login-initial",
        "login-password",
        "login-initial-password",
    ],
)
def test_an_empty_login_or_password_is_malformed_not_a_failed_login(
    sent: list[bytes], expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 4616 requires both in PLAIN, and no login has an empty one: such
    credentials were a failed login, 535 after the delay, logged for fail2ban
    and counted towards the lock-out, where PLAIN data without its NULs gets
    501 at once. LOGIN's empty answers are the same empty name or password;
    PLAIN's ``=`` (an empty initial response, RFC 4954 4) and empty answer
    to its challenge hold no credentials at all, and are no cancel."""
    caplog.set_level(logging.INFO, logger="relay")
    failures = AuthFailures(per_client=1, delay=5.0)
    with Relay([listener()], failures=failures) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        started = time.monotonic()
        replies = [raw.cmd(line) for line in sent]
        assert replies[-1] == expected
        assert time.monotonic() - started < 2.0
        login = b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()
        assert raw.cmd(login).startswith("235 ")  # one failure counted would lock it
    assert "AUTH failed" not in caplog.text


def test_auth_attempts_per_connection_are_limited(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(10):
            assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "x").encode()).startswith("535")
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "x").encode()).startswith("421")


def test_auth_required_refuses_mail_before_auth(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(auth=AuthMode.REQUIRED)]) as relay:
        with Raw(relay.port) as raw:
            raw.ehlo()
            assert raw.cmd(b"MAIL FROM:<erp@acme.example>") == "530 5.7.0 Authentication required"
            assert raw.cmd(b"RCPT TO:<one@example.org>") == "530 5.7.0 Authentication required"
            assert raw.cmd(b"DATA") == "530 5.7.0 Authentication required"
            assert refused_lines(caplog) == [  # one line for the message, not per command
                "refused client=127.0.0.1 login=- from=<erp@acme.example>:"
                " 530 5.7.0 Authentication required"
            ]
            assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()).startswith(
                "235"
            )
            assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        done = swaks(
            relay.port,
            "--auth", "LOGIN", "--auth-user", "erp-acme", "--auth-password", "demo-password",
            "--from", "jan@acme.example", "--to", "customer@example.org",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout
    assert relay.process.submissions[0].auth_login == "erp-acme"


def test_auth_after_helo_logs_in() -> None:
    """As Postfix takes it: a scanner that only says HELO, on an ``auth: required``
    listener, was refused MAIL for want of a login and AUTH for want of EHLO."""
    login = b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()
    with Relay([listener(auth=AuthMode.REQUIRED)]) as relay, Raw(relay.port) as raw:
        assert raw.cmd(b"HELO scanner").startswith("250")
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>") == "530 5.7.0 Authentication required"
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "wrong").encode()).startswith("535 ")
        assert raw.cmd(login).startswith("235 ")
        # still a HELO session: no ESMTP parameters
        assert raw.cmd(b"MAIL FROM:<erp@acme.example> SIZE=10").startswith("501 ")
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")
        _data(raw)
    (submission,) = relay.process.submissions
    assert (submission.auth_login, submission.esmtp) == ("erp-acme", False)


def test_auth_before_any_greeting_asks_for_helo(relay: Relay) -> None:
    """HELO is enough for AUTH (above), so that is what is asked for, as MAIL
    asks: a device that only knows HELO was told to send EHLO."""
    with Raw(relay.port) as raw:
        assert raw.cmd(b"AUTH PLAIN") == "503 5.5.1 Error: send HELO first"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>") == "503 5.5.1 Error: send HELO first"
        assert raw.cmd(b"HELO scanner").startswith("250")
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()).startswith(
            "235 "
        )


def test_auth_off_is_not_offered() -> None:
    with Relay([listener(auth=AuthMode.OFF)]) as relay, Raw(relay.port) as raw:
        assert not any("AUTH" in line for line in raw.ehlo())
        reply = raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode())
        assert reply.startswith("504 ")


def test_loopback_decision() -> None:
    assert listen.loopback_only("127.0.0.1")
    assert listen.loopback_only("127.0.0.2")
    assert listen.loopback_only("::1")
    assert not listen.loopback_only("0.0.0.0")
    assert not listen.loopback_only("::")
    assert not listen.loopback_only("")
    assert not listen.loopback_only("192.0.2.10")
    assert not listen.loopback_only("2001:db8::1")
    assert not listen.loopback_only("no-such-host.invalid")


@pytest.fixture
def not_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat the 127.0.0.1 test listener as if it were on a public address."""
    monkeypatch.setattr(listen, "loopback_only", lambda address: False)


@pytest.fixture
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    certs = make_certs(tmp_path_factory.mktemp("tls"))
    return read_pair(certs.cert, certs.key)


@pytest.mark.usefixtures("not_loopback")
def test_auth_refused_before_starttls_off_loopback(tls_files: TlsFiles) -> None:
    with Relay([listener(tls=tls_files)]) as relay, Raw(relay.port) as raw:
        lines = raw.ehlo()
        assert "250-STARTTLS" in lines
        assert not any("AUTH" in line for line in lines)
        reply = raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode())
        assert reply.startswith("538 5.7.11 ")


@pytest.mark.usefixtures("not_loopback")
def test_auth_after_helo_needs_tls_as_after_ehlo(tls_files: TlsFiles) -> None:
    login = b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with Relay([listener(tls=tls_files, auth=AuthMode.REQUIRED)]) as relay, Raw(relay.port) as raw:
        assert raw.cmd(b"HELO scanner").startswith("250")
        assert raw.cmd(login).startswith("538 5.7.11 ")
        assert raw.cmd(b"STARTTLS").startswith("220")
        raw.sock = context.wrap_socket(raw.sock)
        assert raw.cmd(b"HELO scanner").startswith("250")
        assert raw.cmd(login).startswith("235 ")
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")


@pytest.mark.usefixtures("not_loopback")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls_then_auth(tls_files: TlsFiles, mechanism: str) -> None:
    with Relay([listener(tls=tls_files, auth=AuthMode.REQUIRED)]) as relay:
        done = swaks(
            relay.port, "--tls",
            "--auth", mechanism, "--auth-user", "erp-acme", "--auth-password", "demo-password",
            "--from", "jan@acme.example", "--to", "customer@example.org",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "220 2.0.0 Ready to start TLS" in done.stdout
    assert relay.process.submissions[0].auth_login == "erp-acme"


@pytest.mark.usefixtures("not_loopback")
def test_without_tls_configured_auth_is_never_offered_off_loopback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Relay([listener(auth=AuthMode.REQUIRED)]) as relay, Raw(relay.port) as raw:
        assert not any("AUTH" in line or "STARTTLS" in line for line in raw.ehlo())
    assert "no client can log in" in caplog.text


# --- timeouts and shutdown -------------------------------------------------------


IDLE = ["421 4.4.2 relay.test.example Error: timeout exceeded"]


def test_idle_connection_is_told_and_closed() -> None:
    with Relay([listener(idle_timeout=0.3)]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        started = time.monotonic()
        assert raw.reply() == IDLE
        assert raw.closed()
        assert time.monotonic() - started < 5


def test_idle_after_commands_is_closed_counting_from_the_last_one() -> None:
    with Relay([listener(idle_timeout=0.3)]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(6):  # 0.6 s in all, never 0.3 s without a command
            assert raw.cmd(b"NOOP") == "250 2.0.0 OK"
            time.sleep(0.1)
        last = time.monotonic()
        assert raw.reply() == IDLE
        assert raw.closed()
        assert 0.15 < time.monotonic() - last < 5


def test_slow_upload_is_not_idle() -> None:
    with Relay([listener(idle_timeout=0.5)]) as relay, Raw(relay.port) as raw:
        raw.envelope()
        raw.cmd(b"DATA")
        for n in range(8):  # 1.6 s in all, but never 0.5 s without a byte
            raw.send(b"X-Line: %d\r\n" % n)
            time.sleep(0.2)
        assert raw.cmd(b"\r\nbody\r\n.").startswith("250")


def test_slow_processing_is_not_idle() -> None:
    with Relay([listener(idle_timeout=0.3)], Recorder(delay=1.0)) as relay, Raw(relay.port) as raw:
        raw.envelope()
        raw.cmd(b"DATA")
        assert raw.cmd(MESSAGE + b".").startswith("250")
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"


def test_close_lets_a_transaction_finish_and_says_421_to_idle_clients() -> None:
    with Relay([listener()], Recorder(delay=1.0)) as relay:
        port = relay.port
        with Raw(port) as idle, Raw(port) as busy:
            idle.ehlo()
            busy.envelope()
            busy.cmd(b"DATA")
            busy.send(MESSAGE + b".\r\n")
            time.sleep(0.2)  # the message is being processed
            assert relay.ingress is not None
            closing = asyncio.run_coroutine_threadsafe(relay.ingress.close(5), relay.loop)
            assert idle.reply() == ["421 4.3.2 Service shutting down, try again later"]
            assert idle.closed()
            assert busy.reply()[-1].startswith("250 2.0.0")
            assert busy.reply() == ["421 4.3.2 Service shutting down, try again later"]
            assert busy.closed()
            closing.result(10)
            relay.ingress = None
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_data_cut_short_by_a_stop_is_logged_as_such(caplog: pytest.LogCaptureFixture) -> None:
    """The relay told the client 421 and closed: not a connection the client lost."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(b"Subject: half\r\n\r\nthe first half")
        time.sleep(0.2)
        assert relay.ingress is not None
        asyncio.run_coroutine_threadsafe(relay.ingress.close(0.3), relay.loop).result(10)
        relay.ingress = None
        assert raw.reply() == ["421 4.3.2 Service shutting down, try again later"]
    deadline = time.monotonic() + 10
    while "DATA cut short" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "client=127.0.0.1: DATA cut short by the stop, told 421" in caplog.text
    assert "connection lost during DATA" not in caplog.text
    assert "stop grace of 0.3s over: 1 connection told 421" in caplog.text


def _stuffed_and_not_reading(port: int) -> socket.socket:
    """A client that pipelines NOOPs until nothing more fits, reading no reply."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    chunk, idle_since, deadline = b"NOOP\r\n" * 10_000, time.monotonic(), time.monotonic() + 30
    while time.monotonic() - idle_since < 1 and time.monotonic() < deadline:
        try:
            sock.send(chunk)
            idle_since = time.monotonic()
        except BlockingIOError:
            time.sleep(0.05)
        except (ConnectionResetError, BrokenPipeError):
            break  # let go already: idle while the client still tried to send
    return sock


def _until_no_connections(relay: Relay, seconds: float) -> bool:
    assert relay.ingress is not None
    deadline = time.monotonic() + seconds
    while relay.ingress.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    return not relay.ingress.connections


def test_a_client_that_reads_no_replies_is_let_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing waits to write out the replies, which such a client never takes:
    the connection outlived the idle timeout, and a shutdown, for good."""
    monkeypatch.setattr(protocol, "LINGER", 0.5)
    with (
        Relay([listener(idle_timeout=0.5)]) as relay,
        contextlib.closing(_stuffed_and_not_reading(relay.port)),
    ):
        assert _until_no_connections(relay, 15)
    with (
        Relay([listener()]) as relay,
        contextlib.closing(_stuffed_and_not_reading(relay.port)),
    ):
        assert relay.ingress is not None
        relay.call(relay.ingress.close(5), timeout=15)
        assert not relay.ingress.connections
        relay.ingress = None


def test_client_leaving_during_processing_does_not_cut_delivery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="relay")
    with Relay([listener()], Recorder(delay=0.5)) as relay:
        with Raw(relay.port) as raw:
            raw.envelope()
            raw.cmd(b"DATA")
            raw.send(MESSAGE + b".\r\n")
            time.sleep(0.1)
        assert relay.process.finished.wait(5)
        deadline = time.monotonic() + 5
        while "before the reply" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (
        "client=127.0.0.1 from=<erp@acme.example> closed its side before the reply,"
        " which it may not read: 250 2.0.0 Ok: queued as TEST"
    ) in caplog.text


# --- the content rules on their own ----------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", None),
        (b"\r\n", None),
        (b"a\r\nb\r\n", None),
        (b"x" * 998 + b"\r\n", None),
        (b"a\rb\r\n", 550),
        (b"a\nb\r\n", 550),
        (b"a\r\r\n", 550),
        (b"a\r\n\n", 550),
        (b"a\n\r", 550),
        (b"a\x00b\r\n", 554),
        (b"x" * 999 + b"\r\n", 554),
        (b"ok\r\n" + b"x" * 999, 554),
    ],
)
def test_content_rules(data: bytes, code: int | None) -> None:
    found = content.refusal(data)
    assert (found.code if found else None) == code


def test_content_rules_are_fast_on_a_big_message() -> None:
    data = (b"A" * 76 + b"\r\n") * 330_000  # 25 MB of base64
    started = time.monotonic()
    assert content.refusal(data) is None
    assert time.monotonic() - started < 1.0


def test_a_starttls_handshake_cut_off_by_the_idle_timeout_ends_the_session(
    tls_files: TlsFiles,
) -> None:
    """asyncio says nothing to the protocol of a connection lost mid-handshake:
    each such connection kept its session, and its memory, for good."""
    with Relay([listener(tls=tls_files, idle_timeout=0.5)]) as relay:
        assert relay.ingress is not None
        connections = relay.ingress.connections
        for _ in range(3):
            with Raw(relay.port) as raw:
                raw.ehlo()
                assert raw.cmd(b"STARTTLS") == "220 2.0.0 Ready to start TLS"
                raw.sock.settimeout(10)
                assert raw.sock.recv(100) == b""  # no ClientHello: closed at the timeout
        deadline = time.monotonic() + 10
        while connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not connections


def test_starttls_inside_tls_is_refused(tls_files: TlsFiles) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with (
        Relay([listener(tls=tls_files)]) as relay,
        smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client,
    ):
        client.starttls(context=context)
        client.ehlo()
        assert not client.has_extn("starttls")
        assert client.docmd("STARTTLS") == (554, b"5.5.1 Error: TLS already active")
        assert client.noop()[0] == 250


def test_auth_during_a_mail_transaction_is_refused(relay: Relay) -> None:
    """RFC 4954 4: the transaction began without the login; it must not end with it."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>").startswith("250")
        reply = raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode())
        assert reply == "503 5.5.1 Error: AUTH not permitted during a mail transaction"
        assert raw.cmd(b"RSET").startswith("250")
        assert raw.cmd(b"AUTH PLAIN " + plain("erp-acme", "demo-password").encode()).startswith(
            "235 "
        )


@pytest.mark.parametrize("value", ["<>", "jan@acme.example", "jan+2Bx@acme.example"])
def test_the_auth_parameter_of_mail_is_taken(relay: Relay, value: str) -> None:
    """RFC 4954 5: relays that log in send it; refused, their mail could not be sent."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert (
            raw.cmd(f"MAIL FROM:<jan@acme.example> AUTH={value} SIZE=100".encode())
            == "250 2.1.0 OK"
        )
        assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")
        assert raw.cmd(b"DATA").startswith("354")
        assert raw.cmd(MESSAGE.replace(b"\r\n.", b"\r\n..") + b".").startswith("250")
    assert relay.process.submissions[0].mail_from == "jan@acme.example"


def test_an_auth_mechanism_named_in_lower_case_is_known(relay: Relay) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH plain " + plain("erp-acme", "demo-password").encode()).startswith(
            "235 "
        )


def test_a_client_gone_in_the_middle_of_data_is_logged_by_address(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.envelope(b"jan@acme.example", b"one@example.org")
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(b"Subject: half\r\n\r\nthe first half")
    deadline = time.monotonic() + 10
    while "connection lost during DATA" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "connection lost during DATA client=127.0.0.1" in caplog.text
    assert relay.process.submissions == []


def test_data_after_every_recipient_was_refused_says_no_valid_recipients(relay: Relay) -> None:
    """It said "need RCPT command" to an ERP that had sent them, and whoever read
    its log went looking for a client bug instead of the refused addresses."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:<c@[192.0.2.1]>").startswith("553")
        assert raw.cmd(b"DATA") == "554 5.5.1 Error: no valid recipients"
        assert raw.cmd(b"RSET").startswith("250")
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"DATA") == "503 5.5.1 Error: need RCPT command"  # none sent this time


def test_a_client_that_resets_after_its_greeting_is_logged(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sent a whole transaction and QUIT, then closed at once, lost
    its message with no line in the log."""
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + 10
    while "lost connection" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "client=127.0.0.1 lost connection after MAIL: Connection reset by peer" in caplog.text
    caplog.clear()
    with Raw(relay.port) as raw:  # in DATA: the DATA reader's line, not a second one
        raw.envelope(b"jan@acme.example", b"one@example.org")
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(b"Subject: half\r\n\r\nthe first half")
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    deadline = time.monotonic() + 10
    while "connection lost during DATA" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "connection lost during DATA" in caplog.text
    assert "lost connection after" not in caplog.text


def test_a_client_that_resets_after_its_dot_is_not_said_to_have_lost_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It was logged "lost connection after DATA", which in Postfix means the
    message was not taken, above the line saying it was queued."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()], Recorder(delay=0.5)) as relay:
        with Raw(relay.port) as raw:
            raw.envelope()
            assert raw.cmd(b"DATA").startswith("354")
            raw.send(MESSAGE + b".\r\n")
            time.sleep(0.1)  # the dot read, the message being handled
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert relay.process.finished.wait(5)
        _wait_for(lambda: "left before the reply" in caplog.text)
    assert (
        "client=127.0.0.1 lost connection after END-OF-MESSAGE, before its reply:"
        " Connection reset by peer (the message was received whole and is handled all the same)"
    ) in caplog.text
    assert "lost connection after DATA" not in caplog.text
    assert "left before the reply; it would have been: 250 2.0.0 Ok: queued as TEST" in caplog.text
    assert len(relay.process.submissions) == 1


def test_data_before_mail_asks_for_mail(relay: Relay) -> None:
    """It asked for RCPT, sending whoever debugs an ERP's command order astray."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"DATA") == "503 5.5.1 Error: need MAIL command"
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"DATA") == "503 5.5.1 Error: need RCPT command"


def test_a_message_refused_for_its_content_is_logged_with_its_login_and_recipients(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """A NUL, a long line or bare line ends were logged without login= and to=:
    a grep for the ERP's login or the customer missed them, though the audit
    log has both."""
    caplog.set_level(logging.INFO, logger="relay")
    blob = base64.b64encode(b"\0erp-acme\0demo-password")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"AUTH PLAIN " + blob).startswith("235 ")
        assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
        assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")
        assert raw.cmd(b"RCPT TO:<two@example.org>").startswith("250")
        assert raw.cmd(b"DATA").startswith("354")
        reply = raw.cmd(b"Subject: x\r\n\r\nnul \0 here\r\n.")
    assert reply.startswith("554 5.6.0 ")
    assert refused_lines(caplog) == [
        "refused client=127.0.0.1 login=erp-acme from=<erp@acme.example>"
        f" to=<one@example.org>,<two@example.org>: {reply}"
    ]


def test_the_size_declared_for_the_disk_check_is_the_larger() -> None:
    """The free-space check at MAIL read the first SIZE, the limit the larger."""
    from relay.ingress.handler import _declared_size

    assert _declared_size(["SIZE=1", "SIZE=90000"]) == 90000
    assert _declared_size(["BODY=8BITMIME", "size=70"]) == 70
    assert _declared_size(["SIZE=abc"]) == 0
