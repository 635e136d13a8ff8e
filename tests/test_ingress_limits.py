"""How much a client is answered when it keeps sending what is refused, and
what the log says of it: over real sockets, as an ERP in a loop would send it."""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Callable

import pytest

from relay.ingress import protocol
from tests.ingress_harness import Raw, Relay
from tests.minimal_policy import listener

LIMIT = protocol.HARD_ERROR_LIMIT
MESSAGE = b"Subject: x\r\n\r\nbody\r\n."


def _replies_until_closed(raw: Raw) -> list[str]:
    replies = []
    with contextlib.suppress(EOFError, ConnectionResetError):
        while True:
            replies.append(raw.reply()[-1])
    return replies


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """The server's log of a connection's end follows the client's seeing it closed."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


@pytest.mark.parametrize(
    ("setup", "command", "error", "stage"),
    [
        (b"", b"MAIL FROM:<x>", "553 5.1.7 ", "MAIL"),  # Postfix's "after MAIL" too
        (b"MAIL FROM:<erp@acme.example>\r\n", b"MAIL FROM:<>", "503 ", "MAIL"),
        (b"", b"RSET x", "501 ", "RSET"),
        (b"", b"VRFY", "501 ", "VRFY"),
    ],
    ids=["bad-sender", "nested-mail", "rset", "vrfy"],
)
def test_a_client_looping_on_errors_is_told_421_and_closed(
    setup: bytes, command: bytes, error: str, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """2000 refused commands in one write were answered 2000 times, each MAIL
    with a log line, and the connection was never closed."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        raw.send(setup + (command + b"\r\n") * 2000)
        replies = _replies_until_closed(raw)
        closing = "client=127.0.0.1 disconnected after "
        _wait_for(lambda: bool(_lines(caplog, closing)))
    skip = 1 if setup else 0
    assert len(replies) == skip + LIMIT + 1
    assert all(r.startswith(error) for r in replies[skip:-1]), replies
    assert replies[-1] == "421 4.7.0 Too many errors, closing the connection"
    assert _lines(caplog, closing) == [
        f"{closing}{stage}: {replies[-1]} ({LIMIT} without a message accepted)"
    ]


