"""The SMTP transaction writes the stored bytes as they are, over a real server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import aiosmtplib
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relay.upstream import pipelining as pipelining_module
from relay.upstream import transaction
from tests.sink import DsnSink, DsnSinkServer, Sink, SinkServer, free_port

MESSAGE = b"From: a@example.org\r\nSubject: dots\r\n\r\n.first\r\nmiddle\r\n..two\r\n.\r\nend\r\n"


def test_a_clean_message_is_sent_without_a_copy() -> None:
    clean = b"Subject: x\r\n\r\nbody\r\n"
    assert transaction.wire(clean) == (clean, len(clean))
    assert transaction.wire(clean)[0] is clean


@pytest.mark.parametrize(
    ("stored", "sent", "size"),
    [
        (b".a\r\nb\r\n.\r\n", b"..a\r\nb\r\n..\r\n", 10),
        (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n", 9),
        (b"no final line ending", b"no final line ending\r\n", 22),
        (b"", b"", 0),
    ],
)
def test_wire_stuffs_dots_and_ends_lines_with_crlf(stored: bytes, sent: bytes, size: int) -> None:
    assert transaction.wire(stored) == (sent, size)  # size: RFC 1870, before stuffing


async def _send(
    sink: SinkServer, rcpts: list[str], data: bytes = MESSAGE, envelope_id: str | None = None
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False, timeout=10)
    await client.connect()
    try:
        return await transaction.send(
            client, "bounces@example.net", rcpts, data, 10, envelope_id=envelope_id
        )
    finally:
        client.close()


async def test_dotted_lines_arrive_intact(pipelining: bool) -> None:
    with SinkServer(Sink(pipelining=pipelining)) as sink:
        refused, reply = await _send(sink, ["one@example.org", "two@example.org"])
    assert refused == {} and reply == "2.0.0 sink accepted"
    (got,) = sink.sink.messages
    assert got.data == MESSAGE and got.rcpt_tos == ["one@example.org", "two@example.org"]


async def test_a_reset_goes_before_the_transaction(pipelining: bool) -> None:
    with SinkServer(Sink(pipelining=pipelining)) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        try:
            for reset in (False, True):
                await transaction.send(
                    client, "b@example.net", ["one@example.org"], MESSAGE, 10, reset
                )
        finally:
            client.close()
    assert [m.data for m in sink.sink.messages] == [MESSAGE, MESSAGE]
    assert sink.sink.resets == 1


async def test_a_refused_reset_means_a_stale_connection_not_a_refused_message(
    pipelining: bool,
) -> None:
    refusing = Sink(pipelining=pipelining, rset_reply="502 5.5.1 not now")
    with SinkServer(refusing) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        try:
            with pytest.raises(pipelining_module.Stale):
                await transaction.send(
                    client, "b@example.net", ["one@example.org"], MESSAGE, 10, True
                )
            assert not client.is_connected
        finally:
            client.close()
    assert sink.sink.messages == []


async def test_one_refused_recipient_is_reported_and_the_others_get_it(pipelining: bool) -> None:
    refusing = Sink(refuse={"gone@example.org": "550 5.1.1 no such user"}, pipelining=pipelining)
    with SinkServer(refusing) as sink:
        refused, _ = await _send(sink, ["gone@example.org", "one@example.org"])
    assert {a: (r.code, r.message) for a, r in refused.items()} == {
        "gone@example.org": (550, "5.1.1 no such user")
    }
    assert [m.rcpt_tos for m in sink.sink.messages] == [["one@example.org"]]


async def test_every_recipient_refused_raises_and_the_connection_stays_usable(
    pipelining: bool,
) -> None:
    refusing = Sink(refuse={"gone@example.org": "450 4.2.1 try later"}, pipelining=pipelining)
    with SinkServer(refusing) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        try:
            with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
                await transaction.send(client, "b@example.net", ["gone@example.org"], MESSAGE, 10)
            assert refused.value.recipients[0].code == 450
            await transaction.send(client, "b@example.net", ["one@example.org"], MESSAGE, 10)
        finally:
            client.close()
    assert [m.rcpt_tos for m in sink.sink.messages] == [["one@example.org"]]


async def test_none_of_the_needed_recipients_taken_sends_nothing_and_resets(
    pipelining: bool,
) -> None:
    """The copy was taken, the recipient it goes with was not: no DATA, so the
    copy does not go alone, and the connection serves the next message."""
    refusing = Sink(refuse={"gone@example.org": "550 5.1.1 no such user"}, pipelining=pipelining)
    rcpts = ["gone@example.org", "copy@example.net"]
    with SinkServer(refusing) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        try:
            with pytest.raises(pipelining_module.Withheld) as withheld:
                await transaction.send(
                    client, "b@example.net", rcpts, MESSAGE, 10, needed=["gone@example.org"]
                )
            assert [(r.recipient, r.code) for r in withheld.value.recipients] == [
                ("gone@example.org", 550)
            ]
            assert withheld.value.taken == ["copy@example.net"]
            assert sink.sink.messages == [] and sink.sink.resets == 1
            await transaction.send(client, "b@example.net", ["one@example.org"], MESSAGE, 10)
        finally:
            client.close()
    assert [m.rcpt_tos for m in sink.sink.messages] == [["one@example.org"]]


async def test_one_needed_recipient_taken_sends_to_every_recipient_taken(
    pipelining: bool,
) -> None:
    refusing = Sink(refuse={"gone@example.org": "550 5.1.1 no such user"}, pipelining=pipelining)
    rcpts = ["gone@example.org", "one@example.org", "copy@example.net"]
    needed = ["gone@example.org", "one@example.org"]
    with SinkServer(refusing) as sink:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=sink.port, start_tls=False)
        await client.connect()
        try:
            refused, reply = await transaction.send(
                client, "b@example.net", rcpts, MESSAGE, 10, needed=needed
            )
        finally:
            client.close()
    assert list(refused) == ["gone@example.org"] and reply == "2.0.0 sink accepted"
    assert [m.rcpt_tos for m in sink.sink.messages] == [["one@example.org", "copy@example.net"]]


async def test_a_refused_data_section_raises_the_servers_reply(pipelining: bool) -> None:
    refusing = Sink(data_reply="554 5.6.0 content refused", pipelining=pipelining)
    with SinkServer(refusing) as sink, pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await _send(sink, ["one@example.org"])
    assert (refused.value.code, refused.value.message) == (554, "5.6.0 content refused")


@pytest.mark.parametrize("bad", ["not an address@example.org", '"x\x00y"@example.org'])
async def test_an_address_it_cannot_send_is_refused_before_anything_is_sent(bad: str) -> None:
    with SinkServer(Sink(pipelining=True)) as sink, pytest.raises(ValueError):
        await _send(sink, ["one@example.org", bad])
    assert sink.sink.messages == []


async def test_the_size_is_declared_so_a_too_big_message_is_refused_at_mail(
    pipelining: bool,
) -> None:
    """An upstream that offers SIZE refuses before the message is sent at all."""
    sink = Sink(pipelining=pipelining)
    controller = Controller(sink, hostname="127.0.0.1", port=free_port(), data_size_limit=60)
    controller.start()
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=controller.port, start_tls=False)
        await client.connect()
        try:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await transaction.send(client, "b@example.net", ["one@example.org"], MESSAGE, 10)
        finally:
            client.close()
    finally:
        controller.stop()
    assert refused.value.code == 552


@dataclass
class OptionsSink(Sink):
    """Records each MAIL FROM's parameters; offers 8BITMIME only with ``eightbit``."""

    eightbit: bool = True
    mail_options: list[list[str]] = field(default_factory=list)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list
    ) -> list:
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return responses if self.eightbit else [r for r in responses if r != "250-8BITMIME"]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list
    ) -> str:
        self.mail_options.append(options)
        envelope.mail_from = address  # what aiosmtpd does when there is no hook
        envelope.mail_options.extend(options)
        return "250 OK"


