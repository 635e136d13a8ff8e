"""Implicit TLS (port 465, the "SSL/TLS" of ERPs, RFC 8314): the handshake
before the SMTP session, which then runs over TLS as it does after STARTTLS.

The handshake is started here rather than by the server's ``ssl=``: asyncio
says nothing of a handshake that fails there, so a plain-text client left no
line in the log; and each connection takes the certificate its listener
serves when it comes, so that a reload's renewal is served without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from relay import tally
from relay.ingress.protocol import RelaySMTP, client_address
from relay.tally import TallyRow

log = logging.getLogger("relay")

PLAIN_CLIENT = (
    "client=%s %s where a TLS handshake was expected: is it set for STARTTLS or no"
    " encryption (port 587 or 25)? this listener offers implicit TLS"
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
        self._task: asyncio.Task[None] | None = None

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
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    def data_received(self, data: bytes) -> None:
        """uvloop reads before the handshake has begun (pausing in
        ``connection_made`` does not hold it): the ClientHello is kept for it.
        Asyncio reads on as the handshake ends, before the session has the
        connection: a client that does not wait for the greeting is not cut."""
        (self._early if self._wrapped else self._raw).append(data)

    def abort(self) -> None:
        """A stop does not wait for a handshake that may take the idle timeout."""
        if self._transport is not None:
            self._transport.abort()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        try:
            tls = await self._start_tls(transport)
        except asyncio.CancelledError:
            self._session.release()
            raise
        finally:
            self._handshaking.discard(self)
        if tls is None or tls.is_closing():  # failed, or closed as it ended: a stop, the client
            self._session.release()  # no session will end to give its place up
            return
        tls.set_protocol(self._session)
        self._session.connection_made(tls)
        for data in self._early:
            self._session.data_received(data)
        self._early.clear()

    async def _start_tls(self, transport: asyncio.Transport) -> asyncio.Transport | None:
        """The TLS transport, or None for a handshake that failed (logged)."""
        loop = asyncio.get_running_loop()
        loop.call_soon(self._replay, transport)  # once start_tls has put its layer in
        try:
            return await loop.start_tls(
                transport,
                self,
                self._context,
                server_side=True,
                ssl_handshake_timeout=self._timeout,
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
        while data and hasattr(layer, "buffer_updated"):  # uvloop's is none by class
            buffer = layer.get_buffer(len(data))
            size = min(len(buffer), len(data))
            buffer[:size] = data[:size]
            layer.buffer_updated(size)
            data = data[size:]

    def _failed(self, error: OSError) -> None:
        """As STARTTLS's failures are said, and a client set for plain text named
        as such; a client that only connects and closes (a TCP health check)
        is not logged, as before the greeting on the other listeners."""
        peer = client_address(self._peer)
        if isinstance(error, ssl.SSLError) and error.reason in _PLAIN_TEXT:
            log.warning(PLAIN_CLIENT, peer, "sent plain text")
        elif isinstance(error, ssl.SSLError):
            log.warning("TLS handshake failed client=%s: %s", peer, str(error) or repr(error))
        elif isinstance(error, ConnectionAbortedError):  # asyncio's handshake timeout
            log.warning(PLAIN_CLIENT, peer, f"sent no TLS handshake in {self._timeout:g}s")
        else:
            return
        if self._tally is not None:
            self._tally.add(tally.TLS_FAILED, self._listener_name)
