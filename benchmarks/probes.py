"""
Latency probes over plain blocking sockets: one request at a time, so the
client adds as little as possible to what it measures.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from benchmarks.procs import PROXY_KEY


def request_bytes(
    body: bytes, *, events: int | None = None, interval_ms: int | None = None
) -> bytes:
    """A keep-alive C{POST /v1/chat/completions} with C{body}."""
    head = [
        b"POST /v1/chat/completions HTTP/1.1",
        b"Host: 127.0.0.1",
        b"Content-Type: application/json",
        b"Authorization: Bearer " + PROXY_KEY.encode(),
        b"Content-Length: %d" % len(body),
    ]
    if events is not None:
        head.append(b"X-Bench-Events: %d" % events)
    if interval_ms is not None:
        head.append(b"X-Bench-Interval-Ms: %d" % interval_ms)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


@dataclass
class Reply:
    status: int
    seconds: float  # request sent -> last byte
    first_event: float | None = None  # request sent -> first SSE event
    delays: list[float] = field(default_factory=list)  # arrival - "t", per event
    events: int = 0


class Connection:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.arrived = 0.0

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        self.arrived = time.time()
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    def _take(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    def _line(self) -> bytes:
        while (i := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:i], self.buf[i + 2 :]
        return line

    def exchange(self, raw: bytes) -> Reply:
        """Send one request; read the whole response, timing SSE events."""
        start_wall = time.time()
        start = time.perf_counter()
        self.sock.sendall(raw)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head, self.buf = self.buf[:end].lower(), self.buf[end + 4 :]
        reply = Reply(int(head.split(b" ", 2)[1]), 0.0)
        if b"transfer-encoding: chunked" in head:
            pending = b""
            while (size := int(self._line().split(b";")[0], 16)) > 0:
                pending += self._take(size)
                self._take(2)
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    self._event(reply, event, start_wall)
            self._take(2)
        else:
            length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
            self._take(length)
        reply.seconds = time.perf_counter() - start
        return reply

    def _event(self, reply: Reply, event: bytes, start_wall: float) -> None:
        reply.events += 1
        if reply.first_event is None:
            reply.first_event = self.arrived - start_wall
        i = event.find(b'"t":')
        if i >= 0:
            sent = float(event[i + 4 : event.index(b",", i)])
            reply.delays.append(self.arrived - sent)


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    """p50/p90/p99/max of C{values} times C{scale} (seconds -> ms by default)."""
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * scale, 4)

    return {
        "n": len(ordered),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": round(ordered[-1] * scale, 4),
    }
