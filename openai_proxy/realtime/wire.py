"""
One hop of a session: a WebSocket connection over a Twisted transport,
read with wsproto and written with L{frames}.  It joins fragments into
L{Message}s (refusing one over the size limit with 1009), answers pings
itself, pings a peer that has gone quiet and drops one that stays silent,
and can stop and start reading for backpressure.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from openai_proxy.realtime import frames
from openai_proxy.realtime.filters import Message

#: Seconds to wait for the peer's answer to our close frame before the
#: connection is dropped anyway.
CLOSE_WAIT = 2.0
#: Seconds the last bytes get to leave before a closed connection is dropped.
FLUSH_WAIT = 0.1
#: The proxy's close codes (see the README's "Realtime and WebSockets").
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
POLICY = 1008
TOO_BIG = 1009
UPSTREAM_FAILED = 1011
TRY_AGAIN = 1013


class WireHandler(Protocol):
    """What a L{Wire} tells its session."""

    def message(self, wire: Wire, message: Message) -> None:
        """A complete message came in."""

    def peer_closed(self, wire: Wire, code: int | None, reason: str) -> None:
        """The peer sent a close frame (C{code} L{None} when it had none)."""

    def too_big(self, wire: Wire) -> None:
        """The peer sent a message over the limit (the wire closes with 1009)."""

    def lost(self, wire: Wire) -> None:
        """The connection is gone (after a close, or without one)."""


class Wire(TwistedProtocol):
    """
    One WebSocket connection.  Give it a C{handler} before data arrives.

    @param client: the proxy is the client on this hop (frames are masked).
    @param max_message: the largest message accepted, in bytes.
    @param ping_interval: seconds between keep-alive pings (L{None}: none);
        a peer that sent nothing at all for two intervals is dropped.
    """

    handler: WireHandler
    #: The close code the peer sent or the proxy sent first (1006 when the
    #: connection dropped without either).
    close_code: int | None = None
    messages = 0
    received = 0

    def __init__(
        self,
        connection: Connection,
        clock: IReactorTime,
        *,
        client: bool,
        max_message: int,
        ping_interval: float | None,
    ) -> None:
        self._connection = connection
        self._clock = clock
        self._mask = client
        self._max = max_message
        self._parts: list[bytes] = []
        self._size = 0
        self._text = False
        self._paused = 0
        self._closing = False  # a close frame was sent
        self._peer_closed = False
        self._gone = False
        self._close_timer: IDelayedCall | None = None
        self._ping_interval = ping_interval
        self._ping_timer: IDelayedCall | None = None
        self._heard = True

    # -- Twisted --------------------------------------------------------

    def connectionMade(self) -> None:
        self._schedule_ping()

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if self._peer_closed or self._gone:
            return
        connection = self._connection
        connection.receive_data(data)
        for event in connection.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                self._part(event)
            elif isinstance(event, Ping):
                self._write(
                    frames.frame(frames.PONG, bytes(event.payload), mask=self._mask)
                )
            elif isinstance(event, CloseConnection):
                self._peer_closed = True
                if self.close_code is None:
                    self.close_code = event.code
                self.handler.peer_closed(self, event.code, event.reason or "")
                return
            if self._gone or self._closing:
                return

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._gone:
            return
        self._gone = True
        if self.close_code is None:
            self.close_code = 1006
        self._parts = []
        for timer in (self._close_timer, self._ping_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.handler.lost(self)

    # -- what the session does ------------------------------------------

    def send(self, message: Message) -> None:
        """Send one message (dropped once the session is closing)."""
        if self._closing or self._gone:
            return
        opcode = frames.TEXT if message.text else frames.BINARY
        self._write(frames.frame(opcode, message.data, mask=self._mask))

    def close(self, code: int | None, reason: str) -> None:
        """
        Close this hop with C{code}: send a close frame (once), then drop the
        connection when the peer answers it, at once if the peer closed
        first, or after L{CLOSE_WAIT} seconds.
        """
        if self._gone:
            return
        if not self._closing:
            self._closing = True
            if self.close_code is None:
                self.close_code = code
            self._write(frames.close_frame(code, reason, mask=self._mask))
        transport = self.transport
        assert transport is not None
        if self._peer_closed:
            transport.loseConnection()
            if self._close_timer is None:
                # Over TLS, loseConnection waits for the peer's close_notify,
                # which a client waiting for the TCP close never sends.
                self._close_timer = self._clock.callLater(FLUSH_WAIT, self.abort)
        elif self._close_timer is None:
            # Reading goes on even when paused: the answer must be seen.
            self._resume_transport()
            self._close_timer = self._clock.callLater(CLOSE_WAIT, self.abort)

    def abort(self) -> None:
        """Drop the connection now."""
        transport: Any = self.transport
        if transport is not None and not self._gone:
            transport.abortConnection()

    def pause(self) -> None:
        """Stop reading (counted: reading resumes after the last L{resume})."""
        self._paused += 1
        if self._paused == 1 and self.transport is not None and not self._closing:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume(self) -> None:
        """Undo one L{pause}."""
        if self._paused == 0:
            return
        self._paused -= 1
        if self._paused == 0:
            self._resume_transport()

    # -- inside ---------------------------------------------------------

    def _resume_transport(self) -> None:
        if self.transport is not None and not self._gone:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not self._gone:
            transport.write(data)

    def _part(self, event: TextMessage | BytesMessage) -> None:
        data = event.data
        chunk = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        self._size += len(chunk)
        if self._size > self._max:
            self._parts = []
            self.handler.too_big(self)
            return
        if event.message_finished and not self._parts:
            # The common case: a message in one read, nothing to join.
            self._size = 0
            self._deliver(Message(chunk, isinstance(data, str)))
            return
        self._parts.append(chunk)
        if event.message_finished:
            joined = b"".join(self._parts)
            self._parts = []
            self._size = 0
            self._deliver(Message(joined, isinstance(data, str)))

    def _deliver(self, message: Message) -> None:
        self.messages += 1
        self.received += len(message.data)
        self.handler.message(self, message)

    def _schedule_ping(self) -> None:
        if self._ping_interval is not None and not self._gone:
            self._ping_timer = self._clock.callLater(self._ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_timer = None
        if self._gone or self._closing:
            return
        if not self._heard and not self._paused:
            # Silent for a whole interval after a ping: gone.
            self.abort()
            return
        self._heard = False
        self._write(frames.frame(frames.PING, b"", mask=self._mask))
        self._schedule_ping()
