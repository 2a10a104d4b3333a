"""
Hardening: slow and hostile clients, broken upstreams, big bodies (issue 9).
Each test reproduces one of the issue's numbered defects against a real
loopback proxy, with fakes that misbehave on purpose.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from tests.fake_upstream import Script
from tests.harness import AUTH, RelayTestCase
from tests.rawhttp import Collector, connect
from tests.test_operations import ERRORS, HANGUPS, REQUESTS, parse_samples, series

_CHUNK = b"x" * 65536


def capture_logs(test: Any) -> list[str]:
    """Every log line formatted from now until the end of C{test}."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


async def get_raw(test: RelayTestCase, path: bytes) -> Collector:
    """Open a raw connection to the proxy and send a keyed GET for C{path}."""
    proto = await connect(test.proxy.port.getHost().port)
    assert proto.transport is not None
    proto.transport.write(
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
        b"Connection: close\r\n\r\n"
    )
    return proto


class _ScrapingTest(RelayTestCase):
    async def scrape(self) -> dict[str, float]:
        response = await self.http.get(self.url("/metrics"))
        return parse_samples((await response.content()).decode("utf-8"))


class SlowReaderTests(_ScrapingTest):
    """Item 1: the upstream idle timer measures only the upstream's silence."""

    env = {"TIMEOUT": "200", "SEND_TIMEOUT": "5000"}

    async def test_client_pausing_longer_than_timeout_still_gets_the_whole_body(
        self,
    ) -> None:
        total = 16 * 1024 * 1024
        self.fake.script = Script(
            headers={
                b"content-type": [b"application/octet-stream"],
                b"content-length": [b"%d" % total],
            },
            chunks=[_CHUNK] * (total // len(_CHUNK)),
        )
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        assert proto.transport is not None
        await proto.first
        proto.transport.pauseProducing()  # the client stops reading...
        await deferLater(reactor, 0.8, lambda: None)  # ...for 4 x TIMEOUT
        proto.transport.resumeProducing()
        data = await proto.done
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertEqual(len(body), total)
        self.assertFalse([line for line in lines if "idle timeout" in line])


class SendTimeoutTests(_ScrapingTest):
    """Item 1: a client that stops reading is cut off after SEND_TIMEOUT."""

    env = {"TIMEOUT": "5000", "SEND_TIMEOUT": "300"}

    async def test_stalled_client_is_cut_off_and_counted_as_its_hang_up(
        self,
    ) -> None:
        total = 32 * 1024 * 1024
        self.fake.script = Script(
            headers={b"content-type": [b"application/octet-stream"]},
            chunks=[_CHUNK] * (total // len(_CHUNK)),
        )
        before = await self.scrape()
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        assert proto.transport is not None
        await proto.first
        proto.transport.pauseProducing()  # and never reads again
        await self.fake.closed[-1]  # the proxy closed the upstream for it
        proto.transport.abortConnection()
        data = await proto.done
        self.assertLess(len(data), total)
        after = await self.scrape()
        self.assertEqual(after.get(HANGUPS, 0) - before.get(HANGUPS, 0), 1)
        self.assertEqual(
            after.get(series(ERRORS, kind="timeout"), 0)
            - before.get(series(ERRORS, kind="timeout"), 0),
            0,
        )
        self.assertTrue([line for line in lines if "stopped reading" in line])
        self.assertTrue([line for line in lines if " 499 " in line])


class TruncatedBodyTests(_ScrapingTest):
    """Item 3: an upstream that breaks off a plain body is the upstream's fault."""

    async def test_truncated_plain_body_is_an_upstream_error_not_a_hang_up(
        self,
    ) -> None:
        self.fake.script = Script(
            headers={
                b"content-type": [b"application/octet-stream"],
                b"content-length": [b"1000"],
            },
            chunks=[b"y" * 100],
            hang_up_after=1,
            interval=0.01,
        )
        before = await self.scrape()
        lines = capture_logs(self)
        proto = await get_raw(self, b"/v1/files/f/content")
        data = await proto.done
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "))
        self.assertNotIn(b"y" * 1000, data)
        after = await self.scrape()
        self.assertEqual(after.get(HANGUPS, 0), before.get(HANGUPS, 0))
        reset = series(ERRORS, kind="reset")
        self.assertEqual(after.get(reset, 0) - before.get(reset, 0), 1)
        access = [line for line in lines if "/v1/files/f/content" in line]
        self.assertTrue(access)
        self.assertNotIn(" 499 ", access[-1])
        self.assertEqual(
            after.get(series(REQUESTS, method="GET", route="files", status="499"), 0),
            before.get(series(REQUESTS, method="GET", route="files", status="499"), 0),
        )


class ResponseHeaderTests(RelayTestCase):
    """Items 4 and 5: what the upstream may not put in the client's headers."""

    async def test_upstream_cannot_forge_the_proxy_request_id(self) -> None:
        lines = capture_logs(self)
        self.fake.script = Script(
            headers={b"x-proxy-request-id": [b"forged-by-upstream"]}, body=b"{}"
        )
        response = await self.http.get(self.url("/v1/models"), headers=AUTH)
        await response.content()
        ids = response.headers.getRawHeaders(b"x-proxy-request-id")
        self.assertEqual(len(ids), 1)
        self.assertNotEqual(ids[0], b"forged-by-upstream")
        self.assertRegex(ids[0], rb"^[0-9a-f]{16}$")
        self.assertFalse([line for line in lines if "forged" in line])

    async def test_headers_named_in_the_upstream_connection_header_are_dropped(
        self,
    ) -> None:
        self.fake.script = Script(
            headers={
                b"connection": [b"x-hop-secret, keep-alive"],
                b"x-hop-secret": [b"internal"],
                b"x-end-to-end": [b"kept"],
            },
            body=b"{}",
        )
        response = await self.http.get(self.url("/v1/models"), headers=AUTH)
        await response.content()
        self.assertIsNone(response.headers.getRawHeaders(b"x-hop-secret"))
        self.assertEqual(response.headers.getRawHeaders(b"x-end-to-end"), [b"kept"])
