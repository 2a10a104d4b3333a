"""
Moving bytes: a request body to the upstream, a response body back to the
client as it arrives, with backpressure and an idle limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
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


class BodyRelay(Protocol):
    """
    Receives an upstream response body and hands each chunk to C{sink} the
    moment it arrives.

    The upstream transport is registered as the client request's producer, so
    a client that stops reading pauses the upstream instead of filling the
    proxy's memory.  L{done} fires with L{None} when the body ended normally,
    or fails with the reason (L{UpstreamTimeout} after C{idle_timeout}
    seconds of silence; the upstream connection is then closed).
    """

    def __init__(
        self,
        sink: Callable[[bytes], None],
        consumer: Any,
        reactor: IReactorTime,
        idle_timeout: float,
    ) -> None:
        self._sink = sink
        self._consumer = consumer
        self._reactor = reactor
        self._idle_timeout = idle_timeout
        self._timer: IDelayedCall | None = None
        self._timed_out = False
        self._registered = False
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self._consumer.registerProducer(self.transport, True)
        self._registered = True
        self._timer = self._reactor.callLater(self._idle_timeout, self._idle)

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
