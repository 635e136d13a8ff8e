"""DATA read in large pieces ends where aiosmtpd's line reader ends, and nowhere else."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ingress import content, data

LIMIT = 1001  # aiosmtpd's stream reader limit (its line length limit)


def reference(wire: bytes) -> tuple[bytes, bytes]:
    """aiosmtpd 1.4's DATA loop, line by line: (content, what is left unread)."""
    lines, rest = [], wire
    while True:
        line, sep, rest = rest.partition(b"\r\n")
        assert sep, "the test wire always ends DATA"
        if line == b".":
            break
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in lines), rest


async def read_in_pieces(
    wire: bytes, piece: int, limit: int | None = None
) -> tuple[data.Data, bytes, int]:
    reader = asyncio.StreamReader(limit=LIMIT)

    async def feed() -> None:
        for start in range(0, len(wire), piece):
            reader.feed_data(wire[start : start + piece])
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    section = await asyncio.wait_for(data.read(reader, limit), 10)
    await feeding
    return section, await reader.read(), reader._limit


async def test_empty_message_and_pipelined_command_left_unread() -> None:
    section, rest, window = await read_in_pieces(b".\r\nRSET\r\n", 64)
    assert section == data.Data(b"", data.Overflow.NONE)
    assert rest == b"RSET\r\n" and window == LIMIT


async def test_a_dot_line_after_bare_line_feeds_then_silence_is_a_bare_end() -> None:
    for wire in (b"Subject: x\n\nbody\n.\n", b"Subject: x\r\n\r\nbody\n.\r\n", b".\n"):
        reader = asyncio.StreamReader(limit=LIMIT)
        reader.feed_data(wire)  # and then nothing: the client waits for the reply
        section = await asyncio.wait_for(data.read(reader, None), data.STALL + 5)
        assert section == data.Data(b"", data.Overflow.NONE, bare_end=True), wire


async def test_a_bare_dot_line_with_more_after_it_then_silence_is_a_bare_end() -> None:
    """Only a bare dot line at the very end of what came was seen: a client that
    pipelined its QUIT after the ``.<LF>`` heard nothing until the idle timeout,
    a 421 it retried for ever."""
    for wire in (
        b"From: a@b\nSubject: x\n\nbody\n.\nQUIT\n",
        b"Subject: x\r\n\r\nbody\n.\r\nQUIT\r\n",
        b"Subject: x\n\nbody\n.\nQUIT\nRSET.\r\nNOOP\n",  # a dot line in an earlier piece
        b".\nQUIT\n",
    ):
        reader = asyncio.StreamReader(limit=LIMIT)
        reader.feed_data(wire)
        section = await asyncio.wait_for(data.read(reader, None), data.STALL * 2 + 5)
        assert section == data.Data(b"", data.Overflow.NONE, bare_end=True), wire


class _LateEnd(asyncio.StreamReader):
    """The proper end arrives in the same turn of the event loop as the stall
    timer runs out: in the buffer, with the wait for it timed out."""

    def __init__(self, first: bytes, end: bytes) -> None:
        super().__init__(limit=LIMIT)
        self.feed_data(first)
        self._end = end

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        if self._end:
            self.feed_data(self._end)
            self._end = b""
            raise TimeoutError
        return await super().readuntil(separator)


async def test_a_proper_end_that_comes_as_the_stall_timer_runs_out_ends_the_message() -> None:
    """``\\r\\n.\\r\\n`` was taken for a bare end: a valid message the client sent a
    second after the 354 (or paused a second before its dot) was refused 550 5.6.11."""
    for first, end in ((b"Subject: x\r\n\r\nbody\r\n", b".\r\n"), (b"", b".\r\n")):
        section = await asyncio.wait_for(data.read(_LateEnd(first, end), None), 5)
        assert section == data.Data(first, data.Overflow.NONE), (first, end)
    for first, end in ((b"Subject: x\r\n\r\nbody\n", b".\r\n"), (b"body\r\n", b".\n")):
        section = await asyncio.wait_for(data.read(_LateEnd(first, end), None), 5)
        assert section.bare_end, (first, end)


async def test_a_bare_dot_line_the_client_goes_on_after_is_no_end(monkeypatch) -> None:
    """Only silence makes it an end: more data (a slow client) and the section goes on,
    to be refused whole for its bare line feed, as before."""
    monkeypatch.setattr(data, "STALL", 0.2)
    reader = asyncio.StreamReader(limit=LIMIT)
    reader.feed_data(b"Subject: x\r\n\r\nbody\n.\n")

    async def rest() -> None:
        await asyncio.sleep(0.05)
        reader.feed_data(b"more\r\n.\r\nNOOP\r\n")

    feeding = asyncio.ensure_future(rest())
    section = await asyncio.wait_for(data.read(reader, None), 5)
    await feeding
    assert section.content == b"Subject: x\r\n\r\nbody\n.\nmore\r\n"
    assert not section.bare_end
    assert content.refusal(section.content) is content.BARE_NEWLINE


