"""
Server-key failover against misbehaving upstreams (issue 17, items 11-13):
error bodies that stall or are large, and upstreams that answer before
they have read the request body.  Real sockets over loopback throughout.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from tests.fake_upstream import Script
from tests.harness import JSON, Proxy, RelayTestCase
from tests.rawhttp import connect
from tests.test_keys import chat
from tests.test_operations import parse_samples, series

_PROXY_KEY = "pk-team"
_HEADERS = {"Authorization": f"Bearer {_PROXY_KEY}", **JSON}
_TIMEOUT = 0.3  # seconds (TIMEOUT is given in milliseconds)


def _large_error(size: int) -> bytes:
    """A JSON error body of exactly C{size} bytes, no two 1 KiB stretches alike."""
    head = b'{"error": {"code": "rate_limit_exceeded", "message": "'
    tail = b'", "type": "requests"}}'
    filler = b"".join(b"%07d " % n for n in range(size // 8 + 1))
    body = head + filler[: size - len(head) - len(tail)] + tail
    assert len(body) == size
    json.loads(body)
    return body


_LARGE_ERROR = _large_error(300_056)
_OK = b'{"object": "chat.completion"}'
_CLOSED = Failure(ConnectionDone())


class _Failover(RelayTestCase):
    keys = "sk-server-one,sk-server-two"
    idle_timeout = _TIMEOUT

    def setUp(self) -> None:
        self.env = {
            "OPENAI_KEY": self.keys,
            "PROXY_KEY": _PROXY_KEY,
            "TIMEOUT": str(int(self.idle_timeout * 1000)),
        }
        super().setUp()

    async def post(self, body: bytes | None = None) -> Any:
        return await self.http.post(
            self.url("/v1/chat/completions"),
            json.dumps(chat()).encode() if body is None else body,
            headers=_HEADERS,
        )

    async def scrape(self) -> dict[str, float]:
        response = await self.http.get(self.url("/metrics"))
        return parse_samples((await response.content()).decode("utf-8"))

    def keys_used(self) -> list[bytes | None]:
        return [r.header(b"authorization") for r in self.fake.received]


def _stalled_error() -> Script:
    """A 429 whose body sends its first piece and then goes silent."""
    return Script(
        status=429,
        headers={b"content-type": [b"application/json"]},
        chunks=[b'{"error": {"message": "slow', b' down"}}'],
        stall_after=1,
    )


class _Pieces(Protocol):
    """Collects a response body; C{done} fires with the pieces and the reason."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.done: Deferred[tuple[list[bytes], Failure]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.done.callback((self.pieces, reason))


async def _body_and_ending(response: Any) -> tuple[bytes, Failure]:
    pieces = _Pieces()
    response.deliverBody(pieces)
    got, reason = await pieces.done
    return b"".join(got), reason


class StalledErrorBodyOneKeyTests(_Failover):
    """Item 11, one server key: nothing to fail over to, nothing to wait for."""

    keys = "sk-server-one"
    timeout = 10  # the old code waited for ever

    async def test_a_stalled_error_body_streams_and_is_cut_at_timeout(self) -> None:
        self.fake.script = _stalled_error()
        started = time.monotonic()
        response = await self.post()
        self.assertEqual(response.code, 429)
        # The headers are relayed before the body is read, not after it.
        self.assertLess(time.monotonic() - started, _TIMEOUT)
        body, reason = await _body_and_ending(response)
        self.assertEqual(body, b'{"error": {"message": "slow')
        self.assertTrue(reason.check(ResponseFailed), reason)
        self.assertEqual(len(self.fake.received), 1)