@pytest.mark.parametrize(
    ("command", "answer"),
    [
        (b"NOOP", "250 2.0.0 OK"),
        (b"RSET", "250 2.0.0 OK"),
        (b"VRFY <a@b.example>", "252 2.0.0 Cannot VRFY user, but will accept message"),
    ],
)
def test_a_loop_of_commands_that_are_never_refused_is_ended_too(
    command: bytes, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Postfix's junk command limit: each answered 250, a loop was never ended.
    The log says why a client that had no error reply was cut off, and after
    which command, as Postfix does."""
    caplog.set_level(logging.INFO, logger="relay")
    closing = f"client=127.0.0.1 disconnected after {command.split()[0].decode()}: "
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        raw.send((command + b"\r\n") * 2000)
        replies = _replies_until_closed(raw)
        _wait_for(lambda: bool(_lines(caplog, closing)))
    assert len(replies) == protocol.JUNK_COMMAND_LIMIT + LIMIT + 1
    assert all(r.startswith(answer) for r in replies[:-1])
    assert replies[-1] == "421 4.7.0 Too many errors, closing the connection"
    assert _lines(caplog, closing) == [
        f"{closing}{replies[-1]} ({LIMIT} without a message accepted, {LIMIT} of them NOOP,"
        f" RSET or VRFY past the first {protocol.JUNK_COMMAND_LIMIT})"
    ]


def test_refused_senders_past_the_first_ones_share_one_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    prefix = "refused client=127.0.0.1 login=- from=<x>: "
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        raw.send(b"MAIL FROM:<x>\r\n" * 2000)
        replies = _replies_until_closed(raw)
        _wait_for(lambda: len(_lines(caplog, "refused ")) > protocol.REFUSALS_LOGGED)
    refusal = replies[0]
    unlogged = LIMIT - protocol.REFUSALS_LOGGED
    assert _lines(caplog, "refused ") == [
        *[prefix + refusal] * protocol.REFUSALS_LOGGED,
        f"{prefix}{unlogged} more messages refused, not logged one by one; the last: {refusal}",
    ]


def test_an_accepted_message_starts_the_error_count_afresh() -> None:
    """An ERP on one long connection, now and then a bad address among good
    messages, is not cut off: Postfix counts errors without mail delivered."""
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(3):
            for _ in range(LIMIT - 1):
                assert raw.cmd(b"MAIL FROM:<x>").startswith("553")
            raw.envelope()
            assert raw.cmd(b"DATA").startswith("354")
            assert raw.cmd(MESSAGE).startswith("250")
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"
    assert len(relay.process.calls) == 3


def test_an_accepted_message_starts_the_junk_command_count_afresh() -> None:
    """An ERP that keeps its connection open with a NOOP now and then, between
    messages, is not cut off after its hundredth: Postfix counts them, as the
    errors, on a session without mail delivered."""
    keepalives = protocol.JUNK_COMMAND_LIMIT + LIMIT - 1
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.ehlo()
        for _ in range(2):
            raw.send(b"NOOP\r\n" * keepalives)
            assert [raw.reply()[-1] for _ in range(keepalives)] == ["250 2.0.0 OK"] * keepalives
            raw.envelope()
            assert raw.cmd(b"DATA").startswith("354")
            assert raw.cmd(MESSAGE).startswith("250")
        assert raw.cmd(b"NOOP") == "250 2.0.0 OK"
    assert len(relay.process.calls) == 2


def test_recipients_past_the_limit_are_no_errors() -> None:
    """RFC 5321 4.5.3.1.10: the client sends them again in another transaction."""
    with Relay([listener(max_recipients=5)]) as relay, Raw(relay.port) as raw:
        raw.envelope(b"erp@acme.example", *(b"r%d@example.org" % n for n in range(5)))
        for n in range(5, 5 + LIMIT * 2):
            assert raw.cmd(b"RCPT TO:<r%d@example.org>" % n) == "452 4.5.3 Too many recipients"
        assert raw.cmd(b"DATA").startswith("354")
        assert raw.cmd(MESSAGE).startswith("250")


def test_past_the_recipients_overshoot_limit_each_refused_recipient_is_an_error() -> None:
    """Postfix's smtpd_recipient_overshoot_limit: a client sending RCPTs past the
    limit in a loop is ended after that many and then the hard error limit."""
    with Relay([listener(max_recipients=1)]) as relay, Raw(relay.port) as raw:
        raw.envelope()
        raw.send(b"RCPT TO:<r@example.org>\r\n" * (protocol.RCPT_OVERSHOOT + LIMIT * 2))
        replies = _replies_until_closed(raw)
    assert replies[:-1] == ["452 4.5.3 Too many recipients"] * (protocol.RCPT_OVERSHOOT + LIMIT)
    assert replies[-1] == "421 4.7.0 Too many errors, closing the connection"


def _disconnect_lines(
    caplog: pytest.LogCaptureFixture, relay: Relay, send: Callable[[Raw], None]
) -> tuple[list[str], list[str]]:
    """The client's replies from what ``send`` sent on, and the lines logged of its end."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        send(raw)
        replies = _replies_until_closed(raw)
    _wait_for(lambda: bool(_lines(caplog, "client=127.0.0.1 disconnected")))
    return replies, _lines(caplog, "client=127.0.0.1 disconnected")


def _idle_in_a_transaction(raw: Raw) -> None:
    assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
    assert raw.cmd(b"RCPT TO:<one@example.org>").startswith("250")


def _idle_in_data(raw: Raw) -> None:
    _idle_in_a_transaction(raw)
    assert raw.cmd(b"DATA").startswith("354")
    raw.send(b"Subject: x\r\n")


def _idle_after_a_message(raw: Raw) -> None:
    """A pooled ERP connection left open: it was logged "after EHLO", as one
    that never sent anything."""
    _idle_in_a_transaction(raw)
    assert raw.cmd(b"DATA").startswith("354")
    assert raw.cmd(b"Subject: x\r\n\r\nx\r\n.").startswith("250")


def _idle_after_a_greeting_again(raw: Raw) -> None:
    """The greeting is the last step, not the NOOP before it."""
    _idle_after_a_message(raw)
    assert raw.cmd(b"NOOP").startswith("250")
    raw.ehlo()


def _idle_after_a_login(raw: Raw) -> None:
    """An ERP that logged in and sent nothing: it was logged "after EHLO"."""
    login = base64.b64encode(b"\0erp-acme\0demo-password")
    assert raw.cmd(b"AUTH PLAIN " + login).startswith("235")


def _idle_after_a_transaction_given_up(raw: Raw) -> None:
    """Not "after END-OF-MESSAGE": the last message is not what it stopped at."""
    _idle_after_a_message(raw)
    _idle_in_a_transaction(raw)
    assert raw.cmd(b"RSET").startswith("250")


def _idle_after_a_refused_sender(raw: Raw) -> None:
    assert raw.cmd(b"MAIL FROM:<bad>").startswith("553")


def _idle_after_a_non_ascii_sender(raw: Raw) -> None:
    """Refused by aiosmtpd before its MAIL method runs: it was logged "after EHLO"."""
    assert raw.cmd("MAIL FROM:<\u00f8@acme.example>".encode()).startswith("501 5.6.7")


def _idle_after_a_line_that_is_no_command(raw: Raw) -> None:
    assert raw.cmd(b"\xff\xfe x").startswith("500")


def _idle_after_a_refused_recipient(raw: Raw) -> None:
    """Postfix's "after RCPT": the client's last command, whatever its answer."""
    assert raw.cmd(b"MAIL FROM:<erp@acme.example>").startswith("250")
    assert raw.cmd(b"RCPT TO:<bad>").startswith("5")


def _unknown_commands_around_a_known_one(raw: Raw) -> None:
    """The fifth unknown command, after a NOOP, was logged "after NOOP"."""
    for _ in range(4):
        assert raw.cmd(b"FOO").startswith("500 5.5.2 ")
    assert raw.cmd(b"NOOP").startswith("250")
    raw.send(b"XCLIENT a=b\r\n")


TIMEOUT = "421 4.4.2 relay.test.example Error: timeout exceeded"


@pytest.mark.parametrize(
    ("send", "stage", "reply"),
    [
        (_idle_in_a_transaction, "RCPT", TIMEOUT),
        (_idle_in_data, "DATA", TIMEOUT),
        (_idle_after_a_message, "END-OF-MESSAGE", TIMEOUT),
        (_idle_after_a_transaction_given_up, "RSET", TIMEOUT),
        (_idle_after_a_greeting_again, "EHLO", TIMEOUT),
        (_idle_after_a_login, "AUTH", TIMEOUT),
        (_idle_after_a_refused_sender, "MAIL", TIMEOUT),
        (_idle_after_a_refused_recipient, "RCPT", TIMEOUT),
        (_idle_after_a_non_ascii_sender, "MAIL", TIMEOUT),
        (_idle_after_a_line_that_is_no_command, "UNKNOWN", TIMEOUT),
        (
            lambda raw: raw.send(b"BOGUS\r\n" * 10),
            "UNKNOWN",
            "421 4.7.0 Too many unrecognized commands, closing the connection",
        ),
        (
            _unknown_commands_around_a_known_one,
            "UNKNOWN",
            "421 4.7.0 Too many unrecognized commands, closing the connection",
        ),
        (
            lambda raw: raw.send(b"AUTH PLAIN AGF1AGI=\r\n" * 15),
            "AUTH",
            "421 4.7.0 AUTH sent too many times",
        ),
    ],
    ids=[
        *("idle-after-rcpt", "idle-in-data", "idle-after-a-message", "idle-after-rset"),
        *("idle-after-ehlo-again", "idle-after-auth"),
        *("idle-after-a-refused-sender", "idle-after-a-refused-recipient"),
        *("idle-after-a-non-ascii-sender", "idle-after-no-command"),
        *("unknown-commands", "unknown-commands-around-a-known-one", "auth"),
    ],
)
def test_a_connection_the_relay_ends_with_421_has_one_log_line(
    send: Callable[[Raw], None], stage: str, reply: str, caplog: pytest.LogCaptureFixture
) -> None:
    """It had none (aiosmtpd's went to a logger kept quiet), or, idle in DATA,
    only ``connection lost during DATA``, as if the client had gone. Only the
    idle cases wait for a short timeout: with it, ten slowed-down AUTH checks
    on a busy host were cut as idle before the limit's 421."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener(idle_timeout=0.5 if reply == TIMEOUT else 30)]) as relay:
        replies, lines = _disconnect_lines(caplog, relay, send)
    assert replies[-1] == reply
    assert lines == [f"client=127.0.0.1 disconnected after {stage}: {reply}"]
    assert "connection lost" not in caplog.text
    # an ERP's pooled connection times out routinely: not in journalctl -p warning
    levels = {r.levelname for r in caplog.records if r.getMessage() == lines[0]}
    assert levels == {"INFO" if reply == TIMEOUT else "WARNING"}


def test_a_nested_mail_is_no_refused_message(caplog: pytest.LogCaptureFixture) -> None:
    """It was logged ``refused``, while the transaction it came in went on to be
    delivered: a count of refused lines overcounted the mail lost."""
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"MAIL FROM:<>").startswith("503 ")
        assert raw.cmd(b"DATA").startswith("354")
        assert raw.cmd(MESSAGE).startswith("250")
        assert raw.cmd(b"QUIT").startswith("221")
    assert len(relay.process.calls) == 1
    assert _lines(caplog, "refused ") == []


def test_a_failure_reading_data_closes_the_connection_unread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of memory under ``ulimit -v``, aiosmtpd answered 451 and read the rest
    of the message as commands: a MAIL, RCPT and DATA in its text were sent."""
    from relay.ingress import data

    async def out_of_memory(*args: object, **kwargs: object) -> data.Data:
        raise MemoryError

    monkeypatch.setattr(data, "read", out_of_memory)
    body = (
        b"Subject: x\r\n\r\nRSET\r\nMAIL FROM:<erp@acme.example>\r\n"
        b"RCPT TO:<smuggled@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n"
    )
    caplog.set_level(logging.INFO, logger="relay")
    with Relay([listener()]) as relay, Raw(relay.port) as raw:
        raw.envelope()
        assert raw.cmd(b"DATA").startswith("354")
        raw.send(body)
        assert raw.reply() == [protocol.READ_FAILED]
        assert raw.closed()
    assert relay.process.calls == []
    assert "reading DATA failed; the connection is closed" in caplog.text
