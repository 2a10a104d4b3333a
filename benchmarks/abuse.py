"""
``python -m benchmarks.abuse [--checkout DIR] [--only NAME]... [--slowloris-seconds S]``

Repeats issue 9's abuse probes against a proxy started the way users run it
(``twistd -n --pidfile= openai-proxy``, from the checkout C{DIR}: default
this one; pass another checkout, e.g. the main branch, for a "before"
figure), with a misbehaving fake upstream and hostile clients in this
process, all on loopback, every loop bounded:

- ``slowloris``: 500 connections trickling one header line every 5 s while
  a normal client fetches C{/v1/models} every 100 ms; how many slowloris
  connections are still open at the end, and the normal client's p50/p99.
- ``uploads_chat``, ``uploads_embeddings``: 10 concurrent 40 MB JSON POSTs
  (holding a C{"moderation"} field) with a good key to a moderated path and
  to one that is not, then 10 with no key; the proxy's peak RSS, its RSS
  5 s later, the worst C{/healthz} latency meanwhile, and how many bytes
  the keyless clients got to send before their answer.
- ``gzip_bomb``: a moderated request whose upstream answers with 1 MiB of
  gzip that decodes to 1 GiB; peak RSS, worst C{/healthz} latency, status.
- ``big_event``: a moderated stream with one 10 MB SSE event; worst
  C{/healthz} latency (the reactor stall) and the moderation calls made.

Moderation uses the C{keywords} backend (no network).  Prints one JSON
object; timing figures are noisy on a shared machine, RSS figures are not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.probes import percentiles

_KEYWORDS_TERM = "forbidden-term-xyzzy"
_ABUSE = b"x-abuse"


# -- the misbehaving upstream ---------------------------------------------------


def _gzip_bomb(decoded: int) -> bytes:
    """One gzip member of C{decoded} spaces inside a JSON string (~1 KiB per MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [packer.compress(b'{"choices": [{"message": {"content": "')]
    block = b" " * (1 << 20)
    for _ in range(decoded // len(block)):
        parts.append(packer.compress(block))
    parts.append(packer.compress(b'"}}]}'))
    parts.append(packer.flush())
    return b"".join(parts)


def _big_event(size: int) -> bytes:
    text = ("Many words make a sentence. " * (size // 28 + 1))[:size]
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"


_SMALL = b'{"object": "list", "data": []}'


class Upstream(asyncio.Protocol):
    """Reads each request whole (bodies discarded) and answers per X-Abuse."""

    bomb = b""
    event = b""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need: int | None = None
        self.head = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                self.head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                self.need = _length(self.head)
            if len(self.buf) < self.need:
                return
            del self.buf[: self.need]
            self.need = None
            self._answer(self.head)

    def _answer(self, head: bytes) -> None:
        abuse = b""
        for line in head.split(b"\r\n"):
            if line.startswith(_ABUSE + b":"):
                abuse = line.split(b":", 1)[1].strip()
        if abuse == b"bomb":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n"
                % len(self.bomb)
                + self.bomb
            )
        elif abuse == b"event":
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % len(self.event) + self.event
            )
        else:
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(_SMALL) + _SMALL
            )


def _length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


# -- clients ----------------------------------------------------------------------


async def _exchange(port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send C{payload}; return what comes back until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()


def _get(path: str, key: bool = True) -> bytes:
    auth = f"Authorization: Bearer {procs.PROXY_KEY}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode()


def _post(path: str, body: bytes, *, key: bool = True, abuse: str = "") -> bytes:
    auth = f"Authorization: Bearer {procs.PROXY_KEY}\r\n" if key else ""
    extra = f"X-Abuse: {abuse}\r\n" if abuse else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


async def _timed(port: int, payload: bytes) -> float:
    started = time.perf_counter()
    await _exchange(port, payload, 30.0)
    return time.perf_counter() - started


class Watch:
    """
    Samples the proxy's RSS, and has L{benchmarks.healthwatch} (a process
    of its own) probe C{/healthz}, until stopped.
    """

    def __init__(self, proxy: procs.Proxy) -> None:
        self.proxy = proxy
        self.peak_rss_kb = proxy.rss()
        self.healthz: list[float] = []
        self._running = True
        self._prober = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.healthwatch", str(proxy.port)],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )

    async def run(self) -> None:
        while self._running:
            self.peak_rss_kb = max(self.peak_rss_kb, self.proxy.rss())
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._running = False
        # SIGTERM lets the probe in flight (maybe stalled the longest) finish.
        self._prober.terminate()
        out, _ = self._prober.communicate(timeout=60)
        for line in out.decode().split():
            if line != "error":
                self.healthz.append(float(line))

    def figures(self) -> dict[str, Any]:
        return {
            "peak_rss_mb": round(self.peak_rss_kb / 1024, 1),
            "healthz_max_ms": round(max(self.healthz, default=0.0) * 1000, 1),
            "healthz_probes": len(self.healthz),
        }


async def _watched(
    proxy: procs.Proxy, work: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    watch = Watch(proxy)
    task = asyncio.ensure_future(watch.run())
    before_rss = proxy.rss()
    cpu = proxy.cpu()
    started = time.perf_counter()
    result = await work()
    elapsed = time.perf_counter() - started
    watch.stop()
    await task
    return {
        "seconds": round(elapsed, 2),
        "rss_before_mb": round(before_rss / 1024, 1),
        **watch.figures(),
        "proxy_cpu_s": round(proxy.cpu() - cpu, 2),
        **result,
    }


# -- scenarios --------------------------------------------------------------------


async def slowloris(proxy: procs.Proxy, seconds: float) -> dict[str, Any]:
    count = 500
    open_: list[asyncio.StreamWriter] = []
    closed = 0

    async def attacker() -> None:
        nonlocal closed
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        except OSError:
            closed += 1
            return
        open_.append(writer)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            try:
                await asyncio.wait_for(reader.read(1), 5.0)
                closed += 1  # the server answered or closed: let go
                open_.remove(writer)
                writer.close()
                return
            except TimeoutError:
                pass
            n += 1
            try:
                writer.write(b"X-Trickle-%d: x\r\n" % n)
            except OSError:
                closed += 1
                open_.remove(writer)
                return

    latencies: list[float] = []

    async def normal() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                latencies.append(await _timed(proxy.port, _get("/v1/models")))
            except (TimeoutError, OSError):
                latencies.append(30.0)
            await asyncio.sleep(0.1)

    attackers = [asyncio.ensure_future(attacker()) for _ in range(count)]
    await normal()
    still_open, closed_by_proxy = len(open_), closed
    for writer in list(open_):
        writer.close()
    await asyncio.gather(*attackers, return_exceptions=True)
    return {
        "connections": count,
        "seconds": seconds,
        "still_open_at_end": still_open,
        "closed_by_proxy": closed_by_proxy,
        "normal_client_ms": percentiles(latencies),
    }


async def uploads(proxy: procs.Proxy, path: str) -> dict[str, Any]:
    size = 40 * 1024 * 1024
    body = (
        b'{"model": "m", "moderation": false, "messages": [{"role": "user", '
        b'"content": "' + b"a" * (size - 100) + b'"}]}'
    )

    async def keyed() -> dict[str, Any]:
        replies = await asyncio.gather(
            *[_exchange(proxy.port, _post(path, body), 120.0) for _ in range(10)],
            return_exceptions=True,
        )
        statuses = [
            r.split(b" ", 2)[1].decode() if isinstance(r, bytes) and r else repr(r)
            for r in replies
        ]
        return {"statuses": statuses}

    result = await _watched(proxy, keyed)
    await asyncio.sleep(5)
    result["rss_5s_after_mb"] = round(proxy.rss() / 1024, 1)

    async def keyless_one() -> int:
        # Sends the body in 1 MiB writes until answered or cut off.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        payload = _post(path, body, key=False)
        sent = 0
        try:
            for at in range(0, len(payload), 1 << 20):
                writer.write(payload[at : at + (1 << 20)])
                await writer.drain()
                sent += min(1 << 20, len(payload) - at)
                if reader.at_eof() or len(reader._buffer):  # type: ignore[attr-defined]
                    break
        except OSError:
            pass
        writer.close()
        return sent

    sent = await asyncio.gather(*[keyless_one() for _ in range(10)])
    result["keyless_mb_sent_before_refusal"] = [round(s / 2**20, 1) for s in sent]
    return result


async def gzip_bomb(proxy: procs.Proxy) -> dict[str, Any]:
    body = json.dumps({"model": "m", "messages": [], "moderation": True}).encode()

    async def one() -> dict[str, Any]:
        reply = await _exchange(
            proxy.port, _post("/v1/chat/completions", body, abuse="bomb"), 120.0
        )
        return {
            "status": reply.split(b" ", 2)[1].decode() if reply else "closed",
            "bytes_to_client": len(reply),
        }

    return await _watched(proxy, one)


async def big_event(proxy: procs.Proxy) -> dict[str, Any]:
    body = json.dumps(
        {"model": "m", "messages": [], "stream": True, "moderation": True}
    ).encode()
    before = await _moderation_calls(proxy.port)

    async def one() -> dict[str, Any]:
        reply = await _exchange(
            proxy.port, _post("/v1/chat/completions", body, abuse="event"), 300.0
        )
        return {"bytes_to_client": len(reply)}

    result = await _watched(proxy, one)
    result["moderation_calls"] = await _moderation_calls(proxy.port) - before
    return result


async def _moderation_calls(port: int) -> int:
    reply = await _exchange(port, _get("/metrics"))
    total = 0.0
    for line in reply.decode("utf-8", "replace").splitlines():
        if line.startswith("openai_proxy_moderation_calls_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# -- running ----------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    Upstream.bomb = _gzip_bomb(1 << 30)
    Upstream.event = _big_event(10 * 1024 * 1024)
    server = await asyncio.get_running_loop().create_server(Upstream, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    keywords = Path(tempfile.mkdtemp()) / "keywords.txt"
    keywords.write_text(_KEYWORDS_TERM + "\n")
    env = {
        "MODERATION_BACKEND": "keywords",
        "MODERATION_KEYWORDS_FILE": str(keywords),
        "ROUTES": "",
        "MODERATION_ON_ERROR": args.moderation_on_error,
        "PYTHONPATH": str(Path(args.checkout).resolve()),
    }
    results: dict[str, Any] = {
        "checkout": str(Path(args.checkout).resolve()),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "moderation_on_error": args.moderation_on_error,
        "cpus": len(os.sched_getaffinity(0)),
        "bomb_compressed_kb": round(len(Upstream.bomb) / 1024, 1),
    }
    plan: dict[str, Callable[[procs.Proxy], Awaitable[dict[str, Any]]]] = {
        "slowloris": lambda p: slowloris(p, args.slowloris_seconds),
        # A moderated path (the JSON must be parsed), and one that is not.
        "uploads_chat": lambda p: uploads(p, "/v1/chat/completions"),
        "uploads_embeddings": lambda p: uploads(p, "/v1/embeddings"),
        "gzip_bomb": gzip_bomb,
        "big_event": big_event,
    }
    for name, run in plan.items():
        if args.only and name not in args.only:
            continue
        proxy = await asyncio.to_thread(procs.start_proxy, upstream_port, 1, **env)
        try:
            results[name] = await run(proxy)
        except Exception as e:  # a broken probe must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            await asyncio.to_thread(procs.stop, proxy.proc)
    server.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.abuse")
    parser.add_argument("--checkout", default=str(procs.ROOT))
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--slowloris-seconds", type=float, default=40.0)
    # "pass" lets a capped stream through: the whole 10 MB event is relayed.
    parser.add_argument("--moderation-on-error", default="block")
    args = parser.parse_args(argv)
    procs.raise_nofile(4096)
    print(json.dumps(asyncio.run(_main(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
