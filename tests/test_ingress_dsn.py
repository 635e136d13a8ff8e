"""RFC 3461's DSN parameters over real sockets: taken from an ERP that asked
Postfix for delivery receipts, though DSN is not offered, and not acted on."""

from __future__ import annotations

import logging
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ingress_harness import Raw, Relay, swaks
from tests.minimal_policy import listener
from tests.relayproc import RelayProcess
from tests.sink import DsnSink, DsnSinkServer, free_port
from tests.test_queue_e2e import SMALL, audit_events, immediate

MAIL = b"MAIL FROM:<jan@acme.example> RET=HDRS ENVID=abc"
RCPT = b"RCPT TO:<x@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@example.org"
MAIL_SYNTAX = "501 5.5.4 Syntax: MAIL FROM:<address> [SP <mail-parameters>]"
MAIL_UNKNOWN = "555 5.5.4 MAIL FROM parameters not recognized or not implemented"
RCPT_UNKNOWN = "555 5.5.4 RCPT TO parameters not recognized or not implemented"


@pytest.fixture
def relay() -> Iterator[Relay]:
    with Relay([listener()]) as running:
        yield running


def _data(raw: Raw) -> str:
    assert raw.cmd(b"DATA").startswith("354")
    return raw.cmd(b"Subject: receipt\r\n\r\nx\r\n.")