class StalledErrorBodyTests(_Failover):
    """Item 11, several server keys: the error body is read under TIMEOUT."""

    timeout = 10

    async def test_a_stalled_error_body_fails_over_after_timeout(self) -> None:
        self.fake.by_key["sk-server-one"] = _stalled_error()
        started = time.monotonic()
        response = await self.post()
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertGreaterEqual(time.monotonic() - started, _TIMEOUT)
        self.assertEqual(
            self.keys_used(), [b"Bearer sk-server-one", b"Bearer sk-server-two"]
        )

    async def test_stalled_error_bodies_on_every_key_are_cut_at_timeout(
        self,
    ) -> None:
        self.fake.script = _stalled_error()
        response = await self.post()
        self.assertEqual(response.code, 429)
        body, reason = await _body_and_ending(response)
        self.assertEqual(body, b'{"error": {"message": "slow')
        self.assertTrue(reason.check(ResponseFailed), reason)
        self.assertEqual(len(self.fake.received), 2)


class ClientLeavingTests(_Failover):
    """A client that leaves while an error body is being judged."""

    idle_timeout = 30.0
    timeout = 10  # the upstream would be closed only after TIMEOUT

    async def test_leaving_during_the_error_body_closes_the_upstream(self) -> None:
        self.fake.by_key["sk-server-one"] = _stalled_error()
        client = await connect(self.proxy.port.getHost().port)
        assert client.transport is not None
        body = json.dumps(chat()).encode()
        client.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (_PROXY_KEY.encode(), len(body), body)
        )
        used = series("openai_proxy_upstream_key_requests_total", index="0")
        while used not in await self.scrape():  # the error body is being read
            pass
        client.transport.loseConnection()
        await self.fake.closed[0]
        self.assertEqual(len(self.fake.received), 1)


class _LargeErrorBody:
    """Item 12: an error body of any size reaches the client unchanged."""

    fake: Any
    keys: str
    post: Any
    assertEqual: Any

    async def test_a_large_error_body_on_every_key_arrives_whole(self) -> None:
        self.fake.script = Script(status=429, body=_LARGE_ERROR)
        response = await self.post()
        self.assertEqual(response.code, 429)
        # (Twisted's client keeps Content-Length out of the headers.)
        self.assertEqual(response.length, len(_LARGE_ERROR))
        self.assertEqual(await response.content(), _LARGE_ERROR)
        self.assertEqual(len(self.fake.received), len(self.keys.split(",")))

    async def test_a_large_chunked_error_body_arrives_whole(self) -> None:
        pieces = [_LARGE_ERROR[i : i + 10_000] for i in range(0, 300_056, 10_000)]
        self.fake.script = Script(status=503, chunks=pieces)
        response = await self.post()
        self.assertEqual(response.code, 503)
        self.assertEqual(await response.content(), _LARGE_ERROR)


