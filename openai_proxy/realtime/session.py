"""
A session: the client's hop and the upstream's hop joined through a chain
of L{SessionFilter}s, with backpressure each way and the closes of either
side carried to the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from openai_proxy.realtime.filters import Message, Passthrough, Peer, SessionFilter
from openai_proxy.realtime.wire import (
    GOING_AWAY,
    POLICY,
    TOO_BIG,
    UPSTREAM_FAILED,
    Wire,
)

_log = Logger()

#: Makes one link of the chain from the peers on either side of it.
FilterFactory = Callable[[Peer, Peer], SessionFilter]


class SessionObserver:
    """What a session reports as it runs (metrics); every method may be a no-op."""

    def message(self, from_client: bool, size: int) -> None:
        """A message crossed (C{from_client}: towards the upstream)."""

    def ended(self, session: Session) -> None:
        """The session ended: both connections are gone."""


class _Side:
    """The L{Peer} in front of one hop."""

    def __init__(self, session: Session, wire: Wire) -> None:
        self._session = session
        self._wire = wire

    def send(self, message: Message) -> None:
        self._session._send(self._wire, message)

    def close(self, code: int, reason: str) -> None:
        self._session.close(self._wire, code, reason)

    def pause(self) -> None:
        self._wire.pause()

    def resume(self) -> None:
        self._wire.resume()


class _Link:
    """The L{Peer} between two filters: messages go to the next filter."""

    def __init__(self, side: _Side, deliver: Callable[[Message], None]) -> None:
        self._side = side
        self.send = deliver

    def close(self, code: int, reason: str) -> None:
        self._side.close(code, reason)

    def pause(self) -> None:
        self._side.pause()

    def resume(self) -> None:
        self._side.resume()


@implementer(IPushProducer)
class _Backpressure:
    """
    Registered on one hop's transport: while that transport cannot write
    (its peer is not reading), the other hop is not read either; if that
    lasts C{send_timeout} seconds, the session ends.
    """

    def __init__(
        self, session: Session, other: Wire, clock: IReactorTime, timeout: float
    ) -> None:
        self._session = session
        self._other = other
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        if self._timer is None:
            self._other.pause()
            self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def resumeProducing(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
            self._other.resume()

    def stopProducing(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._session.stalled(self._other)


class Session:
    """
    Relays messages between C{client} and C{upstream} (both L{Wire}s,
    connected) through the filters C{chain} makes, in order from the client
    side to the upstream side.

    @ivar done: fires when both connections are gone.
    @ivar close_code: the code the session ended with (the first close,
        whoever sent it; 1006 when a connection dropped without one).
    @ivar closed_by: C{"client"}, C{"upstream"} or C{"proxy"}.
    """

    def __init__(
        self,
        client: Wire,
        upstream: Wire,
        chain: Sequence[FilterFactory],
        clock: IReactorTime,
        *,
        send_timeout: float,
        observer: SessionObserver | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.done: Deferred[None] = Deferred()
        self.started = clock.seconds()
        self.close_code: int | None = None
        self.closed_by = ""
        self._observer = observer or SessionObserver()
        self._ended = False
        self._lost = 0
        client.handler = upstream.handler = self
        client_side, upstream_side = _Side(self, client), _Side(self, upstream)
        factories = list(chain) or [Passthrough]
        filters: list[SessionFilter] = []
        count = len(factories)
        for i, factory in enumerate(factories):
            towards_client: Peer = client_side
            if i > 0:
                towards_client = _Link(client_side, _later(filters, i - 1, False))
            towards_upstream: Peer = upstream_side
            if i < count - 1:
                towards_upstream = _Link(upstream_side, _later(filters, i + 1, True))
            filters.append(factory(towards_client, towards_upstream))
        self._filters = filters
        self._from_client = filters[0].from_client
        self._from_upstream = filters[-1].from_upstream
        for wire, other in ((client, upstream), (upstream, client)):
            transport: Any = wire.transport
            transport.registerProducer(
                _Backpressure(self, other, clock, send_timeout), True
            )

    # -- from the wires (WireHandler) -----------------------------------

    def message(self, wire: Wire, message: Message) -> None:
        if self._ended:
            return
        from_client = wire is self.client
        self._observer.message(from_client, len(message.data))
        try:
            if from_client:
                self._from_client(message)
            else:
                self._from_upstream(message)
        except Exception:
            _log.failure("a session filter failed")
            self.close(self.client, UPSTREAM_FAILED, "proxy error")

    def peer_closed(self, wire: Wire, code: int | None, reason: str) -> None:
        if self._ended:
            wire.close(code, reason)  # the answer to our close
            return
        self._end(code, "client" if wire is self.client else "upstream")
        self._other(wire).close(code, reason)
        wire.close(code, reason)

    def too_big(self, wire: Wire) -> None:
        self.close(wire, TOO_BIG, "message too big")

    def lost(self, wire: Wire) -> None:
        if not self._ended:
            if wire is self.client:
                self._end(wire.close_code, "client")
                self.upstream.close(GOING_AWAY, "client went away")
            else:
                self._end(wire.close_code, "upstream")
                self.client.close(UPSTREAM_FAILED, "upstream connection lost")
        self._lost += 1
        if self._lost == 2:
            self._observer.ended(self)
            self.done.callback(None)

    # -- the session's own decisions ------------------------------------

    def close(self, wire: Wire, code: int, reason: str) -> None:
        """
        End the session: C{wire} gets C{code} and C{reason}, the other hop
        the same code.
        """
        if self._ended:
            return
        self._end(code, "proxy")
        wire.close(code, reason)
        self._other(wire).close(code, reason)

    def go_away(self) -> None:
        """End the session because the proxy is shutting down (1001 both ways)."""
        self.close(self.client, GOING_AWAY, "proxy shutting down")

    def stalled(self, paused: Wire) -> None:
        """
        The hop opposite C{paused} has not taken what was written to it for
        C{send_timeout} seconds: end the session (1008 for a client that
        stopped reading, 1011 for an upstream).
        """
        stuck = self._other(paused)
        if paused is self.upstream:
            self.close(self.client, POLICY, "client stopped reading")
        else:
            self.close(self.client, UPSTREAM_FAILED, "upstream stopped reading")
        # Its close frame sits behind what it did not read: no answer will
        # come, so the connection is dropped now rather than after CLOSE_WAIT.
        stuck.abort()

    def _send(self, wire: Wire, message: Message) -> None:
        wire.send(message)

    def _other(self, wire: Wire) -> Wire:
        return self.upstream if wire is self.client else self.client

    def _end(self, code: int | None, by: str) -> None:
        self._ended = True
        self.close_code = code
        self.closed_by = by
        for link in self._filters:
            link.closed()


def _later(
    filters: list[SessionFilter], index: int, from_client: bool
) -> Callable[[Message], None]:
    # The filter at index may not exist yet when its neighbour is made.
    if from_client:
        return lambda message: filters[index].from_client(message)
    return lambda message: filters[index].from_upstream(message)