def test_an_erp_asking_for_receipts_has_its_message_taken(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused 555, as RFC 3461 has it since DSN is not offered, every message
    of an ERP that asked Postfix for delivery receipts was lost after the move."""
    caplog.set_level(logging.DEBUG, logger="relay")
    with Raw(relay.port) as raw:
        assert not any(line[4:].upper().startswith("DSN") for line in raw.ehlo())
        assert raw.cmd(MAIL) == "250 2.1.0 OK"
        assert raw.cmd(RCPT) == "250 2.1.5 OK"
        assert _data(raw).startswith("250")
    (submission,) = relay.process.submissions
    assert (submission.mail_from, submission.rcpt_tos) == ("jan@acme.example", ("x@example.org",))
    logged = [r.getMessage() for r in caplog.records]
    assert [m for m in logged if not m.endswith("closed the connection")] == []


@pytest.mark.parametrize(
    ("mail", "rcpt"),
    [
        (b"RET=FULL", b"NOTIFY=NEVER"),
        (b"ret=hdrs envid=INV-4711+2Bx+3D1", b"notify=delay ORCPT=rfc822;one+2B1@example.org"),
        (b"ENVID=" + b"a" * 100 + b" RET=HDRS", b"ORCPT=utf-8;one@example.org NOTIFY=FAILURE"),
        (b"SIZE=100 AUTH=<> BODY=8BITMIME ENVID=x", b"NOTIFY=FAILURE,DELAY,SUCCESS"),
        (b"ENVID=!\"#$%&'()*,-./:;<>?@[\\]^_`{|}~", b"ORCPT=rfc822;"),
    ],
)
def test_well_formed_dsn_parameters_are_taken(relay: Relay, mail: bytes, rcpt: bytes) -> None:
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<jan@acme.example> " + mail) == "250 2.1.0 OK"
        assert raw.cmd(b"RCPT TO:<one@example.org> " + rcpt) == "250 2.1.5 OK"
        assert _data(raw).startswith("250")
    assert relay.process.submissions[0].rcpt_tos == ("one@example.org",)


def _refusal(text: str) -> str:
    return f"501 5.5.4 Error: {text}"


RET = _refusal("RET can only be one of FULL, HDRS")
ENVID = _refusal("ENVID must be xtext (RFC 3461 4) of at most 100 characters")
NOTIFY = _refusal("NOTIFY can only be NEVER or a list of SUCCESS, FAILURE, DELAY")
ORCPT = _refusal("ORCPT must be an address type and xtext, as rfc822;one@example.org")


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (b"RET=NONE", RET),
        (b"RET", RET),
        (b"ENVID=" + b"a" * 101, ENVID),
        (b"ENVID=a+b", ENVID),
        (b"ENVID=a+2", ENVID),
        (b"ENVID=a=b", ENVID),
        (b"ENVID", ENVID),
        (b"RET=HDRS RET=FULL", _refusal("RET can only be given once")),
        (b"ENVID=a SIZE=100 ENVID=a", _refusal("ENVID can only be given once")),
        (b"ENVID=", MAIL_SYNTAX),  # an empty value, as for any parameter
    ],
)
def test_a_malformed_mail_dsn_parameter_is_refused_by_name(
    relay: Relay, caplog: pytest.LogCaptureFixture, parameters: bytes, expected: str
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<jan@acme.example> " + parameters) == expected
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>") == "250 2.1.0 OK"
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert refused == [f"refused client=127.0.0.1 login=- from=<jan@acme.example>: {expected}"]


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (b"NOTIFY=SOMETIMES", NOTIFY),
        (b"NOTIFY=NEVER,SUCCESS", NOTIFY),
        (b"NOTIFY=SUCCESS,", NOTIFY),
        (b"NOTIFY=SUCCESS;FAILURE", NOTIFY),
        (b"NOTIFY", NOTIFY),
        (b"ORCPT=one@example.org", ORCPT),
        (b"ORCPT=rfc822", ORCPT),
        (b"ORCPT=;one@example.org", ORCPT),
        (b"ORCPT=rfc822;a+b@example.org", ORCPT),
        (b"NOTIFY=NEVER NOTIFY=NEVER", _refusal("NOTIFY can only be given once")),
        (b"ORCPT=rfc822;a ORCPT=rfc822;a", _refusal("ORCPT can only be given once")),
    ],
)
def test_a_malformed_rcpt_dsn_parameter_is_refused_by_name(
    relay: Relay, caplog: pytest.LogCaptureFixture, parameters: bytes, expected: str
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with Raw(relay.port) as raw:
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<jan@acme.example>") == "250 2.1.0 OK"
        assert raw.cmd(b"RCPT TO:<one@example.org> " + parameters) == expected
        assert raw.cmd(b"RCPT TO:<one@example.org>") == "250 2.1.5 OK"
        assert _data(raw).startswith("250")
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert refused == [
        f"refused client=127.0.0.1 login=- from=<jan@acme.example> to=<one@example.org>: {expected}"
    ]


def test_parameters_of_the_other_command_or_unknown_stay_refused_555(relay: Relay) -> None:
    """Only what RFC 3461 puts on each command is taken there."""
    with Raw(relay.port) as raw:
        raw.ehlo()
        for parameter in (b"NOTIFY=NEVER", b"ORCPT=rfc822;a@b.example", b"X-ENVID=1"):
            assert raw.cmd(b"MAIL FROM:<a@b.example> " + parameter) == MAIL_UNKNOWN
        assert raw.cmd(b"MAIL FROM:<a@b.example> RET=FULL") == "250 2.1.0 OK"
        for parameter in (b"RET=FULL", b"ENVID=abc", b"X-NOTIFY=NEVER"):
            assert raw.cmd(b"RCPT TO:<c@d.example> " + parameter) == RCPT_UNKNOWN


def test_a_malformed_dsn_parameter_is_not_checked_before_the_session_allows_the_command(
    relay: Relay,
) -> None:
    """The 501 comes where aiosmtpd checks parameters: after the greeting, the
    path and the order of the commands."""
    with Raw(relay.port) as raw:
        assert raw.cmd(b"MAIL FROM:<a@b.example> RET=NONE") == "503 5.5.1 Error: send HELO first"
        raw.ehlo()
        assert raw.cmd(b"MAIL FROM:<a@b.example> RET=FULL") == "250 2.1.0 OK"
        nested = raw.cmd(b"MAIL FROM:<a@b.example> RET=NONE")
        assert nested == "503 5.5.1 Error: nested MAIL command"
        assert raw.cmd(b"RCPT TO:<c@d.example> NOTIFY=NEVER").startswith("250")


def test_swaks_with_dsn_parameters_on_its_commands(relay: Relay) -> None:
    """swaks of this age has no DSN options: a path that goes on past its ``>``
    puts the parameters on the command, swaks's own ``>`` ending the last
    one's xtext."""
    done = swaks(
        relay.port,
        "--from", "jan@acme.example> RET=HDRS ENVID=abc",
        "--to", "x@example.org> NOTIFY=FAILURE ORCPT=rfc822;x@example.org",
        "--header", "From: jan@acme.example",
        "--header", "To: x@example.org",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "<-  250 2.1.0 OK" in done.stdout and "<-  250 2.1.5 OK" in done.stdout
    (submission,) = relay.process.submissions
    assert (submission.mail_from, submission.rcpt_tos) == ("jan@acme.example", ("x@example.org",))


def test_the_client_s_dsn_parameters_never_go_upstream(policy_file: Path, tmp_path: Path) -> None:
    """The relay sends its own to an upstream that offers DSN (its queue ID as
    ENVID, RET=HDRS): the ERP's would name another message, and its NOTIFY
    have the upstream send receipts the relay does not pass on."""
    recording = DsnSink()
    with DsnSinkServer(recording) as sink:
        port = free_port()
        policy = immediate(policy_file, port, sink.port)  # the ERP waits for the upstream
        with RelayProcess(policy, port, tmp_path / "relay.log") as running:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo()
                client.mail("jan@acme.example", ["RET=FULL", "ENVID=ERP-4711"])
                client.rcpt("one@example.org", ["NOTIFY=SUCCESS", "ORCPT=rfc822;one@example.org"])
                code, reply = client.data(SMALL)
            assert code == 250, reply
            log = running.log()
    queue_id = reply.decode().rsplit(" ", 1)[1]
    assert [m.rcpt_tos for m in recording.messages] == [["one@example.org"]]
    assert recording.dsn_options == [["RET=HDRS", f"ENVID={queue_id}"]]
    assert ("delivered", "one@example.org") in audit_events(policy, queue_id)
    assert "ERP-4711" not in log and "NOTIFY" not in log