async def test_dots_are_unstuffed_on_every_line() -> None:
    wire = b"..first\r\nplain\r\n.x\r\n...\r\nend.\r\n.\r\nQUIT\r\n"
    section, rest, _ = await read_in_pieces(wire, 5)
    assert section.content == b".first\r\nplain\r\nx\r\n..\r\nend.\r\n"
    assert rest == b"QUIT\r\n"


async def test_smuggling_sequences_do_not_end_the_section() -> None:
    for fake in (b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"):
        wire = b"Subject: x\r\n\r\nbody" + fake + b"MAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n"
        section, rest, _ = await read_in_pieces(wire, 7)
        assert section.content.endswith(b"MAIL FROM:<evil@x>\r\n") and rest == b"NOOP\r\n"
        assert (section.content, rest) == reference(wire)


async def test_a_large_message_in_small_segments() -> None:
    body = b"".join(b"QUJD" * 19 + b"\r\n" for _ in range(3000))  # 234 KB of base64
    section, rest, window = await read_in_pieces(body + b".\r\nQUIT\r\n", 1460)
    assert section.content == body and rest == b"QUIT\r\n" and window == LIMIT


async def test_dot_lines_across_the_pieces_of_a_large_message_are_unstuffed() -> None:
    """Unstuffed piece by piece (a 25 MB message with dot lines took a third copy
    of itself, unstuffed whole): pieces past the window are cut anywhere, so a
    line's CR LF and its stuffed dot may come in different pieces."""
    lines = [b"." + b"x" * (n * 37 % 119) + b"y" for n in range(6000)]  # no ".\r\n" in it
    wire = b"".join(b"." + line + b"\r\n" for line in lines) + b".\r\nQUIT\r\n"
    assert len(wire) > 4 * data.WINDOW
    for piece in (1460, 4096, 65535):
        section, rest, _ = await read_in_pieces(wire, piece)
        assert (section.content, rest) == reference(wire)


async def test_past_the_limit_is_drained_and_the_next_command_kept() -> None:
    body = b"x" * 60 + b"\r\n"
    wire = body * 100 + b".\r\nRSET\r\n"
    section, rest, _ = await read_in_pieces(wire, 100, limit=len(body) * 50)
    assert section == data.Data(b"", data.Overflow.TOO_MUCH)
    assert rest == b"RSET\r\n"
    section, _, _ = await read_in_pieces(wire, 100, limit=len(body) * 100)
    assert section.overflow is data.Overflow.NONE and section.content == body * 100
    section, _, _ = await read_in_pieces(wire, 100, limit=len(body) * 100 - 1)
    assert section.overflow is data.Overflow.TOO_MUCH


lines = st.lists(
    st.sampled_from([b"", b".", b"..", b".x", b"x.", b"a\rb", b"a\nb", b"\n.", b"\r.", b"ok"])
    | st.binary(max_size=40).map(lambda b: b.replace(b"\r\n", b"")),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(lines=lines, piece=st.integers(1, 50), after=st.sampled_from([b"", b"RSET\r\n"]))
def test_same_content_and_same_end_as_aiosmtpd(
    lines: list[bytes], piece: int, after: bytes
) -> None:
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    wire = b"".join(line + b"\r\n" for line in stuffed) + b".\r\n" + after
    section, rest, _ = asyncio.run(read_in_pieces(wire, piece))
    assert (section.content, rest) == reference(wire)


@settings(max_examples=300, deadline=None)
@given(lines=lines, piece=st.integers(1, 50))
def test_the_size_limit_counts_the_mail_not_the_dots_added_for_transparency(
    lines: list[bytes], piece: int
) -> None:
    """RFC 1870 4: a message announced with SIZE=N and N octets long was refused
    at the end of its data when a line of it began with a dot."""
    stuffed = [b"." + line if line.startswith(b".") else line for line in lines]
    wire = b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"
    mail, _ = reference(wire)
    section, _, _ = asyncio.run(read_in_pieces(wire, piece, limit=max(len(mail), 1)))
    assert section == data.Data(mail, data.Overflow.NONE)
    if len(mail) > 1:
        section, _, _ = asyncio.run(read_in_pieces(wire, piece, limit=len(mail) - 1))
        assert section.overflow is data.Overflow.TOO_MUCH


@settings(max_examples=2000, deadline=None)
@given(
    lines=st.lists(st.integers(0, 40), max_size=15),
    closed=st.booleans(),
    limit=st.integers(0, 45),
)
def test_long_lines_are_found_wherever_they_are(lines: list[int], closed: bool, limit: int) -> None:
    message = b"\r\n".join(b"x" * n for n in lines) + (b"\r\n" if closed else b"")
    expected = max(map(len, message.split(b"\r\n")), default=0) > limit
    assert content.has_long_line(message, limit) == expected
