"""
Hardening, round 2 (issue 17): how the proxy answers, counts and logs what
goes wrong around it: a reached upstream's broken response head, a full
temporary directory under an upload, and the text access line.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from openai_proxy.telemetry import logs
from tests.harness import AUTH, Proxy, RelayTestCase
from tests.rawhttp import raw_request
from tests.test_hardening import _ScrapingTest, capture_logs
from tests.test_operations import ERRORS, REQUESTS, series

OPENAI_KEY = "sk-test-upstream-0123456789"


def text_access_lines(test: Any) -> list[str]:
    """
    Every access line the default (text) log writes from now until the end
    of C{test}, as it writes them.
    """
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "openai_proxy.access":
            text = logs._text_line(logs.redact_event(event))
            assert text is not None
            lines.append(logs.redact_text(text))

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


def split_response(data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP response."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.split(b"\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


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


class TextAccessLineTests(RelayTestCase):
    """
    Item 17: the default text access line names the request id, and holds
    the body when C{LOG_BODIES=1}, as the JSON line does.
    """

    env = {"LOG_BODIES": "1", "MAX_BODY": "1000"}

    async def test_text_line_names_the_request_id_and_holds_the_body(self) -> None:
        lines = text_access_lines(self)
        payload = {"model": "m", "messages": [{"role": "user", "content": "a\nb"}]}
        response = await self.post_json("/v1/chat/completions", payload)
        await response.content()
        request_id = response.headers.getRawHeaders(b"x-proxy-request-id")[0].decode()
        [line] = [line for line in lines if f" id={request_id}" in line]
        self.assertIn("POST /v1/chat/completions 200 ", line)
        # One line, whatever the body holds: it is written as a JSON string.
        self.assertTrue(
            line.endswith(" body=" + json.dumps(json.dumps(payload)) + "\n")
        )
        self.assertEqual(line.count("\n"), 1)

    async def test_a_key_in_a_logged_body_is_redacted_in_the_text_line(self) -> None:
        lines = text_access_lines(self)
        response = await self.post_json(
            "/v1/embeddings", {"input": f"my key is {OPENAI_KEY}"}
        )
        await response.content()
        [line] = [line for line in lines if "/v1/embeddings" in line]
        self.assertIn("my key is [REDACTED]", line)
        self.assertNotIn(OPENAI_KEY, line)

    async def test_refused_body_is_logged_with_its_id_and_the_bytes_sent(
        self,
    ) -> None:
        lines = text_access_lines(self)
        data = await raw_request(
            self.proxy.port.getHost().port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer k\r\nContent-Length: 5000\r\n"
            # The proxy closes at once instead of waiting to drain a body.
            b"Expect: 100-continue\r\n\r\n",
        )
        status, headers, body = split_response(data)
        self.assertEqual(status, 413)
        [line] = lines
        self.assertIn(f"POST /v1/chat/completions 413 {len(body)}B ", line)
        self.assertIn(f" id={headers[b'x-proxy-request-id'].decode()}", line)

    async def test_refused_head_is_logged_with_its_id_and_the_bytes_sent(
        self,
    ) -> None:
        lines = text_access_lines(self)
        data = await raw_request(
            self.proxy.port.getHost().port,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
            + b"X-Big: "
            + b"a" * 20_000
            + b"\r\n\r\n",
        )
        status, headers, body = split_response(data)
        self.assertEqual(status, 431)
        [line] = lines
        self.assertTrue(
            re.search(rf"\] - - 431 {len(body)}B .* id=[0-9a-f]{{16}}$", line.rstrip())
        )
        self.assertIn(f" id={headers[b'x-proxy-request-id'].decode()}", line)


class _Disk(io.RawIOBase):
    """A file on a disk with C{room} bytes free: writes past them fail (ENOSPC)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self._data = bytearray()
        self._position = 0
        self._room = room

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        size = len(data)
        if self._position + size > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._data[self._position : self._position + size] = data
        self._position += size
        return size

    def readinto(self, buffer: Any) -> int:
        piece = self._data[self._position : self._position + len(buffer)]
        buffer[: len(piece)] = piece
        self._position += len(piece)
        return len(piece)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._position, len(self._data))[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position


def full_disk(room: int | None, buffer_size: int = 8192) -> Callable[..., Any]:
    """
    A stand-in for C{tempfile.TemporaryFile} on a full disk: a buffered file
    (as the real one is) with C{room} bytes left, or, for L{None}, one that
    cannot even be created.
    """

    def temporary_file(*args: Any, **kwargs: Any) -> Any:
        if room is None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return io.BufferedRandom(_Disk(room), buffer_size)

    return temporary_file


def upload(size: int, *, chunked: bool = False) -> bytes:
    """A raw file upload of C{size} bytes, large enough to be spooled to disk."""
    head = b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
    head += b"Content-Type: application/octet-stream\r\n"
    body = b"x" * size
    if chunked:
        return (
            head
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % size
            + body
            + b"\r\n0\r\n\r\n"
        )
    return head + b"Content-Length: %d\r\n\r\n" % size + body


class FullTemporaryDirectoryTests(_ScrapingTest):
    """
    Item 15: an upload the proxy cannot store (the temporary directory is
    full) is answered 507 with an OpenAI-style body, logged once, counted,
    and the proxy keeps serving.
    """

    REFUSED = series(REQUESTS, method="POST", route="files", status="507")

    async def assert_insufficient_storage(self, payload: bytes) -> None:
        before = await self.scrape()
        data = await raw_request(self.proxy.port.getHost().port, payload)
        status, headers, body = split_response(data)
        self.assertEqual(status, 507)
        self.assertEqual(headers[b"content-type"], b"application/json; charset=utf-8")
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "insufficient_storage")
        self.assertEqual(error["type"], "api_error")
        after = await self.scrape()
        self.assertEqual(after[self.REFUSED] - before.get(self.REFUSED, 0), 1)
        # And the next request is served.
        response = await self.http.get(self.url("/v1/models"), headers=AUTH)
        await response.content()
        self.assertEqual(response.code, 200)

    async def test_body_that_cannot_be_written_gets_507(self) -> None:
        self.patch(tempfile, "TemporaryFile", full_disk(65536, buffer_size=4096))
        await self.assert_insufficient_storage(upload(300_000))

    async def test_body_whose_last_bytes_cannot_be_flushed_gets_507(self) -> None:
        # Everything fits the file's buffer: the failure comes at the flush.
        self.patch(tempfile, "TemporaryFile", full_disk(0, buffer_size=1 << 20))
        await self.assert_insufficient_storage(upload(200_000))

    async def test_chunked_body_without_a_temporary_file_gets_507(self) -> None:
        self.patch(tempfile, "TemporaryFile", full_disk(None))
        await self.assert_insufficient_storage(upload(1000, chunked=True))

    async def test_full_disk_is_logged_once_until_bodies_can_be_stored_again(
        self,
    ) -> None:
        lines = capture_logs(self)
        port = self.proxy.port.getHost().port
        full_tmp = self.patch(tempfile, "TemporaryFile", full_disk(65536, 4096))
        for _ in range(3):
            await raw_request(port, upload(300_000))
        full = [line for line in lines if "cannot store request bodies" in line]
        self.assertEqual(len(full), 1)
        self.assertIn("No space left on device", full[0])

        full_tmp.restore()
        response = await self.http.post(
            self.url("/v1/files"), b"x" * 300_000, headers=AUTH
        )
        self.assertEqual(json.loads(await response.content())["bytes"], 300_000)
        self.assertEqual(
            len([line for line in lines if "can be stored again" in line]), 1
        )

        self.patch(tempfile, "TemporaryFile", full_disk(None))
        await raw_request(port, upload(300_000))
        full = [line for line in lines if "cannot store request bodies" in line]
        self.assertEqual(len(full), 2)
