"""Many slow streams open at once (asyncio client in the harness process)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from benchmarks.probes import request_bytes
from benchmarks.procs import Proxy
from benchmarks.wrk import CHAT_STREAM


class _Stream(asyncio.Protocol):
    """Counts the SSE events of one streamed response; notes how it ended."""

    def __init__(self, request: bytes, tally: _Tally) -> None:
        self.request = request
        self.tally = tally
        self.events = 0
        self.ok = False
        self.status: bytes | None = None
        self.last = b""
        self.tail = b""
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.status is None:
            self.status = data[9:12]
        # Each event ends with a blank line; count "\n\n" across reads.
        found = data.count(b"\n\n") + (self.last == b"\n" and data[:1] == b"\n")
        if found and self.events == 0:
            self.tally.started += 1
        self.events += found
        self.tally.events += found
        self.last = data[-1:]
        self.tail = (self.tail + data)[-7:]

    def eof_received(self) -> None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.ok = self.status == b"200" and self.tail == b"\r\n0\r\n\r\n"
        if not self.done.done():
            self.done.set_result(None)


class _Tally:
    def __init__(self) -> None:
        self.started = 0
        self.events = 0


async def _run(
    proxy: Proxy, count: int, events: int, interval_ms: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = request_bytes(CHAT_STREAM, events=events, interval_ms=interval_ms)
    request = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    tally = _Tally()
    streams: list[_Stream] = []
    connect_errors = 0
    base_rss = proxy.rss()
    started = time.monotonic()
    # Opened in batches, so the listen backlog never overflows.
    for first in range(0, count, 250):
        batch = [_Stream(request, tally) for _ in range(first, min(count, first + 250))]
        results = await asyncio.gather(
            *(
                loop.create_connection(lambda s=s: s, "127.0.0.1", proxy.port)
                for s in batch
            ),
            return_exceptions=True,
        )
        for stream, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                connect_errors += 1
            else:
                streams.append(stream)
    opened = time.monotonic() - started
    # Wait until every stream has its first event: all are open end to end.
    deadline = time.monotonic() + 60
    while tally.started < len(streams) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    all_open = time.monotonic() - started
    cpu0, events0, t0 = proxy.cpu(), tally.events, time.monotonic()
    peak_rss = 0
    # Hold: sample while every stream is open (the first ones end first).
    hold = max(1.0, events * interval_ms / 1000.0 - all_open - 1.0)
    end = time.monotonic() + min(hold, 10.0)
    while time.monotonic() < end:
        peak_rss = max(peak_rss, proxy.rss())
        await asyncio.sleep(0.2)
    cpu1, events1, t1 = proxy.cpu(), tally.events, time.monotonic()
    await asyncio.wait_for(
        asyncio.gather(*(s.done for s in streams)),
        timeout=events * interval_ms / 1000 + 60,
    )
    failed = sum(not s.ok for s in streams)
    short = sum(s.events < events + 1 for s in streams)
    relayed = events1 - events0
    return {
        "streams": count,
        "events_per_stream": events,
        "interval_ms": interval_ms,
        "open_seconds": round(opened, 2),
        "all_streaming_seconds": round(all_open, 2),
        "base_rss_kb": base_rss,
        "peak_rss_kb": peak_rss,
        "rss_per_stream_kb": round((peak_rss - base_rss) / max(1, count), 2),
        "errors": connect_errors + failed,
        "connect_errors": connect_errors,
        "incomplete": failed,
        "short": short,
        "window_seconds": round(t1 - t0, 2),
        "window_events": relayed,
        "events_per_s": round(relayed / max(1e-9, t1 - t0), 1),
        "cpu_us_per_event": round((cpu1 - cpu0) / max(1, relayed) * 1e6, 2),
        "cpu_share": round((cpu1 - cpu0) / max(1e-9, t1 - t0), 3),
    }


def many_streams(
    proxy: Proxy, count: int, events: int, interval_ms: int
) -> dict[str, Any]:
    """Open C{count} streams through C{proxy} at once; measure memory, errors, CPU."""
    return asyncio.run(_run(proxy, count, events, interval_ms))
