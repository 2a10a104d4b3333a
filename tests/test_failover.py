"""
Server-key failover against misbehaving upstreams (issue 17, items 11-13):
error bodies that stall or are large, and upstreams that answer before
they have read the request body.  Real sockets over loopback throughout.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from tests.fake_upstream import Script
from tests.harness import JSON, RelayTestCase
from tests.test_keys import chat

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

    def setUp(self) -> None:
        self.env = {
            "OPENAI_KEY": self.keys,
            "PROXY_KEY": _PROXY_KEY,
            "TIMEOUT": str(int(_TIMEOUT * 1000)),
        }
        super().setUp()

    async def post(self, body: bytes | None = None) -> Any:
        return await self.http.post(
            self.url("/v1/chat/completions"),
            json.dumps(chat()).encode() if body is None else body,
            headers=_HEADERS,
        )

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


class LargeErrorBodyOneKeyTests(_LargeErrorBody, _Failover):
    keys = "sk-server-one"
