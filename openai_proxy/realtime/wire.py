"""
One hop of a session: a WebSocket connection over a Twisted transport,
framed by the C{websockets} package's sans-I/O protocol (masking in C, text
kept as the bytes that came).  It joins fragments into L{Message}s (one over
the size limit closes with 1009), answers pings and close frames itself,
pings a peer that has gone quiet and drops one that stays silent, and can
stop and start reading for backpressure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.python.failure import Failure
from websockets.exceptions import PayloadTooBig
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol as WebSocket
from websockets.protocol import State

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

#: Close codes that name a state and are never sent in a close frame.
_NOT_SENDABLE = frozenset({1004, 1005, 1006, 1015})


def sendable(code: int | None) -> int | None:
    """The code to put in a close frame for C{code} (L{None}: a close without one)."""
    if code is None or code in _NOT_SENDABLE or not 1000 <= code <= 4999:
        return None
    return code


class WireHandler(Protocol):
    """What a L{Wire} tells its session."""

    def message(self, wire: Wire, message: Message) -> None:
        """A complete message came in."""

    def peer_closed(self, wire: Wire, code: int | None, reason: str) -> None:
        """The peer sent a close frame (or broke the protocol: its code)."""

    def too_big(self, wire: Wire) -> None:
        """The peer sent a message over the limit (closed with 1009)."""

    def lost(self, wire: Wire) -> None:
        """The connection is gone (after a close, or without one)."""


class Wire(TwistedProtocol):
    """
    One WebSocket connection, open (its handshake done).  Give it a
    C{handler}, then L{start} it.

    @param websocket: the sans-I/O protocol, in state OPEN, its size limit set.
    @param ping_interval: seconds between keep-alive pings (L{None}: none);
        a peer that sent nothing at all for a whole interval after a ping is
        dropped.
    """

    handler: WireHandler
    #: The close code the peer sent or the proxy sent first (1006 when the
    #: connection dropped without either).
    close_code: int | None = None
    messages = 0
    received = 0

    def __init__(
        self,
        websocket: WebSocket,
        clock: IReactorTime,
        *,
        ping_interval: float | None,
    ) -> None:
        self._ws = websocket
        self._clock = clock
        self._parts: list[bytes] = []
        self._text = False
        self._paused = 0
        self._closing = False  # the proxy sent a close frame
        self._peer_closed = False
        self._gone = False
        self._close_timer: IDelayedCall | None = None
        self._ping_interval = ping_interval
        self._ping_timer: IDelayedCall | None = None
        self._heard = True

    def start(self, pending: Sequence[Any] = ()) -> None:
        """
        Start relaying: frames already parsed with the handshake first,
        then pings.
        """
        self._events(list(pending))
        self._flush()
        self._schedule_ping()

    # -- Twisted --------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._heard = True
        if self._gone:
            return
        ws = self._ws
        ws.receive_data(data)
        self._events(ws.events_received())
        self._flush()

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
        """Send one message (dropped once the hop is closing)."""
        if self._gone or self._ws.state is not State.OPEN:
            return
        if message.text:
            self._ws.send_text(message.data)
        else:
            self._ws.send_binary(message.data)
        self._flush()

    def close(self, code: int | None, reason: str) -> None:
        """
        Close this hop with C{code}: send a close frame (once, unless the
        close handshake already happened), then drop the connection when the
        peer answers it, soon after if the peer closed first, or after
        L{CLOSE_WAIT} seconds.
        """
        if self._gone:
            return
        ws = self._ws
        if not self._closing and ws.state is State.OPEN:
            self._closing = True
            if self.close_code is None:
                self.close_code = code
            code = sendable(code)
            if code is None:
                ws.send_close()
            else:
                ws.send_close(
                    code, reason.encode("utf-8")[:123].decode("utf-8", "ignore")
                )
            self._flush()
        self._closing = True
        self._flush()  # a close answered by the protocol itself, say
        transport: Any = self.transport
        if self._peer_closed or ws.state is State.CLOSED:
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

    def _flush(self) -> None:
        transport: Any = self.transport
        for data in self._ws.data_to_send():
            if self._gone:
                return
            if data:
                transport.write(data)
            # An empty chunk is the protocol asking for the TCP close: the
            # session decides when (close), after telling the other hop.

    def _events(self, events: list[Any]) -> None:
        for frame in events:
            if self._gone:
                return
            if not isinstance(frame, Frame):
                continue
            opcode = frame.opcode
            if (
                opcode is Opcode.TEXT
                or opcode is Opcode.BINARY
                or opcode is Opcode.CONT
            ):
                self._part(frame, opcode)
            elif opcode is Opcode.CLOSE:
                self._peer_closed = True
                rcvd = self._ws.close_rcvd
                code = rcvd.code if rcvd is not None else None
                if self.close_code is None:
                    self.close_code = code
                self.handler.peer_closed(self, code, rcvd.reason if rcvd else "")
                return
        failed = self._ws.parser_exc
        if failed is not None and not self._closing and not self._peer_closed:
            # The protocol closed this hop itself: no answer is waited for.
            self._closing = self._peer_closed = True
            if isinstance(failed, PayloadTooBig):
                self.close_code = TOO_BIG
                self.handler.too_big(self)
            else:
                sent = self._ws.close_sent
                self.close_code = sent.code if sent is not None else PROTOCOL_ERROR
                self.handler.peer_closed(self, self.close_code, str(failed))

    def _part(self, frame: Frame, opcode: Opcode) -> None:
        data = bytes(frame.data)
        if opcode is not Opcode.CONT:
            self._text = opcode is Opcode.TEXT
            if frame.fin:
                self._deliver(Message(data, self._text))
                return
            self._parts = [data]
            return
        self._parts.append(data)
        if frame.fin:
            joined = b"".join(self._parts)
            self._parts = []
            self._deliver(Message(joined, self._text))

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
        self._ws.send_ping(b"")
        self._flush()
        self._schedule_ping()
