"""
Graceful shutdown: let in-flight requests finish, within a grace period, when
twistd stops (SIGTERM); and a readiness flag for C{/readyz}.

Order matters.  L{MultiService} stops its children in reverse order of
addition, so add the L{DrainService} to the parent I{before} the listening
services::

    drain = DrainService(grace=config.grace)
    drain.setServiceParent(parent)          # first: stopped last
    for description in config.listen:       # then: stopped first
        strports.service(description, site).setServiceParent(parent)

On stop, the listening ports then close first (no new connections) and the
drain waits for the requests already accepted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

#: Seconds a drain waits for in-flight requests by default (C{GRACE}).
DEFAULT_GRACE: Final = 30.0

_log = Logger()


class _DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class _Clock(Protocol):
    """The part of C{IReactorTime} used here (a C{task.Clock} in tests)."""

    def callLater(
        self, delay: float, f: Callable[..., object], *args: object
    ) -> _DelayedCall: ...


class TrackableRequest(Protocol):
    """What L{DrainService.track} needs of a request: a twisted.web request."""

    channel: Any
    startedWriting: int

    def notifyFinish(self) -> Deferred[None]: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...


class TrackableSession(Protocol):
    """What L{DrainService.track_session} needs of a WebSocket session."""

    done: Deferred[None]

    def go_away(self) -> None: ...


class DrainService(Service):
    """
    Tracks in-flight requests; on L{stopService}, waits for them (at most
    C{grace} seconds), closes the connections of any still running, and only
    then lets twistd go on to stop the reactor.

    @ivar draining: C{True} from the moment L{stopService} is called; the
        relay answers C{/healthz} and C{/readyz} with 503 while it is set.
    """

    name = "drain"

    def __init__(
        self, grace: float = DEFAULT_GRACE, reactor: _Clock | None = None
    ) -> None:
        """
        @param grace: seconds to wait for in-flight requests before closing
            their connections.
        @param reactor: the clock for the grace deadline (default: the global
            reactor).
        """
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = cast(_Clock, global_reactor)
        self._reactor = reactor
        self.grace = grace
        self.draining = False
        self._in_flight: dict[TrackableRequest, None] = {}
        self._sessions: dict[TrackableSession, None] = {}
        self._idle: list[Deferred[None]] = []

    @property
    def in_flight(self) -> int:
        """How many tracked requests have not finished yet."""
        return len(self._in_flight)

    @property
    def sessions(self) -> int:
        """How many tracked WebSocket sessions are open."""
        return len(self._sessions)

    def track(self, request: TrackableRequest) -> None:
        """
        Count C{request} as in flight until its C{notifyFinish} fires (the
        response ended or the client went away).  Call it once per request,
        as early as possible in C{render}.  A request tracked while draining
        (a new request on a kept-alive connection) is served, with
        C{Connection: close}.
        """
        self._in_flight[request] = None
        if self.draining:
            _close_after(request)
        request.notifyFinish().addBoth(self._finished, request)

    def track_session(self, session: TrackableSession) -> None:
        """
        Count a WebSocket session as in flight until its C{done} fires.  A
        drain lets sessions run for the grace period, then closes them with
        1001 (C{go_away}).
        """
        self._sessions[session] = None
        session.done.addBoth(self._session_ended, session)

    def _session_ended(self, result: object, session: TrackableSession) -> None:
        self._sessions.pop(session, None)
        self._notify_if_idle()

    def _finished(self, result: object, request: TrackableRequest) -> None:
        # Either outcome (finished or lost) ends the request: swallow the
        # failure here, it is the relay's business, not ours.
        self._in_flight.pop(request, None)
        self._notify_if_idle()

    def _notify_if_idle(self) -> None:
        if not self._in_flight and not self._sessions:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def _until_idle(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._in_flight or self._sessions:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    def stopService(self) -> Deferred[None]:
        """
        Set L{draining}, then return a Deferred that fires once every tracked
        request has finished, or C{grace} seconds have passed and the
        connections of the rest were aborted, and one more reactor turn
        passed so the last response bytes reach the socket.
        """
        super().stopService()
        self.draining = True
        for request in self._in_flight:
            _close_after(request)
        if self._in_flight or self._sessions:
            _log.info(
                "Draining {count} in-flight request(s) and {sessions} "
                "WebSocket session(s), for up to {grace} s",
                count=len(self._in_flight),
                sessions=len(self._sessions),
                grace=self.grace,
            )
        return Deferred.fromCoroutine(self._drain())

    async def _drain(self) -> None:
        deadline = self._reactor.callLater(self.grace, self._force_close)
        try:
            await self._until_idle()
        finally:
            if deadline.active():
                deadline.cancel()
        # finish() only queued the last bytes on the transport; they are
        # written when the reactor next polls its sockets, so give it a turn
        # before twistd stops it.
        turn: Deferred[None] = Deferred()
        self._reactor.callLater(0, turn.callback, None)
        await turn

    def _force_close(self) -> None:
        remaining = list(self._in_flight)
        _log.warn(
            "Grace period of {grace} s over: closing {count} request(s)",
            grace=self.grace,
            count=len(remaining),
        )
        for request in remaining:
            _abort(request)
        for session in list(self._sessions):
            session.go_away()
        self._sessions.clear()
        # Stop waiting even if some transport never reports the loss: the
        # extra reactor turn that follows lets the aborts complete.
        self._in_flight.clear()
        self._notify_if_idle()


def _close_after(request: TrackableRequest) -> None:
    # Tell the client not to reuse the connection, and close it once this
    # response ends, so kept-alive clients reconnect to a live replica.
    channel = request.channel
    if channel is None:
        return
    if not request.startedWriting:
        request.setHeader(b"connection", b"close")
    if hasattr(channel, "persistent"):
        channel.persistent = False


def _abort(request: TrackableRequest) -> None:
    channel = request.channel
    transport = getattr(channel, "transport", None)
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


class Readiness:
    """
    Whether the proxy is ready for traffic (C{/readyz}): every named
    condition (e.g. C{"listening"}, C{"moderation"}) has been marked at least
    once.  With no conditions it is ready once L{mark_ready} is called.
    Readiness never goes back; the relay also answers 503 while draining.
    """

    def __init__(self, *conditions: str) -> None:
        self._pending = set(conditions) or {"ready"}

    def mark(self, condition: str) -> None:
        """Record that C{condition} has been met."""
        self._pending.discard(condition)

    def mark_ready(self) -> None:
        """Record every condition as met."""
        self._pending.clear()

    @property
    def is_ready(self) -> bool:
        """C{True} once every condition has been met."""
        return not self._pending

    @property
    def pending(self) -> frozenset[str]:
        """The conditions not met yet (for a 503 body or a log line)."""
        return frozenset(self._pending)
