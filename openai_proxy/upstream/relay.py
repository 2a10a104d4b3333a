"""
Moving bytes: a request body to the upstream, a response body back to the
client as it arrives, with backpressure and an idle limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go: unlike
    C{FileBodyProducer} it costs no cooperator round trip.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_DONE = Failure(ResponseDone())


class UpstreamTimeout(Exception):
    """The upstream body was silent for longer than the idle limit."""


@implementer(IPushProducer)
class _Gate:
    """
    The producer the client's request sees: pausing it pauses the upstream
    and tells the relay that the wait is now the client's, not the upstream's.
    """

    def __init__(self, relay: BodyRelay) -> None:
        self._relay = relay

    def pauseProducing(self) -> None:
        self._relay._client_paused()

    def resumeProducing(self) -> None:
        self._relay._client_resumed()

    def stopProducing(self) -> None:
        self._relay.stop()


class BodyRelay(Protocol):
    """
    Receives an upstream response body and hands each chunk to C{sink} the
    moment it arrives.

    The relay is registered as the client request's producer, so a client
    that stops reading pauses the upstream instead of filling the proxy's
    memory.  L{done} fires with L{None} when the body ended normally, or
    fails with the reason (L{UpstreamTimeout} after C{idle_timeout} seconds
    of silence; the upstream connection is then closed).

    The idle limit counts only time spent waiting on the upstream: while the
    client holds the upstream paused, the C{send_timeout} runs instead, and
    when the client makes no progress for that long C{client_stalled} is
    called (the caller cuts the client off: the client's fault).
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        consumer: Any,
        reactor: IReactorTime,
        idle_timeout: float,
        send_timeout: float | None = None,
        client_stalled: Callable[[], None] | None = None,
    ) -> None:
        self._sink = sink
        self._consumer = consumer
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._send_timeout = send_timeout
        self._client_stalled = client_stalled
        self._timer: IDelayedCall | None = None
        self._send_timer: IDelayedCall | None = None
        self._paused = False
        self._timed_out = False
        self._registered = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._consumer.registerProducer(_Gate(self), True)
        self._registered = True
        self._timer = self._reactor.callLater(self._idle_timeout, self._idle)

    def _client_paused(self) -> None:
        producer: Any = self.transport
        if self._paused or producer is None or self.done.called:
            return  # (once the body has ended there is nothing to pause)
        self._paused = True
        producer.pauseProducing()
        # Not the upstream's silence any more: the client's.
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._send_timeout is not None and self._send_timer is None:
            self._send_timer = self._reactor.callLater(
                self._send_timeout, self._send_timed_out
            )

    def _client_resumed(self) -> None:
        producer: Any = self.transport
        if not self._paused or producer is None:
            return
        self._paused = False
        self._cancel_send_timer()
        if self._timer is None and not self._timed_out and not self.done.called:
            self._timer = self._reactor.callLater(self._idle_timeout, self._idle)
        producer.resumeProducing()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None and self._send_timer.active():
            self._send_timer.cancel()
        self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if self._client_stalled is not None:
            self._client_stalled()

    def dataReceived(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.reset(self._idle_timeout)
        self._sink(data)

    def stop(self) -> None:
        """Close the upstream connection; L{done} then fires."""
        # Response bodies are delivered over a producer (twisted's
        # TransportProxyProducer), not a plain ITransport.
        producer: Any = self.transport
        if producer is not None:
            producer.stopProducing()

    def release(self) -> None:
        """Stop being the client's producer (before it finishes, or once it has gone)."""
        self._cancel_send_timer()
        if self._registered:
            self._registered = False
            self._consumer.unregisterProducer()

    def forget_consumer(self) -> None:
        """The client has gone: never touch its request again."""
        self._registered = False

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._cancel_send_timer()
        if self._timed_out:
            self.done.errback(Failure(UpstreamTimeout()))
        elif reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _idle(self) -> None:
        self._timer = None
        self._timed_out = True
        self.stop()