class LargeErrorBodyTests(_LargeErrorBody, _Failover):
    async def test_a_large_error_body_on_the_first_key_is_not_relayed(self) -> None:
        self.fake.by_key["sk-server-one"] = Script(status=429, body=_LARGE_ERROR)
        response = await self.post()
        self.assertEqual(response.code, 200)
        reply = json.loads(await response.content())
        self.assertEqual(reply["object"], "chat.completion")
        # The first answer's connection, abandoned mid-body, is closed.
        await self.fake.closed[0]

    async def test_a_relayed_error_body_keeps_backpressure(self) -> None:
        total = 64 * 1024 * 1024
        self.fake.script = Script(status=503, chunks=[b"x" * 65536] * 1024)
        client = await connect(self.proxy.port.getHost().port)
        assert client.transport is not None
        body = json.dumps(chat()).encode()
        client.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (_PROXY_KEY.encode(), len(body), body)
        )
        await client.first
        client.transport.pauseProducing()  # the client stops reading
        # Give a proxy without backpressure ample time to pull everything.
        await deferLater(reactor, 0.5)
        self.assertLess(self.fake.sent_bytes[0], total // 4)
        client.transport.abortConnection()
        await self.fake.closed[-1]


class LargeErrorBodyOneKeyTests(_LargeErrorBody, _Failover):
    keys = "sk-server-one"


class _EarlyAnswer(Protocol):
    """
    An upstream that refuses a request body it has not seen before after
    reading only its start, and takes a body it has seen (the retry): it
    records the whole of it.  Keep-alive.

    It stops reading a refused request until the next request comes (the
    retry), so that the retry is sent while the proxy is still sending the
    refused body; it then reads the rest of that body, throwing it away.
    """

    def __init__(self, upstream: _EarlyAnswers) -> None:
        self._upstream = upstream
        self._buffer = b""
        self._head = True
        self._pieces: list[bytes] = []
        self._length = 0
        self._received = 0
        self._refused: bool | None = None
        self._refusal: Deferred[int] | None = None

    def connectionMade(self) -> None:
        self._upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer:
            if self._head:
                head, found, self._buffer = self._buffer.partition(b"\r\n\r\n")
                if not found:
                    self._buffer = head
                    return
                self._begin(head.lower().split(b"\r\n"))
            piece = self._buffer[: self._length - self._received]
            self._buffer = self._buffer[len(piece) :]
            self._received += len(piece)
            if not self._refused:
                self._pieces.append(piece)
            self._answer()

    def _begin(self, lines: list[bytes]) -> None:
        self._head = False
        self._length = next(
            int(line.split(b":")[1])
            for line in lines
            if line.startswith(b"content-length:")
        )
        self._received, self._pieces, self._refused = 0, [], None

    def _answer(self) -> None:
        assert self.transport is not None
        if self._refused is None and self._received >= 1000:
            start = b"".join(self._pieces)[:1000]
            self._refused = start not in self._upstream.seen
            self._upstream.seen.add(start)
            if self._refused:
                self._pieces = []
                self._refusal = Deferred()
                self._upstream.refusals.append(self._refusal)
                self._write(b"401 Unauthorized", b'{"error": {"code": "bad_key"}}')
                self.transport.pauseProducing()
                self._upstream.held.append(self.transport)
            else:
                # The retry: the refused request may be read on now.
                while self._upstream.held:
                    self._upstream.held.pop().resumeProducing()
        if self._received == self._length:
            self._refused_body_ended()
            if not self._refused:
                self._upstream.bodies.append(b"".join(self._pieces))
                self._write(b"200 OK", _OK)
            self._head = True

    def _write(self, status: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body)
        )

    def _refused_body_ended(self) -> None:
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            refusal.callback(self._received)

    def connectionLost(self, reason: Failure = _CLOSED) -> None:
        self._refused_body_ended()


class _EarlyAnswers(Factory):
    """Makes L{_EarlyAnswer}s and keeps what they saw."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.bodies: list[bytes] = []
        self.connections: list[_EarlyAnswer] = []
        self.held: list[Any] = []
        #: For each refused request: how much of its body came, in the end.
        self.refusals: list[Deferred[int]] = []

    def close(self) -> None:
        """Close the connections still open."""
        for protocol in self.connections:
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    def buildProtocol(self, addr: Any) -> _EarlyAnswer:
        return _EarlyAnswer(self)


class SpooledReplayTests(_Failover):
    """Item 13: a spooled body replayed on the next key arrives whole."""

    idle_timeout = 10.0

    def setUp(self) -> None:
        super().setUp()
        self.upstream = _EarlyAnswers()
        port = reactor.listenTCP(0, self.upstream, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.upstream.close)
        # A small window: the refusal comes while the proxy is still sending.
        port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        env = {
            **self.env,
            "UPSTREAM": f"http://127.0.0.1:{port.getHost().port}",
            "KEY_COOLDOWN": "0.001",  # so every request is tried twice
        }
        self.proxy = Proxy(self, env)

    async def test_a_spooled_body_is_replayed_whole_after_an_early_answer(
        self,
    ) -> None:
        sent = []
        for _ in range(20):
            big = json.dumps(chat(padding=os.urandom(1_000_000).hex())).encode()
            sent.append(big)
            response = await self.post(big)
            self.assertEqual(response.code, 200)
            self.assertEqual(await response.content(), _OK)
        self.assertEqual(len(self.upstream.refusals), 20)
        self.assertEqual(len(self.upstream.bodies), 20)
        for got, body in zip(self.upstream.bodies, sent, strict=True):
            self.assertEqual(got, body)
        # The refused attempts stopped sending: none sent the whole body.
        for refusal, body in zip(self.upstream.refusals, sent, strict=True):
            self.assertLess(await refusal, len(body))
