"""
A fast fake OpenAI upstream (and fake Tencent TMS), for the benchmarks only.

Raw asyncio, HTTP/1.1 keep-alive, canned bytes: it must never be the
bottleneck of what it measures.  Run as
``python -m benchmarks.upstream --port 0`` ; it prints ``READY <port>``.
With ``--tls-cert PEM --tls-key PEM`` it speaks https.

- ``POST`` with a body holding ``"stream": true``: an SSE stream of
  ``X-Bench-Events`` (default 70) chat chunks, ``X-Bench-Interval-Ms``
  (default 0: as fast as possible, one write per event) apart, each stamped
  with its send time as ``"t"`` (``time.time()``), then ``data: [DONE]``.
- Any other ``POST``/``GET``: a ~1 KB ``chat.completion``.
- A request carrying ``X-TC-Action`` (the Tencent SDK's): a TMS ``Pass``
  verdict, ``--tms-delay`` seconds later (signatures are not checked).
- ``GET /__stats``: request counters as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import time
from typing import Any

_CONTENT = (
    "The quick brown fox jumps over the lazy dog, and then it keeps on running "
    "for a while longer, because benchmarks need a reply of a realistic size. "
) * 6
_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": _CONTENT[:760]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 180, "total_tokens": 192},
    }
).encode()
_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_COMPLETION) + _COMPLETION
)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
# Words ending in a sentence mark now and then, so moderation has sentences.
_WORDS = [("Hello" if i % 10 else "world.") + " " for i in range(70)]
_EVENT_PREFIX = b'data: {"t":'
_EVENT_SUFFIXES = [
    (
        b',"id":"chatcmpl-bench","object":"chat.completion.chunk",'
        b'"created":1700000000,"model":"gpt-bench","choices":[{"index":0,'
        b'"delta":{"content":'
        + json.dumps(w).encode()
        + b'},"finish_reason":null}]}\n\n'
    )
    for w in _WORDS
]
_DONE = b"data: [DONE]\n\n"
_TMS = json.dumps(
    {
        "Response": {
            "Suggestion": "Pass",
            "Label": "Normal",
            "Score": 0,
            "RequestId": "x",
        }
    }
).encode()
_TMS_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_TMS) + _TMS
)

STATS: dict[str, int] = {"requests": 0, "streams": 0, "events": 0, "tms": 0}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _header(head: bytes, name: bytes, default: int) -> int:
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return default
    j = head.find(b"\r\n", i + 2)
    return int(head[i + len(name) + 3 : j].strip())


class Server(asyncio.Protocol):
    """One keep-alive connection; requests are answered in order."""

    def __init__(self, tms_delay: float) -> None:
        self.tms_delay = tms_delay
        self.buf = b""
        self.busy = False  # a stream or delayed answer is in progress
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        while self.transport is not None and not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[: end + 2].lower()
            length = _header(head, b"content-length", 0)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        STATS["requests"] += 1
        if b"\r\nx-tc-action:" in head:
            STATS["tms"] += 1
            self.busy = True
            asyncio.get_running_loop().call_later(self.tms_delay, self._tms)
        elif head.startswith(b"get /__stats"):
            data = json.dumps(STATS).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
            )
        elif b'"stream": true' in body or b'"stream":true' in body:
            STATS["streams"] += 1
            self.busy = True
            events = _header(head, b"x-bench-events", 70)
            interval = _header(head, b"x-bench-interval-ms", 0) / 1000.0
            self.transport.write(_SSE_HEAD)
            if interval:
                asyncio.get_running_loop().call_later(
                    interval, self._slow, 0, events, interval
                )
            else:
                asyncio.ensure_future(self._burst(events))
        else:
            self.transport.write(_REPLY)

    def _tms(self) -> None:
        if self.transport is not None:
            self.transport.write(_TMS_REPLY)
        self._done()

    def _event(self, i: int) -> None:
        STATS["events"] += 1
        suffix = _EVENT_SUFFIXES[i % len(_EVENT_SUFFIXES)]
        self.transport.write(_chunk(_EVENT_PREFIX + b"%.6f" % time.time() + suffix))

    def _end(self) -> None:
        if self.transport is not None:
            self.transport.write(_chunk(_DONE) + b"0\r\n\r\n")
        self._done()

    async def _burst(self, events: int) -> None:
        for i in range(events):
            if self.transport is None:
                return
            self._event(i)
            # One write per event, each sent on its own, as a model would.
            await asyncio.sleep(0)
        self._end()

    def _slow(self, i: int, events: int, interval: float) -> None:
        if self.transport is None:
            return
        self._event(i)
        if i + 1 < events:
            asyncio.get_running_loop().call_later(
                interval, self._slow, i + 1, events, interval
            )
        else:
            self._end()

    def _done(self) -> None:
        self.busy = False
        if self.buf:
            self._next()


async def serve(
    port: int, tms_delay: float, tls: tuple[str, str] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    context = None
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    server = await loop.create_server(
        lambda: Server(tms_delay),
        "127.0.0.1",
        port,
        backlog=4096,
        reuse_address=True,
        ssl=context,
    )
    print("READY", server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tms-delay", type=float, default=0.02)
    parser.add_argument("--tls-cert", help="serve https with this certificate")
    parser.add_argument("--tls-key", help="... and this key")
    args = parser.parse_args()
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    asyncio.run(serve(args.port, args.tms_delay, tls))


if __name__ == "__main__":
    main()
