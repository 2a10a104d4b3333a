"""
An upstream error answer read to be judged (is it worth trying another
key?) and then, if it is the one the client gets, relayed whole: its start
as read, then the rest of the upstream body as it comes, with backpressure.

The start is read through a L{BodyRelay}, under the same idle limit as
every other read of an upstream body; past L{ERROR_BODY_LIMIT} bytes the
upstream is held paused until the answer is relayed or discarded.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from openai_proxy.upstream.relay import BodyRelay

#: This much of an error body is read to judge it; the rest waits upstream.
ERROR_BODY_LIMIT = 65536


@implementer(IResponse)
class ReadResponse:
    """
    An upstream answer whose body's start is read (under the idle limit) to
    judge it.  Once L{ready} has fired, L{body} is that start (the whole
    body, when it is small or broke off); then either L{deliverBody}
    delivers the whole body, as the upstream sends it, or L{discard} closes
    the upstream.

    The upstream's own C{length} is kept, so a client gets the error body
    with the length the upstream declared, byte for byte.

    @ivar relay: the relay reading the body: stop it to close the upstream.
    """

    def __init__(
        self, original: IResponse, reactor: IReactorTime, idle_timeout: float
    ) -> None:
        self.version = original.version
        self.code = original.code
        self.phrase = original.phrase
        self.headers = original.headers
        self.length: int | object = original.length
        self.request = original.request
        self.previousResponse = original.previousResponse
        self.body = b""
        self._held = _Held(ERROR_BODY_LIMIT)
        self.relay = BodyRelay(self._held.take, self._held, reactor, idle_timeout)
        self.relay.done.addBoth(self._held.ended)
        #: Fires once the limit is reached or the body has ended; never fails.
        self.ready: Deferred[None] = self._held.ready
        self.ready.addCallback(self._judged)
        original.deliverBody(self.relay)

    def _judged(self, _: None) -> None:
        held = self._held
        self.body = b"".join(held.chunks)
        if self.length is UNKNOWN_LENGTH and held.end is not None:
            if held.end.check(ResponseDone):
                self.length = held.size  # all of it came

    def deliverBody(self, protocol: Any) -> None:
        self._held.hand_to(protocol)

    def discard(self) -> None:
        """Not relayed after all: close the upstream if the body is still coming."""
        if self._held.end is None:
            self.relay.stop()

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response


class _Held:
    """
    The consumer an error body is read into: it keeps what comes and, past
    the limit, pauses the upstream (through the L{BodyRelay}'s gate, so the
    idle timer stops too) until a protocol takes the body over.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.gate: IPushProducer | None = None
        #: Why the body ended (L{None} while it has not).
        self.end: Failure | None = None
        self._taker: Any = None
        self.ready: Deferred[None] = Deferred()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self.gate = producer

    def unregisterProducer(self) -> None:
        pass  # (the gate is still what a taker pauses the upstream with)

    def take(self, data: bytes) -> None:
        if self._taker is not None:
            self._taker.dataReceived(data)
            return
        self.chunks.append(data)
        self.size += len(data)
        if self.size >= self._limit and not self.ready.called:
            if self.gate is not None:
                self.gate.pauseProducing()
            self.ready.callback(None)

    def ended(self, result: None | Failure) -> None:
        self.end = result if isinstance(result, Failure) else Failure(ResponseDone())
        if self._taker is not None:
            self._taker.connectionLost(self.end)
        elif not self.ready.called:
            self.ready.callback(None)

    def hand_to(self, protocol: Any) -> None:
        """Deliver what was read, then the rest as it comes, to C{protocol}."""
        live = self.end is None and self.gate is not None
        protocol.makeConnection(self.gate if live else _Finished())
        if live:
            assert self.gate is not None
            # Resumed before the start is delivered, so that a pause the
            # taker asks for while it gets the start holds; bytes that came
            # meanwhile join the queue.
            self.gate.resumeProducing()
        while self.chunks:
            data = b"".join(self.chunks)
            self.chunks = []
            protocol.dataReceived(data)
        if self.end is not None:
            protocol.connectionLost(self.end)
        else:
            self._taker = protocol


@implementer(IPushProducer)
class _Finished:
    """The producer of a body already read whole: nothing to pause or stop."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass
