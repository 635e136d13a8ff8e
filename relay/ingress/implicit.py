"""Implicit TLS (port 465, the "SSL/TLS" of ERPs, RFC 8314): the handshake
before the SMTP session, which then runs over TLS as it does after STARTTLS.

The handshake is started here rather than by the server's ``ssl=``: asyncio
says nothing of a handshake that fails there, so a plain-text client left no
line in the log; and each connection takes the certificate its listener
serves when it comes, so that a reload's renewal is served without a restart.
It begins with the client's first bytes, which a TLS client sends as it
connects: a client that sent none in ``FIRST_BYTES_WAIT`` waits for a plain
greeting, one that stalled in its handshake is given the idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from relay import tally
from relay.ingress.protocol import (
    CLOSED_AFTER_HANDSHAKE,
    HANDSHAKE_FAILED,
    HANDSHAKE_TIMED_OUT,
    RelaySMTP,
    client_address,
    handshake_failure,
)
from relay.tally import TallyRow

log = logging.getLogger("relay")

PLAIN_CLIENT = (
    "client=%s %s where a TLS handshake was expected: is it set for STARTTLS or no"
    " encryption (port 587 or 25)? this listener offers implicit TLS"
)
# A client set for STARTTLS waited for a greeting until the idle timeout (300 s)
# and then told its user only that the connection closed.
FIRST_BYTES_WAIT = 10.0  # seconds, or the idle timeout if shorter
WAITS_FOR_GREETING = (
    b"421 4.7.0 This port expects implicit TLS (SSL/TLS) from the first byte:"
    b" an ERP set for STARTTLS should use a listener of the relay that offers it"
    b" (port 587 is the usual one)\r\n"
)
# OpenSSL's reason for a record that is no TLS at all: an SMTP command
_PLAIN_TEXT = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST"})


class ImplicitTLS(asyncio.Protocol):
    """One connection until its handshake is done; then ``session``'s."""

    def __init__(
        self,
        session: RelaySMTP,
        context: ssl.SSLContext,
        timeout: float,
        handshaking: set[ImplicitTLS],
        listener_name: str,
        tally: TallyRow | None = None,
    ) -> None:
        self._session = session
        self._context = context
        self._timeout = timeout
        self._handshaking = handshaking
        self._listener_name = listener_name
        self._tally = tally
        self._transport: asyncio.Transport | None = None
        self._peer: object = None
        self._raw: list[bytes] = []  # read before the handshake took the connection
        self._early: list[bytes] = []  # sent between the handshake and the session
        self._wrapped = False  # the TLS layer reads the connection
        self._task: asyncio.Task[None] | None = None  # the handshake, from the first bytes
        self._silence: asyncio.TimerHandle | None = None  # until they come
        self._wait = min(FIRST_BYTES_WAIT, timeout)  # for them
        self._deadline = 0.0  # loop time: the handshake's end at the latest
        self._answered = False  # a whole ClientHello came first: the certificate was sent
        self._stopping = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admitted or refused now, as a plain connection is before its greeting:
        held uncounted through a handshake that may take the idle timeout, a
        client's silent connections took every file the relay may open."""
        transport = cast(asyncio.Transport, transport)  # uvloop's is none by class
        self._transport = transport
        self._peer = transport.get_extra_info("peername")
        if self._session.admit(self._peer, before_tls=True) is not None:
            transport.close()
            return
        self._handshaking.add(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self._timeout
        self._silence = loop.call_later(self._wait, self._silent)

    def data_received(self, data: bytes) -> None:
        """The handshake begins with the first bytes, so that a timeout can tell
        a client that sent none (one set for plain text) from one that stalled
        in it; they are kept for the TLS layer, as what uvloop reads before
        the layer has the connection. Asyncio reads on as the handshake ends,
        before the session has the connection: a client that does not wait for
        the greeting is not cut."""
        (self._early if self._wrapped else self._raw).append(data)
        if self._task is None and self._transport is not None:
            if self._silence is not None:
                self._silence.cancel()
            self._task = asyncio.get_running_loop().create_task(self._handshake(self._transport))

    def connection_lost(self, exc: Exception | None) -> None:
        """Gone before its first bytes (a TCP health check): not logged."""
        if self._task is None:
            self._ended()

    def _silent(self) -> None:
        """Told in plain text, which a client waiting for a greeting reads and
        most show their user, rather than an empty reply."""
        peer = client_address(self._peer)
        log.warning(PLAIN_CLIENT, peer, f"sent no TLS handshake in {self._wait:g}s")
        self._count_failed()
        if self._transport is not None:
            self._transport.write(WAITS_FOR_GREETING)
            self._transport.close()

    def _ended(self) -> None:
        if self._silence is not None:
            self._silence.cancel()
        self._handshaking.discard(self)
        self._session.release()

    def abort(self) -> None:
        """A stop does not wait for a handshake that may take the idle timeout."""
        self._stopping = True
        if self._transport is not None:
            self._transport.abort()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        try:
            tls = await self._start_tls(transport)
        except asyncio.CancelledError:
            self._ended()
            raise
        if tls is None or tls.is_closing():  # failed, or closed as it ended: a stop, the client
            if tls is not None and not self._stopping:
                self._closed_after_handshake()
            self._ended()  # no session will end to give its place up
            return
        self._handshaking.discard(self)
        tls.set_protocol(self._session)
        self._session.connection_made(tls)
        for data in self._early:
            self._session.data_received(data)
        self._early.clear()

    async def _start_tls(self, transport: asyncio.Transport) -> asyncio.Transport | None:
        """The TLS transport, or None for a handshake that failed (logged)."""
        loop = asyncio.get_running_loop()
        loop.call_soon(self._replay, transport)  # once start_tls has put its layer in
        left = self._deadline - loop.time()  # of the idle timeout, from the connection
        try:
            return await loop.start_tls(
                transport,
                self,
                self._context,
                server_side=True,
                ssl_handshake_timeout=max(left, 0.001),
            )
        except OSError as exc:  # ssl.SSLError, a reset, the timeout
            self._failed(exc)
            return None

    def _replay(self, transport: asyncio.Transport) -> None:
        """What was read before the TLS layer took the connection, given to it
        as the loop gives what it reads (a ``BufferedProtocol``'s)."""
        self._wrapped = True
        layer = transport.get_protocol()
        data = b"".join(self._raw)
        self._raw.clear()
        self._answered = _whole_record(data)
        while data and hasattr(layer, "buffer_updated"):  # uvloop's is none by class
            buffer = layer.get_buffer(len(data))
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            layer.buffer_updated(size)
            data = data[size:]

    def _failed(self, error: OSError) -> None:
        """As STARTTLS's failures are said, and a client set for plain text named
        as such. A handshake begins with the client's first bytes, so a client
        that only connects and closes (a TCP health check) never comes here;
        one that sent some and then closed or reset is a failed handshake, as
        after STARTTLS, unless it reset once it had the certificate."""
        if isinstance(error, ConnectionResetError) and self._answered and not self._stopping:
            self._closed_after_handshake()  # by a reset that lost its last message
            return
        peer = client_address(self._peer)
        if isinstance(error, ssl.SSLError) and error.reason in _PLAIN_TEXT:
            log.warning(PLAIN_CLIENT, peer, "sent plain text")
        elif isinstance(error, ConnectionAbortedError):  # asyncio's handshake timeout
            log.warning(HANDSHAKE_TIMED_OUT, peer, self._timeout)
        else:
            said = handshake_failure(error, self._context, self._listener_name)
            log.warning(HANDSHAKE_FAILED, peer, said)
        self._count_failed()

    def _closed_after_handshake(self) -> None:
        """As after STARTTLS (``RelaySMTP._log_if_quiet_in_tls``): no failure counted."""
        log.info(CLOSED_AFTER_HANDSHAKE, client_address(self._peer))

    def _count_failed(self) -> None:
        if self._tally is not None:
            self._tally.add(tally.TLS_FAILED, self._listener_name)


def _whole_record(data: bytes) -> bool:
    """Whether ``data`` begins with a whole TLS record, as a ClientHello comes:
    the relay answers it with its certificate, which a client that then resets
    has most likely refused (its reset loses the message that ends the
    handshake, so the relay sees the handshake fail)."""
    return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