EIGHT_BIT = [
    b"Subject: Rechnung f\xc3\xbcr Jan\r\n\r\nbody\r\n",  # RFC 6532 header, 7-bit body
    b"Subject: x\r\n\r\n\xc3\x86 8-bit \xff\r\n",
]


@pytest.mark.parametrize("data", EIGHT_BIT)
async def test_8bit_content_is_announced_to_a_server_that_offers_8bitmime(
    pipelining: bool, data: bytes
) -> None:
    recording = OptionsSink(pipelining=pipelining)
    with SinkServer(recording) as sink:
        await _send(sink, ["one@example.org"], data)
        await _send(sink, ["one@example.org"], MESSAGE)
    assert recording.mail_options == [
        [f"SIZE={len(data)}", "BODY=8BITMIME"],
        [f"SIZE={len(MESSAGE)}"],  # 7-bit: nothing to announce
    ]
    assert [m.data for m in recording.messages] == [data, MESSAGE]


async def test_8bit_content_goes_as_it_is_to_a_server_without_8bitmime(pipelining: bool) -> None:
    """Neither announced nor converted: the signed bytes arrive unchanged."""
    recording = OptionsSink(pipelining=pipelining, eightbit=False)
    with SinkServer(recording) as sink:
        await _send(sink, ["one@example.org"], EIGHT_BIT[1])
    assert recording.mail_options == [[f"SIZE={len(EIGHT_BIT[1])}"]]
    assert [m.data for m in recording.messages] == [EIGHT_BIT[1]]


