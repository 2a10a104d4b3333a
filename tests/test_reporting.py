"""
Hardening, round 2 (issue 17): how the proxy answers, counts and logs what
goes wrong around it: a reached upstream's broken response head, a full
temporary directory under an upload, and the text access line.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from tests.harness import AUTH, Proxy
from tests.test_hardening import _ScrapingTest, capture_logs
from tests.test_operations import ERRORS, series


class _ScriptedHead(Protocol):
    """
    An upstream that answers any request with C{head} as is, then closes
    (or, with C{stall}, goes silent).
    """

    head = b""
    stall = False

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data and self.transport is not None:
            self.transport.write(self.head)
            if not self.stall:
                self.transport.loseConnection()


class BrokenUpstreamHeadTests(_ScrapingTest):
    """
    Item 16: an upstream that was reached but sent a partial, malformed or
    oversized response head is an C{upstream_error} (502), counted as
    C{kind="reset"}, not as an unreachable upstream.
    """

    async def answer(
        self, head: bytes, *, stall: bool = False
    ) -> tuple[int, Any, dict[str, float]]:
        """Status, error body and moved error counters of one request."""
        protocol = type("Head", (_ScriptedHead,), {"head": head, "stall": stall})
        port = reactor.listenTCP(
            0, Factory.forProtocol(protocol), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        self.proxy = Proxy(
            self,
            {"UPSTREAM": f"http://127.0.0.1:{port.getHost().port}", "TIMEOUT": "300"},
        )
        before = await self.scrape()
        response = await self.http.get(self.url("/v1/models"), headers=AUTH)
        error = json.loads(await response.content())["error"]
        after = await self.scrape()
        moved = {
            kind: after.get(series(ERRORS, kind=kind), 0)
            - before.get(series(ERRORS, kind=kind), 0)
            for kind in ("reset", "unreachable", "timeout")
        }
        return response.code, error, moved

    async def assert_upstream_error(self, head: bytes) -> None:
        lines = capture_logs(self)
        code, error, moved = await self.answer(head)
        self.assertEqual(code, 502)
        self.assertEqual(error["code"], "upstream_error")
        self.assertEqual(error["type"], "api_error")
        self.assertEqual(moved, {"reset": 1, "unreachable": 0, "timeout": 0})
        self.assertTrue([line for line in lines if "upstream 127.0.0.1" in line])

    async def test_partial_head_is_an_upstream_error(self) -> None:
        await self.assert_upstream_error(b"HTTP/1.1 200 OK\r\nContent-Ty")

    async def test_malformed_status_line_is_an_upstream_error(self) -> None:
        await self.assert_upstream_error(b"SMTP ready, not HTTP\r\n\r\n")

    async def test_malformed_header_is_an_upstream_error(self) -> None:
        await self.assert_upstream_error(
            b"HTTP/1.1 200 OK\r\nContent-Length: twelve\r\n\r\nhello"
        )

    async def test_oversized_head_is_an_upstream_error(self) -> None:
        await self.assert_upstream_error(
            b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n{}"
        )

    async def test_head_cut_short_by_the_timeout_is_an_upstream_timeout(
        self,
    ) -> None:
        code, error, moved = await self.answer(b"HTTP/1.1 200 OK\r\n", stall=True)
        self.assertEqual(code, 504)
        self.assertEqual(error["code"], "upstream_timeout")
        self.assertEqual(moved, {"reset": 0, "unreachable": 0, "timeout": 1})
