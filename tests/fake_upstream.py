"""
A fake OpenAI API on a real loopback socket, for driving the proxy.

It answers like the real API for the endpoints the tests use, records every
request it received, and can be told to stream slowly, fail, stall or hang up.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

AUDIO = bytes(range(256)) * 400  # 100 KiB of "audio", every byte value
FILE_CONTENT = b"\x00\x01binary file content\xff" * 1000


@dataclass
class Received:
    """One request as the fake upstream saw it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def chat_chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    index: int = 0,
    role: str | None = None,
) -> dict[str, Any]:
    """A chat.completion.chunk object."""
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-fake",
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def sse_events(objects: list[Any], *, done: bool = True) -> list[bytes]:
    """Serialise objects as SSE events, as the OpenAI API does."""
    events = [b"data: " + json.dumps(o).encode() + b"\n\n" for o in objects]
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def chat_stream(pieces: list[str]) -> list[bytes]:
    """The SSE events of a streamed chat answer made of C{pieces}."""
    chunks = [chat_chunk("", role="assistant")]
    chunks += [chat_chunk(p) for p in pieces]
    chunks.append(chat_chunk(finish="stop"))
    return sse_events(chunks)


def chat_completion(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@dataclass
class Script:
    """What the fake does with the next requests, instead of its usual answer."""

    status: int = 200
    headers: dict[bytes, list[bytes]] = field(default_factory=dict)
    body: bytes | None = None
    events: list[bytes] | None = None  # stream these (text/event-stream)
    interval: float = 0.0  # seconds between events
    stall_after: int | None = None  # send this many events, then go silent
    hang_up_after: int | None = None  # send this many events, then drop the connection
    stall: bool = False  # never answer at all
    chunks: list[bytes] | None = None  # a non-SSE body, written in these pieces
    gzip: bool = False  # gzip C{body}, even if the request did not ask for it


class FakeOpenAI(Resource):
    """The fake API.  Set C{script} to change what it answers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.script: Script | None = None
        #: Scripts for requests bearing one upstream key (over C{script}).
        self.by_key: dict[str, Script] = {}
        self.closed: list[Deferred[float]] = []
        self._calls: list[IDelayedCall] = []
        self._open: list[Request] = []
        self.sent_bytes = [0]  # body bytes handed to the transport so far
        #: Gzip whole JSON bodies for requests whose Accept-Encoding allows
        #: it, as the real API does; C{last_body} is the last one, as sent.
        self.gzip_when_asked = False
        self.last_body = b""
        #: What GET /v1/models lists.
        self.models = ["gpt-fake"]

    # -- plumbing -----------------------------------------------------------

    def start(self, test: Any) -> str:
        """Listen on loopback for the duration of C{test}; return the base URL."""
        site = Site(self)
        port = _reactor.listenTCP(0, site, interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        test.addCleanup(self._cleanup)
        return f"http://127.0.0.1:{port.getHost().port}"

    def start_tls(self, test: Any, cert: str, key: str) -> int:
        """Listen with TLS on loopback for C{test}; return the port number."""
        from twisted.internet import ssl

        with open(cert) as c, open(key) as k:
            options = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
        port = _reactor.listenSSL(0, Site(self), options, interface="127.0.0.1")
        test.addCleanup(port.stopListening)
        test.addCleanup(self._cleanup)
        number: int = port.getHost().port
        return number

    def _cleanup(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        for request in self._open:
            if not request.finished and request.channel is not None:
                request.channel.transport.abortConnection()

    def _later(self, delay: float, f: Callable[..., None], *args: Any) -> None:
        self._calls.append(_reactor.callLater(delay, f, *args))

    def _track_close(self, request: Request) -> None:
        """Record when the proxy's connection for this request went away."""
        d: Deferred[float] = Deferred()
        self.closed.append(d)

        def lost(result: object) -> None:
            d.callback(time.monotonic())

        request.notifyFinish().addBoth(lost)

    # -- answering ------------------------------------------------------------

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        self.received.append(
            Received(request.method, request.uri, request.requestHeaders.copy(), body)
        )
        request.addCookie(b"upstream_session", b"secret-cookie")
        request.setHeader(b"x-request-id", b"req-fake-123")
        request.setHeader(b"openai-processing-ms", b"7")
        self._track_close(request)
        auth = (request.getHeader(b"authorization") or b"").decode()
        keyed = self.by_key.get(auth.removeprefix("Bearer "))
        if keyed is not None:
            return self._scripted(request, keyed)
        if self.script is not None:
            answer = self._scripted(request, self.script)
        else:
            answer = self._default(request, body)
        if isinstance(answer, bytes):
            accepts = request.getHeader(b"accept-encoding") or b""
            encoded = request.responseHeaders.hasHeader(b"content-encoding")
            if self.gzip_when_asked and b"gzip" in accepts and answer and not encoded:
                answer = gzip.compress(answer, mtime=0)
                request.setHeader(b"content-encoding", b"gzip")
            self.last_body = answer
        return answer

    def _default(self, request: Request, body: bytes) -> bytes | int:
        path = request.path
        if path == b"/v1/models":
            return _json(
                request,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": model,
                            "object": "model",
                            "created": 0,
                            "owned_by": "fake",
                        }
                        for model in self.models
                    ],
                },
            )
        if path == b"/v1/chat/completions":
            payload = json.loads(body)
            if payload.get("stream"):
                return self._stream(
                    request, Script(events=chat_stream(["Hello", " world", "!"]))
                )
            return _json(request, chat_completion("Hello world!"))
        if path == b"/v1/embeddings":
            return _json(
                request,
                {
                    "object": "list",
                    "data": [
                        {
                            "object": "embedding",
                            "index": 0,
                            "embedding": [0.1, 0.2, 0.3],
                        }
                    ],
                    "model": "emb-fake",
                    "usage": {"prompt_tokens": 1, "total_tokens": 1},
                },
            )
        if path == b"/v1/files" and request.method == b"POST":
            return _json(
                request,
                {
                    "id": "file-fake",
                    "object": "file",
                    "bytes": len(body),
                    "created_at": 0,
                    "filename": "upload.jsonl",
                    "purpose": "batch",
                    "status": "processed",
                },
            )
        if path.startswith(b"/v1/files/") and request.method == b"DELETE":
            return _json(
                request,
                {
                    "id": path.rsplit(b"/", 1)[-1].decode(),
                    "object": "file",
                    "deleted": True,
                },
            )
        if path.startswith(b"/v1/files/") and path.endswith(b"/content"):
            request.setHeader(b"content-type", b"application/octet-stream")
            return FILE_CONTENT
        if path == b"/v1/audio/speech":
            request.setHeader(b"content-type", b"audio/mpeg")
            return self._chunked(
                request, [AUDIO[i : i + 8192] for i in range(0, len(AUDIO), 8192)]
            )
        request.setResponseCode(404)
        return _json(
            request,
            {
                "error": {
                    "message": "unknown path",
                    "type": "invalid_request_error",
                    "code": None,
                }
            },
        )

    def _scripted(self, request: Request, script: Script) -> bytes | int:
        if script.stall:
            self._open.append(request)
            return NOT_DONE_YET
        request.setResponseCode(script.status)
        for name, values in script.headers.items():
            request.responseHeaders.setRawHeaders(name, values)
        if script.events is not None:
            return self._stream(request, script)
        if script.chunks is not None:
            return self._chunked(request, script.chunks, script)
        if not request.responseHeaders.hasHeader(b"content-type"):
            request.setHeader(b"content-type", b"application/json")
        if script.gzip:
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(script.body or b"", mtime=0)
        return script.body or b""

    def _chunked(
        self, request: Request, chunks: list[bytes], script: Script | None = None
    ) -> int:
        self._open.append(request)
        script = script or Script()
        if (
            script.interval
            or script.stall_after is not None
            or script.hang_up_after is not None
        ):
            self._send(request, list(chunks), script, 0)
        else:
            request.registerProducer(_Pull(request, chunks, self), False)
        return NOT_DONE_YET

    def _stream(self, request: Request, script: Script) -> int:
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        assert script.events is not None
        return self._chunked(request, script.events, script)

    def _send(
        self, request: Request, pieces: list[bytes], script: Script, sent: int
    ) -> None:
        if request.finished or request.channel is None:
            return
        if script.hang_up_after is not None and sent == script.hang_up_after:
            request.channel.transport.abortConnection()
            return
        if script.stall_after is not None and sent == script.stall_after:
            return
        if not pieces:
            request.finish()
            return
        self.sent_bytes[0] += len(pieces[0])
        request.write(pieces.pop(0))
        if script.interval:
            self._later(script.interval, self._send, request, pieces, script, sent + 1)
        else:
            self._send(request, pieces, script, sent + 1)


class _Pull:
    """Writes the next piece only when the connection asks: honours backpressure."""

    def __init__(self, request: Request, pieces: list[bytes], fake: FakeOpenAI) -> None:
        self._request = request
        self._pieces = iter(pieces)
        self._fake = fake

    def resumeProducing(self) -> None:
        if self._request.finished or self._request.channel is None:
            return
        piece = next(self._pieces, None)
        if piece is None:
            self._request.unregisterProducer()
            self._request.finish()
            return
        self._fake.sent_bytes[0] += len(piece)
        self._request.write(piece)

    def stopProducing(self) -> None:
        self._pieces = iter(())


def _json(request: Request, obj: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(obj).encode()