ADDRESS_PIECES = st.sampled_from([*'ab9.@<> "()\\,;:é\r\n\x00', "x@y.example", "Jan <", ">"])


@given(st.lists(ADDRESS_PIECES, max_size=12).map("".join))
@settings(max_examples=2000, deadline=None)
@example("jan@acme.example")
@example("j.o'k+x@a-b.example")
@example("a..b@acme.example")
@example('"a b"@acme.example')
@example("Jan <jan@acme.example>")
@example("jan@acme.example\r\nRCPT TO:<x@example.org>")
@example("jé@acme.example")
@example('"x\x00y"@example.org')
def test_paths_are_what_aiosmtplib_would_send(address: str) -> None:
    """The envelope bytes, or the refusal, are aiosmtplib's own for every address."""
    assert _outcome(transaction.path, address) == _outcome(_aiosmtplib_path, address)


def _aiosmtplib_path(address: str) -> bytes:
    """The path aiosmtplib sends: quoted, then refused with control characters in it."""
    quoted = quote_address(address).encode("ascii")
    if COMMAND_INJECTION_REGEX.search(quoted):
        raise ValueError("prohibited control character")
    return quoted


def _outcome(quote: Callable[[str], bytes], address: str) -> object:
    try:
        return quote(address)
    except ValueError as exc:  # UnicodeEncodeError included
        return type(exc)


@pytest.mark.parametrize("offers", [True, False])
async def test_the_queue_id_goes_as_envid_with_ret_hdrs_to_a_server_offering_dsn(
    pipelining: bool, offers: bool
) -> None:
    """A bounce then names the message by its queue ID (Original-Envelope-Id) and
    returns its header only; a server without DSN would refuse the parameters."""
    recording = DsnSink(pipelining=pipelining, offers=offers)
    with DsnSinkServer(recording) as sink:
        await _send(sink, ["one@example.org"], MESSAGE, envelope_id="25Y4D6Z2+3B=JFRP")
    expected = ["RET=HDRS", "ENVID=25Y4D6Z2+2B3B+3DJFRP"] if offers else []
    assert recording.dsn_options == [expected]
    assert [m.data for m in recording.messages] == [MESSAGE]
