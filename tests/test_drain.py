"""Tests for L{openai_proxy.ops.drain}: graceful shutdown and readiness."""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionRefusedError,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from openai_proxy.ops.drain import DEFAULT_GRACE, DrainService, Readiness

_GET = b"GET /slow HTTP/1.1\r\nHost: test\r\n\r\n"


class _Slow(Resource):
    """Tracks each request with the drain and leaves it open for the test."""

    isLeaf = True

    def __init__(self, drain: DrainService) -> None:
        super().__init__()
        self.drain = drain
        self.arrived: DeferredQueue[Request] = DeferredQueue()

    def render_GET(self, request: Request) -> int:
        self.drain.track(request)
        self.arrived.put(request)
        return NOT_DONE_YET


class _RawClient(Protocol):
    """Collects everything the server sends; C{closed} fires with it."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()
        self.first_data: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.first_data.called:
            self.first_data.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.received)


class _LoopbackDrainTest(TestCase):
    """A drain tracking requests on a real loopback HTTP server."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.drain = DrainService(grace=DEFAULT_GRACE, reactor=self.clock)
        self.resource = _Slow(self.drain)
        # No idle timeout: it would leave a DelayedCall behind each test.
        self.site = Site(self.resource, timeout=None)

    def listen(self) -> int:
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    async def connect(self, port: int) -> _RawClient:
        client = _RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(self._close, client)
        return client

    async def _close(self, client: _RawClient) -> None:
        if not client.closed.called:
            client.transport.loseConnection()  # type: ignore[union-attr]
            await client.closed

    async def request_in_flight(self, port: int) -> tuple[_RawClient, Request]:
        client = await self.connect(port)
        client.transport.write(_GET)  # type: ignore[union-attr]
        request = await self.resource.arrived.get()
        return client, request

    def turn_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)


class DrainServiceTests(_LoopbackDrainTest):
    async def test_stop_waits_for_request_in_flight(self) -> None:
        client, request = await self.request_in_flight(self.listen())
        self.drain.startService()
        stopped = self.drain.stopService()
        self.assertTrue(self.drain.draining)
        self.turn_clock(DEFAULT_GRACE - 1)
        self.assertFalse(stopped.called)

        request.write(b"last words")
        request.finish()
        self.turn_clock(0)  # the extra turn after the last request
        await stopped
        received = await client.closed
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"last words", received)
        self.assertTrue(received.endswith(b"0\r\n\r\n"))
        # Headers not yet sent at drain: the client is told not to reuse it.
        self.assertIn(b"\r\nConnection: close\r\n", received)
        self.assertEqual(self.drain.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # deadline cancelled

    async def test_stop_fires_after_one_turn_when_idle(self) -> None:
        self.drain.startService()
        stopped = self.drain.stopService()
        self.assertFalse(stopped.called)
        self.turn_clock(0)
        await stopped
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_grace_deadline_aborts_what_remains(self) -> None:
        client, request = await self.request_in_flight(self.listen())
        request.write(b"partial")
        lost = request.notifyFinish()
        await client.first_data
        self.drain.startService()
        stopped = self.drain.stopService()
        self.turn_clock(DEFAULT_GRACE - 0.001)
        self.assertFalse(stopped.called)
        self.turn_clock(0.001)  # the deadline, then the flush turn
        await stopped
        received = await client.closed
        self.assertIn(b"partial", received)
        self.assertFalse(received.endswith(b"0\r\n\r\n"))
        self.assertEqual(self.drain.in_flight, 0)
        await self.assertFailure(lost, ConnectionAborted)

    async def test_client_hang_up_ends_tracking(self) -> None:
        client, request = await self.request_in_flight(self.listen())
        self.assertEqual(self.drain.in_flight, 1)
        lost = request.notifyFinish()
        client.transport.loseConnection()  # type: ignore[union-attr]
        await self.assertFailure(lost, ConnectionDone)
        self.assertEqual(self.drain.in_flight, 0)
        self.drain.startService()
        stopped = self.drain.stopService()
        self.turn_clock(0)
        await stopped


class DrainOrderTests(_LoopbackDrainTest):
    """Added before the listener, the drain stops after it."""

    async def test_listener_stops_accepting_before_drain_waits(self) -> None:
        parent = MultiService()
        self.drain.setServiceParent(parent)
        listener: Any = strports.service("tcp:0:interface=127.0.0.1", self.site)
        listener.setServiceParent(parent)
        parent.startService()
        port = (await listener._waitingForPort).getHost().port

        order: list[str] = []
        listener_stopped: list[Deferred[None]] = []
        stop_listener, stop_drain = listener.stopService, self.drain.stopService

        def record_listener() -> Deferred[None]:
            order.append("listener")
            listener_stopped.append(stop_listener())
            return listener_stopped[-1]

        def record_drain() -> Deferred[None]:
            order.append("drain")
            return stop_drain()

        listener.stopService = record_listener
        self.drain.stopService = record_drain  # type: ignore[method-assign]
        client, request = await self.request_in_flight(port)

        stopped = parent.stopService()
        self.assertEqual(order, ["listener", "drain"])
        await listener_stopped[0]
        with self.assertRaises(ConnectionRefusedError):
            await self.connect(port)
        self.assertFalse(stopped.called)

        request.finish()
        self.turn_clock(0)
        await stopped
        await client.closed


class _FakeChannel:
    persistent = True


class _FakeRequest:
    """Just what L{DrainService.track} uses of a request."""

    def __init__(self) -> None:
        self.channel = _FakeChannel()
        self.startedWriting = 0
        self.headers: dict[bytes, bytes] = {}
        self.done: Deferred[None] = Deferred()

    def notifyFinish(self) -> Deferred[None]:
        return self.done

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.headers[name] = value


class TrackingTests(TestCase):
    def test_request_arriving_while_draining_served_with_connection_close(self) -> None:
        drain = DrainService(reactor=Clock())
        drain.stopService()
        request = _FakeRequest()
        drain.track(request)
        self.assertEqual(drain.in_flight, 1)
        self.assertEqual(request.headers, {b"connection": b"close"})
        self.assertFalse(request.channel.persistent)

    def test_headers_already_sent_only_channel_marked(self) -> None:
        drain = DrainService(reactor=Clock())
        request = _FakeRequest()
        request.startedWriting = 1
        drain.track(request)
        drain.stopService()
        self.assertEqual(request.headers, {})
        self.assertFalse(request.channel.persistent)

    def test_lost_request_untracked(self) -> None:
        drain = DrainService(reactor=Clock())
        request = _FakeRequest()
        drain.track(request)
        request.done.errback(Failure(RuntimeError("client went away")))
        self.assertEqual(drain.in_flight, 0)

    def test_not_draining_until_stopped(self) -> None:
        drain = DrainService(reactor=Clock())
        drain.startService()
        self.assertFalse(drain.draining)
        self.assertIsInstance(drain, Service)


class ReadinessTests(TestCase):
    def test_ready_once_every_condition_marked(self) -> None:
        readiness = Readiness("listening", "moderation")
        readiness.mark("listening")
        self.assertFalse(readiness.is_ready)
        self.assertEqual(readiness.pending, {"moderation"})
        readiness.mark("moderation")
        readiness.mark("moderation")
        self.assertTrue(readiness.is_ready)

    def test_no_conditions_ready_on_mark_ready(self) -> None:
        readiness = Readiness()
        self.assertFalse(readiness.is_ready)
        readiness.mark_ready()
        self.assertTrue(readiness.is_ready)
